//! The `oci` layout: one OCI Image Layout per repository, as builders write it and as zot
//! stores it on S3: `<repo>/oci-layout`, `<repo>/index.json`, `<repo>/blobs/<alg>/<hex>`.
//!
//! zot with dedupe on S3 stores a digest's content once and a 0-byte *placeholder* at every
//! other repository's `blobs/sha256/<hex>`; which copy is the content lives only in zot's own
//! database. So a 0-byte blob whose digest is not that of empty content is a placeholder, its
//! content may be in any repository, and a content copy is kept while any placeholder of its
//! digest exists (the copies are "linked" blobs of their repository).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ContentCopy, KeyKind, Layout, Partition, Rejected, Repository, Roots, RootsError};
use crate::digest::Digest;
use crate::manifest;
use crate::store::{ObjectMeta, Store, StoreError};

const MARKER: &str = "oci-layout";
const INDEX: &str = "index.json";
const BLOBS: &str = "blobs/";
/// What ocigc writes as the marker of a repository it empties but must keep.
const MARKER_BODY: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// The index of a repository with no images.
const EMPTY_INDEX: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

/// Largest `index.json` ocigc reads (distribution caps manifests at 4 MiB; an index of a
/// repository with tens of thousands of tags is larger). A larger one fails its repository
/// closed.
pub const MAX_INDEX_SIZE: u64 = 16 * 1024 * 1024;

/// The digests of empty content: a 0-byte blob of one of these is real content, not a
/// placeholder.
const EMPTY_CONTENT: [&str; 2] = [
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
     47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
];

/// The digest of a blob key relative to its repository prefix (`blobs/<alg>/<hex>`).
fn blob_digest(rest: &str) -> Option<Digest> {
    let (alg, hex) = rest.strip_prefix(BLOBS)?.split_once('/')?;
    if hex.contains('/') {
        return None;
    }
    Digest::from_parts(alg, hex)
}

fn is_placeholder(object: &ObjectMeta, digest: &Digest) -> bool {
    // A defect (a FIFO, a symlink) lists as 0 bytes too, and is no placeholder.
    object.size == 0 && object.defect.is_none() && !EMPTY_CONTENT.contains(&digest.as_str())
}

/// The repository prefix whose `blobs/` holds `prefix`, if any: such a layout is content of
/// that repository, never a repository of its own.
fn reserving_owner<'p>(prefix: &'p str, prefixes: &HashMap<String, usize>) -> Option<&'p str> {
    prefix.match_indices(BLOBS).find_map(|(i, _)| {
        let owner = &prefix[..i];
        (owner.is_empty() || owner.ends_with('/'))
            .then_some(owner)
            .filter(|o| prefixes.contains_key(*o))
    })
}

/// The OCI Image Layout per repository.
#[derive(Clone, Copy, Debug, Default)]
pub struct OciLayout;

/// The longest registered repository prefix that owns `key`.
fn owner(key: &str, prefixes: &HashMap<String, usize>) -> Option<usize> {
    let mut end = key.len();
    while let Some(i) = key[..end].rfind('/') {
        if let Some(&idx) = prefixes.get(&key[..=i]) {
            return Some(idx);
        }
        end = i;
    }
    prefixes.get("").copied()
}

#[async_trait]
impl Layout for OciLayout {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition {
        let mut prefixes: HashMap<String, usize> = HashMap::new();
        for o in &objects {
            let prefix = if o.key == MARKER {
                Some(String::new())
            } else {
                o.key
                    .strip_suffix(MARKER)
                    .filter(|p| p.ends_with('/'))
                    .map(str::to_string)
            };
            if let Some(p) = prefix {
                let next = prefixes.len();
                prefixes.entry(p).or_insert(next);
            }
        }
        // Layouts inside another repository's `blobs/` are set apart first: their keys stay
        // with the repository whose blob space they are in (where they are no blobs, so
        // never swept), and nothing can delete them as a repository of their own.
        let reserved: HashMap<String, String> = prefixes
            .keys()
            .filter_map(|p| reserving_owner(p, &prefixes).map(|o| (p.clone(), o.to_string())))
            .collect();
        let mut kept: Vec<String> = prefixes
            .into_keys()
            .filter(|p| !reserved.contains_key(p))
            .collect();
        kept.sort_unstable();
        let prefixes: HashMap<String, usize> =
            kept.into_iter().enumerate().map(|(i, p)| (p, i)).collect();
        let reserved_index: HashMap<String, usize> = reserved
            .keys()
            .enumerate()
            .map(|(i, p)| (p.clone(), i))
            .collect();
        let mut reserved_counts = vec![0u64; reserved_index.len()];
        let mut groups: Vec<Vec<ObjectMeta>> = vec![Vec::new(); prefixes.len()];
        let mut unowned = 0;
        for o in objects {
            if !reserved_index.is_empty() {
                if let Some(i) = owner(&o.key, &reserved_index) {
                    reserved_counts[i] += 1;
                }
            }
            match owner(&o.key, &prefixes) {
                Some(i) => groups[i].push(o),
                None => unowned += 1,
            }
        }
        let mut partition = Partition {
            unowned,
            ..Partition::default()
        };
        for (prefix, i) in &reserved_index {
            let holder = reserved[prefix].trim_end_matches('/');
            partition.rejected.push(Rejected {
                prefix: prefix.clone(),
                reason: format!(
                    "inside the blobs/ of repository {holder:?}: content of that repository, \
                     not a repository"
                ),
                objects: reserved_counts[*i],
            });
        }
        for (prefix, idx) in prefixes {
            let objects = std::mem::take(&mut groups[idx]);
            let name = prefix.trim_end_matches('/').to_string();
            partition.add(name, prefix, objects);
        }
        // Sorted first, so that the content copy a placeholder is read from is the same one
        // every run.
        partition.repositories.sort_by(|a, b| a.name.cmp(&b.name));
        partition.placeholders = placeholders(&partition.repositories);
        partition.rejected.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        partition
    }

    fn is_placeholder(&self, object: &ObjectMeta, digest: &Digest) -> bool {
        is_placeholder(object, digest)
    }

    async fn linked_blobs(
        &self,
        _store: &dyn Store,
        partition: &Partition,
        _concurrency: usize,
    ) -> Result<HashMap<String, Vec<Digest>>, StoreError> {
        let mut linked: HashMap<String, Vec<Digest>> = HashMap::new();
        if partition.placeholders.is_empty() {
            return Ok(linked);
        }
        for repo in &partition.repositories {
            for (o, d) in blobs_of(repo) {
                if !is_placeholder(o, &d) && partition.placeholders.contains_key(&d) {
                    linked.entry(repo.name.clone()).or_default().push(d);
                }
            }
        }
        Ok(linked)
    }

    fn empty_repository(&self, repo: &Repository) -> Vec<(String, Bytes)> {
        vec![
            (
                format!("{}{INDEX}", repo.prefix),
                Bytes::from_static(EMPTY_INDEX),
            ),
            (
                format!("{}{MARKER}", repo.prefix),
                Bytes::from_static(MARKER_BODY),
            ),
        ]
    }

    fn repository_prefix(&self, name: &str) -> String {
        format!("{name}/")
    }

    fn classify(&self, repo: &Repository, key: &str) -> KeyKind {
        key.strip_prefix(repo.prefix.as_str())
            .and_then(blob_digest)
            .map_or(KeyKind::Other, KeyKind::Blob)
    }

    fn content_key(
        &self,
        repo: &Repository,
        digest: &Digest,
        _listed: Option<&ObjectMeta>,
    ) -> String {
        format!(
            "{}blobs/{}/{}",
            repo.prefix,
            digest.algorithm(),
            digest.hex()
        )
    }

    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError> {
        let key = format!("{}{INDEX}", repo.prefix);
        let invalid = |reason: String| RootsError::Invalid {
            key: key.clone(),
            reason,
        };
        let object = match store.get_capped(&key, MAX_INDEX_SIZE).await {
            Ok(o) => o,
            Err(StoreError::NotFound { .. }) => return Err(RootsError::Missing(key)),
            Err(e @ StoreError::TooLarge { .. }) => return Err(invalid(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let refs = manifest::references(&object.body).map_err(|e| invalid(e.to_string()))?;
        // umoci writes `"manifests": null` for a layout without images, and Go reads that as
        // an empty list; a document without the field is no index at all.
        if !refs.has_manifests {
            return Err(invalid("no \"manifests\" list".into()));
        }
        Ok(Roots {
            descriptors: refs.children,
            version: object.etag,
            ..Roots::default()
        })
    }

    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<String>, RootsError> {
        let key = format!("{}{INDEX}", repo.prefix);
        match store.head(&key).await? {
            Some(meta) => Ok(meta.etag),
            None => Err(RootsError::Missing(key)),
        }
    }

    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>> {
        let index = format!("{}{INDEX}", repo.prefix);
        let marker = format!("{}{MARKER}", repo.prefix);
        let (mut first, mut middle, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for o in &repo.objects {
            if o.key == index {
                first.push(o.clone());
            } else if o.key == marker {
                // The marker goes last: while any key remains, a resumed deletion still finds
                // the repository (and its keys cannot fall to a parent repository).
                last.push(o.clone());
            } else {
                middle.push(o.clone());
            }
        }
        vec![first, middle, last]
    }
}

/// The blobs of a repository with their digests.
fn blobs_of(repo: &Repository) -> impl Iterator<Item = (&ObjectMeta, Digest)> {
    repo.objects.iter().filter_map(|o| {
        let rest = o.key.strip_prefix(repo.prefix.as_str())?;
        blob_digest(rest).map(|d| (o, d))
    })
}

/// Every digest with a placeholder somewhere, and a content copy of it if there is one: two
/// passes, so that only digests with placeholders are ever held (not every blob's).
fn placeholders(repositories: &[Repository]) -> HashMap<Digest, Option<ContentCopy>> {
    let wanted: HashSet<Digest> = repositories
        .iter()
        .flat_map(blobs_of)
        .filter(|(o, d)| is_placeholder(o, d))
        .map(|(_, d)| d)
        .collect();
    let mut out: HashMap<Digest, Option<ContentCopy>> = HashMap::with_capacity(wanted.len());
    if wanted.is_empty() {
        return out;
    }
    for (o, d) in repositories.iter().flat_map(blobs_of) {
        if wanted.contains(&d) && !is_placeholder(o, &d) {
            out.entry(d).or_insert_with(|| {
                Some(ContentCopy {
                    key: o.key.clone(),
                    size: o.size,
                })
            });
        }
    }
    for d in wanted {
        out.entry(d).or_insert(None);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_object as obj;
    use super::*;

    fn keys(r: &Repository) -> Vec<&str> {
        let mut k: Vec<_> = r.objects.iter().map(|o| o.key.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn nested_and_colliding_prefixes() {
        let p = OciLayout.partition(
            [
                "team/app/oci-layout",
                "team/app/blobs/sha256/aa",
                "team/app/tools/oci-layout",
                "team/app/tools/blobs/sha256/bb",
                "team/app-edge/oci-layout",
                "team/app-edge/index.json",
                "team/README",
                "Bad/oci-layout",
                "Bad/blobs/sha256/cc",
            ]
            .map(obj)
            .to_vec(),
        );
        let names: Vec<_> = p.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["team/app", "team/app-edge", "team/app/tools"]);
        assert_eq!(
            keys(&p.repositories[0]),
            ["team/app/blobs/sha256/aa", "team/app/oci-layout"]
        );
        assert_eq!(
            keys(&p.repositories[2]),
            [
                "team/app/tools/blobs/sha256/bb",
                "team/app/tools/oci-layout"
            ]
        );
        assert_eq!(p.unowned, 1);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].prefix, "Bad/");
        assert_eq!(p.rejected[0].objects, 2);
    }

    #[test]
    fn placeholders_are_empty_objects_of_non_empty_digests() {
        let empty = |key: &str| ObjectMeta::new(key, 0, std::time::SystemTime::UNIX_EPOCH, None);
        let hex = "ab".repeat(32);
        let p = OciLayout.partition(vec![
            obj("a/oci-layout"),
            obj(&format!("a/blobs/sha256/{hex}")),
            obj("b/oci-layout"),
            empty(&format!("b/blobs/sha256/{hex}")),
            empty(&format!(
                "b/blobs/{}",
                EMPTY_CONTENT[0].replacen(':', "/", 1)
            )),
            empty(&format!(
                "b/blobs/{}",
                EMPTY_CONTENT[1].replacen(':', "/", 1)
            )),
            empty(&format!("b/blobs/sha256/{}", "cd".repeat(32))),
        ]);
        let with_copy = Digest::from_parts("sha256", &hex).expect("digest");
        let without = Digest::from_parts("sha256", &"cd".repeat(32)).expect("digest");
        assert_eq!(p.placeholders.len(), 2, "{:?}", p.placeholders);
        assert_eq!(
            p.placeholders[&with_copy].as_ref().map(|c| c.key.as_str()),
            Some(format!("a/blobs/sha256/{hex}").as_str())
        );
        assert_eq!(p.placeholders[&without], None);
        for d in EMPTY_CONTENT {
            assert!(Digest::parse(d).is_some(), "{d}");
        }
    }

    #[test]
    fn classify_blobs_only() {
        let repo = Repository {
            kind: Default::default(),
            name: "r".into(),
            prefix: "r/".into(),
            objects: vec![],
        };
        let hex = "ab".repeat(32);
        assert!(matches!(
            OciLayout.classify(&repo, &format!("r/blobs/sha256/{hex}")),
            KeyKind::Blob(_)
        ));
        for other in [
            "r/index.json".to_string(),
            "r/blobs/sha256/xyz".into(),
            format!("r/blobs/md5/{hex}"),
            format!("r/blobs/sha256/{hex}/extra"),
            format!("r/sub/blobs/sha256/{hex}"),
        ] {
            assert_eq!(OciLayout.classify(&repo, &other), KeyKind::Other, "{other}");
        }
    }
}
