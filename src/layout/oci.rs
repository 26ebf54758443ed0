//! The `oci` layout: one OCI Image Layout per repository, as builders write it and as zot
//! stores it on S3: `<repo>/oci-layout`, `<repo>/index.json`, `<repo>/blobs/<alg>/<hex>`.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{KeyKind, Layout, Partition, Repository, Roots, RootsError};
use crate::digest::Digest;
use crate::manifest;
use crate::store::{ObjectMeta, Store, StoreError};

const MARKER: &str = "oci-layout";
const INDEX: &str = "index.json";

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
        let mut groups: Vec<Vec<ObjectMeta>> = vec![Vec::new(); prefixes.len()];
        let mut unowned = 0;
        for o in objects {
            match owner(&o.key, &prefixes) {
                Some(i) => groups[i].push(o),
                None => unowned += 1,
            }
        }
        let mut partition = Partition {
            unowned,
            ..Partition::default()
        };
        for (prefix, idx) in prefixes {
            let objects = std::mem::take(&mut groups[idx]);
            let name = prefix.trim_end_matches('/').to_string();
            partition.add(name, prefix, objects);
        }
        partition.repositories.sort_by(|a, b| a.name.cmp(&b.name));
        partition.rejected.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        partition
    }

    fn repository_depends_on_bucket(&self) -> bool {
        // Registries that deduplicate (zot) leave a 0-byte placeholder in one repository for
        // content stored in another: the copy lives while a placeholder anywhere names it.
        true
    }

    fn repository_prefix(&self, name: &str) -> String {
        format!("{name}/")
    }

    fn classify(&self, repo: &Repository, key: &str) -> KeyKind {
        let Some(rest) = key
            .strip_prefix(repo.prefix.as_str())
            .and_then(|r| r.strip_prefix("blobs/"))
        else {
            return KeyKind::Other;
        };
        match rest.split_once('/') {
            Some((alg, hex)) if !hex.contains('/') => {
                Digest::from_parts(alg, hex).map_or(KeyKind::Other, KeyKind::Blob)
            }
            _ => KeyKind::Other,
        }
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
        let object = match store.get(&key).await {
            Ok(o) => o,
            Err(StoreError::NotFound { .. }) => return Err(RootsError::Missing(key)),
            Err(e) => return Err(e.into()),
        };
        let invalid = |reason: String| RootsError::Invalid {
            key: key.clone(),
            reason,
        };
        let body = &object.body;
        let has_manifests = serde_json::from_slice::<serde_json::Value>(body)
            .map_err(|e| invalid(e.to_string()))?
            .get("manifests")
            .is_some_and(serde_json::Value::is_array);
        if !has_manifests {
            return Err(invalid("no \"manifests\" array".into()));
        }
        let refs = manifest::references(body).map_err(|e| invalid(e.to_string()))?;
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
    fn classify_blobs_only() {
        let repo = Repository {
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
