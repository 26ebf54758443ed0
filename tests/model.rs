//! Model-based property test: no collector run ever deletes a blob an image needs.
//!
//! proptest generates random buckets in the `oci` layout by playing random sequences of
//! operations: pushes of images and indexes (layers shared within and across repositories),
//! retags, untags, referrers (listed in `index.json` or stored only as blobs), promotions of an
//! image to another repository, zot dedupe placeholders, broken documents, garbage, and
//! collector runs (eager, or with a delay while the clock offset makes time pass). Before every
//! run an oracle, written here without any of ocigc's marking code, computes from the bucket's
//! contents what each repository needs; after the run every deleted key is checked against it.
//! At the end, eager runs must leave no garbage.
//!
//! `PROPTEST_CASES=N cargo test --test model dir` runs N cases on the directory store (default
//! 64); the `s3` test runs 8 by default on moto.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use ocigc::gc::{run_gc, GcOptions};
use ocigc::layout::oci::OciLayout;
use ocigc::report::{RepoStatus, Report};
use ocigc::store::{PutCondition, Store};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// Whether the generator writes zot dedupe placeholders (0-byte blobs whose content lives in
/// another repository).
const PLACEHOLDERS: bool = true;

/// Nested (`team/app`, `team/app/tools`) and prefix-colliding (`lib/a`, `lib/a-b`) names.
const REPOS: [&str; 5] = ["team/app", "team/app/tools", "lib/a", "lib/a-b", "solo"];
const TAGS: [&str; 4] = ["latest", "v1", "v2", "dev"];
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const SIGNATURE: &str = "application/vnd.example.sig.v1";
/// Media types of documents: the oracle reads these and follows what they reference.
const DOCUMENTS: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];
const HALF_HOUR: Duration = Duration::from_secs(1800);
const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Operations

/// Where a pushed document goes in `index.json`.
#[derive(Clone, Copy, Debug)]
enum Root {
    Tag(usize),
    Untagged,
    /// Not listed: an abandoned push, garbage unless something else references it.
    Unlisted,
}

/// A root that cannot be marked: the repository must fail closed while it is listed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Broken {
    /// A manifest that is not in the bucket.
    MissingManifest,
    /// A manifest that is not JSON.
    Unparseable,
    /// An index whose child manifest is not in the bucket.
    MissingIndexChild,
    /// `index.json` itself is not JSON (until the next tag change rewrites it).
    BadIndexJson,
    /// A manifest stored only as a placeholder, its content nowhere.
    ContentlessManifest,
    /// An image whose layer is stored only as a placeholder, its content nowhere.
    ContentlessLayer,
}

/// Keys no image references.
#[derive(Clone, Copy, Debug)]
enum Junk {
    /// A content-addressed blob.
    Blob,
    /// Not blobs of the layout, never to be swept.
    Readme,
    NotADigest,
    UpperHex,
    /// Outside every repository.
    Unowned,
}

/// A collector run; `advance` half-hours pass on the bucket clock before it.
#[derive(Clone, Copy, Debug)]
struct Run {
    delay: bool,
    grace: bool,
    advance: u8,
    /// A dry run first, which must change nothing and plan exactly what the real run deletes.
    dry_run: bool,
}

impl Run {
    const EAGER: Run = Run {
        delay: false,
        grace: false,
        advance: 0,
        dry_run: false,
    };
}

/// One whole operation on the bucket. Indexes (`target`, `subject`, `pick`) are taken modulo
/// what exists when the operation runs, so any shrunk sequence still means something.
#[derive(Clone, Debug)]
enum Op {
    /// A new image with a fresh config and layers from a pool shared by every repository.
    Push {
        repo: usize,
        root: Root,
        layers: Vec<u8>,
        docker: bool,
        dedupe: bool,
    },
    /// A new index over documents of the repository (indexes included: indexes in indexes).
    PushIndex {
        repo: usize,
        root: Root,
        children: Vec<u16>,
        dedupe: bool,
    },
    /// A tag moved to an existing document, re-uploading what it lacks (as a push does).
    Retag {
        repo: usize,
        tag: usize,
        target: u16,
        dedupe: bool,
    },
    /// A tag removed from `index.json`, its entry dropped or kept as an untagged root.
    Untag {
        repo: usize,
        tag: usize,
        keep_untagged: bool,
    },
    /// A referrer of a document of the repository, listed in `index.json` or only a blob.
    Refer {
        repo: usize,
        subject: u16,
        listed: bool,
        dedupe: bool,
    },
    /// A document's tree (and optionally its referrers) promoted to another repository.
    Copy {
        from: usize,
        to: usize,
        pick: u16,
        tag: usize,
        with_referrers: bool,
        dedupe: bool,
    },
    /// An unreferenced placeholder of a digest stored in another repository, or of a digest
    /// stored nowhere.
    Placeholder {
        repo: usize,
        pick: u16,
        orphan: bool,
    },
    /// A tag pointing at something that cannot be marked.
    Break {
        repo: usize,
        tag: usize,
        kind: Broken,
    },
    Garbage {
        repo: usize,
        kind: Junk,
    },
    Gc(Run),
}

fn root() -> impl Strategy<Value = Root> {
    prop_oneof![
        3 => (0..TAGS.len()).prop_map(Root::Tag),
        1 => Just(Root::Untagged),
        1 => Just(Root::Unlisted),
    ]
}

/// Sequences of up to `max_ops` operations; without `placeholders`, no operation writes one.
fn ops(placeholders: bool, max_ops: usize) -> impl Strategy<Value = Vec<Op>> {
    let repo = || 0..REPOS.len();
    let tag = || 0..TAGS.len();
    let dedupe = move || any::<bool>().prop_map(move |d| d && placeholders);
    let mut broken = vec![
        Broken::MissingManifest,
        Broken::Unparseable,
        Broken::MissingIndexChild,
        Broken::BadIndexJson,
    ];
    if placeholders {
        broken.extend([Broken::ContentlessManifest, Broken::ContentlessLayer]);
    }
    let junk = vec![
        Junk::Blob,
        Junk::Blob,
        Junk::Readme,
        Junk::NotADigest,
        Junk::UpperHex,
        Junk::Unowned,
    ];
    let mut choices: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            6,
            (
                repo(),
                root(),
                vec(any::<u8>(), 1..4),
                any::<bool>(),
                dedupe(),
            )
                .prop_map(|(repo, root, layers, docker, dedupe)| Op::Push {
                    repo,
                    root,
                    layers,
                    docker,
                    dedupe,
                })
                .boxed(),
        ),
        (
            2,
            (repo(), root(), vec(any::<u16>(), 1..4), dedupe())
                .prop_map(|(repo, root, children, dedupe)| Op::PushIndex {
                    repo,
                    root,
                    children,
                    dedupe,
                })
                .boxed(),
        ),
        (
            3,
            (repo(), tag(), any::<u16>(), dedupe())
                .prop_map(|(repo, tag, target, dedupe)| Op::Retag {
                    repo,
                    tag,
                    target,
                    dedupe,
                })
                .boxed(),
        ),
        (
            3,
            (repo(), tag(), any::<bool>())
                .prop_map(|(repo, tag, keep_untagged)| Op::Untag {
                    repo,
                    tag,
                    keep_untagged,
                })
                .boxed(),
        ),
        (
            3,
            (repo(), any::<u16>(), any::<bool>(), dedupe())
                .prop_map(|(repo, subject, listed, dedupe)| Op::Refer {
                    repo,
                    subject,
                    listed,
                    dedupe,
                })
                .boxed(),
        ),
        (
            2,
            (repo(), repo(), any::<u16>(), tag(), any::<bool>(), dedupe())
                .prop_map(|(from, to, pick, tag, with_referrers, dedupe)| Op::Copy {
                    from,
                    to,
                    pick,
                    tag,
                    with_referrers,
                    dedupe,
                })
                .boxed(),
        ),
        (
            1,
            (repo(), tag(), proptest::sample::select(broken))
                .prop_map(|(repo, tag, kind)| Op::Break { repo, tag, kind })
                .boxed(),
        ),
        (
            2,
            (repo(), proptest::sample::select(junk))
                .prop_map(|(repo, kind)| Op::Garbage { repo, kind })
                .boxed(),
        ),
        (
            4,
            (
                any::<bool>(),
                any::<bool>(),
                0u8..4,
                proptest::bool::weighted(0.25),
            )
                .prop_map(|(delay, grace, advance, dry_run)| {
                    Op::Gc(Run {
                        delay,
                        grace,
                        advance,
                        dry_run,
                    })
                })
                .boxed(),
        ),
    ];
    if placeholders {
        choices.push((
            2,
            (repo(), any::<u16>(), proptest::bool::weighted(0.3))
                .prop_map(|(repo, pick, orphan)| Op::Placeholder { repo, pick, orphan })
                .boxed(),
        ));
    }
    vec(Union::new_weighted(choices), 1..max_ops)
}

// ---------------------------------------------------------------------------------------------
// The oracle: what each repository needs, from the bucket's contents alone

fn sha256_hex(data: &[u8]) -> String {
    sha256(data).trim_start_matches("sha256:").to_string()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The digest of empty content: a 0-byte blob with this digest is content, not a placeholder.
fn empty_hex() -> String {
    sha256_hex(b"")
}

/// `(repository, hex)` when `key` is a blob of an existing repository.
fn blob_of<'k>(key: &'k str, repos: &BTreeSet<String>) -> Option<(&'k str, &'k str)> {
    let (repo, hex) = key.rsplit_once("/blobs/sha256/")?;
    (repos.contains(repo) && is_hex64(hex)).then_some((repo, hex))
}

/// The descriptors a document points at (index children, config, layers, blobs), and its
/// subject when it is a referrer.
fn links(doc: &Value) -> (Vec<Value>, Option<Value>) {
    let mut out = Vec::new();
    for field in ["manifests", "layers", "blobs"] {
        if let Some(list) = doc.get(field).and_then(Value::as_array) {
            out.extend(list.iter().cloned());
        }
    }
    if let Some(config) = doc.get("config").filter(|v| v.is_object()) {
        out.push(config.clone());
    }
    (out, doc.get("subject").filter(|v| v.is_object()).cloned())
}

/// `(hex, is a document)` of a descriptor.
fn target(desc: &Value) -> Option<(String, bool)> {
    let hex = desc.get("digest")?.as_str()?.strip_prefix("sha256:")?;
    let is_doc = desc
        .get("mediaType")
        .and_then(Value::as_str)
        .is_some_and(|m| DOCUMENTS.contains(&m));
    is_hex64(hex).then(|| (hex.to_string(), is_doc))
}

#[derive(Debug)]
enum Verdict {
    /// The keys of the repository's reachable blobs; how many referrers only a scan of its
    /// blobs finds.
    Healthy {
        needed: BTreeSet<String>,
        via_scan: usize,
    },
    /// The repository cannot be marked: nothing in it may be deleted.
    FailClosed(String),
}

struct Oracle<'b> {
    bucket: &'b BTreeMap<String, Vec<u8>>,
    repos: BTreeMap<String, Verdict>,
    /// Blobs of each repository by hex.
    blobs: BTreeMap<String, BTreeMap<String, &'b [u8]>>,
    /// Keys of placeholders, by hex.
    placeholders: BTreeMap<String, BTreeSet<String>>,
    /// Keys holding content, by hex.
    copies: BTreeMap<String, BTreeSet<String>>,
}

impl<'b> Oracle<'b> {
    fn of(bucket: &'b BTreeMap<String, Vec<u8>>) -> Oracle<'b> {
        let names: BTreeSet<String> = bucket
            .keys()
            .filter_map(|k| k.strip_suffix("/oci-layout"))
            .map(str::to_string)
            .collect();
        let empty = empty_hex();
        let mut o = Oracle {
            bucket,
            repos: BTreeMap::new(),
            blobs: names.iter().map(|n| (n.clone(), BTreeMap::new())).collect(),
            placeholders: BTreeMap::new(),
            copies: BTreeMap::new(),
        };
        for (key, body) in bucket {
            let Some((repo, hex)) = blob_of(key, &names) else {
                continue;
            };
            if let Some(b) = o.blobs.get_mut(repo) {
                b.insert(hex.to_string(), body.as_slice());
            }
            let kind = if body.is_empty() && hex != empty {
                &mut o.placeholders
            } else {
                &mut o.copies
            };
            kind.entry(hex.to_string()).or_default().insert(key.clone());
        }
        for name in &names {
            let verdict = match o.mark(name) {
                Ok((needed, via_scan)) => Verdict::Healthy { needed, via_scan },
                Err(why) => Verdict::FailClosed(why),
            };
            o.repos.insert(name.clone(), verdict);
        }
        o
    }

    fn is_placeholder(hex: &str, body: &[u8]) -> bool {
        body.is_empty() && hex != empty_hex()
    }

    /// The content of `hex` as `repo` sees it: its own blob, or a placeholder's content copy
    /// anywhere in the bucket. `Ok(None)`: no blob in `repo`.
    fn read(&self, repo: &str, hex: &str) -> Result<Option<&'b [u8]>, String> {
        let Some(body) = self.blobs.get(repo).and_then(|b| b.get(hex)).copied() else {
            return Ok(None);
        };
        if !Self::is_placeholder(hex, body) {
            return Ok(Some(body));
        }
        self.copies
            .get(hex)
            .and_then(|keys| keys.iter().next())
            .and_then(|k| self.bucket.get(k))
            .map(|b| Some(b.as_slice()))
            .ok_or_else(|| format!("placeholder {repo}/blobs/sha256/{hex} has no content copy"))
    }

    /// Keys `repo` needs and how many referrers the blob scan found, or why it cannot be
    /// marked.
    fn mark(&self, repo: &str) -> Result<(BTreeSet<String>, usize), String> {
        let index = self
            .bucket
            .get(&format!("{repo}/index.json"))
            .ok_or("no index.json")?;
        let index: Value = serde_json::from_slice(index).map_err(|e| format!("index.json: {e}"))?;
        let roots = index
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or("index.json has no manifests")?;
        let empty = BTreeMap::new();
        let blobs = self.blobs.get(repo).unwrap_or(&empty);
        let mut queue: Vec<(String, bool)> = roots.iter().filter_map(target).collect();
        let mut reachable = BTreeSet::new();
        let mut parsed = BTreeSet::new();
        let mut via_scan = 0;
        loop {
            while let Some((hex, is_doc)) = queue.pop() {
                if reachable.insert(hex.clone()) {
                    // Any reachable placeholder needs content somewhere.
                    self.read(repo, &hex)?;
                }
                if !is_doc || !parsed.insert(hex.clone()) {
                    continue;
                }
                let body = self
                    .read(repo, &hex)?
                    .ok_or_else(|| format!("manifest {hex} is missing"))?;
                let doc: Value = serde_json::from_slice(body)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| format!("manifest {hex} is not JSON"))?;
                let (children, subject) = links(&doc);
                queue.extend(children.iter().chain(subject.as_ref()).filter_map(target));
            }
            // Referrers stored only as blobs: any blob whose `subject` is reachable.
            let found: Vec<(String, bool)> = blobs
                .keys()
                .filter(|hex| !reachable.contains(*hex))
                .filter(|hex| {
                    let Ok(Some(body)) = self.read(repo, hex) else {
                        return false;
                    };
                    serde_json::from_slice::<Value>(body)
                        .ok()
                        .and_then(|doc| links(&doc).1)
                        .and_then(|s| target(&s))
                        .is_some_and(|(s, _)| reachable.contains(&s))
                })
                .map(|hex| (hex.clone(), true))
                .collect();
            if found.is_empty() {
                break;
            }
            via_scan += found.len();
            queue = found;
        }
        let needed = reachable
            .iter()
            .filter(|hex| blobs.contains_key(*hex))
            .map(|hex| format!("{repo}/blobs/sha256/{hex}"))
            .collect();
        Ok((needed, via_scan))
    }

    fn names(&self) -> BTreeSet<String> {
        self.repos.keys().cloned().collect()
    }

    /// Why deleting `removed` (leaving `after`) lost something: a non-blob key, a key of a
    /// repository that must fail closed, a needed blob, or the last content copy of a digest
    /// whose placeholders remain.
    fn check_deletions(&self, removed: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
        let names = self.names();
        let mut wrong = Vec::new();
        for key in removed {
            let Some((repo, _)) = blob_of(key, &names) else {
                wrong.push(format!(
                    "deleted {key}, which is not a blob of a repository"
                ));
                continue;
            };
            match &self.repos[repo] {
                Verdict::FailClosed(why) => wrong.push(format!(
                    "deleted {key} although {repo} must fail closed ({why})"
                )),
                Verdict::Healthy { needed, .. } if needed.contains(key) => {
                    wrong.push(format!("deleted {key}, which {repo} needs"))
                }
                Verdict::Healthy { .. } => {}
            }
        }
        for (hex, placeholders) in &self.placeholders {
            let copies = self.copies.get(hex);
            let remain = placeholders.iter().any(|k| after.contains(k));
            if remain
                && copies.is_some_and(|c| !c.is_empty())
                && !copies.into_iter().flatten().any(|k| after.contains(k))
            {
                wrong.push(format!(
                    "deleted every content copy of {hex} ({copies:?}) while placeholders remain"
                ));
            }
        }
        wrong
    }

    /// Repositories the report gives the wrong status: one that must fail closed and did not
    /// say so, or a healthy one that did not finish.
    fn check_statuses(&self, report: &Report) -> Vec<String> {
        let mut wrong = Vec::new();
        for (name, verdict) in &self.repos {
            let Some(r) = report.repositories.iter().find(|r| &r.name == name) else {
                wrong.push(format!("{name} is not in the report"));
                continue;
            };
            match verdict {
                Verdict::FailClosed(why) if r.status != RepoStatus::Failed => wrong.push(format!(
                    "{name} must fail closed ({why}) but is {:?}",
                    r.status
                )),
                Verdict::Healthy { .. } if r.status != RepoStatus::Ok => {
                    wrong.push(format!("healthy {name} is {:?}: {:?}", r.status, r.errors))
                }
                _ => {}
            }
        }
        if report.totals.dangling_references != 0 {
            wrong.push(format!(
                "{} dangling references",
                report.totals.dangling_references
            ));
        }
        wrong
    }

    /// Blobs no eager run had a reason to keep: not needed, not in a repository that fails
    /// closed, and not a content copy of a digest that still has a placeholder.
    fn garbage(&self) -> Vec<String> {
        let names = self.names();
        self.bucket
            .iter()
            .filter_map(|(key, body)| {
                let (repo, hex) = blob_of(key, &names)?;
                let kept = match &self.repos[repo] {
                    Verdict::FailClosed(_) => true,
                    Verdict::Healthy { needed, .. } => {
                        needed.contains(key)
                            || (!Self::is_placeholder(hex, body)
                                && self.placeholders.contains_key(hex))
                    }
                };
                (!kept).then(|| key.clone())
            })
            .collect()
    }
}

/// What the cases of one property exercised, so that a generator that stopped producing the
/// interesting situations shows.
#[derive(Default)]
struct Stats {
    runs: AtomicU64,
    deleted: AtomicU64,
    fail_closed: AtomicU64,
    via_scan: AtomicU64,
    placeholders_needed: AtomicU64,
}

impl Stats {
    fn count(&self, oracle: &Oracle<'_>, deleted: usize) {
        self.runs.fetch_add(1, Relaxed);
        self.deleted.fetch_add(deleted as u64, Relaxed);
        for verdict in oracle.repos.values() {
            match verdict {
                Verdict::FailClosed(_) => self.fail_closed.fetch_add(1, Relaxed),
                Verdict::Healthy { needed, via_scan } => {
                    let placeholders = needed
                        .iter()
                        .filter(|k| {
                            let hex = k.rsplit('/').next().unwrap_or_default();
                            oracle
                                .bucket
                                .get(*k)
                                .is_some_and(|b| Oracle::is_placeholder(hex, b))
                        })
                        .count();
                    self.placeholders_needed
                        .fetch_add(placeholders as u64, Relaxed);
                    self.via_scan.fetch_add(*via_scan as u64, Relaxed)
                }
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The world: plays operations on a store and keeps what it wrote

#[derive(Default)]
struct RepoModel {
    created: bool,
    /// `index.json` entries: tag (none: untagged root) and descriptor.
    roots: Vec<(Option<String>, Value)>,
    /// Documents pushed or promoted here, which later operations may reuse.
    docs: Vec<String>,
}

struct World<'s> {
    store: Arc<dyn Store>,
    stats: &'s Stats,
    placeholders: bool,
    /// Every key outside `_ocigc/` with its content, as written and left by the collector.
    bucket: BTreeMap<String, Vec<u8>>,
    /// Content of every digest generated so far (what a pusher has locally), by hex.
    content: HashMap<String, Vec<u8>>,
    /// Media types of generated documents, by hex.
    doc_types: HashMap<String, String>,
    repos: Vec<RepoModel>,
    /// Layers `0..layers` exist in the shared pool; layer 0 is empty.
    layers: usize,
    serial: u64,
    offset: Duration,
}

fn descriptor(media_type: &str, hex: &str, size: usize) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size})
}

fn key_of(repo: usize, hex: &str) -> String {
    format!("{}/blobs/sha256/{hex}", REPOS[repo])
}

fn layer_content(i: usize) -> Vec<u8> {
    if i == 0 {
        Vec::new()
    } else {
        format!("layer {i}").into_bytes()
    }
}

impl<'s> World<'s> {
    fn new(store: Arc<dyn Store>, stats: &'s Stats, placeholders: bool) -> World<'s> {
        World {
            store,
            stats,
            placeholders,
            bucket: BTreeMap::new(),
            content: HashMap::new(),
            doc_types: HashMap::new(),
            repos: REPOS.iter().map(|_| RepoModel::default()).collect(),
            layers: 1,
            serial: 0,
            offset: Duration::ZERO,
        }
    }

    fn next(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    async fn put(&mut self, key: String, body: Vec<u8>) -> Result<(), String> {
        self.store
            .put(&key, Bytes::from(body.clone()), PutCondition::None)
            .await
            .map_err(|e| format!("put {key}: {e}"))?;
        self.bucket.insert(key, body);
        Ok(())
    }

    /// Remembers content; returns its descriptor.
    fn register(&mut self, media_type: &str, body: Vec<u8>) -> Value {
        let hex = sha256_hex(&body);
        let desc = descriptor(media_type, &hex, body.len());
        if DOCUMENTS.contains(&media_type) {
            self.doc_types.insert(hex.clone(), media_type.to_string());
        }
        self.content.insert(hex, body);
        desc
    }

    fn doc_descriptor(&self, hex: &str) -> Value {
        let media_type = self.doc_types.get(hex).map_or(OCI_MANIFEST, String::as_str);
        descriptor(media_type, hex, self.content.get(hex).map_or(0, Vec::len))
    }

    fn document(&mut self, doc: &Value) -> Value {
        let media_type = doc["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        self.register(&media_type, serde_json::to_vec(doc).expect("json"))
    }

    async fn ensure_repo(&mut self, repo: usize) -> Result<(), String> {
        if !self.repos[repo].created {
            self.repos[repo].created = true;
            self.put(
                format!("{}/oci-layout", REPOS[repo]),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            )
            .await?;
            self.write_index(repo).await?;
        }
        Ok(())
    }

    async fn write_index(&mut self, repo: usize) -> Result<(), String> {
        let manifests: Vec<Value> = self.repos[repo]
            .roots
            .iter()
            .map(|(tag, desc)| {
                let mut d = desc.clone();
                if let Some(t) = tag {
                    d["annotations"] = json!({"org.opencontainers.image.ref.name": t});
                }
                d
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        let body = serde_json::to_vec(&index).expect("json");
        self.put(format!("{}/index.json", REPOS[repo]), body).await
    }

    async fn set_root(
        &mut self,
        repo: usize,
        tag: Option<&str>,
        desc: Value,
    ) -> Result<(), String> {
        let roots = &mut self.repos[repo].roots;
        match tag {
            Some(t) => {
                roots.retain(|(x, _)| x.as_deref() != Some(t));
                roots.push((Some(t.to_string()), desc));
            }
            None => {
                if !roots
                    .iter()
                    .any(|(x, d)| x.is_none() && d["digest"] == desc["digest"])
                {
                    roots.push((None, desc));
                }
            }
        }
        self.write_index(repo).await
    }

    async fn place(&mut self, repo: usize, root: Root, desc: Value) -> Result<(), String> {
        match root {
            Root::Tag(t) => self.set_root(repo, Some(TAGS[t]), desc).await,
            Root::Untagged => self.set_root(repo, None, desc).await,
            Root::Unlisted => Ok(()),
        }
    }

    /// Uploads one blob unless the repository has it (content or placeholder). With `dedupe`,
    /// content stored in another repository becomes a placeholder here, as zot does.
    async fn upload(&mut self, repo: usize, hex: &str, dedupe: bool) -> Result<(), String> {
        let key = key_of(repo, hex);
        if self.bucket.contains_key(&key) {
            return Ok(());
        }
        let Some(body) = self.content.get(hex).cloned() else {
            return Ok(());
        };
        let suffix = format!("/blobs/sha256/{hex}");
        let elsewhere = self
            .bucket
            .iter()
            .any(|(k, v)| k.ends_with(&suffix) && !v.is_empty());
        let placeholder = self.placeholders && dedupe && !body.is_empty() && elsewhere;
        self.put(key, if placeholder { Vec::new() } else { body })
            .await
    }

    /// Uploads a document and everything under it that the repository lacks, children first.
    async fn upload_tree(&mut self, repo: usize, hex: &str, dedupe: bool) -> Result<(), String> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![hex.to_string()];
        while let Some(h) = stack.pop() {
            if !seen.insert(h.clone()) {
                continue;
            }
            if self.doc_types.contains_key(&h) {
                if let Some(doc) = self
                    .content
                    .get(&h)
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                {
                    stack.extend(links(&doc).0.iter().filter_map(target).map(|t| t.0));
                }
            }
            order.push(h);
        }
        for h in order.iter().rev() {
            self.upload(repo, h, dedupe).await?;
        }
        Ok(())
    }

    fn pick_doc(&self, repo: usize, pick: u16) -> Option<String> {
        let docs = &self.repos[repo].docs;
        (!docs.is_empty()).then(|| docs[usize::from(pick) % docs.len()].clone())
    }

    /// Referrers among the documents of `repo` whose subject is `hex`, transitively.
    fn referrers_of(&self, repo: usize, hex: &str) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        let mut subjects = vec![hex.to_string()];
        while let Some(s) = subjects.pop() {
            for d in &self.repos[repo].docs {
                let subject = self
                    .content
                    .get(d)
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                    .and_then(|doc| links(&doc).1)
                    .and_then(|v| target(&v));
                if subject.is_some_and(|(x, _)| x == s) && !found.contains(d) {
                    found.push(d.clone());
                    subjects.push(d.clone());
                }
            }
        }
        found
    }

    async fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Push {
                repo,
                root,
                ref layers,
                docker,
                dedupe,
            } => {
                self.ensure_repo(repo).await?;
                let hex = self.new_image(layers, docker);
                self.upload_tree(repo, &hex, dedupe).await?;
                self.repos[repo].docs.push(hex.clone());
                self.place(repo, root, self.doc_descriptor(&hex)).await
            }
            Op::PushIndex {
                repo,
                root,
                ref children,
                dedupe,
            } => {
                self.ensure_repo(repo).await?;
                let children: Vec<Value> = children
                    .iter()
                    .filter_map(|p| self.pick_doc(repo, *p))
                    .map(|h| self.doc_descriptor(&h))
                    .collect();
                if children.is_empty() {
                    return Ok(());
                }
                let n = self.next();
                let desc = self.document(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": children,
                    "annotations": {"serial": n.to_string()},
                }));
                let hex = target(&desc).expect("descriptor").0;
                self.upload_tree(repo, &hex, dedupe).await?;
                self.repos[repo].docs.push(hex);
                self.place(repo, root, desc).await
            }
            Op::Retag {
                repo,
                tag,
                target: pick,
                dedupe,
            } => {
                let Some(hex) = self.pick_doc(repo, pick) else {
                    return Ok(());
                };
                self.upload_tree(repo, &hex, dedupe).await?;
                self.set_root(repo, Some(TAGS[tag]), self.doc_descriptor(&hex))
                    .await
            }
            Op::Untag {
                repo,
                tag,
                keep_untagged,
            } => {
                if !self.repos[repo].created {
                    return Ok(());
                }
                let roots = &mut self.repos[repo].roots;
                let tagged = roots
                    .iter()
                    .position(|(t, _)| t.as_deref() == Some(TAGS[tag]));
                let removed = tagged.map(|i| roots.remove(i));
                match removed {
                    Some((_, desc)) if keep_untagged => self.set_root(repo, None, desc).await,
                    _ => self.write_index(repo).await,
                }
            }
            Op::Refer {
                repo,
                subject,
                listed,
                dedupe,
            } => {
                let Some(subject) = self.pick_doc(repo, subject) else {
                    return Ok(());
                };
                let n = self.next();
                let config = self.register(OCI_EMPTY, b"{}".to_vec());
                let payload = self.register(SIGNATURE, format!("signature {n}").into_bytes());
                let desc = self.document(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.example.sig",
                    "config": config,
                    "layers": [payload],
                    "subject": self.doc_descriptor(&subject),
                }));
                let hex = target(&desc).expect("descriptor").0;
                self.upload_tree(repo, &hex, dedupe).await?;
                self.repos[repo].docs.push(hex);
                if listed {
                    self.set_root(repo, None, desc).await?;
                }
                Ok(())
            }
            Op::Copy {
                from,
                to,
                pick,
                tag,
                with_referrers,
                dedupe,
            } => {
                let to = if from == to {
                    (to + 1) % REPOS.len()
                } else {
                    to
                };
                let Some(hex) = self.pick_doc(from, pick) else {
                    return Ok(());
                };
                self.ensure_repo(to).await?;
                self.upload_tree(to, &hex, dedupe).await?;
                self.repos[to].docs.push(hex.clone());
                if with_referrers {
                    for r in self.referrers_of(from, &hex) {
                        self.upload_tree(to, &r, dedupe).await?;
                        self.repos[to].docs.push(r);
                    }
                }
                self.set_root(to, Some(TAGS[tag]), self.doc_descriptor(&hex))
                    .await
            }
            Op::Placeholder { repo, pick, orphan } => {
                if !self.placeholders {
                    return Ok(());
                }
                self.ensure_repo(repo).await?;
                let hex = if orphan {
                    let n = self.next();
                    sha256_hex(format!("nowhere {n}").as_bytes())
                } else {
                    let own = format!("{}/blobs/sha256/", REPOS[repo]);
                    let elsewhere: BTreeSet<&str> = self
                        .bucket
                        .iter()
                        .filter(|(k, v)| !v.is_empty() && !k.starts_with(&own))
                        .filter_map(|(k, _)| k.rsplit_once("/blobs/sha256/"))
                        .map(|(_, h)| h)
                        .filter(|h| is_hex64(h))
                        .collect();
                    if elsewhere.is_empty() {
                        return Ok(());
                    }
                    let i = usize::from(pick) % elsewhere.len();
                    elsewhere.into_iter().nth(i).unwrap_or_default().to_string()
                };
                let key = key_of(repo, &hex);
                if self.bucket.contains_key(&key) {
                    return Ok(());
                }
                self.put(key, Vec::new()).await
            }
            Op::Break { repo, tag, kind } => {
                self.ensure_repo(repo).await?;
                self.break_tag(repo, TAGS[tag], kind).await
            }
            Op::Garbage { repo, kind } => {
                self.ensure_repo(repo).await?;
                let n = self.next();
                let body = format!("garbage {n}").into_bytes();
                let hex = sha256_hex(&body);
                let key = match kind {
                    Junk::Blob => key_of(repo, &hex),
                    Junk::Readme => format!("{}/README", REPOS[repo]),
                    Junk::NotADigest => format!("{}/blobs/sha256/not-a-digest-{n}", REPOS[repo]),
                    Junk::UpperHex => key_of(repo, &hex.to_uppercase()),
                    Junk::Unowned => format!("junk/{n}"),
                };
                self.put(key, body).await
            }
            Op::Gc(run) => self.collect(run).await.map(|_| ()),
        }
    }

    /// A fresh image (config unique to it, layers from the shared pool); returns its hex.
    fn new_image(&mut self, layers: &[u8], docker: bool) -> String {
        let (manifest_type, config_type, layer_type) = if docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        } else {
            (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
        };
        let n = self.next();
        let config = self.register(config_type, format!("{{\"image\":{n}}}").into_bytes());
        let layers: Vec<Value> = layers
            .iter()
            .map(|p| {
                let i = usize::from(*p) % (self.layers + 1);
                self.layers = self.layers.max(i + 1);
                self.register(layer_type, layer_content(i))
            })
            .collect();
        let desc = self.document(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config,
            "layers": layers,
        }));
        target(&desc).expect("descriptor").0
    }

    async fn break_tag(&mut self, repo: usize, tag: &str, kind: Broken) -> Result<(), String> {
        let n = self.next();
        let missing = descriptor(
            OCI_MANIFEST,
            &sha256_hex(format!("missing {n}").as_bytes()),
            10,
        );
        let desc = match kind {
            Broken::MissingManifest => missing,
            Broken::Unparseable => {
                let body = format!("{{broken manifest {n}").into_bytes();
                let desc = descriptor(OCI_MANIFEST, &sha256_hex(&body), body.len());
                self.put(key_of(repo, &sha256_hex(&body)), body).await?;
                desc
            }
            Broken::MissingIndexChild => {
                let desc = self.document(&json!({
                    "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [missing],
                }));
                let hex = target(&desc).expect("descriptor").0;
                self.upload(repo, &hex, false).await?;
                desc
            }
            Broken::BadIndexJson => {
                return self
                    .put(format!("{}/index.json", REPOS[repo]), b"]]".to_vec())
                    .await;
            }
            Broken::ContentlessManifest | Broken::ContentlessLayer => {
                let lost = format!("lost layer {n}").into_bytes();
                let lost_hex = sha256_hex(&lost);
                let config = self.register(OCI_CONFIG, format!("{{\"lost\":{n}}}").into_bytes());
                let config_hex = target(&config).expect("descriptor").0;
                self.upload(repo, &config_hex, false).await?;
                let manifest = json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": config,
                    "layers": [descriptor(OCI_LAYER, &lost_hex, lost.len())],
                });
                let body = serde_json::to_vec(&manifest).expect("json");
                let hex = sha256_hex(&body);
                let desc = descriptor(OCI_MANIFEST, &hex, body.len());
                if kind == Broken::ContentlessManifest {
                    self.put(key_of(repo, &hex), Vec::new()).await?;
                } else {
                    self.put(key_of(repo, &lost_hex), Vec::new()).await?;
                    self.put(key_of(repo, &hex), body).await?;
                }
                desc
            }
        };
        self.set_root(repo, Some(tag), desc).await
    }

    /// Keys and sizes outside `_ocigc/`, and the whole listing.
    async fn listing(&self) -> Result<(BTreeMap<String, u64>, BTreeSet<String>), String> {
        let pages: Vec<_> = self
            .store
            .list("")
            .try_collect()
            .await
            .map_err(|e| format!("listing: {e}"))?;
        let all: Vec<_> = pages.into_iter().flatten().collect();
        let keys = all.iter().map(|o| o.key.clone()).collect();
        let objects = all
            .into_iter()
            .filter(|o| !o.key.starts_with("_ocigc/"))
            .map(|o| (o.key, o.size))
            .collect();
        Ok((objects, keys))
    }

    async fn gc(&self, opts: &GcOptions) -> Result<Report, String> {
        run_gc(self.store.clone(), Arc::new(OciLayout), opts)
            .await
            .map_err(|e| format!("gc run: {e:#}"))
    }

    /// One collector run (after a dry run, if asked), checked against the oracle computed
    /// from the bucket before it. Returns the keys it deleted.
    async fn collect(&mut self, run: Run) -> Result<BTreeSet<String>, String> {
        self.offset += HALF_HOUR * u32::from(run.advance);
        let opts = GcOptions {
            grace: if run.grace { HOUR } else { Duration::ZERO },
            delay: if run.delay { HOUR } else { Duration::ZERO },
            clock_offset: self.offset,
            concurrency: 4,
            ..eager()
        };
        let (objects, all_before) = self.listing().await?;
        let modelled: BTreeMap<String, u64> = self
            .bucket
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect();
        if objects != modelled {
            return Err(format!(
                "the bucket differs from the model: {objects:?} vs {modelled:?}"
            ));
        }
        let oracle = Oracle::of(&self.bucket);
        let keys: BTreeSet<String> = self.bucket.keys().cloned().collect();
        let mut planned = None;
        if run.dry_run {
            let dry = self
                .gc(&GcOptions {
                    dry_run: true,
                    ..opts.clone()
                })
                .await?;
            if self.listing().await?.1 != all_before {
                return Err("the dry run changed the bucket".into());
            }
            let plan = all_deleted_keys(&dry);
            let left: BTreeSet<String> = keys.difference(&plan).cloned().collect();
            let mut wrong = oracle.check_deletions(&plan, &left);
            wrong.extend(oracle.check_statuses(&dry));
            if !wrong.is_empty() {
                return Err(format!("dry run: {wrong:#?}"));
            }
            planned = Some(plan);
        }
        let report = self.gc(&opts).await?;
        let (after, _) = self.listing().await?;
        let left: BTreeSet<String> = after.keys().cloned().collect();
        if let Some(k) = left.difference(&keys).next() {
            return Err(format!("the run wrote {k}"));
        }
        let removed: BTreeSet<String> = keys.difference(&left).cloned().collect();
        let mut wrong = oracle.check_deletions(&removed, &left);
        wrong.extend(oracle.check_statuses(&report));
        if all_deleted_keys(&report) != removed {
            wrong.push(format!(
                "report lists {:?}, bucket lost {removed:?}",
                all_deleted_keys(&report)
            ));
        }
        if planned.as_ref().is_some_and(|p| *p != removed) {
            wrong.push(format!(
                "dry run planned {planned:?}, real run deleted {removed:?}"
            ));
        }
        if !wrong.is_empty() {
            return Err(format!("{run:?}: {wrong:#?}"));
        }
        self.stats.count(&oracle, removed.len());
        for k in &removed {
            self.bucket.remove(k);
        }
        Ok(removed)
    }

    /// Eager runs until one deletes nothing; then no garbage may be left, and every key must
    /// still hold what was written to it.
    async fn finish(&mut self) -> Result<(), String> {
        let mut converged = false;
        for _ in 0..4 {
            if self.collect(Run::EAGER).await?.is_empty() {
                converged = true;
                break;
            }
        }
        if !converged {
            return Err("four eager runs in a row still deleted something".into());
        }
        let garbage = Oracle::of(&self.bucket).garbage();
        if !garbage.is_empty() {
            return Err(format!("garbage left after eager runs: {garbage:#?}"));
        }
        for (key, body) in &self.bucket {
            let got = self
                .store
                .get(key)
                .await
                .map_err(|e| format!("reading {key}: {e}"))?;
            if got.body.as_ref() != body.as_slice() {
                return Err(format!("{key} does not hold what was written to it"));
            }
        }
        Ok(())
    }
}

/// Plays `ops` on `store`, then the final eager runs.
async fn play(
    store: Arc<dyn Store>,
    stats: &Stats,
    ops: &[Op],
    placeholders: bool,
) -> Result<(), String> {
    let mut world = World::new(store, stats, placeholders);
    for (i, op) in ops.iter().enumerate() {
        world
            .apply(op)
            .await
            .map_err(|e| format!("operation {i} ({op:?}): {e}"))?;
    }
    world.finish().await.map_err(|e| format!("final runs: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The properties

#[derive(Clone, Copy)]
enum Kind {
    Dir,
    S3,
}

/// A directory store in memory where the machine has a tmpfs: the store syncs every write,
/// which on a disk costs more than everything else the test does.
fn memory_dir_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let store = ocigc::store::DirStore::open(dir.path()).expect("open dir store");
    (Arc::new(store), dir)
}

/// `PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check_model(kind: Kind, cases: u32, max_ops: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = Config {
        cases,
        // A counter-example becomes a named regression test below, not a file.
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let stats = Stats::default();
    let result = runner.run(&ops(PLACEHOLDERS, max_ops), |ops| {
        rt.block_on(async {
            match kind {
                Kind::Dir => {
                    let (store, _dir) = memory_dir_store();
                    play(store, &stats, &ops, PLACEHOLDERS).await
                }
                Kind::S3 => play(s3_store().await.store, &stats, &ops, PLACEHOLDERS).await,
            }
        })
        .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let get = |c: &AtomicU64| c.load(Relaxed);
    eprintln!(
        "{cases} cases: {} collector runs, {} keys deleted, {} repositories failing closed, \
         {} referrers found only as blobs, {} placeholders needed (summed over runs)",
        get(&stats.runs),
        get(&stats.deleted),
        get(&stats.fail_closed),
        get(&stats.via_scan),
        get(&stats.placeholders_needed),
    );
    // With enough cases every situation the generator aims at must have come up.
    if cases >= 32 {
        assert!(get(&stats.deleted) > 0, "no case deleted anything");
        assert!(
            get(&stats.fail_closed) > 0,
            "no case had a broken repository"
        );
        assert!(get(&stats.via_scan) > 0, "no case had an unlisted referrer");
        assert!(
            !PLACEHOLDERS || get(&stats.placeholders_needed) > 0,
            "no case needed a placeholder"
        );
    }
}

#[test]
fn dir() {
    check_model(Kind::Dir, cases(64), 40);
}

#[test]
fn s3() {
    check_model(Kind::S3, cases(8), 24);
}

// ---------------------------------------------------------------------------------------------
// The oracle itself: it must be able to fail

fn bucket_of(entries: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

fn manifest_with(config: &[u8], layer: &[u8], subject: Option<&[u8]>) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &sha256_hex(config), config.len()),
        "layers": [descriptor(OCI_LAYER, &sha256_hex(layer), layer.len())],
    });
    if let Some(s) = subject {
        m["subject"] = descriptor(OCI_MANIFEST, &sha256_hex(s), s.len());
    }
    serde_json::to_vec(&m).expect("json")
}

fn index_of(manifest: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [descriptor(OCI_MANIFEST, &sha256_hex(manifest), manifest.len())],
    }))
    .expect("json")
}

fn blob(repo: &str, body: &[u8]) -> String {
    format!("{repo}/blobs/sha256/{}", sha256_hex(body))
}

#[test]
fn oracle_needs_the_tree_and_unlisted_referrers_and_nothing_else() {
    let m = manifest_with(b"{\"c\":1}", b"layer", None);
    let sig = manifest_with(b"{}", b"sig", Some(&m));
    let junk = manifest_with(b"{\"c\":2}", b"other", None);
    let index = index_of(&m);
    let bucket = bucket_of(&[
        ("r/oci-layout", b"{}"),
        ("r/index.json", &index),
        (&blob("r", &m), &m),
        (&blob("r", b"{\"c\":1}"), b"{\"c\":1}"),
        (&blob("r", b"layer"), b"layer"),
        (&blob("r", &sig), &sig),
        (&blob("r", b"{}"), b"{}"),
        (&blob("r", b"sig"), b"sig"),
        (&blob("r", &junk), &junk),
    ]);
    let o = Oracle::of(&bucket);
    let Verdict::Healthy { needed, via_scan } = &o.repos["r"] else {
        panic!("{:?}", o.repos["r"]);
    };
    let want: BTreeSet<String> = [&m[..], b"{\"c\":1}", b"layer", &sig, b"{}", b"sig"]
        .iter()
        .map(|b| blob("r", b))
        .collect();
    assert_eq!(needed, &want);
    assert_eq!(*via_scan, 1);
    assert_eq!(o.garbage(), vec![blob("r", &junk)]);
    let keys: BTreeSet<String> = bucket.keys().cloned().collect();
    let lost: BTreeSet<String> = [blob("r", b"sig")].into();
    let wrong = o.check_deletions(&lost, &keys.difference(&lost).cloned().collect());
    assert_eq!(wrong.len(), 1, "{wrong:?}");
    let index_json: BTreeSet<String> = ["r/index.json".to_string()].into();
    assert_eq!(o.check_deletions(&index_json, &keys).len(), 1);
}

#[test]
fn oracle_fails_closed_on_broken_documents_and_guards_content_copies() {
    let m = manifest_with(b"{\"c\":1}", b"layer", None);
    let index = index_of(&m);
    // `a` holds a placeholder of the manifest whose content lives in `b` (without that copy,
    // `a` cannot be marked); `d` lists a manifest that is not JSON.
    let bad = b"{not json".to_vec();
    let bucket = bucket_of(&[
        ("a/oci-layout", b"{}"),
        ("a/index.json", &index),
        (&blob("a", &m), b""),
        (&blob("a", b"{\"c\":1}"), b"{\"c\":1}"),
        ("b/oci-layout", b"{}"),
        ("b/index.json", br#"{"manifests":[]}"#),
        (&blob("b", &m), &m),
        ("d/oci-layout", b"{}"),
        ("d/index.json", &index_of(&bad)),
        (&blob("d", &bad), &bad),
    ]);
    let mut no_copy = bucket.clone();
    no_copy.remove(&blob("b", &m));
    let o = Oracle::of(&bucket);
    assert!(matches!(o.repos["a"], Verdict::Healthy { .. }));
    assert!(matches!(o.repos["d"], Verdict::FailClosed(_)));
    let without_copy = Oracle::of(&no_copy);
    assert!(matches!(without_copy.repos["a"], Verdict::FailClosed(_)));
    // The copy in `b` is unreferenced there but kept for `a`'s placeholder.
    assert!(o.garbage().is_empty(), "{:?}", o.garbage());
    let keys: BTreeSet<String> = bucket.keys().cloned().collect();
    let copy: BTreeSet<String> = [blob("b", &m)].into();
    let left: BTreeSet<String> = keys.difference(&copy).cloned().collect();
    assert!(
        o.check_deletions(&copy, &left)
            .iter()
            .any(|w| w.contains("content copy")),
        "{:?}",
        o.check_deletions(&copy, &left)
    );
    let in_d: BTreeSet<String> = [blob("d", &bad)].into();
    assert_eq!(o.check_deletions(&in_d, &keys).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Counter-examples the model found, as plain scenarios

/// Found by the model: `solo` tags an index over an image whose manifest also has a
/// placeholder in `team/app`. The manifest's content copy is kept alive as a linked blob of
/// `solo`, a root never read; reached first that way, the manifest was then skipped when the
/// index listed it, so its config and layer were deleted (dangling references).
async fn content_copy_of_a_manifest_below_an_index_keeps_its_children(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("solo", "img").await;
    let idx = f.index("solo", OCI_INDEX, &[&img]).await;
    f.layout("solo", &[(Some("latest"), &idx)]).await;
    f.layout("team/app", &[]).await;
    f.put(&blob_key("team/app", &img.digest), b"").await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(
        &k,
        "solo",
        &idx,
        "index over a manifest with a placeholder elsewhere",
    );
    assert_eq!(report.totals.dangling_references, 0, "{report:#?}");
    assert!(
        !k.contains(&blob_key("team/app", &img.digest)),
        "unreferenced placeholder kept"
    );
}

/// Found by the model: an unlisted referrer in `team/app/tools` also has a placeholder in
/// `lib/a`. Its content copy, kept as a linked blob, counted as seen, so the referrer scan
/// never read it and its config and payload were deleted.
async fn content_copy_of_an_unlisted_referrer_keeps_its_children(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("team/app/tools", "img").await;
    let sig = f.referrer("team/app/tools", &img, "sig").await;
    f.layout("team/app/tools", &[(Some("latest"), &img)]).await;
    f.layout("lib/a", &[]).await;
    f.put(&blob_key("lib/a", &sig.digest), b"").await;

    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "team/app/tools", &img, "signed image");
    assert_intact(
        &k,
        "team/app/tools",
        &sig,
        "unlisted referrer with a placeholder elsewhere",
    );
}

both_stores!(
    content_copy_of_a_manifest_below_an_index_keeps_its_children,
    content_copy_of_an_unlisted_referrer_keeps_its_children,
);
