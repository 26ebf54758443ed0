//! What a run lists: ocigc's own state, then the key space of the repositories - the whole
//! of it, or, for a run of one repository whose blobs nothing outside its prefix keeps alive,
//! that prefix and the repository's own state.
//!
//! A hook GC of one repository then costs the repository's share of the listing, not the
//! bucket's. Where keys elsewhere can keep the repository's blobs alive
//! ([`Layout::links_across_repositories`]) the whole key space is listed as before.

use super::{cache, intent, lease, list_all, state};
use crate::layout::{KeySpace, Layout};
use crate::namespace::{self, Scope, STATE_PREFIX};
use crate::store::{ObjectMeta, Store, StoreError};

/// The state objects a run of `only` (or of every repository, for `None`) reads.
pub(crate) async fn list_state(
    store: &dyn Store,
    layout: &dyn Layout,
    only: Option<&str>,
) -> Result<Vec<ObjectMeta>, StoreError> {
    match only {
        Some(name) if !layout.links_across_repositories() => repository_state(store, name).await,
        _ => Ok(list_all(store, STATE_PREFIX).await?.state),
    }
}

/// The prefix whose listing holds every repository a run of `only` collects.
pub(crate) fn objects_prefix(layout: &dyn Layout, space: &KeySpace, only: Option<&str>) -> String {
    match only {
        Some(name) if !layout.links_across_repositories() => layout.repository_prefix(name),
        _ => space.repositories.clone(),
    }
}

/// Every state object a run of `name` reads: its intents, pending candidates, batch
/// announcement, lease and trash.
async fn repository_state(store: &dyn Store, name: &str) -> Result<Vec<ObjectMeta>, StoreError> {
    let mut state = intent::list_intents(store, Scope::Repository(name)).await?;
    // Its cache entries (a nested repository's, under the same prefix, are ignored by unit).
    state.extend(
        list_all(store, &format!("{}{name}/", cache::CACHE_PREFIX))
            .await?
            .state,
    );
    for key in [
        state::pending_key(name),
        intent::deleting_key(name),
        lease::lease_key(name),
        // Its trash: the manifests of tags retention removed are roots until they expire.
        namespace::trash_key(name),
    ] {
        state.extend(store.head(&key).await?);
    }
    Ok(state)
}
