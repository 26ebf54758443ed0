//! A local directory used as a bucket: key = relative path, `LastModified` = mtime.
//!
//! Writes go to a temporary file that is synced and renamed into place, so a reader never sees a
//! half-written object. Conditional writes are serialised across processes by an exclusive lock
//! on one lock file, which makes `If-None-Match`/`If-Match` atomic just as on S3. ETags are
//! content hashes: mtimes are too coarse to tell two quick writes apart.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest as _, Sha256};

use super::{
    DeleteFailure, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, Store, StoreError,
    StoreResult,
};

/// Directory (relative to the root) that holds temporary files and the lock; never listed.
const TMP_DIR: &str = ".ocigc-tmp";
const PAGE: usize = 1000;

/// A directory on the local file system used as a bucket.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens a directory as a bucket; it must exist.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<DirStore> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(DirStore { root }),
            Ok(_) => Err(request_err(Op::List, "", "is not a directory", &root)),
            Err(e) => Err(request_err(Op::List, "", &e.to_string(), &root)),
        }
    }

    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn request_err(op: Op, key: &str, message: &str, root: &Path) -> StoreError {
    StoreError::Request {
        op,
        key: key.to_string(),
        message: format!("{message} (directory {})", root.display()),
    }
}

fn io_err(op: Op, key: &str, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound {
            op,
            key: key.to_string(),
        }
    } else {
        StoreError::Request {
            op,
            key: key.to_string(),
            message: e.to_string(),
        }
    }
}

fn validate_key(key: &str) -> StoreResult<()> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return bad("empty, or starts or ends with '/'");
    }
    if key.contains('\0') {
        return bad("contains NUL");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("empty, '.' or '..' segment");
    }
    if key == TMP_DIR || key.starts_with(&format!("{TMP_DIR}/")) {
        return bad("reserved for the directory store's temporary files");
    }
    Ok(())
}

fn etag_of(body: &[u8]) -> String {
    let hash = Sha256::digest(body);
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

async fn blocking<T: Send + 'static>(
    op: Op,
    key: &str,
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Request {
            op,
            key: key.to_string(),
            message: format!("worker task failed: {e}"),
        })?
}

/// Walks `dir`, sending pages of objects whose key starts with `prefix`.
fn walk(
    root: &Path,
    start: &Path,
    prefix: &str,
    tx: &tokio::sync::mpsc::Sender<StoreResult<Vec<ObjectMeta>>>,
) -> Result<(), ()> {
    let mut page = Vec::with_capacity(PAGE);
    let mut sent_any = false;
    let mut stack = vec![start.to_path_buf()];
    let send = |item| tx.blocking_send(item).map_err(|_| ());
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return send(Err(io_err(Op::List, &dir.to_string_lossy(), e))),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => return send(Err(io_err(Op::List, &dir.to_string_lossy(), e))),
            };
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(key) = rel.to_str().map(str::to_string) else {
                // Not UTF-8: cannot be an S3 key; leaving it alone is the safe choice.
                continue;
            };
            if key == TMP_DIR {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Deleted between readdir and stat: a concurrent writer or collector.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return send(Err(io_err(Op::List, &key, e))),
            };
            if meta.is_dir() {
                if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                    stack.push(path);
                }
                continue;
            }
            if !meta.is_file() || !key.starts_with(prefix) {
                continue;
            }
            let last_modified = match meta.modified() {
                Ok(t) => t,
                Err(e) => return send(Err(io_err(Op::List, &key, e))),
            };
            page.push(ObjectMeta::new(key, meta.len(), last_modified, None));
            if page.len() == PAGE {
                send(Ok(std::mem::replace(&mut page, Vec::with_capacity(PAGE))))?;
                sent_any = true;
            }
        }
    }
    // Like S3, a listing is at least one (possibly empty) page.
    if !page.is_empty() || !sent_any {
        send(Ok(page))?;
    }
    Ok(())
}

fn write_tmp(root: &Path, key: &str, body: &[u8]) -> StoreResult<PathBuf> {
    let tmp_dir = root.join(TMP_DIR);
    fs::create_dir_all(&tmp_dir).map_err(|e| io_err(Op::Put, key, e))?;
    let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
    let mut f = File::create(&tmp).map_err(|e| io_err(Op::Put, key, e))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(Op::Put, key, e))?;
    Ok(tmp)
}

/// Renames `tmp` to `dest`, re-creating parents that a concurrent delete may have just pruned.
///
/// A prune can remove a parent between `mkdir` reporting "exists" and the check that it is a
/// directory, so `create_dir_all` may fail with `AlreadyExists` as well as `NotFound`; both mean
/// "try again", not "give up".
fn install(tmp: &Path, dest: &Path, key: &str) -> StoreResult<()> {
    const ATTEMPTS: usize = 16;
    let racing = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::AlreadyExists
        )
    };
    let mut last = None;
    for _ in 0..ATTEMPTS {
        if let Some(parent) = dest.parent() {
            match fs::create_dir_all(parent) {
                Ok(()) => {}
                Err(e) if racing(&e) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(io_err(Op::Put, key, e)),
            }
        }
        match fs::rename(tmp, dest) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(io_err(Op::Put, key, e)),
        }
    }
    let _ = fs::remove_file(tmp);
    Err(io_err(
        Op::Put,
        key,
        last.unwrap_or_else(|| io::Error::other("rename failed")),
    ))
}

fn current_etag(path: &Path, key: &str) -> StoreResult<Option<String>> {
    match fs::read(path) {
        Ok(body) => Ok(Some(etag_of(&body))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(Op::Put, key, e)),
    }
}

fn put_sync(
    root: &Path,
    key: &str,
    dest: &Path,
    body: &[u8],
    condition: &PutCondition,
) -> StoreResult<PutOutcome> {
    let etag = etag_of(body);
    let tmp = write_tmp(root, key, body)?;
    if *condition == PutCondition::None {
        install(&tmp, dest, key)?;
        return Ok(PutOutcome::Written { etag });
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(TMP_DIR).join(".lock"))
        .map_err(|e| io_err(Op::Put, key, e))?;
    lock.lock().map_err(|e| io_err(Op::Put, key, e))?;
    let holds = match (condition, current_etag(dest, key)?) {
        (PutCondition::IfNoneMatch, current) => current.is_none(),
        (PutCondition::IfMatch(want), Some(current)) => *want == current,
        (PutCondition::IfMatch(_), None) => false,
        (PutCondition::None, _) => true,
    };
    let outcome = if holds {
        install(&tmp, dest, key).map(|_| PutOutcome::Written { etag })
    } else {
        let _ = fs::remove_file(&tmp);
        Ok(PutOutcome::PreconditionFailed)
    };
    // Dropping the file releases the lock.
    drop(lock);
    outcome
}

fn delete_sync(root: &Path, key: &str) -> Result<(), String> {
    validate_key(key).map_err(|e| e.to_string())?;
    let path = root.join(key);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    }
    // Prune now-empty parents so a deleted repository leaves no directories behind; a parent
    // that is not empty (or that a writer just filled) simply stays.
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[async_trait]
impl Store for DirStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let root = self.root.clone();
        let prefix = prefix.to_string();
        // Walk from the deepest directory the prefix names; keys are filtered by the full prefix.
        let start = match prefix.rfind('/') {
            Some(i) => root.join(&prefix[..i]),
            None => root.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let _ = walk(&root, &start, &prefix, &tx);
        });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking(Op::Get, key, move || {
            let file = File::open(&path).map_err(|e| io_err(Op::Get, &k, e))?;
            let mut body = Vec::new();
            io::Read::take(file, limit.saturating_add(1))
                .read_to_end(&mut body)
                .map_err(|e| io_err(Op::Get, &k, e))?;
            if body.len() as u64 > limit {
                return Err(StoreError::TooLarge {
                    op: Op::Get,
                    key: k,
                    limit,
                });
            }
            Ok(Object {
                etag: Some(etag_of(&body)),
                body: Bytes::from(body),
            })
        })
        .await
    }

    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking(Op::Head, key, move || {
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(Op::Head, &k, e)),
            };
            let body = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(Op::Head, &k, e)),
            };
            let modified = meta.modified().map_err(|e| io_err(Op::Head, &k, e))?;
            let meta = ObjectMeta::new(k.clone(), meta.len(), modified, Some(etag_of(&body)));
            Ok(Some((meta, Metadata::new())))
        })
        .await
    }

    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
        metadata: Metadata,
    ) -> StoreResult<PutOutcome> {
        if !metadata.is_empty() {
            return Err(StoreError::Request {
                op: Op::Put,
                key: key.to_string(),
                message: "the directory store does not keep object metadata yet".into(),
            });
        }
        let dest = self.path_of(key)?;
        let root = self.root.clone();
        let k = key.to_string();
        blocking(Op::Put, key, move || {
            put_sync(&root, &k, &dest, &body, &condition)
        })
        .await
    }

    async fn server_time(&self) -> StoreResult<std::time::SystemTime> {
        // Modification times come from this host's clock, so the bucket clock is this host's.
        Ok(std::time::SystemTime::now())
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        let root = self.root.clone();
        let keys = keys.to_vec();
        let first = keys.first().cloned().unwrap_or_default();
        blocking(Op::Delete, &first, move || {
            Ok(keys
                .into_iter()
                .filter_map(|key| {
                    delete_sync(&root, &key)
                        .err()
                        .map(|message| DeleteFailure { key, message })
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "./a",
            ".ocigc-tmp/x",
            "a\0b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["a", "a/b/c", "repo/blobs/sha256/00", ".hidden/x"] {
            assert!(validate_key(good).is_ok(), "{good:?} should be accepted");
        }
    }

    /// A delete prunes empty parents; a put into the same directory at that moment must still
    /// succeed (it once failed with "File exists" when the directory vanished mid-create).
    #[test]
    fn puts_survive_concurrent_pruning() {
        const ROUNDS: usize = 2000;
        const WORKERS: usize = 4;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let root = root.clone();
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        let key = format!("_ocigc/clock/w{w}-{i}");
                        let dest = root.join(&key);
                        put_sync(&root, &key, &dest, b"{}", &PutCondition::None)
                            .map_err(|e| format!("put {key}: {e}"))?;
                        delete_sync(&root, &key).map_err(|e| format!("delete {key}: {e}"))?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for w in workers {
            let outcome = w.join().expect("worker thread");
            assert_eq!(outcome, Ok(()));
        }
        assert!(!root.join("_ocigc").exists(), "empty parents are pruned");
    }
}
