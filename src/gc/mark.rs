//! Marking: everything reachable from a repository's roots.
//!
//! Breadth-first over descriptors, reading each manifest once with bounded concurrency. Then
//! one pass over the small unreferenced blobs finds referrers that no index lists (a manifest
//! whose `subject` is reachable is reachable too, and so are its own referrers), and marking
//! continues from them until nothing changes.

use std::collections::{HashMap, HashSet};

use futures::{stream, StreamExt};

use crate::digest::Digest;
use crate::layout::{Layout, Repository, Roots};
use crate::manifest::{self, ContentKind, Descriptor, References, MAX_MANIFEST_SIZE};
use crate::store::{ObjectMeta, Store, StoreError};

/// The repository cannot be marked safely; nothing in it may be deleted this run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FailClosed(pub String);

/// What marking found.
#[derive(Debug, Default)]
pub struct Marked {
    /// Reachable digests (present in the bucket or not).
    pub reachable: HashSet<Digest>,
    /// Documents read.
    pub manifests_fetched: u64,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// Inputs that stay fixed while one repository is marked.
pub struct MarkContext<'a> {
    /// Where blobs are read from.
    pub store: &'a dyn Store,
    /// How digests map to keys.
    pub layout: &'a dyn Layout,
    /// The repository being marked.
    pub repo: &'a Repository,
    /// The repository's blobs by digest, from the listing.
    pub blobs: &'a HashMap<Digest, &'a ObjectMeta>,
    /// Reads in flight at most.
    pub concurrency: usize,
}

enum Read {
    /// Parsed references.
    Doc(References),
    /// Read, but not a document with references.
    Opaque,
    /// Not in the bucket.
    Missing,
}

impl MarkContext<'_> {
    async fn read(&self, digest: &Digest, must_parse: bool) -> Result<Read, FailClosed> {
        let key = self.layout.blob_key(self.repo, digest);
        let body = match self.store.get(&key).await {
            Ok(o) => o.body,
            Err(StoreError::NotFound { .. }) => return Ok(Read::Missing),
            // An unreadable document might reference anything: nothing is safe to delete.
            Err(e) => return Err(FailClosed(format!("cannot read {key}: {e}"))),
        };
        if body.len() as u64 > MAX_MANIFEST_SIZE && !must_parse {
            return Ok(Read::Opaque);
        }
        match manifest::references(&body) {
            Ok(refs) => Ok(Read::Doc(refs)),
            Err(e) if must_parse => Err(FailClosed(format!("manifest {digest} ({key}): {e}"))),
            Err(_) => Ok(Read::Opaque),
        }
    }

    async fn read_all(
        &self,
        wanted: Vec<(Digest, bool)>,
    ) -> Vec<(Digest, bool, Result<Read, FailClosed>)> {
        stream::iter(wanted)
            .map(|(d, must)| async move {
                let r = self.read(&d, must).await;
                (d, must, r)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await
    }
}

/// Marks everything reachable from `roots`.
pub async fn mark(ctx: &MarkContext<'_>, roots: &Roots) -> Result<Marked, FailClosed> {
    let mut out = Marked::default();
    // Documents already read: Some(references) or None for opaque blobs.
    let mut docs: HashMap<Digest, Option<References>> = HashMap::new();
    // Referrers found among unreferenced blobs, by subject.
    let mut referrers: HashMap<Digest, Vec<Descriptor>> = HashMap::new();
    let mut frontier: Vec<Descriptor> = roots.descriptors.clone();
    let mut scanned = false;

    loop {
        while !frontier.is_empty() {
            let mut next = Vec::new();
            let mut wanted = Vec::new();
            for d in frontier.drain(..) {
                if !out.reachable.insert(d.digest.clone()) {
                    continue;
                }
                if let Some(rs) = referrers.get(&d.digest) {
                    next.extend(rs.iter().cloned());
                }
                let kind = manifest::content_kind(d.media_type.as_deref());
                match docs.get(&d.digest) {
                    Some(Some(doc)) => {
                        next.extend(doc.children.iter().cloned());
                        continue;
                    }
                    // Read during the referrer scan and found unparseable or gone, but a
                    // manifest after all: the same failure as reading it here.
                    Some(None) if kind == ContentKind::Manifest => {
                        return Err(FailClosed(format!(
                            "manifest {} is missing or unparseable",
                            d.digest
                        )));
                    }
                    Some(None) => continue,
                    None => {}
                }
                let listed = ctx.blobs.get(&d.digest);
                let size = listed.map(|o| o.size).or(d.size);
                if manifest::should_read(kind, d.media_type.as_deref(), size) {
                    wanted.push((d.digest, kind == ContentKind::Manifest));
                } else if listed.is_none() {
                    out.warnings
                        .push(format!("blob {} is referenced but missing", d.digest));
                }
            }
            out.manifests_fetched += wanted.len() as u64;
            for (digest, must_parse, read) in ctx.read_all(wanted).await {
                match read? {
                    Read::Doc(refs) => {
                        next.extend(refs.children.iter().cloned());
                        if must_parse {
                            for u in &refs.unsupported {
                                out.warnings
                                    .push(format!("{digest}: unsupported reference kept: {u}"));
                            }
                        }
                        docs.insert(digest, Some(refs));
                    }
                    Read::Opaque => {
                        docs.insert(digest, None);
                    }
                    Read::Missing if must_parse => {
                        return Err(FailClosed(format!(
                            "manifest {digest} is referenced but missing"
                        )));
                    }
                    Read::Missing => {
                        out.warnings
                            .push(format!("blob {digest} is referenced but missing"));
                    }
                }
            }
            frontier = next;
        }
        if scanned {
            return Ok(out);
        }
        scanned = true;

        // Referrers may exist only as blobs. Read each small unreferenced blob once; manifests
        // with a `subject` are indexed by it, and marking resumes from reachable subjects.
        let candidates: Vec<(Digest, bool)> = ctx
            .blobs
            .iter()
            .filter(|(d, o)| {
                o.size <= MAX_MANIFEST_SIZE && !out.reachable.contains(*d) && !docs.contains_key(*d)
            })
            .map(|(d, _)| ((*d).clone(), false))
            .collect();
        out.manifests_fetched += candidates.len() as u64;
        for (digest, _, read) in ctx.read_all(candidates).await {
            match read? {
                Read::Doc(refs) => {
                    if let Some(subject) = &refs.subject {
                        referrers
                            .entry(subject.digest.clone())
                            .or_default()
                            .push(Descriptor {
                                media_type: None,
                                digest: digest.clone(),
                                size: None,
                            });
                    }
                    docs.insert(digest, Some(refs));
                }
                // Gone since the listing (another collector), or not a document.
                Read::Opaque | Read::Missing => {
                    docs.insert(digest, None);
                }
            }
        }
        for (subject, rs) in &referrers {
            if out.reachable.contains(subject) {
                frontier.extend(rs.iter().cloned());
            }
        }
    }
}
