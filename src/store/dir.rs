//! A local directory used as a bucket: key = relative path, `LastModified` = mtime.
//!
//! Writes go to a temporary file that is synced and renamed into place, so a reader never sees a
//! half-written object. Conditional writes are serialised across processes by an exclusive lock
//! on one lock file, which makes `If-None-Match`/`If-Match` atomic just as on S3. ETags are
//! content hashes: mtimes are too coarse to tell two quick writes apart.
//!
//! User metadata lives in a sidecar file under [`META_DIR`], named by a hash of the key. The
//! sidecar names the inode and ETag of the object it belongs to and counts only while both
//! match: a rename keeps the inode, so writing the sidecar first and renaming the object in
//! second makes the pair appear at once, and a sidecar left by a crash or by a later write
//! without metadata describes another inode and is ignored.

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
/// Directory (relative to the root) that holds metadata sidecars; never listed, never a key.
const META_DIR: &str = ".ocigc-meta";
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
    let first = key.split('/').next().unwrap_or_default();
    if first == TMP_DIR || first == META_DIR {
        return bad("reserved for the directory store's own files");
    }
    Ok(())
}

fn etag_of(body: &[u8]) -> String {
    etag_of_hash(&Sha256::digest(body))
}

fn etag_of_hash(hash: &[u8]) -> String {
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// The ETag of a file's content, hashed as it streams by rather than read into memory.
fn etag_of_reader(mut file: impl io::Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(etag_of_hash(&hasher.finalize()))
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
            if key == TMP_DIR || key == META_DIR {
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

/// What a sidecar in [`META_DIR`] records: the object it belongs to and its metadata.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sidecar {
    key: String,
    dev: u64,
    ino: u64,
    etag: String,
    metadata: Metadata,
}

/// Largest sidecar read back; S3 itself allows 2 KiB of user metadata.
const SIDECAR_LIMIT: u64 = 64 * 1024;

fn sidecar_path(root: &Path, key: &str) -> PathBuf {
    let hash = Sha256::digest(key.as_bytes());
    let name: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    root.join(META_DIR).join(name)
}

/// Installs the sidecar for the object about to be renamed in from `tmp`.
fn write_sidecar(
    root: &Path,
    key: &str,
    tmp: &Path,
    etag: &str,
    metadata: &Metadata,
) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt as _;
    let stat = fs::symlink_metadata(tmp).map_err(|e| io_err(Op::Put, key, e))?;
    let sidecar = Sidecar {
        key: key.to_string(),
        dev: stat.dev(),
        ino: stat.ino(),
        etag: etag.to_string(),
        metadata: metadata.clone(),
    };
    let body = serde_json::to_vec(&sidecar).map_err(|e| StoreError::Request {
        op: Op::Put,
        key: key.to_string(),
        message: format!("encoding metadata: {e}"),
    })?;
    let staged = write_tmp(root, key, &body)?;
    let dest = sidecar_path(root, key);
    install(&staged, &dest, key)
}

/// The metadata recorded for the object `key` whose inode is `(dev, ino)` and content `etag`;
/// empty when no sidecar describes exactly that object.
fn read_sidecar(root: &Path, key: &str, dev: u64, ino: u64, etag: &str) -> StoreResult<Metadata> {
    let file = match File::open(sidecar_path(root, key)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Metadata::new()),
        Err(e) => return Err(io_err(Op::Head, key, e)),
    };
    let mut body = Vec::new();
    io::Read::take(file, SIDECAR_LIMIT)
        .read_to_end(&mut body)
        .map_err(|e| io_err(Op::Head, key, e))?;
    // A sidecar that does not parse cannot describe this object: the write that left it died.
    let Ok(sidecar) = serde_json::from_slice::<Sidecar>(&body) else {
        return Ok(Metadata::new());
    };
    let ours = sidecar.key == key && sidecar.dev == dev && sidecar.ino == ino;
    Ok(if ours && sidecar.etag == etag {
        sidecar.metadata
    } else {
        Metadata::new()
    })
}

fn remove_sidecar(root: &Path, key: &str, op: Op) -> StoreResult<()> {
    match fs::remove_file(sidecar_path(root, key)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(op, key, e)),
    }
}

/// Takes the store-wide lock that serialises conditional writes and sidecar changes; dropping
/// the file releases it.
fn lock(root: &Path, key: &str, op: Op) -> StoreResult<File> {
    let dir = root.join(TMP_DIR);
    fs::create_dir_all(&dir).map_err(|e| io_err(op, key, e))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(|e| io_err(op, key, e))?;
    lock.lock().map_err(|e| io_err(op, key, e))?;
    Ok(lock)
}

fn current_etag(path: &Path, key: &str) -> StoreResult<Option<String>> {
    match File::open(path).and_then(etag_of_reader) {
        Ok(etag) => Ok(Some(etag)),
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
    metadata: &Metadata,
) -> StoreResult<PutOutcome> {
    let etag = etag_of(body);
    let tmp = write_tmp(root, key, body)?;
    let has_sidecar = sidecar_path(root, key).exists();
    if *condition == PutCondition::None && metadata.is_empty() && !has_sidecar {
        install(&tmp, dest, key)?;
        return Ok(PutOutcome::Written { etag });
    }
    let lock = lock(root, key, Op::Put)?;
    let holds = match (condition, current_etag(dest, key)?) {
        (PutCondition::IfNoneMatch, current) => current.is_none(),
        (PutCondition::IfMatch(want), Some(current)) => *want == current,
        (PutCondition::IfMatch(_), None) => false,
        (PutCondition::None, _) => true,
    };
    let outcome = if holds {
        // The sidecar goes first, naming the inode the rename is about to put in place.
        if !metadata.is_empty() {
            write_sidecar(root, key, &tmp, &etag, metadata)?;
        }
        install(&tmp, dest, key)?;
        if metadata.is_empty() {
            remove_sidecar(root, key, Op::Put)?;
        }
        Ok(PutOutcome::Written { etag })
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
    // Without a sidecar there is nothing to keep consistent; one written concurrently that
    // this delete misses names a removed inode and so is ignored.
    let lock = if sidecar_path(root, key).exists() {
        Some(lock(root, key, Op::Delete).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let removed = match fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e.to_string()),
    };
    if lock.is_some() {
        remove_sidecar(root, key, Op::Delete).map_err(|e| e.to_string())?;
    }
    drop(lock);
    if !removed {
        return Ok(());
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
        let root = self.root.clone();
        blocking(Op::Head, key, move || {
            use std::os::unix::fs::MetadataExt as _;
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(Op::Head, &k, e)),
            };
            let meta = file.metadata().map_err(|e| io_err(Op::Head, &k, e))?;
            if !meta.is_file() {
                return Ok(None);
            }
            let etag = etag_of_reader(file).map_err(|e| io_err(Op::Head, &k, e))?;
            let metadata = read_sidecar(&root, &k, meta.dev(), meta.ino(), &etag)?;
            let modified = meta.modified().map_err(|e| io_err(Op::Head, &k, e))?;
            let meta = ObjectMeta::new(k.clone(), meta.len(), modified, Some(etag));
            Ok(Some((meta, metadata)))
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
        let dest = self.path_of(key)?;
        let root = self.root.clone();
        let k = key.to_string();
        blocking(Op::Put, key, move || {
            put_sync(&root, &k, &dest, &body, &condition, &metadata)
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
            ".ocigc-meta",
            ".ocigc-meta/x",
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
                        put_sync(
                            &root,
                            &key,
                            &dest,
                            b"{}",
                            &PutCondition::None,
                            &Metadata::new(),
                        )
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

    fn meta(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    async fn head_meta(store: &DirStore, key: &str) -> Option<Metadata> {
        store
            .head_with_metadata(key)
            .await
            .expect("head")
            .map(|(_, m)| m)
    }

    /// Metadata comes back with the object it was written with, goes away when the object is
    /// rewritten without it or deleted, and never shows up as a key of its own.
    #[tokio::test]
    async fn metadata_follows_its_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        let link = meta(&[("x-serverless-registry-symlink", "other/blobs/sha256/aa")]);
        let put = |body: &'static [u8], m: Metadata| {
            store.put_with_metadata("r/blobs/x", Bytes::from_static(body), PutCondition::None, m)
        };
        put(b"link", link.clone()).await.expect("put");
        assert_eq!(head_meta(&store, "r/blobs/x").await, Some(link.clone()));

        let pages: Vec<_> = futures::TryStreamExt::try_collect(store.list(""))
            .await
            .expect("list");
        let keys: Vec<String> = pages.into_iter().flatten().map(|o| o.key).collect();
        assert_eq!(keys, ["r/blobs/x"], "the sidecar is not an object");

        // Same content, no metadata: the link is gone.
        put(b"link", Metadata::new()).await.expect("rewrite");
        assert_eq!(head_meta(&store, "r/blobs/x").await, Some(Metadata::new()));

        put(b"link", link.clone()).await.expect("put again");
        let other = meta(&[("timestamp", "1")]);
        let cond = store
            .put_with_metadata(
                "r/blobs/x",
                Bytes::from_static(b"link"),
                PutCondition::IfNoneMatch,
                other,
            )
            .await
            .expect("conditional put");
        assert_eq!(cond, PutOutcome::PreconditionFailed);
        assert_eq!(
            head_meta(&store, "r/blobs/x").await,
            Some(link.clone()),
            "a failed precondition leaves the metadata alone"
        );

        let failures = store
            .delete_batch(&["r/blobs/x".to_string()])
            .await
            .expect("delete");
        assert!(failures.is_empty(), "{failures:?}");
        assert!(!sidecar_path(dir.path(), "r/blobs/x").exists());
        // A plain object written later at the key has no metadata.
        put(b"link", Metadata::new()).await.expect("plain put");
        assert_eq!(head_meta(&store, "r/blobs/x").await, Some(Metadata::new()));
    }

    /// A sidecar that a crash left behind (here: one describing an earlier file at the key,
    /// restored after a plain rewrite) does not attach to the new object.
    #[tokio::test]
    async fn stale_sidecar_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        let link = meta(&[("x-serverless-registry-symlink", "t")]);
        store
            .put_with_metadata("k", Bytes::from_static(b"a"), PutCondition::None, link)
            .await
            .expect("put");
        let saved = fs::read(sidecar_path(dir.path(), "k")).expect("sidecar");
        store
            .put("k", Bytes::from_static(b"a"), PutCondition::None)
            .await
            .expect("plain put");
        fs::write(sidecar_path(dir.path(), "k"), saved).expect("restore sidecar");
        assert_eq!(head_meta(&store, "k").await, Some(Metadata::new()));
    }
}
