//! A local directory used as a bucket: key = relative path, `LastModified` = mtime.
//!
//! Writes go to a temporary file that is synced and renamed into place, so a reader never sees a
//! half-written object. Conditional writes are serialised across processes by an exclusive lock
//! on one lock file, which makes `If-None-Match`/`If-Match` atomic just as on S3. ETags are
//! content hashes: mtimes are too coarse to tell two quick writes apart.
//!
//! Nothing below the root is reached through a symbolic link: every operation walks from a
//! descriptor of the root one component at a time with `O_NOFOLLOW | O_DIRECTORY` (`openat`,
//! `mkdirat`, `renameat`, `unlinkat`), holding each directory it passes, so replacing a
//! component by a symlink mid-operation cannot redirect it outside the bucket. Only regular
//! files are read: the entry is checked with `lstat`, opened `O_NOFOLLOW | O_NONBLOCK` and
//! checked again with `fstat` (the one window left: a device node swapped in between the two
//! checks gets opened, non-blocking, and then refused unread). A listing reports what it
//! cannot serve (symlinks, special files, unreadable directories, names that are not UTF-8)
//! as entries with a `defect` instead of skipping them, so that whatever owns them fails closed.
//!
//! User metadata lives in a sidecar file under [`META_DIR`], named by a hash of the key. The
//! sidecar names the inode and ETag of the object it belongs to and counts only while both
//! match: a rename keeps the inode, so writing the sidecar first and renaming the object in
//! second makes the pair appear at once, and a sidecar left by a crash or by a later write
//! without metadata describes another inode and is ignored.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::{
    DeleteFailure, Level, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, Store,
    StoreError, StoreResult,
};

/// Directory (relative to the root) that holds temporary files and the lock; never listed.
const TMP_DIR: &str = ".ocigc-tmp";
/// Directory (relative to the root) that holds metadata sidecars; never listed, never a key.
const META_DIR: &str = ".ocigc-meta";
const PAGE: usize = 1000;
/// Rounds of "create the parents, rename in" before a put racing with pruning gives up.
const ATTEMPTS: usize = 24;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// A directory on the local file system used as a bucket.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
    fd: Arc<OwnedFd>,
}

impl DirStore {
    /// Opens a directory as a bucket; it must exist. The root itself may be a symlink.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<DirStore> {
        let root = root.into();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rfs::open(&root, flags, Mode::empty()) {
            Ok(fd) => Ok(DirStore {
                root,
                fd: Arc::new(fd),
            }),
            Err(Errno::NOTDIR) => Err(StoreError::Request {
                op: Op::List,
                key: String::new(),
                message: format!("{} is not a directory", root.display()),
            }),
            Err(e) => Err(StoreError::Request {
                op: Op::List,
                key: String::new(),
                message: format!("opening {}: {e}", root.display()),
            }),
        }
    }
}

/// Why a step below the root was refused or failed.
#[derive(Debug)]
enum Refusal {
    /// The system call failed; `NOENT` means missing.
    Os(Errno),
    /// The entry at this relative path is a symbolic link.
    Symlink(String),
    /// The entry at this relative path is of a kind the operation cannot use.
    Kind(String, FileType),
}

impl Refusal {
    fn is_missing(&self) -> bool {
        matches!(self, Refusal::Os(Errno::NOENT))
    }

    /// Missing, or below a regular file: either way no key lies there.
    fn is_absent(&self) -> bool {
        matches!(self, Refusal::Os(Errno::NOENT | Errno::NOTDIR))
    }

    fn reason(&self) -> String {
        match self {
            Refusal::Os(e) => e.to_string(),
            Refusal::Symlink(path) => {
                format!("{path} is a symbolic link; the directory store never follows one")
            }
            Refusal::Kind(path, kind) => format!(
                "{path} is {}, which the directory store cannot use there",
                kind_name(*kind)
            ),
        }
    }

    fn into_store(self, op: Op, key: &str) -> StoreError {
        match self {
            Refusal::Os(Errno::NOENT) => StoreError::NotFound {
                op,
                key: key.to_string(),
            },
            other => StoreError::Request {
                op,
                key: key.to_string(),
                message: other.reason(),
            },
        }
    }
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "a file of unknown type",
    }
}

fn kind_of(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Size, modification time and identity of a `stat`.
struct Facts {
    size: u64,
    modified: SystemTime,
    dev: u64,
    ino: u64,
}

// The field types of `Stat` differ between targets; on some these casts are no-ops.
#[allow(clippy::unnecessary_cast)]
fn facts(st: &Stat) -> Facts {
    let secs = st.st_mtime as i64;
    let nanos = Duration::from_nanos(st.st_mtime_nsec as u64);
    let modified = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    };
    Facts {
        size: u64::try_from(st.st_size as i64).unwrap_or(0),
        modified,
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
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

/// A validated key split into its parent directories and its file name.
fn split_key(key: &str) -> StoreResult<(Vec<&str>, &str)> {
    validate_key(key)?;
    let mut parts: Vec<&str> = key.split('/').collect();
    let leaf = parts.pop().unwrap_or_default();
    Ok((parts, leaf))
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

fn io_request(op: Op, key: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Request {
        op,
        key: key.to_string(),
        message: format!("{what}: {e}"),
    }
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

/// Opens `name` in `parent` as a directory, refusing a symlink or anything else.
fn open_child_dir(parent: BorrowedFd<'_>, name: &str, path: &str) -> Result<OwnedFd, Refusal> {
    match rfs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
            Err(match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if kind_of(&st) == FileType::Symlink => Refusal::Symlink(path.to_string()),
                // An object where a directory would be: as on S3, nothing lies below it.
                Ok(st) if kind_of(&st) == FileType::RegularFile => Refusal::Os(Errno::NOTDIR),
                Ok(st) if kind_of(&st) != FileType::Directory => {
                    Refusal::Kind(path.to_string(), kind_of(&st))
                }
                _ => Refusal::Os(e),
            })
        }
        Err(e) => Err(Refusal::Os(e)),
    }
}

/// Opens the directories `comps` below the root one by one, never through a symlink, creating
/// missing ones when asked. Returns every directory on the way, deepest last.
fn open_dirs(root: BorrowedFd<'_>, comps: &[&str], create: bool) -> Result<Vec<OwnedFd>, Refusal> {
    let mut chain: Vec<OwnedFd> = Vec::with_capacity(comps.len());
    for (i, name) in comps.iter().enumerate() {
        let parent = chain.last().map_or(root, |fd| fd.as_fd());
        let path = comps[..=i].join("/");
        let mut made = false;
        let fd = loop {
            match open_child_dir(parent, name, &path) {
                Err(r) if r.is_missing() && create && !made => {
                    made = true;
                    // The umask trims this, as for `mkdir -p`.
                    match rfs::mkdirat(parent, *name, Mode::from_bits_truncate(0o777)) {
                        Ok(()) | Err(Errno::EXIST) => continue,
                        Err(e) => return Err(Refusal::Os(e)),
                    }
                }
                other => break other?,
            }
        };
        chain.push(fd);
    }
    Ok(chain)
}

/// The deepest directory of a chain from [`open_dirs`].
fn tip<'a>(root: BorrowedFd<'a>, chain: &'a [OwnedFd]) -> BorrowedFd<'a> {
    chain.last().map_or(root, |fd| fd.as_fd())
}

/// Opens `name` in `dir` for reading if, and only if, it is a regular file.
fn open_regular(dir: BorrowedFd<'_>, name: &str, path: &str) -> Result<(File, Stat), Refusal> {
    let check = |st: &Stat| match kind_of(st) {
        FileType::RegularFile => Ok(()),
        FileType::Symlink => Err(Refusal::Symlink(path.to_string())),
        other => Err(Refusal::Kind(path.to_string(), other)),
    };
    // Checked before opening, because opening a device or FIFO can block or act on it.
    check(&rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(Refusal::Os)?)?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = match rfs::openat(dir, name, flags | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::LOOP) => return Err(Refusal::Symlink(path.to_string())),
        Err(e) => return Err(Refusal::Os(e)),
    };
    // And after, because the entry may have been swapped in between.
    let st = rfs::fstat(&fd).map_err(Refusal::Os)?;
    check(&st)?;
    Ok((File::from(fd), st))
}

/// The regular file at `key`, with its `stat`; `None` if there is none (a directory at the key
/// is a prefix, not an object, as on S3).
fn open_object(root: BorrowedFd<'_>, key: &str, op: Op) -> StoreResult<Option<(File, Stat)>> {
    let (parents, leaf) = split_key(key)?;
    let chain = match open_dirs(root, &parents, false) {
        Ok(c) => c,
        Err(r) if r.is_absent() => return Ok(None),
        Err(r) => return Err(r.into_store(op, key)),
    };
    match open_regular(tip(root, &chain), leaf, key) {
        Ok(found) => Ok(Some(found)),
        Err(Refusal::Kind(_, FileType::Directory)) => Ok(None),
        Err(r) if r.is_missing() => Ok(None),
        Err(r) => Err(r.into_store(op, key)),
    }
}

/// A listing entry for something that is not an object. Its time is now, so nothing that goes
/// by age treats it as old, and a listing fingerprint with it never repeats.
fn defect(key: String, reason: String) -> ObjectMeta {
    let mut meta = ObjectMeta::new(key, 0, SystemTime::now(), None);
    meta.defect = Some(reason.into_boxed_str());
    meta
}

/// Reads a directory's entries; a parameter so that tests can make a directory unreadable,
/// which permissions cannot do for root.
type OpenListing<'a> = &'a (dyn Fn(&str, OwnedFd) -> io::Result<Dir> + Sync);

fn open_listing(_rel: &str, fd: OwnedFd) -> io::Result<Dir> {
    Ok(Dir::new(fd)?)
}

/// One listing in progress: the page being filled and where pages go.
struct Lister<'a> {
    prefix: &'a str,
    start_after: Option<&'a str>,
    tx: &'a tokio::sync::mpsc::Sender<StoreResult<Vec<ObjectMeta>>>,
    page: Vec<ObjectMeta>,
    sent_any: bool,
}

impl Lister<'_> {
    /// Adds an entry (unless it lies at or before `start_after`); `Err` once the receiver is
    /// gone.
    fn emit(&mut self, meta: ObjectMeta) -> Result<(), ()> {
        if self
            .start_after
            .is_some_and(|after| meta.key.as_str() <= after)
        {
            return Ok(());
        }
        self.page.push(meta);
        if self.page.len() == PAGE {
            let page = std::mem::replace(&mut self.page, Vec::with_capacity(PAGE));
            self.tx.blocking_send(Ok(page)).map_err(|_| ())?;
            self.sent_any = true;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ()> {
        // Like S3, a listing is at least one (possibly empty) page.
        if !self.page.is_empty() || !self.sent_any {
            self.tx.blocking_send(Ok(self.page)).map_err(|_| ())?;
        }
        Ok(())
    }

    /// True when nothing at `key` or below it can be listed: everything there is at or before
    /// `start_after`. Such a subtree is not read at all.
    fn passed(&self, key: &str) -> bool {
        let Some(after) = self.start_after else {
            return false;
        };
        // "k" < "k/" < "k/…": past all of them once `after` is beyond "k/" and not inside it.
        let dir = format!("{key}/");
        after > dir.as_str() && !after.starts_with(&dir)
    }
}

/// An entry of a directory being listed, still to visit.
struct Pending {
    name: std::ffi::CString,
    /// From the directory entry (or a `stat` where the file system does not say): it decides
    /// where the entry sorts, and is checked again when the entry is visited.
    is_dir: bool,
}

/// The order of keys among siblings: a directory `d` holds keys `d/…`, so it sorts as `d/`,
/// after a sibling file `d.x` and before `d0`. Names that are not UTF-8 sort as they list.
fn sibling_order(a: &Pending, b: &Pending) -> std::cmp::Ordering {
    let a_name = String::from_utf8_lossy(a.name.to_bytes());
    let b_name = String::from_utf8_lossy(b.name.to_bytes());
    let slash = |d: bool| if d { Some(&b'/') } else { None };
    let a_key = a_name.as_bytes().iter().chain(slash(a.is_dir));
    let b_key = b_name.as_bytes().iter().chain(slash(b.is_dir));
    a_key.cmp(b_key)
}

/// A directory whose entries are being listed: it stays open (for `statat` and `openat` of its
/// entries) until its last entry is visited; its entries wait smallest last.
struct Frame {
    rel: String,
    dir: Dir,
    pending: Vec<Pending>,
}

/// Joins a directory's relative path and an entry name into a key.
fn child_key(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// Reads the entries of `dir` that can hold listed keys, sorted to be visited in key order.
/// A read error below the root becomes a defect at the directory (what was read still lists);
/// at the root it fails the listing.
fn read_frame(out: &mut Lister<'_>, rel: String, mut dir: Dir) -> Result<Option<Frame>, ()> {
    let mut pending = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if rel.is_empty() => {
                send_err(out.tx, "", "reading the root", e)?;
                return Ok(None);
            }
            Err(e) => {
                out.emit(defect(
                    rel.clone(),
                    format!("directory cannot be read: {e}"),
                ))?;
                break;
            }
        };
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let lossy = String::from_utf8_lossy(bytes);
        if rel.is_empty() && (lossy == TMP_DIR || lossy == META_DIR) {
            continue;
        }
        let key = child_key(&rel, &lossy);
        let inside = key.starts_with(out.prefix);
        let above = out.prefix.starts_with(&format!("{key}/"));
        if (!inside && !above) || out.passed(&key) {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Unknown => match dir.fd() {
                Ok(fd) => match rfs::statat(fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => kind_of(&st) == FileType::Directory,
                    Err(Errno::NOENT) => continue,
                    // Visited as a file: the `stat` there reports it.
                    Err(_) => false,
                },
                Err(_) => false,
            },
            kind => kind == FileType::Directory,
        };
        if !is_dir && out.start_after.is_some_and(|after| key.as_str() <= after) {
            continue;
        }
        pending.push(Pending {
            name: entry.file_name().to_owned(),
            is_dir,
        });
    }
    // Descending, so that popping visits the smallest first.
    pending.sort_unstable_by(|a, b| sibling_order(b, a));
    Ok(Some(Frame { rel, dir, pending }))
}

/// Walks the tree from the deepest directory `prefix` names, sending pages of what it finds
/// under `prefix` after `start_after`, in key order. Holds the unvisited entries of the
/// directories on the current path, sorted, and skips subtrees entirely at or before
/// `start_after` without opening them.
fn walk(
    root: BorrowedFd<'_>,
    prefix: &str,
    start_after: Option<&str>,
    tx: &tokio::sync::mpsc::Sender<StoreResult<Vec<ObjectMeta>>>,
    read_dir: OpenListing<'_>,
) -> Result<(), ()> {
    let mut out = Lister {
        prefix,
        start_after,
        tx,
        page: Vec::with_capacity(PAGE),
        sent_any: false,
    };
    let start: Vec<&str> = match prefix.rfind('/') {
        Some(i) => prefix[..i].split('/').collect(),
        None => Vec::new(),
    };
    // No valid key lies below such a directory, and the store's own files are never listed.
    let unreachable = start
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
        || start
            .first()
            .is_some_and(|c| *c == TMP_DIR || *c == META_DIR);
    if unreachable {
        return out.finish();
    }
    let rel = start.join("/");
    let fd = match open_dirs(root, &start, false) {
        Ok(mut chain) => match chain.pop() {
            Some(fd) => fd,
            // A descriptor of its own: a duplicate would share the read position with
            // every other listing.
            None => match rfs::openat(root, ".", DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) => return send_err(tx, "", "opening the root", e),
            },
        },
        // The prefix runs through nothing, or through an object.
        Err(r) if r.is_absent() => return out.finish(),
        Err(r) => {
            out.emit(defect(rel, r.reason()))?;
            return out.finish();
        }
    };
    let mut frames = Vec::new();
    match read_dir(&rel, fd) {
        Ok(dir) => match read_frame(&mut out, rel, dir)? {
            Some(frame) => frames.push(frame),
            None => return Ok(()),
        },
        Err(e) if rel.is_empty() => return send_err(tx, "", "reading the root", e),
        Err(e) => out.emit(defect(rel, format!("directory cannot be read: {e}")))?,
    }
    while let Some(frame) = frames.last_mut() {
        let Some(entry) = frame.pending.pop() else {
            frames.pop();
            continue;
        };
        let dir_fd = match frame.dir.fd() {
            Ok(fd) => fd,
            Err(e) => {
                out.emit(defect(
                    frame.rel.clone(),
                    format!("directory cannot be read: {e}"),
                ))?;
                frames.pop();
                continue;
            }
        };
        let Some(key) = visit(&mut out, dir_fd, &frame.rel, &entry.name)? else {
            continue;
        };
        let Ok(name) = entry.name.to_str() else {
            continue;
        };
        let child = match open_child_dir(dir_fd, name, &key) {
            Ok(fd) => fd,
            // Removed since its parent was read (a concurrent delete).
            Err(r) if r.is_absent() => continue,
            Err(r) => {
                out.emit(defect(key, r.reason()))?;
                continue;
            }
        };
        match read_dir(&key, child) {
            Ok(dir) => {
                if let Some(frame) = read_frame(&mut out, key, dir)? {
                    frames.push(frame);
                }
            }
            Err(e) => out.emit(defect(key, format!("directory cannot be read: {e}")))?,
        }
    }
    out.finish()
}

fn send_err(
    tx: &tokio::sync::mpsc::Sender<StoreResult<Vec<ObjectMeta>>>,
    key: &str,
    what: &str,
    e: impl std::fmt::Display,
) -> Result<(), ()> {
    tx.blocking_send(Err(io_request(Op::List, key, what, e)))
        .map_err(|_| ())
}

/// What one directory entry is, for a listing.
enum Seen {
    /// A regular file: an object.
    Object(ObjectMeta),
    /// A directory, by key.
    Dir(String),
    /// Something that is not an object; reported as a defect.
    Defect(ObjectMeta),
    /// Nothing to list (gone since the directory was read).
    Nothing,
}

/// Classifies one entry of `dir` (at `rel`) by `lstat`.
fn classify(dir: BorrowedFd<'_>, rel: &str, name: &CStr) -> Seen {
    let key = child_key(rel, &String::from_utf8_lossy(name.to_bytes()));
    let Ok(utf8) = name.to_str() else {
        return Seen::Defect(defect(key, "the name is not UTF-8".into()));
    };
    let st = match rfs::statat(dir, utf8, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        // Removed since the directory was read: a concurrent delete.
        Err(Errno::NOENT) => return Seen::Nothing,
        Err(e) => return Seen::Defect(defect(key, format!("cannot stat: {e}"))),
    };
    match kind_of(&st) {
        FileType::RegularFile => {
            let f = facts(&st);
            Seen::Object(ObjectMeta::new(key, f.size, f.modified, None))
        }
        FileType::Directory => Seen::Dir(key),
        FileType::Symlink => Seen::Defect(defect(
            key,
            "a symbolic link; the directory store never follows one".into(),
        )),
        other => Seen::Defect(defect(
            key,
            format!("{}, not a regular file", kind_name(other)),
        )),
    }
}

/// Lists one directory entry: emits an object or a defect, or returns the key of a directory
/// to walk into.
fn visit(
    out: &mut Lister<'_>,
    dir: BorrowedFd<'_>,
    rel: &str,
    name: &CStr,
) -> Result<Option<String>, ()> {
    match classify(dir, rel, name) {
        // A file where the prefix needs a directory: nothing can lie below it.
        Seen::Object(meta) if !meta.key.starts_with(out.prefix) => Ok(None),
        // A symlink on the prefix's path hides what the prefix names: reported either way.
        Seen::Object(meta) | Seen::Defect(meta) => out.emit(meta).map(|()| None),
        Seen::Dir(key) => Ok(Some(key)),
        Seen::Nothing => Ok(None),
    }
}

/// One level below `prefix`: the entries of the one directory it names whose names continue
/// the prefix, sorted; each page holds at most [`PAGE`] objects and prefixes together.
fn level_sync(
    root: BorrowedFd<'_>,
    prefix: &str,
    read_dir: OpenListing<'_>,
) -> StoreResult<Vec<Level>> {
    let (rel, partial) = match prefix.rfind('/') {
        Some(i) => (&prefix[..i], &prefix[i + 1..]),
        None => ("", prefix),
    };
    let comps: Vec<&str> = if rel.is_empty() {
        Vec::new()
    } else {
        rel.split('/').collect()
    };
    let unreachable = comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
        || comps
            .first()
            .is_some_and(|c| *c == TMP_DIR || *c == META_DIR);
    let mut level = Level::default();
    if unreachable {
        return Ok(vec![level]);
    }
    let fd = match open_dirs(root, &comps, false) {
        Ok(mut chain) => match chain.pop() {
            Some(fd) => fd,
            None => rfs::openat(root, ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| io_request(Op::List, "", "opening the root", e))?,
        },
        Err(r) if r.is_absent() => return Ok(vec![level]),
        Err(r) => {
            level.objects.push(defect(rel.to_string(), r.reason()));
            return Ok(vec![level]);
        }
    };
    let mut dir = match read_dir(rel, fd) {
        Ok(d) => d,
        Err(e) if rel.is_empty() => return Err(io_request(Op::List, "", "reading the root", e)),
        Err(e) => {
            level.objects.push(defect(
                rel.to_string(),
                format!("directory cannot be read: {e}"),
            ));
            return Ok(vec![level]);
        }
    };
    while let Some(entry) = dir.read() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if rel.is_empty() => {
                return Err(io_request(Op::List, "", "reading the root", e))
            }
            Err(e) => {
                level.objects.push(defect(
                    rel.to_string(),
                    format!("directory cannot be read: {e}"),
                ));
                break;
            }
        };
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." || !bytes.starts_with(partial.as_bytes()) {
            continue;
        }
        if rel.is_empty() && (bytes == TMP_DIR.as_bytes() || bytes == META_DIR.as_bytes()) {
            continue;
        }
        let dir_fd = dir
            .fd()
            .map_err(|e| io_request(Op::List, rel, "reading a directory", e))?;
        match classify(dir_fd, rel, entry.file_name()) {
            Seen::Object(meta) | Seen::Defect(meta) => level.objects.push(meta),
            Seen::Dir(key) => level.prefixes.push(format!("{key}/")),
            Seen::Nothing => {}
        }
    }
    level.normalize();
    Ok(level.into_pages(PAGE))
}

/// A temporary file in [`TMP_DIR`], removed when dropped unless it was renamed away.
struct Staged {
    dir: OwnedFd,
    name: String,
    stat: Stat,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a successful rename the name is gone and this fails harmlessly.
        let _ = rfs::unlinkat(&self.dir, self.name.as_str(), AtFlags::empty());
    }
}

fn write_tmp(root: BorrowedFd<'_>, key: &str, body: &[u8]) -> StoreResult<Staged> {
    let mut chain = open_dirs(root, &[TMP_DIR], true).map_err(|r| r.into_store(Op::Put, key))?;
    let Some(dir) = chain.pop() else {
        return Err(io_request(Op::Put, key, "temporary directory", "missing"));
    };
    let name = uuid::Uuid::new_v4().to_string();
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
    let fd = rfs::openat(
        &dir,
        name.as_str(),
        flags | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o666),
    )
    .map_err(|e| io_request(Op::Put, key, "creating a temporary file", e))?;
    let mut file = File::from(fd);
    let stat = match rfs::fstat(&file) {
        Ok(st) => st,
        Err(e) => {
            let _ = rfs::unlinkat(&dir, name.as_str(), AtFlags::empty());
            return Err(io_request(Op::Put, key, "stat of a temporary file", e));
        }
    };
    // From here on, dropping `staged` removes the file again.
    let staged = Staged { dir, name, stat };
    file.write_all(body)
        .and_then(|_| file.sync_all())
        .map_err(|e| io_request(Op::Put, key, "writing a temporary file", e))?;
    Ok(staged)
}

/// Waits a little before retry `attempt` of a put that lost a race with pruning: nothing at
/// first, then doubling from 50 µs up to 50 ms (about half a second in all), so that a writer
/// is not starved by deleters emptying the same directory over and over.
fn backoff(attempt: usize) {
    if attempt < 4 {
        std::thread::yield_now();
    } else {
        let micros = 50u64 << (attempt - 4).min(10);
        std::thread::sleep(std::time::Duration::from_micros(micros));
    }
}

/// Renames `staged` to `key`, re-creating parents that a concurrent delete may have just
/// pruned. Refuses to replace anything but a regular file.
fn install(root: BorrowedFd<'_>, staged: &Staged, key: &str) -> StoreResult<()> {
    let (parents, leaf) = split_key(key)?;
    let mut last = Errno::NOENT;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            backoff(attempt);
        }
        let chain = match open_dirs(root, &parents, true) {
            Ok(c) => c,
            Err(Refusal::Os(e)) if e == Errno::NOENT => {
                last = e;
                continue;
            }
            Err(r) => return Err(r.into_store(Op::Put, key)),
        };
        let dir = tip(root, &chain);
        match rfs::statat(dir, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if kind_of(&st) == FileType::Symlink => {
                return Err(Refusal::Symlink(key.to_string()).into_store(Op::Put, key))
            }
            Ok(st) if kind_of(&st) != FileType::RegularFile => {
                return Err(Refusal::Kind(key.to_string(), kind_of(&st)).into_store(Op::Put, key))
            }
            Ok(_) | Err(Errno::NOENT) => {}
            Err(e) => return Err(io_request(Op::Put, key, "stat", e)),
        }
        match rfs::renameat(&staged.dir, staged.name.as_str(), dir, leaf) {
            Ok(()) => return Ok(()),
            // The parent was pruned after it was opened: open it again.
            Err(e) if e == Errno::NOENT => last = e,
            Err(e) => return Err(io_request(Op::Put, key, "rename", e)),
        }
    }
    Err(io_request(
        Op::Put,
        key,
        "rename kept racing with pruning",
        last,
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

fn sidecar_name(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The metadata directory, `None` if it does not exist yet.
fn meta_dir(root: BorrowedFd<'_>, create: bool, op: Op, key: &str) -> StoreResult<Option<OwnedFd>> {
    match open_dirs(root, &[META_DIR], create) {
        Ok(mut chain) => Ok(chain.pop()),
        Err(r) if r.is_missing() => Ok(None),
        Err(r) => Err(io_request(op, key, "metadata directory", r.reason())),
    }
}

fn sidecar_exists(root: BorrowedFd<'_>, key: &str, op: Op) -> StoreResult<bool> {
    let Some(dir) = meta_dir(root, false, op, key)? else {
        return Ok(false);
    };
    match rfs::statat(&dir, sidecar_name(key).as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(io_request(op, key, "metadata", e)),
    }
}

/// Installs the sidecar for the object about to be renamed in from `object`.
fn write_sidecar(
    root: BorrowedFd<'_>,
    key: &str,
    object: &Staged,
    etag: &str,
    metadata: &Metadata,
) -> StoreResult<()> {
    let f = facts(&object.stat);
    let sidecar = Sidecar {
        key: key.to_string(),
        dev: f.dev,
        ino: f.ino,
        etag: etag.to_string(),
        metadata: metadata.clone(),
    };
    let body = serde_json::to_vec(&sidecar)
        .map_err(|e| io_request(Op::Put, key, "encoding metadata", e))?;
    let staged = write_tmp(root, key, &body)?;
    let Some(dir) = meta_dir(root, true, Op::Put, key)? else {
        return Err(io_request(Op::Put, key, "metadata directory", "missing"));
    };
    rfs::renameat(
        &staged.dir,
        staged.name.as_str(),
        &dir,
        sidecar_name(key).as_str(),
    )
    .map_err(|e| io_request(Op::Put, key, "installing metadata", e))
}

/// The metadata recorded for the object `key` whose `stat` is `st` and content `etag`; empty
/// when no sidecar describes exactly that object.
fn read_sidecar(root: BorrowedFd<'_>, key: &str, st: &Stat, etag: &str) -> StoreResult<Metadata> {
    let Some(dir) = meta_dir(root, false, Op::Head, key)? else {
        return Ok(Metadata::new());
    };
    let name = sidecar_name(key);
    let file = match open_regular(dir.as_fd(), &name, &format!("{META_DIR}/{name}")) {
        Ok((file, _)) => file,
        Err(r) if r.is_missing() => return Ok(Metadata::new()),
        Err(r) => return Err(io_request(Op::Head, key, "metadata", r.reason())),
    };
    let mut body = Vec::new();
    io::Read::take(file, SIDECAR_LIMIT)
        .read_to_end(&mut body)
        .map_err(|e| io_request(Op::Head, key, "reading metadata", e))?;
    // A sidecar that does not parse cannot describe this object: the write that left it died.
    let Ok(sidecar) = serde_json::from_slice::<Sidecar>(&body) else {
        return Ok(Metadata::new());
    };
    let f = facts(st);
    let ours = sidecar.key == key && sidecar.dev == f.dev && sidecar.ino == f.ino;
    Ok(if ours && sidecar.etag == etag {
        sidecar.metadata
    } else {
        Metadata::new()
    })
}

fn remove_sidecar(root: BorrowedFd<'_>, key: &str, op: Op) -> StoreResult<()> {
    let Some(dir) = meta_dir(root, false, op, key)? else {
        return Ok(());
    };
    match rfs::unlinkat(&dir, sidecar_name(key).as_str(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(io_request(op, key, "removing metadata", e)),
    }
}

/// Takes the store-wide lock that serialises conditional writes and sidecar changes; dropping
/// the file releases it.
fn lock(root: BorrowedFd<'_>, key: &str, op: Op) -> StoreResult<File> {
    let mut chain = open_dirs(root, &[TMP_DIR], true).map_err(|r| r.into_store(op, key))?;
    let Some(dir) = chain.pop() else {
        return Err(io_request(op, key, "temporary directory", "missing"));
    };
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let fd = rfs::openat(
        &dir,
        ".lock",
        flags | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o666),
    )
    .map_err(|e| io_request(op, key, "opening the lock file", e))?;
    let st = rfs::fstat(&fd).map_err(|e| io_request(op, key, "lock file", e))?;
    if kind_of(&st) != FileType::RegularFile {
        return Err(io_request(op, key, "lock file", kind_name(kind_of(&st))));
    }
    let lock = File::from(fd);
    lock.lock()
        .map_err(|e| io_request(op, key, "taking the lock", e))?;
    Ok(lock)
}

/// The ETag of the object at `key` now, `None` if there is none.
fn current_etag(root: BorrowedFd<'_>, key: &str) -> StoreResult<Option<String>> {
    match open_object(root, key, Op::Put)? {
        Some((file, _)) => etag_of_reader(file)
            .map(Some)
            .map_err(|e| io_request(Op::Put, key, "reading", e)),
        None => Ok(None),
    }
}

fn put_sync(
    root: BorrowedFd<'_>,
    key: &str,
    body: &[u8],
    condition: &PutCondition,
    metadata: &Metadata,
) -> StoreResult<PutOutcome> {
    validate_key(key)?;
    let etag = etag_of(body);
    let staged = write_tmp(root, key, body)?;
    let has_sidecar = sidecar_exists(root, key, Op::Put)?;
    if *condition == PutCondition::None && metadata.is_empty() && !has_sidecar {
        install(root, &staged, key)?;
        return Ok(PutOutcome::Written { etag });
    }
    let lock = lock(root, key, Op::Put)?;
    let holds = match condition {
        PutCondition::None => true,
        PutCondition::IfNoneMatch => current_etag(root, key)?.is_none(),
        PutCondition::IfMatch(want) => current_etag(root, key)?.as_ref() == Some(want),
    };
    if !holds {
        return Ok(PutOutcome::PreconditionFailed);
    }
    // The sidecar goes first, naming the inode the rename is about to put in place.
    if !metadata.is_empty() {
        write_sidecar(root, key, &staged, &etag, metadata)?;
    }
    install(root, &staged, key)?;
    if metadata.is_empty() {
        remove_sidecar(root, key, Op::Put)?;
    }
    drop(lock);
    Ok(PutOutcome::Written { etag })
}

/// The parent directories of the last key a batch of deletes touched, kept open for the next
/// key: most keys of a batch share their parent directory.
type ParentCache = Option<(Vec<String>, Vec<OwnedFd>)>;

fn delete_sync(root: BorrowedFd<'_>, key: &str, cache: &mut ParentCache) -> StoreResult<()> {
    let (parents, leaf) = split_key(key)?;
    // Without a sidecar there is nothing to keep consistent; one written concurrently that
    // this delete misses names a removed inode and so is ignored.
    let lock = if sidecar_exists(root, key, Op::Delete)? {
        Some(lock(root, key, Op::Delete)?)
    } else {
        None
    };
    if cache.as_ref().is_none_or(|(p, _)| *p != parents) {
        *cache = match open_dirs(root, &parents, false) {
            Ok(c) => Some((parents.iter().map(|p| p.to_string()).collect(), c)),
            Err(r) if r.is_absent() => None,
            Err(r) => return Err(r.into_store(Op::Delete, key)),
        };
    }
    let chain = cache.as_ref().map(|(_, c)| c);
    let mut removed = false;
    if let Some(chain) = &chain {
        let dir = tip(root, chain);
        match rfs::statat(dir, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if kind_of(&st) == FileType::Symlink => {
                return Err(Refusal::Symlink(key.to_string()).into_store(Op::Delete, key))
            }
            Ok(st) if kind_of(&st) != FileType::RegularFile => {
                return Err(Refusal::Kind(key.to_string(), kind_of(&st)).into_store(Op::Delete, key))
            }
            Ok(_) => match rfs::unlinkat(dir, leaf, AtFlags::empty()) {
                Ok(()) => removed = true,
                Err(Errno::NOENT) => {}
                Err(e) => return Err(io_request(Op::Delete, key, "unlink", e)),
            },
            Err(Errno::NOENT) => {}
            Err(e) => return Err(io_request(Op::Delete, key, "stat", e)),
        }
    }
    if lock.is_some() {
        remove_sidecar(root, key, Op::Delete)?;
    }
    drop(lock);
    let Some(chain) = chain.filter(|_| removed) else {
        return Ok(());
    };
    // Prune now-empty parents so a deleted repository leaves no directories behind; a parent
    // that is not empty (or that a writer just filled) simply stays. `rmdir` never follows a
    // symlink, and each parent is named relative to the directory held above it.
    let mut pruned = false;
    for i in (0..chain.len()).rev() {
        let above = if i == 0 { root } else { chain[i - 1].as_fd() };
        if rfs::unlinkat(above, parents[i], AtFlags::REMOVEDIR).is_err() {
            break;
        }
        pruned = true;
    }
    if pruned {
        // A removed directory must not be written through again; the next key reopens.
        *cache = None;
    }
    Ok(())
}

#[async_trait]
impl Store for DirStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let root = Arc::clone(&self.fd);
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let _ = walk(
                root.as_fd(),
                &prefix,
                start_after.as_deref(),
                &tx,
                &open_listing,
            );
        });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        let root = Arc::clone(&self.fd);
        let owned = prefix.to_string();
        let read = blocking(Op::List, prefix, move || {
            level_sync(root.as_fd(), &owned, &open_listing)
        });
        Box::pin(
            futures::stream::once(read)
                .map(|pages| match pages {
                    Ok(pages) => futures::stream::iter(pages.into_iter().map(Ok)).left_stream(),
                    Err(e) => futures::stream::iter([Err(e)]).right_stream(),
                })
                .flatten(),
        )
    }

    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        let root = Arc::clone(&self.fd);
        let k = key.to_string();
        blocking(Op::Get, key, move || {
            let Some((file, st)) = open_object(root.as_fd(), &k, Op::Get)? else {
                return Err(StoreError::NotFound {
                    op: Op::Get,
                    key: k,
                });
            };
            let too_large = || StoreError::TooLarge {
                op: Op::Get,
                key: k.clone(),
                limit,
            };
            if facts(&st).size > limit {
                return Err(too_large());
            }
            // The file may grow after the `stat`: the read stays capped all the same.
            let mut body = Vec::new();
            io::Read::take(file, limit.saturating_add(1))
                .read_to_end(&mut body)
                .map_err(|e| io_request(Op::Get, &k, "reading", e))?;
            if body.len() as u64 > limit {
                return Err(too_large());
            }
            Ok(Object {
                etag: Some(etag_of(&body)),
                body: Bytes::from(body),
            })
        })
        .await
    }

    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        let root = Arc::clone(&self.fd);
        let k = key.to_string();
        blocking(Op::Head, key, move || {
            let Some((file, st)) = open_object(root.as_fd(), &k, Op::Head)? else {
                return Ok(None);
            };
            let etag = etag_of_reader(file).map_err(|e| io_request(Op::Head, &k, "reading", e))?;
            let metadata = read_sidecar(root.as_fd(), &k, &st, &etag)?;
            let f = facts(&st);
            let meta = ObjectMeta::new(k.clone(), f.size, f.modified, Some(etag));
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
        validate_key(key)?;
        let root = Arc::clone(&self.fd);
        let k = key.to_string();
        blocking(Op::Put, key, move || {
            put_sync(root.as_fd(), &k, &body, &condition, &metadata)
        })
        .await
    }

    async fn server_time(&self) -> StoreResult<std::time::SystemTime> {
        // Modification times come from this host's clock, so the bucket clock is this host's.
        Ok(std::time::SystemTime::now())
    }

    fn answered_time(&self) -> Option<(std::time::SystemTime, tokio::time::Instant)> {
        // The host's clock is the store's: known without a request.
        Some((std::time::SystemTime::now(), tokio::time::Instant::now()))
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        let root = Arc::clone(&self.fd);
        let keys = keys.to_vec();
        let first = keys.first().cloned().unwrap_or_default();
        blocking(Op::Delete, &first, move || {
            let mut cache = None;
            Ok(keys
                .into_iter()
                .filter_map(|key| {
                    delete_sync(root.as_fd(), &key, &mut cache)
                        .err()
                        .map(|e| DeleteFailure {
                            key,
                            message: e.to_string(),
                        })
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
        let store = DirStore::open(dir.path()).expect("open");
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let root = Arc::clone(&store.fd);
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        let key = format!("_ocigc/clock/w{w}-{i}");
                        put_sync(
                            root.as_fd(),
                            &key,
                            b"{}",
                            &PutCondition::None,
                            &Metadata::new(),
                        )
                        .map_err(|e| format!("put {key}: {e}"))?;
                        delete_sync(root.as_fd(), &key, &mut None)
                            .map_err(|e| format!("delete {key}: {e}"))?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for w in workers {
            let outcome = w.join().expect("worker thread");
            assert_eq!(outcome, Ok(()));
        }
        assert!(
            !dir.path().join("_ocigc").exists(),
            "empty parents are pruned"
        );
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
        let sidecar = dir.path().join(META_DIR).join(sidecar_name("r/blobs/x"));
        assert!(
            !sidecar.exists(),
            "a rewrite without metadata removes the sidecar"
        );

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
        assert!(!dir
            .path()
            .join(META_DIR)
            .join(sidecar_name("r/blobs/x"))
            .exists());
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
        let sidecar = dir.path().join(META_DIR).join(sidecar_name("k"));
        let saved = std::fs::read(&sidecar).expect("sidecar");
        store
            .put("k", Bytes::from_static(b"a"), PutCondition::None)
            .await
            .expect("plain put");
        std::fs::write(&sidecar, saved).expect("restore sidecar");
        assert_eq!(head_meta(&store, "k").await, Some(Metadata::new()));
    }

    async fn listing(store: &DirStore, prefix: &str) -> Vec<ObjectMeta> {
        let pages: Vec<_> = futures::TryStreamExt::try_collect(store.list(prefix))
            .await
            .expect("list");
        let mut all: Vec<ObjectMeta> = pages.into_iter().flatten().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    fn defects(listed: &[ObjectMeta]) -> Vec<(String, String)> {
        listed
            .iter()
            .filter_map(|o| Some((o.key.clone(), o.defect.as_deref()?.to_string())))
            .collect()
    }

    fn objects(listed: &[ObjectMeta]) -> Vec<String> {
        listed
            .iter()
            .filter(|o| o.defect.is_none())
            .map(|o| o.key.clone())
            .collect()
    }

    /// Every file and directory under `dir`, with each file's content, to show it unchanged.
    fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                let name = p.strip_prefix(dir).expect("below").display().to_string();
                if p.is_dir() {
                    out.push((name + "/", Vec::new()));
                    stack.push(p);
                } else {
                    out.push((name, std::fs::read(&p).expect("read")));
                }
            }
        }
        out.sort();
        out
    }

    /// A bucket with symlinks to a directory outside it, as a repository, as `_ocigc`, as the
    /// store's temporary directory and as an object: no operation reads, writes or deletes
    /// anything outside.
    #[tokio::test]
    async fn symlinks_are_never_followed() {
        use std::os::unix::fs::symlink;
        let bucket = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(outside.path().join("blobs")).expect("mkdir");
        std::fs::write(outside.path().join("blobs/secret"), b"outside").expect("write");
        std::fs::write(outside.path().join("index.json"), b"{}").expect("write");
        let before = snapshot(outside.path());
        let b = bucket.path();
        std::fs::create_dir_all(b.join("real")).expect("mkdir");
        std::fs::write(b.join("real/ok"), b"ok").expect("write");
        symlink(outside.path(), b.join("linked")).expect("symlink");
        symlink(outside.path(), b.join("_ocigc")).expect("symlink");
        symlink(outside.path().join("index.json"), b.join("real/leaf")).expect("symlink");
        let store = DirStore::open(b).expect("open");

        for key in ["linked/blobs/secret", "real/leaf", "_ocigc/index.json"] {
            let got = store.get(key).await;
            assert!(
                matches!(&got, Err(StoreError::Request { message, .. }) if message.contains("symbolic link")),
                "get {key}: {got:?}"
            );
            let head = store.head(key).await;
            assert!(head.is_err(), "head {key}: {head:?}");
        }
        for key in [
            "linked/blobs/new",
            "linked/index.json",
            "_ocigc/deleting/repo",
            "real/leaf",
        ] {
            for cond in [PutCondition::None, PutCondition::IfNoneMatch] {
                let put = store
                    .put(key, Bytes::from_static(b"overwritten"), cond.clone())
                    .await;
                assert!(put.is_err(), "put {key} {cond:?}: {put:?}");
            }
        }
        let failures = store
            .delete_batch(&[
                "linked/blobs/secret".to_string(),
                "linked/index.json".to_string(),
                "_ocigc/index.json".to_string(),
                "real/leaf".to_string(),
            ])
            .await
            .expect("delete");
        assert_eq!(failures.len(), 4, "{failures:?}");
        assert_eq!(
            snapshot(outside.path()),
            before,
            "outside the bucket changed"
        );
        assert!(b.join("real/leaf").is_symlink(), "the link itself stays");

        let all = listing(&store, "").await;
        assert_eq!(objects(&all), ["real/ok"]);
        let found: Vec<String> = defects(&all).into_iter().map(|(k, _)| k).collect();
        assert_eq!(found, ["_ocigc", "linked", "real/leaf"]);
        // Listing from inside the link, as delete-repo does, reports the link.
        for prefix in ["linked/", "linked/blobs/", "_ocigc/deleting/"] {
            let under = listing(&store, prefix).await;
            assert!(objects(&under).is_empty(), "{prefix}: {under:?}");
            assert_eq!(defects(&under).len(), 1, "{prefix}: {under:?}");
        }

        // The store's own temporary directory as a link: writes fail instead of landing outside.
        std::fs::remove_dir_all(b.join(TMP_DIR)).ok();
        symlink(outside.path(), b.join(TMP_DIR)).expect("symlink");
        let put = store
            .put("real/new", Bytes::from_static(b"x"), PutCondition::None)
            .await;
        assert!(put.is_err(), "{put:?}");
        assert_eq!(
            snapshot(outside.path()),
            before,
            "outside the bucket changed"
        );
    }

    /// FIFOs and devices are refused without blocking or reading; a listing reports them.
    #[tokio::test]
    async fn only_regular_files_are_read() {
        use std::os::unix::fs::symlink;
        let bucket = tempfile::tempdir().expect("tempdir");
        let b = bucket.path();
        std::fs::create_dir_all(b.join("r")).expect("mkdir");
        let store = DirStore::open(b).expect("open");
        let dir = rfs::open(b.join("r"), DIR_FLAGS, Mode::empty()).expect("open r");
        rfs::mknodat(
            &dir,
            "fifo",
            FileType::Fifo,
            Mode::from_bits_truncate(0o644),
            0,
        )
        .expect("mkfifo");
        symlink("/dev/zero", b.join("r/zero-link")).expect("symlink");
        let mut special = vec!["r/fifo", "r/zero-link"];
        // A real device node needs CAP_MKNOD; without it the link to /dev/zero stands in.
        let made = rfs::mknodat(
            &dir,
            "zero",
            FileType::CharacterDevice,
            Mode::from_bits_truncate(0o644),
            rfs::makedev(1, 5),
        );
        if made.is_ok() {
            special.push("r/zero");
        }
        for key in &special {
            let got = tokio::time::timeout(Duration::from_secs(10), store.get(key))
                .await
                .expect("get returns");
            assert!(got.is_err(), "get {key}: {got:?}");
            let head = tokio::time::timeout(Duration::from_secs(10), store.head(key))
                .await
                .expect("head returns");
            assert!(head.is_err(), "head {key}: {head:?}");
            let put = tokio::time::timeout(
                Duration::from_secs(10),
                store.put(key, Bytes::from_static(b"x"), PutCondition::IfNoneMatch),
            )
            .await
            .expect("put returns");
            assert!(put.is_err(), "conditional put over {key}: {put:?}");
        }
        let listed = listing(&store, "r/").await;
        let found: Vec<String> = defects(&listed).into_iter().map(|(k, _)| k).collect();
        let mut want: Vec<String> = special.iter().map(|k| k.to_string()).collect();
        want.sort();
        assert_eq!(found, want);
        assert!(objects(&listed).is_empty());
    }

    /// A file larger than the cap is refused from its size, and a growing one from the read.
    #[tokio::test]
    async fn capped_get_refuses_oversized_files() {
        let bucket = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(bucket.path().join("big")).expect("create");
        // Sparse: a gibibyte that costs nothing to make, and would cost a lot to read.
        file.set_len(1 << 30).expect("set_len");
        let store = DirStore::open(bucket.path()).expect("open");
        let got = store.get_capped("big", 1024).await;
        assert!(
            matches!(got, Err(StoreError::TooLarge { limit: 1024, .. })),
            "{got:?}"
        );
        assert!(matches!(
            store.get("big").await,
            Err(StoreError::TooLarge { .. })
        ));
        std::fs::write(bucket.path().join("small"), b"12345").expect("write");
        let got = store.get_capped("small", 5).await.expect("at the cap");
        assert_eq!(got.body.as_ref(), b"12345");
        assert!(matches!(
            store.get_capped("small", 4).await,
            Err(StoreError::TooLarge { .. })
        ));
    }

    /// A name that is not UTF-8 and a directory that cannot be read become defect entries; the
    /// rest of the listing goes on.
    #[tokio::test]
    async fn listing_reports_bad_names_and_unreadable_directories() {
        use std::os::unix::ffi::OsStrExt as _;
        let bucket = tempfile::tempdir().expect("tempdir");
        let b = bucket.path();
        for d in ["a/blobs", "b/blobs", "c"] {
            std::fs::create_dir_all(b.join(d)).expect("mkdir");
        }
        std::fs::write(b.join("a/blobs/1"), b"1").expect("write");
        std::fs::write(b.join("b/blobs/2"), b"2").expect("write");
        std::fs::write(b.join("c/3"), b"3").expect("write");
        let bad = std::ffi::OsStr::from_bytes(b"bad\xffname");
        std::fs::write(b.join("a").join(bad), b"x").expect("write");
        let store = DirStore::open(b).expect("open");

        // Root can read any directory whatever its mode, so the failure is injected.
        let unreadable = |rel: &str, fd: OwnedFd| {
            if rel == "b/blobs" {
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            } else {
                open_listing(rel, fd)
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let root = Arc::clone(&store.fd);
        let walker =
            std::thread::spawn(move || walk(root.as_fd(), "", None, &tx, &unreadable).is_ok());
        let mut listed = Vec::new();
        while let Some(page) = rx.recv().await {
            listed.extend(page.expect("page"));
        }
        assert!(walker.join().expect("walker"), "the receiver stayed");
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(objects(&listed), ["a/blobs/1", "c/3"]);
        let found = defects(&listed);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, "a/bad\u{fffd}name");
        assert!(found[0].1.contains("UTF-8"), "{found:?}");
        assert_eq!(found[1].0, "b/blobs");
        assert!(found[1].1.contains("cannot be read"), "{found:?}");

        // Through the trait, the bad name is a defect as well.
        let all = listing(&store, "a/").await;
        assert_eq!(objects(&all), ["a/blobs/1"]);
        assert_eq!(defects(&all).len(), 1);
    }

    /// A walk on a thread of its own (it sends with `blocking_send`): the keys it listed and
    /// the directories it read.
    fn walk_recorded(
        root: Arc<OwnedFd>,
        prefix: &str,
        after: Option<&str>,
    ) -> (Vec<String>, Vec<String>) {
        let read = std::sync::Mutex::new(Vec::new());
        let recording = |rel: &str, fd: OwnedFd| {
            read.lock().expect("lock").push(rel.to_string());
            open_listing(rel, fd)
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let ok = std::thread::scope(|s| {
            s.spawn(|| walk(root.as_fd(), prefix, after, &tx, &recording).is_ok())
                .join()
                .expect("walker")
        });
        assert!(ok, "the receiver stayed");
        let mut listed = Vec::new();
        while let Ok(page) = rx.try_recv() {
            listed.extend(page.expect("page").into_iter().map(|o| o.key));
        }
        let read = read.into_inner().expect("lock");
        (listed, read)
    }

    /// Keys come in byte order (a directory `b` sorts as `b/`, after `b-c` and `b.x`), and a
    /// start skips whole subtrees before it without reading them.
    #[tokio::test]
    async fn listing_is_sorted_and_skips_what_lies_before_the_start() {
        let bucket = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(bucket.path()).expect("open");
        let mut keys = vec![
            "a/b-c/1", "a/b.x", "a/b/1", "a/b/2/3", "a/b0", "z/1", "m/q/r", "m/q-s", "m/\u{e9}",
        ];
        for k in &keys {
            store
                .put(k, Bytes::from_static(b"x"), PutCondition::None)
                .await
                .expect("put");
        }
        keys.sort();
        let root = || Arc::clone(&store.fd);
        let (listed, _) = walk_recorded(root(), "", None);
        assert_eq!(listed, keys);
        let (listed, read) = walk_recorded(root(), "", Some("a/b0"));
        assert_eq!(listed, ["m/q-s", "m/q/r", "m/\u{e9}", "z/1"]);
        // `a` is read (the start lies inside it), `a/b` and `a/b-c` are not.
        assert_eq!(read, ["", "a", "m", "m/q", "z"]);
        let (listed, read) = walk_recorded(root(), "a/", Some("a/b/1"));
        assert_eq!(listed, ["a/b/2/3", "a/b0"]);
        assert_eq!(read, ["a", "a/b", "a/b/2"]);
    }

    /// Below an object there is nothing, as on S3: not an error, and not a defect.
    #[tokio::test]
    async fn keys_below_an_object_are_absent() {
        let bucket = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(bucket.path()).expect("open");
        store
            .put("a", Bytes::from_static(b"x"), PutCondition::None)
            .await
            .expect("put");
        assert!(matches!(
            store.get("a/b").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.head("a/b").await.expect("head"), None);
        let failures = store
            .delete_batch(&["a/b".to_string()])
            .await
            .expect("delete");
        assert!(failures.is_empty(), "{failures:?}");
        assert!(listing(&store, "a/b/").await.is_empty());
        assert_eq!(objects(&listing(&store, "a").await), ["a"]);
    }
}
