//! The retention decision (pure): for every tag (and untagged root) of one repository, keep or
//! remove, with the clause that decided it, like [`crate::gc::plan`] gives a reason per object.
//!
//! A tag is removed only if it is a candidate under every clause of its table (matches
//! `delete_tags` if given, is older than `older_than` if given, matches no `keep_tags`, is not
//! among the `keep_last` most recently pushed, is not kept by `keep_semver`), is not protected
//! and is older than the grace period. Referrer fallback tags (`sha256-<hex>`, cosign's
//! `sha256-<hex>.sig|.att|.sbom`) are never counted or removed as tags: they go only with a
//! subject this decision removes (and nothing kept still points at).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use super::protect::Protected;
use super::rules::{KeepSemver, Rule, SemverPer};
use crate::digest::Digest;

/// A tag as retention sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct TagInput {
    /// The tag.
    pub name: String,
    /// Its manifest.
    pub digest: Digest,
    /// When it last moved (at the latest): its age runs from here.
    pub since: SystemTime,
    /// When its manifest was pushed: orders `keep_last`.
    pub pushed_at: SystemTime,
}

/// An untagged root manifest as retention sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct UntaggedInput {
    /// The manifest.
    pub digest: Digest,
    /// When it was added (at the latest).
    pub since: SystemTime,
    /// Its `subject`, if it is a referrer.
    pub subject: Option<Digest>,
}

/// What a decision is made under.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    /// The repository.
    pub repo: &'a str,
    /// The table that applies to it, if any.
    pub rule: Option<&'a Rule>,
    /// Images never removed.
    pub protected: &'a Protected,
    /// Now, on the bucket clock.
    pub now: SystemTime,
    /// Nothing younger than this is removed (`--grace`).
    pub grace: Duration,
}

/// Keep or remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Stays.
    Keep,
    /// Goes (to the trash).
    Remove,
}

/// The clause that decided a tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Clause {
    /// No table applies to the repository.
    NoRule,
    /// The table names no clause that selects tags (an exemption).
    NoTagClause,
    /// A referrer (fallback tag or untagged referrer) whose subject stays.
    Referrer,
    /// In the protect file.
    Protected,
    /// Younger than `--grace`.
    Grace,
    /// Matches `keep_tags`.
    KeepTags,
    /// Does not match `delete_tags`.
    DeleteTags,
    /// Among the highest versions `keep_semver` keeps.
    KeepSemver,
    /// Among the `keep_last` most recently pushed.
    KeepLast,
    /// Not older than `older_than`.
    OlderThan,
    /// An untagged root the table does not remove (no `untagged_older_than`).
    Untagged,
    /// An untagged root not older than `untagged_older_than`.
    UntaggedOlderThan,
    /// Removed by the table with this index.
    Table(usize),
    /// A referrer removed with its subject.
    SubjectRemoved,
    /// Decided for removal, but a push moved it before it was removed: left alone.
    Moved,
    /// Decided for removal, but the trash keeps removed manifests' content and would grow
    /// past its bound: left for a later run, once entries expire.
    TrashFull,
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Clause::NoRule => "no_rule",
            Clause::NoTagClause => "no_tag_clause",
            Clause::Referrer => "referrer",
            Clause::Protected => "protected",
            Clause::Grace => "grace",
            Clause::KeepTags => "keep_tags",
            Clause::DeleteTags => "delete_tags",
            Clause::KeepSemver => "keep_semver",
            Clause::KeepLast => "keep_last",
            Clause::OlderThan => "older_than",
            Clause::Untagged => "untagged",
            Clause::UntaggedOlderThan => "untagged_older_than",
            Clause::Table(i) => return write!(f, "retention[{i}]"),
            Clause::SubjectRemoved => "subject_removed",
            Clause::Moved => "moved",
            Clause::TrashFull => "trash_full",
        };
        f.write_str(s)
    }
}

/// The decision on one tag or untagged root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The tag; `None` for an untagged root.
    pub tag: Option<String>,
    /// The manifest.
    pub digest: Digest,
    /// Keep or remove.
    pub verdict: Verdict,
    /// What decided it.
    pub clause: Clause,
    /// Its age (from when it last moved).
    pub age: Duration,
    /// For a referrer, the subject it follows: removed only with it.
    pub subject: Option<Digest>,
}

/// The subject digest a referrers-tag-schema or cosign fallback tag names, if `tag` is one.
pub fn fallback_subject(tag: &str) -> Option<Digest> {
    let rest = tag.strip_prefix("sha256-")?;
    let (hex, suffix) = rest.split_at_checked(64)?;
    let suffix_ok = suffix.is_empty()
        || suffix
            .strip_prefix('.')
            .is_some_and(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
    if !suffix_ok {
        return None;
    }
    Digest::from_parts("sha256", hex)
}

/// A version a tag names (`1.2.3`, `v1.2.3-rc.1`), if any.
fn version(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

/// The tags `keep_semver` keeps: in each group, those of the `last` highest versions.
fn semver_kept<'t>(keep: KeepSemver, tags: &[&'t TagInput]) -> HashSet<&'t str> {
    let mut groups: HashMap<(u64, Option<u64>), BTreeSet<semver::Version>> = HashMap::new();
    let mut versions = Vec::new();
    for t in tags {
        if let Some(v) = version(&t.name) {
            let group = match keep.per {
                SemverPer::Minor => (v.major, Some(v.minor)),
                SemverPer::Major => (v.major, None),
            };
            groups.entry(group).or_default().insert(v.clone());
            versions.push((t.name.as_str(), group, v));
        }
    }
    let top: HashMap<(u64, Option<u64>), Vec<&semver::Version>> = groups
        .iter()
        .map(|(g, vs)| (*g, vs.iter().rev().take(keep.last).collect()))
        .collect();
    versions
        .iter()
        .filter(|(_, g, v)| top.get(g).is_some_and(|t| t.contains(&v)))
        .map(|(name, _, _)| *name)
        .collect()
}

/// Decides every tag and untagged root of one repository.
pub fn decide(policy: Policy<'_>, tags: &[TagInput], untagged: &[UntaggedInput]) -> Vec<Decision> {
    let age = |since: SystemTime| policy.now.duration_since(since).unwrap_or_default();
    let (fallback, plain): (Vec<&TagInput>, Vec<&TagInput>) = tags
        .iter()
        .partition(|t| fallback_subject(&t.name).is_some());
    let mut out: Vec<Decision> = Vec::with_capacity(tags.len() + untagged.len());
    let keep_last: HashSet<&str> = match policy.rule.and_then(|r| r.keep_last) {
        Some(n) => {
            let mut order = plain.clone();
            order.sort_by(|a, b| b.pushed_at.cmp(&a.pushed_at).then(a.name.cmp(&b.name)));
            order.iter().take(n).map(|t| t.name.as_str()).collect()
        }
        None => HashSet::new(),
    };
    let semver: HashSet<&str> = match policy.rule.and_then(|r| r.keep_semver) {
        Some(k) => semver_kept(k, &plain),
        None => HashSet::new(),
    };
    for t in &plain {
        let a = age(t.since);
        let clause = match policy.rule {
            None => Clause::NoRule,
            Some(r) => tag_clause(policy, r, t, a, &keep_last, &semver),
        };
        let verdict = match clause {
            Clause::Table(_) => Verdict::Remove,
            _ => Verdict::Keep,
        };
        out.push(Decision {
            tag: Some(t.name.clone()),
            digest: t.digest.clone(),
            verdict,
            clause,
            age: a,
            subject: None,
        });
    }
    let (referrers, roots): (Vec<&UntaggedInput>, Vec<&UntaggedInput>) =
        untagged.iter().partition(|u| u.subject.is_some());
    for u in roots {
        let a = age(u.since);
        let clause = match policy
            .rule
            .and_then(|r| r.untagged_older_than.map(|d| (r, d)))
        {
            None if policy.rule.is_none() => Clause::NoRule,
            None => Clause::Untagged,
            Some(_) if policy.protected.protects(policy.repo, &u.digest) => Clause::Protected,
            Some((_, d)) if a <= d => Clause::UntaggedOlderThan,
            Some(_) if a <= policy.grace => Clause::Grace,
            Some((r, _)) => Clause::Table(r.index),
        };
        out.push(Decision {
            tag: None,
            digest: u.digest.clone(),
            verdict: if matches!(clause, Clause::Table(_)) {
                Verdict::Remove
            } else {
                Verdict::Keep
            },
            clause,
            age: a,
            subject: None,
        });
    }
    // Referrers last: they follow what was decided of their subjects.
    let removed: HashSet<Digest> = out
        .iter()
        .filter(|d| d.verdict == Verdict::Remove)
        .map(|d| d.digest.clone())
        .collect();
    let kept: HashSet<Digest> = out
        .iter()
        .filter(|d| d.verdict == Verdict::Keep)
        .map(|d| d.digest.clone())
        .collect();
    let goes_with_subject = |subject: &Digest| removed.contains(subject) && !kept.contains(subject);
    let mut followers = Vec::new();
    for t in fallback {
        let subject = fallback_subject(&t.name);
        let clause = if policy
            .protected
            .protects_tag(policy.repo, &t.name, &t.digest)
        {
            Clause::Protected
        } else if subject.as_ref().is_some_and(goes_with_subject) {
            Clause::SubjectRemoved
        } else {
            Clause::Referrer
        };
        followers.push((
            Some(t.name.clone()),
            t.digest.clone(),
            clause,
            age(t.since),
            subject,
        ));
    }
    for u in referrers {
        let clause = if policy.protected.protects(policy.repo, &u.digest) {
            Clause::Protected
        } else if u.subject.as_ref().is_some_and(goes_with_subject) {
            Clause::SubjectRemoved
        } else {
            Clause::Referrer
        };
        followers.push((
            None,
            u.digest.clone(),
            clause,
            age(u.since),
            u.subject.clone(),
        ));
    }
    for (tag, digest, clause, a, subject) in followers {
        out.push(Decision {
            tag,
            digest,
            verdict: if clause == Clause::SubjectRemoved {
                Verdict::Remove
            } else {
                Verdict::Keep
            },
            clause,
            age: a,
            subject,
        });
    }
    out
}

/// Keeps removals back (`trash_full`) so that what they add to the trash (`cost`) stays within
/// `budget`: the oldest first, each with the referrers that follow it (a referrer never goes
/// while its subject stays). Returns how many were kept back. Pure, so that a dry run keeps
/// back exactly what the real run does.
pub fn bound_trash(
    decisions: &mut [Decision],
    cost: &dyn Fn(&Decision) -> u64,
    budget: u64,
) -> usize {
    let removing = |d: &Decision| d.verdict == Verdict::Remove;
    let total: u64 = decisions.iter().filter(|d| removing(d)).map(cost).sum();
    if total <= budget {
        return 0;
    }
    // Leaders: removals that follow no subject this decision removes.
    let removed: HashSet<Digest> = (decisions.iter().filter(|d| removing(d)))
        .map(|d| d.digest.clone())
        .collect();
    let follows = |d: &Decision| {
        (d.subject.as_ref())
            .filter(|s| removed.contains(*s))
            .cloned()
    };
    let mut leaders: Vec<usize> = (0..decisions.len())
        .filter(|&i| removing(&decisions[i]) && follows(&decisions[i]).is_none())
        .collect();
    leaders.sort_by(|&a, &b| decisions[b].age.cmp(&decisions[a].age).then(a.cmp(&b)));
    let mut followers: HashMap<Digest, Vec<usize>> = HashMap::new();
    for (i, d) in decisions.iter().enumerate() {
        if let Some(s) = follows(d).filter(|_| removing(d)) {
            followers.entry(s).or_default().push(i);
        }
    }
    let (mut spent, mut kept_back) = (0u64, 0);
    let mut placed: HashSet<usize> = leaders.iter().copied().collect();
    for leader in leaders {
        // A referrer of a referrer follows too.
        let mut group = vec![leader];
        let mut at = 0;
        while at < group.len() {
            let digest = decisions[group[at]].digest.clone();
            for &f in followers.get(&digest).into_iter().flatten() {
                if placed.insert(f) {
                    group.push(f);
                }
            }
            at += 1;
        }
        let group_cost: u64 = group.iter().map(|&i| cost(&decisions[i])).sum();
        if spent + group_cost <= budget {
            spent += group_cost;
            continue;
        }
        for i in group {
            decisions[i].verdict = Verdict::Keep;
            decisions[i].clause = Clause::TrashFull;
            kept_back += 1;
        }
    }
    // Referrers whose subjects follow each other in a cycle reach no leader: kept back.
    for (i, d) in decisions.iter_mut().enumerate() {
        if d.verdict == Verdict::Remove && !placed.contains(&i) {
            d.verdict = Verdict::Keep;
            d.clause = Clause::TrashFull;
            kept_back += 1;
        }
    }
    kept_back
}

/// The clause that keeps tag `t`, or [`Clause::Table`] if it is a candidate under every one.
fn tag_clause(
    policy: Policy<'_>,
    rule: &Rule,
    t: &TagInput,
    age: Duration,
    keep_last: &HashSet<&str>,
    semver: &HashSet<&str>,
) -> Clause {
    if policy
        .protected
        .protects_tag(policy.repo, &t.name, &t.digest)
    {
        Clause::Protected
    } else if !rule.selects_tags() {
        Clause::NoTagClause
    } else if rule.keep_tags.iter().any(|r| r.is_match(&t.name)) {
        Clause::KeepTags
    } else if rule
        .delete_tags
        .as_ref()
        .is_some_and(|d| !d.iter().any(|r| r.is_match(&t.name)))
    {
        Clause::DeleteTags
    } else if semver.contains(t.name.as_str()) {
        Clause::KeepSemver
    } else if keep_last.contains(t.name.as_str()) {
        Clause::KeepLast
    } else if rule.older_than.is_some_and(|d| age <= d) {
        Clause::OlderThan
    } else if age <= policy.grace {
        Clause::Grace
    } else {
        Clause::Table(rule.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::rules::Rules;
    use serde_json::json;

    const DAY: u64 = 86400;

    fn at(days_ago: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1000 * DAY - days_ago * DAY)
    }

    fn tag(name: &str, days_ago: u64) -> TagInput {
        TagInput {
            name: name.into(),
            digest: Digest::sha256_of(name.as_bytes()),
            since: at(days_ago),
            pushed_at: at(days_ago),
        }
    }

    fn run(rule: serde_json::Value, tags: &[TagInput], protected: &str) -> Vec<(String, String)> {
        let rules = Rules::parse(&json!([rule])).expect("valid rule");
        let protected = Protected::parse(protected).expect("valid");
        let policy = Policy {
            repo: "app",
            rule: rules.for_repository("app"),
            protected: &protected,
            now: at(0),
            grace: Duration::from_secs(3600),
        };
        decide(policy, tags, &[])
            .into_iter()
            .map(|d| {
                let v = match d.verdict {
                    Verdict::Keep => "keep",
                    Verdict::Remove => "remove",
                };
                (d.tag.unwrap_or_default(), format!("{v} {}", d.clause))
            })
            .collect()
    }

    fn of<'a>(out: &'a [(String, String)], tag: &str) -> &'a str {
        out.iter()
            .find(|(t, _)| t == tag)
            .map_or("missing", |(_, d)| d.as_str())
    }

    #[test]
    fn every_clause_must_agree_before_a_tag_goes() {
        let tags = [
            tag("latest", 50),
            tag("pr-1", 40),
            tag("pr-2", 10),
            tag("main-1", 40),
            tag("pr-3", 35),
            tag("pr-4", 1),
        ];
        let out = run(
            json!({"keep_last": 1, "keep_tags": ["latest"], "delete_tags": ["pr-.*"],
                   "older_than": "30d"}),
            &tags,
            "app:pr-3\n",
        );
        assert_eq!(of(&out, "latest"), "keep keep_tags");
        assert_eq!(of(&out, "pr-1"), "remove retention[0]");
        assert_eq!(of(&out, "pr-2"), "keep older_than");
        assert_eq!(of(&out, "main-1"), "keep delete_tags");
        assert_eq!(of(&out, "pr-3"), "keep protected");
        assert_eq!(of(&out, "pr-4"), "keep keep_last");
    }

    #[test]
    fn grace_and_exempting_tables() {
        let young = TagInput {
            since: at(0) - Duration::from_secs(1800),
            ..tag("a", 0)
        };
        let tags = [young, tag("b", 2)];
        let out = run(json!({"older_than": "0s"}), &tags, "");
        assert_eq!(of(&out, "a"), "keep grace");
        assert_eq!(of(&out, "b"), "remove retention[0]");
        let out = run(json!({"keep_tags": ["x"]}), &tags, "");
        assert_eq!(of(&out, "b"), "keep no_tag_clause");
    }

    #[test]
    fn semver_keeps_the_highest_of_each_group() {
        let tags = [
            tag("1.2.3", 9),
            tag("v1.2.10", 9),
            tag("1.2.11-rc.1", 9),
            tag("1.3.0", 9),
            tag("2.0.0", 9),
            tag("nightly", 9),
        ];
        let out = run(
            json!({"keep_semver": {"per": "minor", "last": 1}}),
            &tags,
            "",
        );
        assert_eq!(of(&out, "1.2.11-rc.1"), "keep keep_semver");
        assert_eq!(of(&out, "v1.2.10"), "remove retention[0]");
        assert_eq!(of(&out, "1.3.0"), "keep keep_semver");
        assert_eq!(of(&out, "nightly"), "remove retention[0]");
        let out = run(
            json!({"keep_semver": {"per": "major", "last": 2}}),
            &tags,
            "",
        );
        assert_eq!(of(&out, "1.3.0"), "keep keep_semver");
        assert_eq!(of(&out, "1.2.11-rc.1"), "keep keep_semver");
        assert_eq!(of(&out, "v1.2.10"), "remove retention[0]");
        assert_eq!(of(&out, "2.0.0"), "keep keep_semver");
    }

    #[test]
    fn fallback_tags_follow_their_subject() {
        let old = tag("old", 90);
        let kept = tag("kept", 90);
        let sig = |t: &TagInput, suffix: &str| TagInput {
            name: format!("sha256-{}{suffix}", t.digest.hex()),
            ..tag("sig", 90)
        };
        let tags = [
            old.clone(),
            kept.clone(),
            sig(&old, ".sig"),
            sig(&kept, ".att"),
            sig(&old, ""),
        ];
        let out = run(json!({"keep_last": 1, "keep_tags": ["kept"]}), &tags, "");
        assert_eq!(of(&out, "old"), "remove retention[0]");
        assert_eq!(of(&out, &tags[2].name), "remove subject_removed");
        assert_eq!(of(&out, &tags[4].name), "remove subject_removed");
        assert_eq!(of(&out, &tags[3].name), "keep referrer");
        // keep_last counted only "old" and "kept": fallback tags are no tags of their own.
        assert!(fallback_subject("sha256-abc.sig").is_none());
    }

    #[test]
    fn the_trash_bound_keeps_back_the_youngest_with_their_referrers() {
        let d = |c: &str| Digest::parse(&format!("sha256:{}", c.repeat(64))).expect("digest");
        let removal = |c: &str, days: u64, subject: Option<&str>| Decision {
            tag: None,
            digest: d(c),
            verdict: Verdict::Remove,
            clause: match subject {
                Some(_) => Clause::SubjectRemoved,
                None => Clause::Table(0),
            },
            age: Duration::from_secs(days * 86400),
            subject: subject.map(d),
        };
        let mut out = vec![
            removal("a", 30, None),
            removal("b", 20, None),
            removal("c", 10, None),
            // A signature of `b`, and a signature of that signature.
            removal("e", 20, Some("b")),
            removal("f", 20, Some("e")),
            // A referrer of something kept: a leader of its own.
            removal("9", 5, Some("1")),
        ];
        let cost = |x: &Decision| if x.digest == d("c") { 50 } else { 10 };
        // Fits: nothing kept back.
        assert_eq!(bound_trash(&mut out.clone(), &cost, 110), 0);
        // `a` (10), then `b` with its two followers (30): 40; `c` (50) does not fit, `9` does.
        let kept_back = bound_trash(&mut out, &cost, 60);
        assert_eq!(kept_back, 1);
        let verdicts: Vec<&str> = out
            .iter()
            .map(|x| {
                if x.verdict == Verdict::Remove {
                    "remove"
                } else {
                    "keep"
                }
            })
            .collect();
        assert_eq!(
            verdicts,
            ["remove", "remove", "keep", "remove", "remove", "remove"]
        );
        assert_eq!(out[2].clause, Clause::TrashFull);
        // Too small for `b`'s group: the group stays together, never a referrer without its
        // subject.
        let mut out = vec![
            removal("b", 20, None),
            removal("e", 20, Some("b")),
            removal("f", 20, Some("e")),
        ];
        assert_eq!(bound_trash(&mut out, &|_| 10, 25), 3);
        assert!(out.iter().all(|x| x.clause == Clause::TrashFull));
    }
}
