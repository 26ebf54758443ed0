//! ocigc's own keys: everything it writes or reads under `_ocigc/` (SPEC §3, the online
//! safety protocol's objects) is named here and parsed back here, so no other module spells a
//! state key or compares key prefixes by hand.
//!
//! | key                                  | what                                        |
//! |--------------------------------------|---------------------------------------------|
//! | `_ocigc/pending/<unit>.json`         | pending candidates of a unit (§3.2)         |
//! | `_ocigc/intents/<repo>/<id>.json`    | a pusher's intent (§3.3)                    |
//! | `_ocigc/deleting/<unit>.json`        | a collector's announced batch (§3.3)        |
//! | `_ocigc/leases/<unit>.json`          | a unit's lease (§3.4)                       |
//! | `_ocigc/clock/<id>`                  | the bucket-clock probe (never written)      |
//! | `_ocigc/readyz`                      | the daemon's readiness probe (never written)|
//! | `_ocigc/cache/<name>`                | reserved: the manifest-reference cache      |
//! | `_ocigc/trash/<repo>.json`           | tags retention removed, until `--trash-ttl` |
//! | `_ocigc/tags/<repo>.json`            | when each tag→digest pair was first seen    |
//!
//! `<unit>` is a repository name, or [`GLOBAL_REPOSITORY`] for a layout's global blob space:
//! the repository grammar forbids a leading `_`, so it never collides with a repository.
//!
//! This module sits below the store, the layouts and the engine (it imports only the global
//! unit's name), so each of them may name keys without depending on the others.

use crate::layout::{Repository, UnitKind, GLOBAL_REPOSITORY};

/// Prefix of ocigc's own state; never part of a repository, never swept.
pub const STATE_PREFIX: &str = "_ocigc/";

const PENDING: &str = "_ocigc/pending/";
const INTENTS: &str = "_ocigc/intents/";
const DELETING: &str = "_ocigc/deleting/";
const LEASES: &str = "_ocigc/leases/";
const CLOCK: &str = "_ocigc/clock/";
const READINESS: &str = "_ocigc/readyz";
const CACHE: &str = "_ocigc/cache/";
const TRASH: &str = "_ocigc/trash/";
const TAGS: &str = "_ocigc/tags/";
const JSON: &str = ".json";

/// Whose state a key is: one repository's, or the global blob space's. Replaces comparing a
/// unit's name with the magic global name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope<'a> {
    /// One repository, by full name (`team/app`).
    Repository(&'a str),
    /// A layout's global blob space: protected by every repository's intents.
    Global,
}

impl<'a> Scope<'a> {
    /// The name the unit's keys carry ([`GLOBAL_REPOSITORY`] for the global blob space).
    pub fn name(self) -> &'a str {
        match self {
            Scope::Repository(name) => name,
            Scope::Global => GLOBAL_REPOSITORY,
        }
    }

    /// The scope a unit name found in a key stands for: the one place the global name is
    /// recognised.
    fn parse(name: &'a str) -> Scope<'a> {
        if name == GLOBAL_REPOSITORY {
            Scope::Global
        } else {
            Scope::Repository(name)
        }
    }
}

impl<'a> From<&'a Repository> for Scope<'a> {
    fn from(unit: &'a Repository) -> Scope<'a> {
        match unit.kind {
            UnitKind::Repository => Scope::Repository(&unit.name),
            UnitKind::Global => Scope::Global,
        }
    }
}

/// What a key is, as far as ocigc's own state goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKey<'a> {
    /// Not under `_ocigc/`: registry content, owned by the layout.
    Outside,
    /// A unit's pending candidates.
    Pending(Scope<'a>),
    /// A pusher's intent for `repository` (empty when the key names none: honoured only by
    /// the global blob space); `id` is the file name without `.json`.
    Intent {
        /// The repository it protects blobs of.
        repository: &'a str,
        /// Its unique id.
        id: &'a str,
    },
    /// A unit's announced delete batch.
    Deleting(Scope<'a>),
    /// A unit's lease.
    Lease(Scope<'a>),
    /// A bucket-clock probe key (only ever HEADed).
    ClockProbe,
    /// The daemon's readiness probe key (only ever HEADed).
    Readiness,
    /// An entry of the reference cache, by name below `_ocigc/cache/`.
    Cache(&'a str),
    /// A repository's trash: the tags retention removed (by repository name).
    Trash(&'a str),
    /// When each tag of a repository was first seen pointing where it does (`oci`).
    TagsSeen(&'a str),
    /// Under `_ocigc/` but none of the above (another version's state, a stray file): kept,
    /// never interpreted.
    Unknown,
}

/// Whether `key` is ocigc's own state rather than registry content.
pub fn is_state(key: &str) -> bool {
    key.starts_with(STATE_PREFIX)
}

/// Classifies a key.
pub fn classify(key: &str) -> StateKey<'_> {
    let Some(rest) = key.strip_prefix(STATE_PREFIX) else {
        return StateKey::Outside;
    };
    let unit = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(JSON))
            .filter(|name| !name.is_empty())
            .map(Scope::parse)
    };
    if let Some(scope) = unit(PENDING) {
        return StateKey::Pending(scope);
    }
    if let Some(scope) = unit(DELETING) {
        return StateKey::Deleting(scope);
    }
    if let Some(scope) = unit(LEASES) {
        return StateKey::Lease(scope);
    }
    // Any `.json` below `intents/` is an intent, however odd its name: the global blob space
    // honours every one, and honouring one too many only keeps blobs longer.
    if let Some(file) = key.strip_prefix(INTENTS).and_then(|r| r.strip_suffix(JSON)) {
        let (repository, id) = file.rsplit_once('/').unwrap_or(("", file));
        return StateKey::Intent { repository, id };
    }
    if key == READINESS {
        return StateKey::Readiness;
    }
    if key.strip_prefix(CLOCK).is_some_and(|id| !id.is_empty()) {
        return StateKey::ClockProbe;
    }
    if let Some(name) = key.strip_prefix(CACHE).filter(|n| !n.is_empty()) {
        return StateKey::Cache(name);
    }
    if let Some(name) = key
        .strip_prefix(TRASH)
        .and_then(|r| r.strip_suffix(JSON))
        .filter(|n| !n.is_empty())
    {
        return StateKey::Trash(name);
    }
    if let Some(name) = key
        .strip_prefix(TAGS)
        .and_then(|r| r.strip_suffix(JSON))
        .filter(|n| !n.is_empty())
    {
        return StateKey::TagsSeen(name);
    }
    debug_assert!(!rest.is_empty() || key == STATE_PREFIX);
    StateKey::Unknown
}

/// The key of a unit's pending state (`name`: a repository, or [`Scope::name`] of the global
/// unit, as the layout names its units).
pub fn pending_key(name: &str) -> String {
    format!("{PENDING}{name}{JSON}")
}

/// The key of a unit's deletion announcement.
pub fn deleting_key(name: &str) -> String {
    format!("{DELETING}{name}{JSON}")
}

/// The key of a unit's lease.
pub fn lease_key(name: &str) -> String {
    format!("{LEASES}{name}{JSON}")
}

/// The listing prefix of a repository's own intents (nested repositories' intents are below
/// it too; [`intent_scope_matches`] tells them apart).
pub fn intents_prefix(repository: &str) -> String {
    format!("{INTENTS}{repository}/")
}

/// The listing prefix of the intents a scope honours: its own, or every one for the global
/// blob space.
pub fn intents_listing_prefix(scope: Scope<'_>) -> String {
    match scope {
        Scope::Repository(name) => intents_prefix(name),
        Scope::Global => INTENTS.to_string(),
    }
}

/// The key of one intent.
pub fn intent_key(repository: &str, id: &str) -> String {
    format!("{INTENTS}{repository}/{id}{JSON}")
}

/// Whether `key` is an intent that `scope` honours: the repository's own (not a nested
/// repository's), or any intent for the global blob space.
pub fn intent_scope_matches(scope: Scope<'_>, key: &str) -> bool {
    match (classify(key), scope) {
        (StateKey::Intent { .. }, Scope::Global) => true,
        (StateKey::Intent { repository, .. }, Scope::Repository(name)) => {
            !name.is_empty() && repository == name
        }
        _ => false,
    }
}

/// A key for one bucket-clock probe: unique so no cache along the way answers it, and never
/// written, so the HEAD needs no write permission.
pub fn clock_probe_key(id: &str) -> String {
    format!("{CLOCK}{id}")
}

/// The key the daemon's readiness check HEADs (it need not exist).
pub fn readiness_probe_key() -> &'static str {
    READINESS
}

/// The key of a reference-cache entry (reserved for the incremental-run cache).
pub fn cache_key(name: &str) -> String {
    format!("{CACHE}{name}")
}

/// The listing prefix of the reference cache.
pub fn cache_prefix() -> &'static str {
    CACHE
}

/// The trash of repository `name`: the tags retention removed from it, until they expire.
pub fn trash_key(name: &str) -> String {
    format!("{TRASH}{name}{JSON}")
}

/// When each tag of repository `name` was first seen pointing where it does (`oci`).
pub fn tags_seen_key(name: &str) -> String {
    format!("{TAGS}{name}{JSON}")
}

/// The listing prefix of the trash.
pub fn trash_prefix() -> &'static str {
    TRASH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builder_classifies_back_to_its_key() {
        for name in ["app", "team/app", "team/app/tools", "a.json"] {
            let scope = Scope::Repository(name);
            assert_eq!(classify(&pending_key(name)), StateKey::Pending(scope));
            assert_eq!(classify(&deleting_key(name)), StateKey::Deleting(scope));
            assert_eq!(classify(&lease_key(name)), StateKey::Lease(scope));
            let id = "0b5c2a6e-1f4d-4b8e-9a55-2a1f3c4d5e6f";
            assert_eq!(
                classify(&intent_key(name, id)),
                StateKey::Intent {
                    repository: name,
                    id
                }
            );
            assert!(intent_key(name, id).starts_with(&intents_prefix(name)));
        }
        let global = Scope::Global.name();
        assert_eq!(
            classify(&pending_key(global)),
            StateKey::Pending(Scope::Global)
        );
        assert_eq!(
            classify(&deleting_key(global)),
            StateKey::Deleting(Scope::Global)
        );
        assert_eq!(classify(&lease_key(global)), StateKey::Lease(Scope::Global));
        assert_eq!(classify(&clock_probe_key("x1")), StateKey::ClockProbe);
        assert_eq!(classify(readiness_probe_key()), StateKey::Readiness);
        assert_eq!(
            classify(&cache_key("v1/ab/cd")),
            StateKey::Cache("v1/ab/cd")
        );
        assert!(cache_key("x").starts_with(cache_prefix()));
        assert_eq!(
            classify(&trash_key("team/app")),
            StateKey::Trash("team/app")
        );
        assert!(trash_key("x").starts_with(trash_prefix()));
        assert_eq!(
            classify(&tags_seen_key("team/app/tools")),
            StateKey::TagsSeen("team/app/tools")
        );
    }

    #[test]
    fn keys_keep_their_historical_spelling() {
        // Buckets written by earlier versions, and pushers running `ocigc intent` of another
        // version, rely on exactly these names.
        assert_eq!(pending_key("team/app"), "_ocigc/pending/team/app.json");
        assert_eq!(deleting_key("_global"), "_ocigc/deleting/_global.json");
        assert_eq!(lease_key("app"), "_ocigc/leases/app.json");
        assert_eq!(intents_prefix("team/app"), "_ocigc/intents/team/app/");
        assert_eq!(Scope::Global.name(), GLOBAL_REPOSITORY);
        assert!(clock_probe_key("u").starts_with("_ocigc/clock/"));
        assert_eq!(readiness_probe_key(), "_ocigc/readyz");
    }

    #[test]
    fn other_keys_are_outside_or_unknown() {
        for key in [
            "team/app/index.json",
            "",
            "_ocigcx/pending/a.json",
            "blobs/_ocigc/",
        ] {
            assert_eq!(classify(key), StateKey::Outside, "{key}");
            assert!(!is_state(key));
        }
        for key in [
            "_ocigc/",
            "_ocigc/index.json",
            "_ocigc/pending/.json",
            "_ocigc/pending/app.txt",
            "_ocigc/intents/app/3.txt",
            "_ocigc/clock/",
            "_ocigc/cache/",
            "_ocigc/trash/",
            "_ocigc/trash/app.txt",
            "_ocigc/tags/.json",
            "_ocigc/state/app.json",
        ] {
            assert_eq!(classify(key), StateKey::Unknown, "{key}");
            assert!(is_state(key));
        }
    }

    #[test]
    fn intents_belong_to_their_scope() {
        let own = intent_key("team/app", "1");
        let nested = intent_key("team/app/tools", "2");
        let app = Scope::Repository("team/app");
        assert!(intent_scope_matches(app, &own));
        assert!(!intent_scope_matches(app, &nested));
        assert!(!intent_scope_matches(app, "_ocigc/intents/team/app/3.txt"));
        assert!(intent_scope_matches(Scope::Global, &own));
        assert!(intent_scope_matches(Scope::Global, &nested));
        assert!(!intent_scope_matches(
            Scope::Global,
            &pending_key("team/app")
        ));
        // Odd names still protect (the global space honours every intent, as before).
        assert!(intent_scope_matches(Scope::Global, "_ocigc/intents/1.json"));
        assert!(intent_scope_matches(app, "_ocigc/intents/team/app/.json"));
        assert!(!intent_scope_matches(
            Scope::Repository(""),
            "_ocigc/intents/1.json"
        ));
        assert_eq!(intents_listing_prefix(Scope::Global), "_ocigc/intents/");
        assert_eq!(intents_listing_prefix(app), intents_prefix("team/app"));
    }
}
