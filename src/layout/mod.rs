//! Bucket layouts: how a listing turns into repositories, roots and blob keys.
//!
//! The GC engine knows nothing about a particular layout; it asks the layout to partition the
//! listing, to classify keys, to read roots and to name the key a digest lives at.

mod name;
pub mod oci;

use async_trait::async_trait;

use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::store::{ObjectMeta, Store, StoreError};

pub use name::validate_repository_name;

/// Prefix of ocigc's own state; never part of a repository, never swept.
pub const STATE_PREFIX: &str = "_ocigc/";

/// One repository and the objects it owns.
#[derive(Clone, Debug)]
pub struct Repository {
    /// Repository name, e.g. `team/app`.
    pub name: String,
    /// Key prefix of the repository, ending in `/` (empty for a layout at the bucket root).
    pub prefix: String,
    /// Objects owned by this repository (not by a nested one).
    pub objects: Vec<ObjectMeta>,
}

/// A repository-like prefix that will not be collected, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// The prefix as found in the bucket.
    pub prefix: String,
    /// Why it is left alone.
    pub reason: String,
    /// Objects it owns (left untouched).
    pub objects: u64,
}

/// The result of partitioning a bucket listing.
#[derive(Debug, Default)]
pub struct Partition {
    /// Repositories to collect, sorted by name.
    pub repositories: Vec<Repository>,
    /// Prefixes that look like repositories but are not collected (e.g. invalid names).
    pub rejected: Vec<Rejected>,
    /// Objects that belong to no repository (left untouched).
    pub unowned: u64,
}

/// What a key inside a repository is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A content-addressed blob (layers, configs and manifests alike).
    Blob(Digest),
    /// Anything else: metadata, unknown files. Never swept.
    Other,
}

/// The roots of a repository and the version they were read at.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// Descriptors everything reachable hangs off.
    pub descriptors: Vec<Descriptor>,
    /// Version marker of the roots (e.g. the ETag of `index.json`), when the store gives one.
    pub version: Option<String>,
}

/// Why the roots of a repository could not be read; the repository fails closed.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// The roots document is absent.
    #[error("{0} is missing")]
    Missing(String),
    /// The roots document is unreadable or malformed.
    #[error("{key} is invalid: {reason}")]
    Invalid { key: String, reason: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A bucket layout.
#[async_trait]
pub trait Layout: Send + Sync {
    /// The layout's name as given to `--layout`.
    fn name(&self) -> &'static str;

    /// Splits a listing (state keys already removed) into repositories.
    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition;

    /// The listing prefix that holds everything of repository `name` (and of repositories
    /// nested in it, which [`Layout::partition`] separates out).
    fn repository_prefix(&self, name: &str) -> String;

    /// Classifies a key owned by `repo`.
    fn classify(&self, repo: &Repository, key: &str) -> KeyKind;

    /// The key at which `digest` is stored in `repo`.
    fn blob_key(&self, repo: &Repository, digest: &Digest) -> String;

    /// Reads the roots of `repo`.
    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError>;

    /// The current version of the roots (e.g. the ETag of `index.json`) in one cheap request;
    /// `None` when the store gives none (the caller must then re-read the roots).
    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<String>, RootsError>;

    /// The keys of `repo` in the order whole-repository deletion removes them: each inner list
    /// is finished before the next starts (e.g. the index first, so pulls stop resolving).
    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>>;
}

/// The layouts ocigc knows, by `--layout` name.
pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn Layout>> {
    match name {
        "oci" => Some(std::sync::Arc::new(oci::OciLayout)),
        _ => None,
    }
}
