//! Retention (issue 11, SPEC §3b): which tags go, decided per repository by the first
//! `[[retention]]` table that matches it, before the GC marks.
//!
//! The spine for one repository is one way: read the tags ([`Layout::read_tags`]) → their ages
//! ([`seen`]) → decide ([`decide`], pure) → record the removals in the trash ([`trash`],
//! before anything is removed, so the manifests stay roots) → remove, each only if it still
//! points where it did ([`Layout::remove_tags`]; `oci` re-reads and decides again when
//! `index.json` changed) → report. A dry run stops after deciding, so it lists exactly what
//! the real run removes from the same state.

pub mod decide;
pub mod protect;
pub mod restore;
pub mod rules;
pub mod seen;
pub mod trash;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::digest::Digest;
use crate::layout::{inline_manifest_entry, Doomed, Layout, Removal, Repository, TagError, TagSet};
use crate::store::Store;
use decide::{Clause, Decision, Policy, TagInput, UntaggedInput, Verdict};
use protect::Protected;
use rules::Rules;
use trash::TrashEntry;

/// How long removed tags stay in the trash unless `--trash-ttl` says otherwise.
pub const DEFAULT_TRASH_TTL: Duration = Duration::from_secs(7 * 86400);
/// Reads and decisions again after `index.json` changed underneath a removal.
const ATTEMPTS: usize = 5;
/// Largest manifest read to tell whether an untagged root is a referrer.
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// How large a trash that keeps removed manifests' content may grow by removals (its reader's
/// cap is 64 MiB, and an unreadable trash fails the repository closed).
const TRASH_CONTENT_BUDGET: u64 = 16 * 1024 * 1024;
/// A trash entry's fields besides any content, generously.
const TRASH_ENTRY_BYTES: u64 = 512;

/// The retention settings of a run.
#[derive(Clone, Debug)]
pub struct RetentionOptions {
    /// The tables.
    pub rules: Rules,
    /// Images never removed.
    pub protected: Protected,
    /// How long removed tags stay in the trash (their manifests roots).
    pub trash_ttl: Duration,
    /// Where `protected` was read from, so that a long-running daemon reads it again before
    /// every run (the cluster's images change).
    pub protect_file: Option<std::path::PathBuf>,
}

impl Default for RetentionOptions {
    fn default() -> Self {
        RetentionOptions {
            rules: Rules::default(),
            protected: Protected::default(),
            trash_ttl: DEFAULT_TRASH_TTL,
            protect_file: None,
        }
    }
}

impl RetentionOptions {
    /// These options with the protect file read again (unchanged without one); an
    /// unreadable file is an error: retention never runs without its protection.
    pub fn reloaded(&self) -> Result<RetentionOptions, protect::LoadError> {
        let mut out = self.clone();
        if let Some(path) = &self.protect_file {
            out.protected = Protected::load(path)?;
        }
        Ok(out)
    }

    /// Whether retention looks at repository `name` at all (a table matches it).
    pub fn applies_to(&self, name: &str) -> bool {
        self.rules.for_repository(name).is_some()
    }
}

/// One tag (or untagged root) in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TagReport {
    /// The tag; absent for an untagged root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest.
    pub digest: Digest,
    /// `keep` or `remove`.
    pub decision: Verdict,
    /// The clause that decided it (`keep_last`, `retention[0]`, `moved`, …).
    pub rule: String,
    /// Its age in seconds, from when it last moved.
    pub age_seconds: u64,
}

/// What retention did in one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// The table that applied (`retention[0]`).
    pub table: String,
    /// Every tag and untagged root, with its decision.
    pub tags: Vec<TagReport>,
    /// Roots removed (in a dry run: that would be removed).
    pub removed: u64,
    /// Roots kept.
    pub kept: u64,
    /// Roots decided for removal that a push moved meanwhile: left alone.
    pub moved: u64,
}

/// Why retention failed in a repository (nothing more is done there this run).
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// Reading or removing tags failed.
    #[error("retention: {0}")]
    Tags(#[from] TagError),
    /// The trash could not be written: nothing was removed.
    #[error("retention: {0}")]
    Trash(#[from] trash::TrashError),
    /// An untagged root could not be read.
    #[error("retention: reading {key}: {reason}")]
    Manifest { key: String, reason: String },
    /// The tags kept changing underneath.
    #[error("retention: the tags kept changing underneath; left for the next run")]
    Contended,
}

/// What one repository's retention gave.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The report.
    pub report: RetentionReport,
    /// Whether anything was removed (the repository's listing is stale now).
    pub changed: bool,
    /// Warnings.
    pub warnings: Vec<String>,
}

/// Everything one repository's retention runs under.
pub struct Run<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The layout.
    pub layout: &'a dyn Layout,
    /// The settings.
    pub options: &'a RetentionOptions,
    /// Now, on the bucket clock.
    pub now: SystemTime,
    /// `--grace`.
    pub grace: Duration,
    /// Decide and report only.
    pub dry_run: bool,
}

impl Run<'_> {
    /// Applies retention to `repo`; `None` where no table matches it.
    pub async fn apply(&self, repo: &Repository) -> Option<Result<Outcome, RetentionError>> {
        let rule = self.options.rules.for_repository(&repo.name)?;
        Some(self.apply_rule(repo, rule).await)
    }

    async fn apply_rule(
        &self,
        repo: &Repository,
        rule: &rules::Rule,
    ) -> Result<Outcome, RetentionError> {
        let mut warnings = Vec::new();
        for attempt in 0..ATTEMPTS {
            let mut set = self.layout.read_tags(self.store, repo).await?;
            // What the trash holds now (its size bounds what removals may add to it).
            let mut trash_size = 0;
            if rule.untagged_older_than.is_some() && self.layout.removes_untagged() {
                // Children of trashed manifests stay out of the roots while they are trashed.
                let trash_now = trash::read(self.store, &repo.name).await?;
                trash_size = trash_now.size;
                self.layout
                    .read_untagged(self.store, repo, &mut set, &trash_now.held(self.now))
                    .await?;
            } else if attempt == 0 && rule.untagged_older_than.is_some() {
                // serverless-registry with --delete-untagged: untagged manifests are no roots
                // there and go after --grace anyway.
                warnings.push(format!(
                    "{}.untagged_older_than has no effect on the {} layout with \
                     --delete-untagged: untagged manifests are collected after --grace",
                    rule.name(),
                    self.layout.name()
                ));
            }
            let seen = if set.shared_document {
                seen::read(self.store, &repo.name, &mut warnings)
                    .await
                    .map_err(TagError::from)?
            } else {
                seen::Seen::default()
            };
            let (tags, untagged) = self.inputs(repo, &set, &seen).await?;
            let policy = Policy {
                repo: &repo.name,
                rule: Some(rule),
                protected: &self.options.protected,
                now: self.now,
                grace: self.grace,
            };
            let mut decisions = decide::decide(policy, &tags, &untagged);
            if self.layout.trash_keeps_content() {
                // Each removed untagged manifest's content goes into the trash file, whose
                // reader has a cap: what would not fit waits for entries to expire.
                let cost = |d: &Decision| content_cost(&set, d);
                let budget = TRASH_CONTENT_BUDGET.saturating_sub(trash_size);
                let kept_back = decide::bound_trash(&mut decisions, &cost, budget);
                if kept_back > 0 && attempt == 0 {
                    warnings.push(format!(
                        "{kept_back} removals left for a later run (trash_full): the trash keeps \
                         each removed manifest's content and would grow past \
                         {TRASH_CONTENT_BUDGET} bytes"
                    ));
                }
            }
            let mut doomed: Vec<Doomed> = decisions
                .iter()
                .filter(|d| d.verdict == Verdict::Remove)
                .map(|d| Doomed {
                    tag: d.tag.clone(),
                    digest: d.digest.clone(),
                    subject: (d.clause == Clause::SubjectRemoved)
                        .then(|| d.subject.clone())
                        .flatten(),
                })
                .collect();
            if self.dry_run || doomed.is_empty() {
                if !self.dry_run && set.shared_document {
                    self.remember(repo, &set, &seen, &[], &mut warnings).await;
                }
                return Ok(outcome(rule, decisions, false, warnings));
            }
            // Where removing an untagged root deletes its manifest, its content is read now
            // (only for what goes) for the trash; one gone since stays gone, not removed here.
            let mut contents: HashMap<Digest, serde_json::Value> = HashMap::new();
            let mut gone: Vec<(Option<String>, Digest)> = Vec::new();
            if self.layout.trash_keeps_content() {
                for d in doomed.iter().filter(|d| d.tag.is_none()) {
                    match self.content(repo, &d.digest).await? {
                        Some(body) => {
                            contents.insert(d.digest.clone(), inline_manifest_entry(&body));
                        }
                        None => gone.push((None, d.digest.clone())),
                    }
                }
                doomed.retain(|d| d.tag.is_some() || contents.contains_key(&d.digest));
            }
            // The trash first: from here on the manifests are roots, whatever happens next.
            let entries: Vec<TrashEntry> = doomed
                .iter()
                .map(|d| {
                    let clause = decisions
                        .iter()
                        .find(|x| x.tag == d.tag && x.digest == d.digest)
                        .map_or(Clause::Table(rule.index), |x| x.clause);
                    let entry = match d.tag {
                        None => contents.get(&d.digest).cloned(),
                        Some(_) => None,
                    };
                    TrashEntry::new(
                        d.tag.clone(),
                        d.digest.clone(),
                        clause.to_string(),
                        entry.or_else(|| entry_of(&set, d)),
                        self.now,
                        self.options.trash_ttl,
                    )
                })
                .collect();
            let added = entries.clone();
            trash::update(self.store, &repo.name, self.now, move |all| {
                all.extend(added.iter().cloned())
            })
            .await?;
            let result = self
                .layout
                .remove_tags(self.store, repo, &set, &doomed)
                .await;
            let outcomes = match result {
                Ok(o) => o,
                // index.json changed since it was read: the entries just added are roots a
                // little longer than needed until the next attempt rewrites them.
                Err(TagError::Conflict) => {
                    self.forget(repo, &entries, &mut warnings).await;
                    continue;
                }
                // Some roots may be gone already: their entries stay (roots a little long).
                Err(e) => return Err(e.into()),
            };
            let mut not_removed = gone;
            let mut removed = Vec::new();
            for (d, o) in doomed.iter().zip(&outcomes) {
                match o {
                    Removal::Removed => removed.push(d.clone()),
                    Removal::Moved => not_removed.push((d.tag.clone(), d.digest.clone())),
                }
            }
            let left = |tag: &Option<String>, digest: &Digest| {
                not_removed.iter().any(|(t, g)| t == tag && g == digest)
            };
            for d in decisions.iter_mut() {
                if d.verdict == Verdict::Remove && left(&d.tag, &d.digest) {
                    d.verdict = Verdict::Keep;
                    d.clause = Clause::Moved;
                }
            }
            let stale: Vec<TrashEntry> = (entries.iter())
                .filter(|e| left(&e.tag, &e.digest))
                .cloned()
                .collect();
            self.forget(repo, &stale, &mut warnings).await;
            if set.shared_document {
                self.remember(repo, &set, &seen, &removed, &mut warnings)
                    .await;
            }
            return Ok(outcome(rule, decisions, !removed.is_empty(), warnings));
        }
        Err(RetentionError::Contended)
    }

    /// The tags and untagged roots of `set` with their ages and (untagged) subjects.
    async fn inputs(
        &self,
        repo: &Repository,
        set: &TagSet,
        seen: &seen::Seen,
    ) -> Result<(Vec<TagInput>, Vec<UntaggedInput>), RetentionError> {
        let tags = set
            .tags
            .iter()
            .map(|t| TagInput {
                name: t.name.clone(),
                digest: t.digest.clone(),
                since: if set.shared_document {
                    seen.tag_since(&t.name, &t.digest, t.moved_by)
                } else {
                    t.moved_by
                },
                pushed_at: t.pushed_at,
            })
            .collect();
        let mut untagged = Vec::with_capacity(set.untagged.len());
        for u in &set.untagged {
            // Whether it is a referrer, which lives and dies with its subject (as the layout
            // read it already, where it did).
            let subject = match &u.subject {
                Some(known) => known.clone(),
                None => {
                    let key = self.layout.content_key(repo, &u.digest, None);
                    let unreadable = |reason: String| RetentionError::Manifest {
                        key: key.clone(),
                        reason,
                    };
                    let body = (self.store.get_capped(&key, MAX_MANIFEST_SIZE).await)
                        .map_err(|e| unreadable(e.to_string()))?
                        .body;
                    (crate::manifest::references(&body).map_err(|e| unreadable(e.to_string()))?)
                        .subjects
                        .first()
                        .map(|s| s.digest.clone())
                }
            };
            untagged.push(UntaggedInput {
                digest: u.digest.clone(),
                since: seen.untagged_since(&u.digest, u.moved_by),
                subject,
            });
        }
        Ok((tags, untagged))
    }

    /// The content of manifest `digest` of `repo` as stored now, checked against its digest;
    /// `None` if it is gone.
    async fn content(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<bytes::Bytes>, RetentionError> {
        let key = self.layout.content_key(repo, digest, None);
        match self.store.get_capped(&key, MAX_MANIFEST_SIZE).await {
            Ok(o) if crate::gc::mark::content_matches(digest, &o.body) => Ok(Some(o.body)),
            Ok(_) => Err(RetentionError::Manifest {
                key,
                reason: format!("does not hold {digest}"),
            }),
            Err(crate::store::StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(RetentionError::Manifest {
                key,
                reason: e.to_string(),
            }),
        }
    }

    /// Records first-seen times for what stays (a failure only makes ages restart).
    async fn remember(
        &self,
        repo: &Repository,
        set: &TagSet,
        seen: &seen::Seen,
        removed: &[Doomed],
        warnings: &mut Vec<String>,
    ) {
        let gone: HashSet<(Option<&str>, &Digest)> = removed
            .iter()
            .map(|d| (d.tag.as_deref(), &d.digest))
            .collect();
        let next = seen.next(set, &|t, d| gone.contains(&(t, d)));
        if let Err(e) = seen.write(self.store, &repo.name, &next).await {
            warnings.push(format!("recording when tags were first seen: {e}"));
        }
    }

    /// Takes back trash entries this run added for roots it did not remove (best effort: an
    /// entry left behind only keeps a manifest a little longer).
    async fn forget(&self, repo: &Repository, entries: &[TrashEntry], warnings: &mut Vec<String>) {
        if entries.is_empty() {
            return;
        }
        let taken = trash::update(self.store, &repo.name, self.now, |all| {
            all.retain(|e| !entries.contains(e));
        })
        .await;
        if let Err(e) = taken {
            warnings.push(format!("taking back trash entries: {e}"));
        }
    }
}

/// What removing `d` adds to a trash that keeps removed manifests' content: base64 of the
/// listed size (of the largest manifest where unknown) and the entry's other fields.
fn content_cost(set: &TagSet, d: &Decision) -> u64 {
    if d.verdict != Verdict::Remove || d.tag.is_some() {
        return TRASH_ENTRY_BYTES;
    }
    let size = (set.untagged.iter())
        .find(|u| u.digest == d.digest)
        .and_then(|u| u.size)
        .unwrap_or(MAX_MANIFEST_SIZE);
    size.div_ceil(3) * 4 + TRASH_ENTRY_BYTES
}

/// The layout's entry for a doomed root (what restoring it writes back).
fn entry_of(set: &TagSet, d: &Doomed) -> Option<serde_json::Value> {
    match &d.tag {
        Some(tag) => set
            .tags
            .iter()
            .find(|t| t.name == *tag && t.digest == d.digest)
            .and_then(|t| t.entry.clone()),
        None => set
            .untagged
            .iter()
            .find(|u| u.digest == d.digest)
            .and_then(|u| u.entry.clone()),
    }
}

fn outcome(
    rule: &rules::Rule,
    decisions: Vec<Decision>,
    changed: bool,
    warnings: Vec<String>,
) -> Outcome {
    let mut report = RetentionReport {
        table: rule.name(),
        ..RetentionReport::default()
    };
    for d in decisions {
        match (d.verdict, d.clause) {
            (Verdict::Remove, _) => report.removed += 1,
            (Verdict::Keep, Clause::Moved) => {
                report.moved += 1;
                report.kept += 1;
            }
            (Verdict::Keep, _) => report.kept += 1,
        }
        report.tags.push(TagReport {
            tag: d.tag,
            digest: d.digest,
            decision: d.verdict,
            rule: d.clause.to_string(),
            age_seconds: d.age.as_secs(),
        });
    }
    report
        .tags
        .sort_by(|a, b| (&a.tag, &a.digest).cmp(&(&b.tag, &b.digest)));
    Outcome {
        report,
        changed,
        warnings,
    }
}
