//! What a run lists: the whole bucket, or, for a run of one repository whose blobs nothing
//! outside its prefix keeps alive, that prefix and the repository's own ocigc state.
//!
//! A hook GC of one repository then costs the repository's share of the listing, not the
//! bucket's. Where keys elsewhere can keep the repository's blobs alive
//! ([`Layout::links_across_repositories`]) the whole bucket is listed as before.

use super::{intent, lease, list_all, state, Listing};
use crate::layout::Layout;
use crate::namespace::Scope;
use crate::store::{Store, StoreError};

/// The listing a run of `only` (or of every repository, for `None`) needs.
pub(crate) async fn list_for_run(
    store: &dyn Store,
    layout: &dyn Layout,
    only: Option<&str>,
) -> Result<Listing, StoreError> {
    match only {
        Some(name) if !layout.links_across_repositories() => {
            list_repository(store, layout, name).await
        }
        _ => list_all(store, "").await,
    }
}

/// The prefix of `name` (nested repositories included: the layout's partition separates them
/// out) and every state object a run of `name` reads: its intents, pending candidates, batch
/// announcement and lease.
async fn list_repository(
    store: &dyn Store,
    layout: &dyn Layout,
    name: &str,
) -> Result<Listing, StoreError> {
    let objects = list_all(store, &layout.repository_prefix(name))
        .await?
        .objects;
    let mut state = intent::list_intents(store, Scope::Repository(name)).await?;
    for key in [
        state::pending_key(name),
        intent::deleting_key(name),
        lease::lease_key(name),
    ] {
        state.extend(store.head(&key).await?);
    }
    Ok(Listing { objects, state })
}
