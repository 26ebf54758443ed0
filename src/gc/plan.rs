//! The plan: a decision, with a reason, for every object of a repository.
//!
//! A plan is a value. A dry run reports it; a real run executes its deletions. Both come from
//! the same function, so a dry run shows exactly what the real run would delete.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::digest::Digest;
use crate::layout::{KeyKind, Layout, Repository};
use crate::report::Tally;

/// Why an object is kept or deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Reachable from a root.
    Reachable,
    /// Unreferenced, but modified less than `--grace` ago: its image may still be pushing.
    WithinGrace,
    /// Unreferenced and old enough, but not yet seen unreferenced `--delay` ago.
    AwaitingSecondObservation,
    /// Not a blob of the layout (metadata, unknown file): never swept.
    NotABlob,
    /// Unreferenced and older than the grace period: deleted.
    Unreferenced,
    /// Part of a repository deleted on request.
    RepositoryDeleted,
    /// Left by an upload that was abandoned (older than the grace period, no longer open).
    AbandonedUpload,
}

/// Keep or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leave the object.
    Keep(Reason),
    /// Delete the object.
    Delete(Reason),
}

/// One object and what happens to it.
#[derive(Clone, Debug)]
pub struct PlanItem {
    /// The key.
    pub key: String,
    /// The digest, for blobs.
    pub digest: Option<Digest>,
    /// Size in bytes.
    pub size: u64,
    /// Last modification on the store's clock.
    pub last_modified: SystemTime,
    /// The decision.
    pub decision: Decision,
}

/// The plan for one repository.
#[derive(Clone, Debug, Default)]
pub struct RepoPlan {
    /// Every object of the repository with its decision, but those in `streamed_reachable`.
    pub items: Vec<PlanItem>,
    /// Reachable blobs of a streamed unit (the global blob space): decided (kept) as the
    /// listing went by, counted, and not held.
    pub streamed_reachable: Tally,
}

/// Time parameters of planning.
#[derive(Clone, Copy, Debug)]
pub struct PlanPolicy {
    /// The current time on the store's clock.
    pub now: SystemTime,
    /// Unreferenced blobs younger than this are kept.
    pub grace: Duration,
    /// Unreferenced blobs must have been seen so long before; zero deletes in this run.
    pub delay: Duration,
}

impl RepoPlan {
    /// Items to delete.
    pub fn deletions(&self) -> impl Iterator<Item = &PlanItem> {
        self.items
            .iter()
            .filter(|i| matches!(i.decision, Decision::Delete(_)))
    }

    /// Blobs kept for one of `reasons`.
    pub fn tally(&self, reasons: &[Reason]) -> Tally {
        let mut t = Tally::default();
        if reasons.contains(&Reason::Reachable) {
            t.blobs += self.streamed_reachable.blobs;
            t.bytes += self.streamed_reachable.bytes;
        }
        for i in &self.items {
            if let Decision::Keep(r) = i.decision {
                if reasons.contains(&r) {
                    t.add(i.size);
                }
            }
        }
        t
    }
}

/// How much of a repository a plan deletes. The share that the blast-radius budget weighs is
/// of blob bytes: every blob of the repository as listed, whatever its decision. Upload
/// leftovers are deleted too but never part of an image, so they are not weighed (a unit of
/// nothing but stale uploads may lose all of them); keys that are no blobs of the layout
/// (`index.json`, tag links) are never deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// Keys the plan deletes, blobs and upload leftovers.
    pub deleted_keys: u64,
    /// Their bytes: what the run's byte bound counts.
    pub deleted_bytes: u64,
    /// Blobs the plan deletes.
    pub deleted_blobs: u64,
    /// Their bytes.
    pub deleted_blob_bytes: u64,
    /// Blobs of the repository, whatever their decision.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
}

impl Exposure {
    /// Whether the plan deletes more than `max_fraction` of the repository's blob bytes. A
    /// repository whose blobs are all empty (placeholders) is judged by blob count instead, so
    /// that it is not unguarded. `max_fraction >= 1` never exceeds.
    pub fn exceeds(&self, max_fraction: f64) -> bool {
        if max_fraction >= 1.0 {
            return false;
        }
        let (part, whole) = self.measure();
        part as f64 > max_fraction * whole as f64
    }

    /// The deleted share of the repository's blobs, by the measure [`Exposure::exceeds`] uses.
    pub fn fraction(&self) -> f64 {
        match self.measure() {
            (_, 0) => 0.0,
            (part, whole) => part as f64 / whole as f64,
        }
    }

    fn measure(&self) -> (u64, u64) {
        if self.blob_bytes > 0 {
            (self.deleted_blob_bytes, self.blob_bytes)
        } else {
            (self.deleted_blobs, self.blobs)
        }
    }
}

impl RepoPlan {
    /// What the plan deletes, against all the repository's blobs (see [`Exposure`]).
    pub fn exposure(&self) -> Exposure {
        let mut e = Exposure {
            blobs: self.streamed_reachable.blobs,
            blob_bytes: self.streamed_reachable.bytes,
            ..Exposure::default()
        };
        for i in &self.items {
            let deleted = matches!(i.decision, Decision::Delete(_));
            if deleted {
                e.deleted_keys += 1;
                e.deleted_bytes += i.size;
            }
            // Only blobs carry a digest; upload leftovers and other keys do not.
            if i.digest.is_some() {
                e.blobs += 1;
                e.blob_bytes += i.size;
                if deleted {
                    e.deleted_blobs += 1;
                    e.deleted_blob_bytes += i.size;
                }
            }
        }
        e
    }
}

/// Decides every object of `repo` given the reachable set and when each candidate was first
/// seen at an earlier observation.
pub fn plan(
    layout: &dyn Layout,
    repo: &Repository,
    reachable: &HashSet<Digest>,
    first_seen: &HashMap<Digest, SystemTime>,
    policy: PlanPolicy,
) -> RepoPlan {
    let items = repo
        .objects
        .iter()
        .map(|o| {
            let (digest, decision) = match layout.classify(repo, &o.key) {
                KeyKind::Other => (None, Decision::Keep(Reason::NotABlob)),
                KeyKind::Scratch => {
                    let decision = if deletes_scratch(o.last_modified, policy) {
                        Decision::Delete(Reason::AbandonedUpload)
                    } else {
                        Decision::Keep(Reason::WithinGrace)
                    };
                    (None, decision)
                }
                KeyKind::Blob(d) => {
                    let decision = decide(
                        reachable.contains(&d),
                        o.last_modified,
                        first_seen.get(&d).copied(),
                        policy,
                    );
                    (Some(d), decision)
                }
            };
            PlanItem {
                key: o.key.clone(),
                digest,
                size: o.size,
                last_modified: o.last_modified,
                decision,
            }
        })
        .collect();
    RepoPlan {
        items,
        streamed_reachable: Tally::default(),
    }
}

/// Whether an unreferenced blob last modified at `last_modified`, first seen unreferenced at
/// `first_seen`, is deleted under `policy` (the decision [`plan`] makes for it).
pub(crate) fn deletes_unreferenced(
    last_modified: SystemTime,
    first_seen: Option<SystemTime>,
    policy: PlanPolicy,
) -> bool {
    matches!(
        decide(false, last_modified, first_seen, policy),
        Decision::Delete(_)
    )
}

/// Whether an abandoned upload's object last modified at `last_modified` is deleted under
/// `policy` (the decision [`plan`] makes for it).
pub(crate) fn deletes_scratch(last_modified: SystemTime, policy: PlanPolicy) -> bool {
    age(policy, last_modified) >= policy.grace
}

/// Age on the store's clock; a modification time in the future (clock skew) is age zero.
fn age(policy: PlanPolicy, last_modified: SystemTime) -> Duration {
    policy
        .now
        .duration_since(last_modified)
        .unwrap_or(Duration::ZERO)
}

fn decide(
    reachable: bool,
    last_modified: SystemTime,
    first_seen: Option<SystemTime>,
    policy: PlanPolicy,
) -> Decision {
    if reachable {
        return Decision::Keep(Reason::Reachable);
    }
    // A modification time in the future (clock skew) gives an age of zero: kept.
    if age(policy, last_modified) < policy.grace {
        return Decision::Keep(Reason::WithinGrace);
    }
    let observed_long_enough = policy.delay.is_zero()
        || first_seen.is_some_and(|t| {
            policy.now.duration_since(t).unwrap_or(Duration::ZERO) >= policy.delay
        });
    if observed_long_enough {
        Decision::Delete(Reason::Unreferenced)
    } else {
        Decision::Keep(Reason::AwaitingSecondObservation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(grace: u64, delay: u64) -> PlanPolicy {
        PlanPolicy {
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            grace: Duration::from_secs(grace),
            delay: Duration::from_secs(delay),
        }
    }

    #[test]
    fn decisions() {
        let old = SystemTime::UNIX_EPOCH;
        let young = SystemTime::UNIX_EPOCH + Duration::from_secs(999_990);
        let future = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000);
        let decide = |r, t, p| decide(r, t, None, p);
        assert_eq!(
            decide(true, old, policy(0, 0)),
            Decision::Keep(Reason::Reachable)
        );
        assert_eq!(
            decide(false, old, policy(60, 0)),
            Decision::Delete(Reason::Unreferenced)
        );
        assert_eq!(
            decide(false, young, policy(60, 0)),
            Decision::Keep(Reason::WithinGrace)
        );
        assert_eq!(
            decide(false, future, policy(60, 0)),
            Decision::Keep(Reason::WithinGrace)
        );
        assert_eq!(
            decide(false, young, policy(0, 0)),
            Decision::Delete(Reason::Unreferenced)
        );
        assert_eq!(
            decide(false, old, policy(60, 3600)),
            Decision::Keep(Reason::AwaitingSecondObservation)
        );
    }

    fn item(size: u64, decision: Decision) -> PlanItem {
        let digest = (decision != Decision::Keep(Reason::NotABlob)
            && decision != Decision::Delete(Reason::AbandonedUpload))
        .then(|| Digest::sha256_of(format!("{size}").as_bytes()));
        PlanItem {
            key: format!("k{size}"),
            digest,
            size,
            last_modified: SystemTime::UNIX_EPOCH,
            decision,
        }
    }

    #[test]
    fn exposure_weighs_blob_bytes_only() {
        let plan = RepoPlan {
            items: vec![
                item(900, Decision::Delete(Reason::Unreferenced)),
                item(100, Decision::Keep(Reason::Reachable)),
                // An upload leftover: deleted and counted for the run, not weighed.
                item(5000, Decision::Delete(Reason::AbandonedUpload)),
                // index.json: neither deleted nor weighed.
                item(10_000, Decision::Keep(Reason::NotABlob)),
            ],
            ..Default::default()
        };
        let e = plan.exposure();
        assert_eq!(
            e,
            Exposure {
                deleted_keys: 2,
                deleted_bytes: 5900,
                deleted_blobs: 1,
                deleted_blob_bytes: 900,
                blobs: 2,
                blob_bytes: 1000,
            }
        );
        assert!((e.fraction() - 0.9).abs() < 1e-9);
        assert!(e.exceeds(0.89));
        assert!(!e.exceeds(0.9), "exactly the limit is within it");
        assert!(!e.exceeds(1.0));
    }

    #[test]
    fn an_all_garbage_repository_exceeds_any_fraction_below_one() {
        let plan = RepoPlan {
            items: vec![item(7, Decision::Delete(Reason::Unreferenced))],
            ..Default::default()
        };
        assert!(plan.exposure().exceeds(0.999));
        assert!(!plan.exposure().exceeds(1.0));
        assert!(
            !RepoPlan::default().exposure().exceeds(0.1),
            "nothing to delete"
        );
    }

    #[test]
    fn streamed_reachable_blobs_weigh_and_count_as_reachable() {
        // The global blob space: 9 reachable blobs counted as the listing went by, 1 to go.
        let plan = RepoPlan {
            items: vec![item(1000, Decision::Delete(Reason::Unreferenced))],
            streamed_reachable: Tally {
                blobs: 9,
                bytes: 9000,
            },
        };
        let e = plan.exposure();
        assert_eq!((e.blobs, e.blob_bytes, e.deleted_blobs), (10, 10_000, 1));
        assert!((e.fraction() - 0.1).abs() < 1e-9);
        assert!(!e.exceeds(0.1) && e.exceeds(0.09));
        assert_eq!(
            plan.tally(&[Reason::Reachable]),
            Tally {
                blobs: 9,
                bytes: 9000
            }
        );
        assert_eq!(plan.tally(&[Reason::WithinGrace]), Tally::default());
    }

    #[test]
    fn stale_uploads_alone_are_not_weighed() {
        // serverless-registry's unit of stale temp objects at the bucket root: all go.
        let plan = RepoPlan {
            items: vec![
                item(50, Decision::Delete(Reason::AbandonedUpload)),
                item(60, Decision::Delete(Reason::AbandonedUpload)),
            ],
            ..Default::default()
        };
        assert!(!plan.exposure().exceeds(0.1));
        assert_eq!(plan.exposure().deleted_bytes, 110);
    }

    #[test]
    fn empty_blobs_are_judged_by_count() {
        // Placeholders only: 0 bytes, but deleting all of them would break every image.
        let plan = RepoPlan {
            items: vec![
                item(0, Decision::Delete(Reason::Unreferenced)),
                item(0, Decision::Delete(Reason::Unreferenced)),
                item(0, Decision::Keep(Reason::Reachable)),
            ],
            ..Default::default()
        };
        assert!(plan.exposure().exceeds(0.5));
        assert!(!plan.exposure().exceeds(0.7));
    }

    #[test]
    fn second_observation() {
        let old = SystemTime::UNIX_EPOCH;
        let p = policy(60, 3600);
        let long_ago = p.now - Duration::from_secs(3600);
        let recently = p.now - Duration::from_secs(3599);
        assert_eq!(
            decide(false, old, Some(long_ago), p),
            Decision::Delete(Reason::Unreferenced)
        );
        assert_eq!(
            decide(false, old, Some(recently), p),
            Decision::Keep(Reason::AwaitingSecondObservation)
        );
        assert_eq!(
            decide(true, old, Some(long_ago), p),
            Decision::Keep(Reason::Reachable)
        );
    }
}
