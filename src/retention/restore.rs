//! `ocigc restore`: puts tags retention removed back from the trash, never over a tag that
//! exists now. The tag is written first and the trash entry dropped after, so its manifest is
//! a root throughout.

use std::time::SystemTime;

use crate::digest::Digest;
use crate::layout::{validate_repository_name, Layout, TagError};
use crate::store::Store;

use super::trash;

/// What to restore: `repo:tag`, or an untagged root `repo@sha256:…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The repository.
    pub repo: String,
    /// The tag, or `None` for an untagged root.
    pub tag: Option<String>,
    /// The untagged root's digest.
    pub digest: Option<Digest>,
}

impl Target {
    /// Parses `repo:tag` or `repo@sha256:…`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let (repo, tag, digest) = if let Some((repo, d)) = s.split_once('@') {
            let digest = Digest::parse(d).ok_or_else(|| format!("{s:?}: invalid digest"))?;
            (repo, None, Some(digest))
        } else {
            match s.rsplit_once(':') {
                Some((repo, tag)) if !tag.is_empty() && !tag.contains('/') => {
                    (repo, Some(tag.to_string()), None)
                }
                _ => return Err(format!("{s:?}: expected REPO:TAG or REPO@sha256:…")),
            }
        };
        validate_repository_name(repo).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Target {
            repo: repo.to_string(),
            tag,
            digest,
        })
    }
}

/// Why a target was not restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No live trash entry names it.
    #[error("{0} is not in the trash (never removed, expired, or restored already)")]
    NotInTrash(String),
    /// The layout refused or failed (e.g. the tag exists now).
    #[error("{what}: {source}")]
    Tag {
        what: String,
        #[source]
        source: TagError,
    },
    /// The trash could not be read or updated.
    #[error("{0}")]
    Trash(#[from] trash::TrashError),
}

/// Restores `target`; returns the digest it points at again.
pub async fn restore(
    store: &dyn Store,
    layout: &dyn Layout,
    target: &Target,
    now: SystemTime,
) -> Result<Digest, RestoreError> {
    let what = match (&target.tag, &target.digest) {
        (Some(t), _) => format!("{}:{t}", target.repo),
        (None, Some(d)) => format!("{}@{d}", target.repo),
        (None, None) => target.repo.clone(),
    };
    let trash = trash::read(store, &target.repo).await?;
    // The latest removal of that tag (a tag removed, restored and removed again).
    let entry = trash
        .file
        .entries
        .iter()
        .rev()
        .filter(|e| e.live(now))
        .find(|e| match (&target.tag, &target.digest) {
            (Some(t), _) => e.tag.as_deref() == Some(t.as_str()),
            (None, Some(d)) => e.tag.is_none() && e.digest == *d,
            (None, None) => false,
        })
        .cloned()
        .ok_or_else(|| RestoreError::NotInTrash(what.clone()))?;
    // A tag whose manifest was removed since as an untagged root (serverless-registry deletes
    // it then): that entry keeps the content the tag needs.
    let content = entry.entry.clone().or_else(|| {
        (trash.file.entries.iter().rev())
            .filter(|e| e.live(now) && e.tag.is_none() && e.digest == entry.digest)
            .find_map(|e| e.entry.clone())
    });
    layout
        .restore_tag(
            store,
            &target.repo,
            entry.tag.as_deref(),
            &entry.digest,
            content.as_ref(),
        )
        .await
        .map_err(|source| RestoreError::Tag {
            what: what.clone(),
            source,
        })?;
    trash::update(store, &target.repo, now, |all| {
        all.retain(|e| !(e.tag == entry.tag && e.digest == entry.digest));
    })
    .await?;
    Ok(entry.digest)
}
