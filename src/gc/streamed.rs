//! The global blob space listed against its reachable set (SPEC §3.3, issue 12): its roots
//! are every repository's revision links, known before the blob space is listed, so the unit
//! is marked first and the listing then streams past the reachable set. A reachable blob is
//! counted and dropped as its page goes by; only what could be collected (unreferenced
//! blobs, keys that are no blobs) is held and planned. Peak memory follows the reachable
//! digests and the garbage, not the bucket.
//!
//! Only a unit that needs nothing of its listing to be marked is streamed: no referrer scan
//! over its unreferenced blobs, no placeholders, content at a key named by the digest alone
//! (`distribution`). `du` and `explain`, which report every blob, list it whole.

use std::collections::HashSet;

use super::cache::StreamedFingerprint;
use super::mark::Marker;
use super::parts;
use super::repo::{not_objects, without_dropped, RepoRun};
use crate::layout::{KeyKind, Repository, Roots};
use crate::report::Tally;

/// A unit whose listing is read while it is collected, after its roots are marked.
#[derive(Clone, Debug)]
pub(super) struct Streamed {
    /// The key space listed (the unit's prefix).
    pub(super) prefix: String,
    /// About how many parts it is listed in at once.
    pub(super) list_parts: usize,
}

/// What the streamed listing showed, beyond the objects it kept.
#[derive(Clone, Debug, Default)]
pub(super) struct StreamedListing {
    /// The whole listing's fingerprint (before the cache context is added).
    pub(super) fingerprint: StreamedFingerprint,
    /// Keys listed, and their bytes.
    pub(super) listed: Tally,
    /// Reachable blobs among them: decided (kept) and dropped.
    pub(super) reachable: Tally,
}

impl RepoRun<'_> {
    /// Marks `unit` from its roots (read here where the run has none), then lists it: a
    /// reachable blob is counted and dropped, anything else kept as the unit's objects from
    /// here on (in key order, as a listed unit's are). Intents and the trash are marked
    /// after, with the kept objects: what only they reach is held and decided, not dropped.
    /// A cached document whose object the listing shows changed is forgotten, and the unit
    /// marked and listed again.
    pub(super) async fn mark_and_list(
        &self,
        unit: &Repository,
        streamed: &Streamed,
        marker: &mut Marker<'_>,
        roots: &mut Option<Roots>,
        dropped: &HashSet<String>,
    ) -> Result<(Repository, StreamedListing), String> {
        let roots = match roots {
            Some(r) => r,
            None => {
                let read = self.layout.read_roots(self.store, unit).await;
                roots.insert(without_dropped(read.map_err(|e| e.to_string())?, dropped))
            }
        };
        marker.prime(std::mem::take(&mut roots.documents));
        let (mut kept, listing) = loop {
            marker.mark(&roots.descriptors).await.map_err(|e| e.0)?;
            let mut kept = Vec::new();
            let mut listing = StreamedListing::default();
            marker.begin_listing();
            let listed = parts::each_page(
                self.store,
                self.layout,
                &streamed.prefix,
                streamed.list_parts,
                self.concurrency,
                |page| {
                    for o in page {
                        listing.fingerprint.add(&o);
                        listing.listed.add(o.size);
                        // A defect fails the unit closed below, from the kept objects.
                        match self.layout.classify(unit, &o.key) {
                            KeyKind::Blob(d) if o.defect.is_none() && marker.listed(&d, &o) => {
                                listing.reachable.add(o.size)
                            }
                            _ => kept.push(o),
                        }
                    }
                },
            )
            .await;
            // Even a failed listing ends: the marker holds the reachable set whole again.
            let restart = marker.end_listing(listed.is_ok());
            listed.map_err(|e| format!("listing {}: {e}", streamed.prefix))?;
            if !restart {
                break (kept, listing);
            }
            // A cached document's object changed behind the cache: what it said decided what
            // this listing dropped. Marked and listed once more, from what the objects hold
            // now (no cached document is left to go stale), so that the run decides exactly
            // as one without the cache; it costs a second listing, only here.
            marker.restart();
        };
        if let Some(reason) = not_objects(&kept) {
            return Err(reason);
        }
        kept.sort_by(|a, b| a.key.cmp(&b.key));
        let unit = Repository {
            objects: kept,
            ..unit.clone()
        };
        Ok((unit, listing))
    }
}
