//! Streaming partition against a model of each layout's ownership rules: for random bucket
//! key sets in the layout's shape and random page splits, the repositories handed out by
//! `push` and `finish` equal the model's (and batch `partition()`'s) in every field, each one
//! comes out no later than the first page whose keys prove it complete, and the partitioner
//! holds no key of a repository it has handed out.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use ocigc::digest::Digest;
use ocigc::layout::distribution::DistributionLayout;
use ocigc::layout::oci::OciLayout;
use ocigc::layout::serverless_registry::ServerlessRegistryLayout;
use ocigc::layout::{
    validate_repository_name, ContentCopy, Layout, Partition, Partitioner, Repository, UnitKind,
};
use ocigc::store::{ObjectMeta, PutCondition};
use proptest::prelude::*;
use proptest::sample::select;

const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
/// The digest of empty content: a 0-byte blob of it is no placeholder.
const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const REPOS: &str = "docker/registry/v2/repositories/";
const BLOBS: &str = "docker/registry/v2/blobs/";
const U1: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";
const U2: &str = "1f0e0d0c-0b0a-4909-8807-060504030201";
const U3: &str = "2f0e0d0c-0b0a-4909-8807-060504030201";

fn obj(key: &str, size: u64) -> ObjectMeta {
    ObjectMeta::new(key, size, SystemTime::UNIX_EPOCH, None)
}

/// Sorted, de-duplicated objects from (key, size) pairs (the last size of a key wins).
fn listing(pairs: Vec<(String, u64)>) -> Vec<ObjectMeta> {
    let map: BTreeMap<String, u64> = pairs.into_iter().collect();
    map.into_iter().map(|(k, s)| obj(&k, s)).collect()
}

/// Page boundaries from random indices.
fn pages(objects: &[ObjectMeta], cuts: &[usize]) -> Vec<Vec<ObjectMeta>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i % (objects.len() + 1)).collect();
    at.push(0);
    at.push(objects.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2)
        .map(|w| objects[w[0]..w[1]].to_vec())
        .collect()
}

/// What a streaming run handed out.
struct Streamed {
    /// Every repository, sorted by name then prefix.
    repositories: Vec<Repository>,
    /// The call (page index; the number of pages for `finish`) that handed each out, by prefix.
    call: HashMap<String, usize>,
    /// The rest of `finish`'s partition.
    rest: Partition,
}

/// Pushes `pages` into `p`; after each push, `held_bound(pushed so far)` bounds
/// what the partitioner may still hold.
fn stream(
    mut p: Box<dyn Partitioner + '_>,
    pages: &[Vec<ObjectMeta>],
    held_bound: &dyn Fn(&[ObjectMeta]) -> usize,
) -> Result<Streamed, TestCaseError> {
    let mut repositories = Vec::new();
    let mut call = HashMap::new();
    let mut pushed = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        pushed.extend(page.iter().cloned());
        for r in p.push(page.clone()) {
            prop_assert!(
                call.insert(r.prefix.clone(), i).is_none(),
                "{} twice",
                r.prefix
            );
            repositories.push(r);
        }
        let bound = held_bound(&pushed);
        prop_assert!(
            p.held_objects() <= bound,
            "after page {i}: holds {} objects, at most {bound} expected",
            p.held_objects()
        );
    }
    let mut rest = p.finish();
    for r in std::mem::take(&mut rest.repositories) {
        prop_assert!(call.insert(r.prefix.clone(), pages.len()).is_none());
        repositories.push(r);
    }
    repositories.sort_by(|a, b| (&a.name, &a.prefix).cmp(&(&b.name, &b.prefix)));
    Ok(Streamed {
        repositories,
        call,
        rest,
    })
}

/// A repository as compared: name, prefix, kind, object keys and sizes in order.
type Shape = (String, String, UnitKind, Vec<(String, u64)>);

fn shape(r: &Repository) -> Shape {
    let objects = r.objects.iter().map(|o| (o.key.clone(), o.size)).collect();
    (r.name.clone(), r.prefix.clone(), r.kind, objects)
}

fn shapes<'a>(rs: impl IntoIterator<Item = &'a Repository>) -> Vec<Shape> {
    let mut v: Vec<Shape> = rs.into_iter().map(shape).collect();
    v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    v
}

/// The model's view of one layout on one listing.
#[derive(Debug, Default)]
struct Model {
    /// Collected repositories by prefix: name and owned keys (listing order).
    repos: BTreeMap<String, (String, Vec<ObjectMeta>)>,
    /// Rejected prefixes: object count and a word the reason must contain.
    rejected: BTreeMap<String, (u64, String)>,
    unowned: u64,
    global: Option<Vec<ObjectMeta>>,
}

impl Model {
    fn add(&mut self, name: &str, prefix: &str, objects: Vec<ObjectMeta>) {
        let name = name.to_string();
        match validate_repository_name(&name) {
            Ok(()) => {
                self.repos.insert(prefix.to_string(), (name, objects));
            }
            Err(reason) => {
                self.rejected
                    .insert(prefix.to_string(), (objects.len() as u64, reason));
            }
        }
    }

    fn repositories(&self) -> Vec<Shape> {
        let mut v: Vec<Shape> = self
            .repos
            .iter()
            .map(|(prefix, (name, objects))| {
                let objects = objects.iter().map(|o| (o.key.clone(), o.size)).collect();
                (name.clone(), prefix.clone(), UnitKind::Repository, objects)
            })
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }
}

/// Checks a partition's fields against the model (placeholders and global roots aside).
fn check_against_model(
    what: &str,
    repositories: &[Repository],
    p: &Partition,
    model: &Model,
    global_prefix: &str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        shapes(repositories),
        model.repositories(),
        "{}: repositories",
        what
    );
    let rejected: BTreeMap<String, u64> = p
        .rejected
        .iter()
        .map(|r| (r.prefix.clone(), r.objects))
        .collect();
    let want: BTreeMap<String, u64> = model
        .rejected
        .iter()
        .map(|(p, (n, _))| (p.clone(), *n))
        .collect();
    prop_assert_eq!(rejected, want, "{}: rejected", what);
    prop_assert_eq!(
        p.rejected.len(),
        model.rejected.len(),
        "{}: rejected twice",
        what
    );
    for r in &p.rejected {
        let (_, word) = &model.rejected[&r.prefix];
        prop_assert!(r.reason.contains(word.as_str()), "{}: {:?}", what, r);
    }
    prop_assert_eq!(p.unowned, model.unowned, "{}: unowned", what);
    let global = p.global.as_ref().map(|g| {
        prop_assert_eq!(g.kind, UnitKind::Global);
        prop_assert_eq!(&g.prefix, global_prefix);
        Ok(g.objects.iter().map(|o| o.key.clone()).collect::<Vec<_>>())
    });
    let global = global.transpose()?;
    let want = model
        .global
        .as_ref()
        .map(|g| g.iter().map(|o| o.key.clone()).collect::<Vec<_>>());
    prop_assert_eq!(global, want, "{}: global", what);
    Ok(())
}

/// The index of the first key that proves a unit complete, per `proves`.
fn proof(objects: &[ObjectMeta], proves: impl Fn(&str) -> bool) -> Option<usize> {
    objects.iter().position(|o| proves(&o.key))
}

/// The page holding key index `i`.
fn page_of(pages: &[Vec<ObjectMeta>], i: usize) -> usize {
    let mut seen = 0;
    for (p, page) in pages.iter().enumerate() {
        seen += page.len();
        if i < seen {
            return p;
        }
    }
    pages.len()
}

/// Past `prefix` in both listing orders: byte order, and the tree order of SeaweedFS, where
/// `/` sorts before every other character (a partitioner must not take either for passed
/// early).
fn passed(prefix: &str, key: &str) -> bool {
    let tree = |k: &str| -> Vec<u16> {
        k.bytes()
            .map(|c| if c == b'/' { 0 } else { u16::from(c) + 1 })
            .collect()
    };
    key > prefix && !key.starts_with(prefix) && tree(key) > tree(prefix)
}

// ---------------------------------------------------------------------------------------
// oci

/// The model of the oci layout: owner = longest layout directory above a key that is not
/// inside the `blobs/` of another layout directory.
fn oci_model(objects: &[ObjectMeta]) -> (Model, BTreeSet<String>) {
    let registered: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| {
            if o.key == "oci-layout" {
                Some(String::new())
            } else {
                o.key.strip_suffix("/oci-layout").map(|p| format!("{p}/"))
            }
        })
        .collect();
    let holders = |p: &str| -> Vec<String> {
        let mut h: Vec<String> = registered
            .iter()
            .filter(|a| p.starts_with(&format!("{a}blobs/")))
            .cloned()
            .collect();
        h.sort_by_key(|a| a.len());
        h
    };
    let reserved: BTreeMap<String, String> = registered
        .iter()
        .filter_map(|p| holders(p).first().map(|h| (p.clone(), h.clone())))
        .collect();
    let kept: Vec<&String> = registered
        .iter()
        .filter(|p| !reserved.contains_key(*p))
        .collect();
    let mut model = Model::default();
    let mut groups: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    let mut reserved_counts: BTreeMap<String, u64> = BTreeMap::new();
    for o in objects {
        if let Some(r) = reserved
            .keys()
            .filter(|r| o.key.starts_with(r.as_str()))
            .max_by_key(|r| r.len())
        {
            *reserved_counts.entry(r.clone()).or_default() += 1;
        }
        match kept
            .iter()
            .filter(|p| o.key.starts_with(p.as_str()))
            .max_by_key(|p| p.len())
        {
            Some(p) => groups.entry((*p).clone()).or_default().push(o.clone()),
            None => model.unowned += 1,
        }
    }
    for p in &kept {
        let objects = groups.remove(*p).unwrap_or_default();
        model.add(p.trim_end_matches('/'), p, objects);
    }
    for (p, holder) in &reserved {
        let n = reserved_counts.get(p).copied().unwrap_or(0);
        let word = format!("{:?}", holder.trim_end_matches('/'));
        model.rejected.insert(p.clone(), (n, word));
    }
    (model, registered)
}

fn blob_digest(prefix: &str, key: &str) -> Option<Digest> {
    let (alg, hex) = key
        .strip_prefix(prefix)?
        .strip_prefix("blobs/")?
        .split_once('/')?;
    if hex.contains('/') {
        return None;
    }
    Digest::from_parts(alg, hex)
}

fn is_placeholder(o: &ObjectMeta, d: &Digest) -> bool {
    o.size == 0 && d.hex() != EMPTY
}

/// Placeholders of the model's repositories, with the first copy (by repository name, then
/// key) among the repositories `eligible` accepts for the digest.
fn oci_placeholders(
    model: &Model,
    eligible: &dyn Fn(&Digest, &str) -> bool,
) -> HashMap<Digest, Option<ContentCopy>> {
    let blobs = || {
        model.repos.iter().flat_map(|(prefix, (name, objects))| {
            objects
                .iter()
                .filter_map(move |o| blob_digest(prefix, &o.key).map(|d| (prefix, name, o, d)))
        })
    };
    let mut out: HashMap<Digest, Option<(String, ContentCopy)>> = blobs()
        .filter(|(_, _, o, d)| is_placeholder(o, d))
        .map(|(_, _, _, d)| (d, None))
        .collect();
    for (prefix, name, o, d) in blobs() {
        if is_placeholder(o, &d) || !eligible(&d, prefix) {
            continue;
        }
        if let Some(slot) = out.get_mut(&d) {
            let copy = ContentCopy {
                key: o.key.clone(),
                size: o.size,
            };
            if slot
                .as_ref()
                .is_none_or(|(n, c)| (name.as_str(), o.key.as_str()) < (n.as_str(), c.key.as_str()))
            {
                *slot = Some((name.clone(), copy));
            }
        }
    }
    out.into_iter().map(|(d, c)| (d, c.map(|c| c.1))).collect()
}

fn oci_listing() -> impl Strategy<Value = Vec<ObjectMeta>> {
    let component = select(vec!["a", "b", "a-b", "blobs", "sha256", "B"]);
    let dir = prop::collection::vec(component, 0..6)
        .prop_map(|c| c.iter().map(|c| format!("{c}/")).collect::<String>());
    let leaf = select(vec![
        "oci-layout".to_string(),
        "oci-layout".to_string(),
        "index.json".to_string(),
        "README".to_string(),
        "zz".to_string(),
        format!("blobs/sha256/{H1}"),
        format!("blobs/sha256/{H2}"),
        format!("blobs/sha256/{EMPTY}"),
        "blobs/sha256/not-hex".to_string(),
    ]);
    let size = select(vec![0u64, 0, 7]);
    prop::collection::vec(dir, 1..7)
        .prop_flat_map(move |dirs| {
            prop::collection::vec((select(dirs), leaf.clone(), size.clone()), 0..48)
        })
        .prop_map(|keys| {
            listing(
                keys.into_iter()
                    .map(|(d, l, s)| (format!("{d}{l}"), s))
                    .collect(),
            )
        })
}

/// Whether the listing, at `key`, proves the layout-to-be at `prefix` complete: past its
/// prefix, and past the marker of every directory whose blobs/ holds it (a layout or not:
/// that is known only there).
fn oci_proves(prefix: &str, key: &str) -> bool {
    passed(prefix, key)
        && std::iter::once("")
            .chain(prefix.match_indices('/').map(|(i, _)| &prefix[..=i]))
            .filter(|a| prefix.starts_with(&format!("{a}blobs/")))
            .all(|a| key >= format!("{a}oci-layout").as_str())
}

/// Where every key an oci partitioner may hold after `pushed` comes from: keys under a layout
/// directory not proven complete yet, and keys under the top-level directory the listing is
/// in (whose layouts are not known yet).
fn oci_held_bound(registered: &BTreeSet<String>, pushed: &[ObjectMeta]) -> usize {
    let Some(last) = pushed.last() else {
        return 0;
    };
    let top = |k: &str| k.split_once('/').map(|(t, _)| t.to_string());
    let open_top = top(&last.key);
    let open: Vec<&String> = registered
        .iter()
        .filter(|r| !oci_proves(r, &last.key))
        .collect();
    pushed
        .iter()
        .filter(|o| {
            (open_top.is_some() && top(&o.key) == open_top)
                || open.iter().any(|r| o.key.starts_with(r.as_str()))
        })
        .count()
}

fn check_oci(objects: Vec<ObjectMeta>, cuts: Vec<usize>) -> Result<(), TestCaseError> {
    let layout = OciLayout;
    let (model, registered) = oci_model(&objects);
    let pages = pages(&objects, &cuts);
    let streamed = stream(
        layout.streaming_partitioner().expect("oci streams"),
        &pages,
        &|pushed| oci_held_bound(&registered, pushed),
    )?;
    check_against_model("stream", &streamed.repositories, &streamed.rest, &model, "")?;
    let batch = layout.partition(objects.clone());
    check_against_model("batch", &batch.repositories, &batch, &model, "")?;
    prop_assert_eq!(shapes(&batch.repositories), shapes(&streamed.repositories));
    prop_assert_eq!(&batch.rejected, &streamed.rest.rejected);
    prop_assert!(batch.global.is_none() && streamed.rest.global.is_none());
    prop_assert!(batch.global_roots.is_none() && streamed.rest.global_roots.is_none());
    // Batch finds the first copy of every placeholder; streaming those handed out no earlier
    // than the first placeholder of their digest.
    prop_assert_eq!(&batch.placeholders, &oci_placeholders(&model, &|_, _| true));
    let first_call = |d: &Digest| {
        model
            .repos
            .iter()
            .filter(|(p, (_, objects))| {
                objects.iter().any(|o| {
                    blob_digest(p, &o.key).is_some_and(|x| x == *d && is_placeholder(o, &x))
                })
            })
            .filter_map(|(p, _)| streamed.call.get(p).copied())
            .min()
    };
    let eligible = |d: &Digest, prefix: &str| {
        let at = streamed.call.get(prefix).copied();
        at.is_some() && at >= first_call(d)
    };
    prop_assert_eq!(
        &streamed.rest.placeholders,
        &oci_placeholders(&model, &eligible)
    );
    // Each repository comes out with the page whose keys prove it complete: past its prefix,
    // and past the marker of every layout-to-be whose blobs/ holds it.
    for prefix in model.repos.keys() {
        let proves = |key: &str| oci_proves(prefix, key);
        let due = proof(&objects, proves).map_or(pages.len(), |i| page_of(&pages, i));
        prop_assert!(
            streamed.call[prefix] <= due,
            "{prefix} handed out by call {}, due by {due}",
            streamed.call[prefix]
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn oci_streaming_equals_model(objects in oci_listing(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        check_oci(objects, cuts)?;
    }
}

/// Hand-picked cases the random ones may miss: nested layouts, a root layout, layouts in
/// blobs/ of a layout and of a non-layout, copies before and after placeholders.
#[test]
fn oci_fixed_cases() {
    let hex = |c: char| c.to_string().repeat(64);
    let cases: Vec<Vec<(String, u64)>> = vec![
        vec![
            ("oci-layout".into(), 1),
            ("README".into(), 1),
            ("a/oci-layout".into(), 1),
            ("a/blobs/x/oci-layout".into(), 1),
            ("a/blobs/x/blobs/sha256/aa".into(), 1),
            ("a/blobs/x/blobs/y/oci-layout".into(), 1),
            ("a/blobs/x/blobs/y/z".into(), 1),
            ("b/blobs/c/oci-layout".into(), 1),
            ("b/blobs/c/index.json".into(), 1),
            ("b/README".into(), 1),
            ("blobs/q/oci-layout".into(), 1),
            ("Bad/oci-layout".into(), 1),
            ("Bad/x".into(), 1),
        ],
        vec![
            (format!("a/blobs/sha256/{}", hex('1')), 5),
            ("a/oci-layout".into(), 1),
            (format!("b/blobs/sha256/{}", hex('1')), 0),
            (format!("b/blobs/sha256/{}", hex('2')), 0),
            ("b/oci-layout".into(), 1),
            (format!("c/blobs/sha256/{}", hex('2')), 5),
            ("c/oci-layout".into(), 1),
            (format!("d/blobs/sha256/{}", hex('3')), 0),
            ("d/oci-layout".into(), 1),
        ],
        vec![
            ("t/a/oci-layout".into(), 1),
            ("t/a-b/oci-layout".into(), 1),
            ("t/a/z/oci-layout".into(), 1),
            ("t/a/blobs/k/blobs/sha256/aa".into(), 1),
            ("t/a/blobs/k/oci-layout".into(), 1),
            ("t/oci-layout".into(), 1),
            ("t/zz".into(), 1),
        ],
    ];
    for case in cases {
        let objects = listing(case);
        for n in 0..=objects.len() {
            let cuts = (0..n).map(|i| i * 7919 % 101).collect();
            if let Err(e) = check_oci(objects.clone(), cuts) {
                panic!("{e}");
            }
        }
        let p = OciLayout.partition(objects.clone());
        assert!(!p.repositories.is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// serverless-registry

/// A serverless-registry key with the repository it belongs to by construction, or none
/// (a temp object or an unknown key).
fn serverless_listing() -> impl Strategy<Value = (Vec<ObjectMeta>, HashMap<String, String>)> {
    let name = select(vec!["a", "b", "a/b", "a/uploads", "a-b", "Bad", "blobs/x"]);
    let d1 = format!("sha256:{H1}");
    let d2 = format!("sha256:{H2}");
    let rest = select(vec![
        format!("blobs/{d1}"),
        format!("blobs/{d2}"),
        "blobs/junk".to_string(),
        "manifests/v1".to_string(),
        format!("manifests/{d1}"),
        format!("uploads/{U1}"),
        format!("uploads/{U2}"),
        "gc/marker".to_string(),
        "insertion/last_update".to_string(),
        format!("_referrers/{d1}/{d2}"),
        "_referrers/junk".to_string(),
    ]);
    let loose = select(vec![
        U1.to_string(),
        format!("{U1}-helper"),
        U2.to_string(),
        U3.to_string(),
        format!("{U3}-helper"),
        "README".to_string(),
        "x/README".to_string(),
        "blobs/x".to_string(),
        "a/other/x".to_string(),
    ]);
    let keyed = (name, rest).prop_map(|(n, r)| (format!("{n}/{r}"), Some(n.to_string())));
    let loose = loose.prop_map(|k| (k, None));
    let size = select(vec![0u64, 7]);
    prop::collection::vec((prop_oneof![3 => keyed, 1 => loose], size), 0..48).prop_map(|keys| {
        let owners: HashMap<String, String> = keys
            .iter()
            .filter_map(|((k, n), _)| n.clone().map(|n| (k.clone(), n)))
            .collect();
        let objects = listing(keys.into_iter().map(|((k, _), s)| (k, s)).collect());
        (objects, owners)
    })
}

fn check_serverless(
    objects: Vec<ObjectMeta>,
    owners: HashMap<String, String>,
    cuts: Vec<usize>,
) -> Result<(), TestCaseError> {
    let layout = ServerlessRegistryLayout::default();
    let mut model = Model::default();
    let mut by_repo: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    let mut temps = Vec::new();
    let uuid = |k: &str| [U1, U2, U3].contains(&k.strip_suffix("-helper").unwrap_or(k));
    for o in &objects {
        match owners.get(&o.key) {
            Some(n) => by_repo.entry(n.clone()).or_default().push(o.clone()),
            None if uuid(&o.key) => temps.push(o.clone()),
            None => model.unowned += 1,
        }
    }
    let open_uploads: BTreeSet<&str> = owners
        .keys()
        .filter_map(|k| k.rsplit_once("/uploads/").map(|(_, id)| id))
        .collect();
    let (open, stale): (Vec<ObjectMeta>, Vec<ObjectMeta>) = temps
        .into_iter()
        .partition(|o| open_uploads.contains(o.key.strip_suffix("-helper").unwrap_or(&o.key)));
    model.unowned += open.len() as u64;
    model.global = (!stale.is_empty()).then_some(stale);
    for (n, objects) in &by_repo {
        model.add(n, &format!("{n}/"), objects.clone());
    }
    let pages = pages(&objects, &cuts);
    let bound = |pushed: &[ObjectMeta]| {
        let last = pushed.last().map_or("", |o| o.key.as_str());
        pushed
            .iter()
            .filter(|o| match owners.get(&o.key) {
                Some(n) => !passed(&format!("{n}/"), last),
                None => uuid(&o.key),
            })
            .count()
    };
    let streamed = stream(
        layout.streaming_partitioner().expect("streams"),
        &pages,
        &bound,
    )?;
    check_against_model("stream", &streamed.repositories, &streamed.rest, &model, "")?;
    let batch = layout.partition(objects.clone());
    check_against_model("batch", &batch.repositories, &batch, &model, "")?;
    prop_assert_eq!(&batch.rejected, &streamed.rest.rejected);
    prop_assert!(batch.placeholders.is_empty() && streamed.rest.placeholders.is_empty());
    prop_assert!(batch.global_roots.is_none() && streamed.rest.global_roots.is_none());
    for prefix in model.repos.keys() {
        let due =
            proof(&objects, |k| passed(prefix, k)).map_or(pages.len(), |i| page_of(&pages, i));
        prop_assert!(streamed.call[prefix] <= due, "{prefix} late");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn serverless_streaming_equals_model((objects, owners) in serverless_listing(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        check_serverless(objects, owners, cuts)?;
    }
}

// ---------------------------------------------------------------------------------------
// distribution

fn distribution_listing() -> impl Strategy<Value = (Vec<ObjectMeta>, HashMap<String, String>)> {
    let name = select(vec!["a", "a/b", "a-b", "Bad", "a/b/c", "x", "a/_x"]);
    let rest = select(vec![
        format!("_manifests/revisions/sha256/{H1}/link"),
        format!("_manifests/revisions/sha256/{H2}/link"),
        "_manifests/tags/t/current/link".to_string(),
        format!("_manifests/tags/t/index/sha256/{H1}/link"),
        format!("_layers/sha256/{H2}/link"),
        "_uploads/u/startedat".to_string(),
        "_uploads".to_string(),
    ]);
    let loose = select(vec![
        format!("{BLOBS}sha256/11/{H1}/data"),
        format!("{BLOBS}sha256/22/{H2}/data"),
        format!("{BLOBS}sha256/xx/junk"),
        format!("{REPOS}a/README"),
        format!("{REPOS}README"),
        "docker/registry/v2/other".to_string(),
        "elsewhere/x".to_string(),
    ]);
    let keyed = (name, rest).prop_map(|(n, r)| (format!("{REPOS}{n}/{r}"), Some(n.to_string())));
    let loose = loose.prop_map(|k| (k, None));
    prop::collection::vec(prop_oneof![3 => keyed, 1 => loose], 0..48).prop_map(|keys| {
        let owners: HashMap<String, String> = keys
            .iter()
            .filter_map(|(k, n)| n.clone().map(|n| (k.clone(), n)))
            .collect();
        let objects = listing(keys.into_iter().map(|(k, _)| (k, 3)).collect());
        (objects, owners)
    })
}

fn check_distribution(
    objects: Vec<ObjectMeta>,
    owners: HashMap<String, String>,
    cuts: Vec<usize>,
) -> Result<(), TestCaseError> {
    let layout = DistributionLayout::default();
    let mut model = Model::default();
    let mut by_repo: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    let mut global = Vec::new();
    for o in &objects {
        match owners.get(&o.key) {
            Some(n) => by_repo.entry(n.clone()).or_default().push(o.clone()),
            None if o.key.starts_with(BLOBS) => global.push(o.clone()),
            None => model.unowned += 1,
        }
    }
    let any_repository_key = !owners.is_empty();
    model.global = (!global.is_empty()).then_some(global);
    for (n, objects) in &by_repo {
        model.add(n, &format!("{REPOS}{n}/"), objects.clone());
    }
    let revisions: Vec<(String, String)> = objects
        .iter()
        .filter(|o| owners.contains_key(&o.key) && o.key.contains("/_manifests/revisions/"))
        .map(|o| {
            let hex = o.key.rsplit('/').nth(1).unwrap_or_default();
            (o.key.clone(), format!("sha256:{hex}"))
        })
        .collect();
    let pages = pages(&objects, &cuts);
    let bound = |pushed: &[ObjectMeta]| {
        let last = pushed.last().map_or("", |o| o.key.as_str());
        let open = pushed
            .iter()
            .filter(|o| match owners.get(&o.key) {
                Some(n) => !passed(&format!("{REPOS}{n}/"), last),
                None => o.key.starts_with(BLOBS),
            })
            .count();
        let revisions = pushed
            .iter()
            .filter(|o| revisions.iter().any(|(k, _)| *k == o.key))
            .count();
        open + revisions
    };
    let streamed = stream(
        layout.streaming_partitioner().expect("streams"),
        &pages,
        &bound,
    )?;
    check_against_model(
        "stream",
        &streamed.repositories,
        &streamed.rest,
        &model,
        BLOBS,
    )?;
    let batch = layout.partition(objects.clone());
    check_against_model("batch", &batch.repositories, &batch, &model, BLOBS)?;
    prop_assert_eq!(&batch.rejected, &streamed.rest.rejected);
    for p in [&batch, &streamed.rest] {
        prop_assert_eq!(p.global_roots.is_some(), any_repository_key);
        if let Some(roots) = &p.global_roots {
            let got: Vec<(String, String)> = roots
                .sources
                .iter()
                .cloned()
                .zip(
                    roots
                        .descriptors
                        .iter()
                        .map(|d| d.digest.as_str().to_string()),
                )
                .collect();
            prop_assert_eq!(&got, &revisions);
        }
    }
    prop_assert_eq!(
        batch.global_roots.as_ref().map(|r| r.version.clone()),
        streamed
            .rest
            .global_roots
            .as_ref()
            .map(|r| r.version.clone())
    );
    for prefix in model.repos.keys() {
        let due =
            proof(&objects, |k| passed(prefix, k)).map_or(pages.len(), |i| page_of(&pages, i));
        prop_assert!(streamed.call[prefix] <= due, "{prefix} late");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn distribution_streaming_equals_model((objects, owners) in distribution_listing(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        check_distribution(objects, owners, cuts)?;
    }
}

// ---------------------------------------------------------------------------------------
// Hooks for the engine.

#[test]
fn key_spaces() {
    assert_eq!(OciLayout.key_space().repositories, "");
    assert_eq!(OciLayout.key_space().global, None);
    let s = ServerlessRegistryLayout::default().key_space();
    assert_eq!((s.repositories.as_str(), s.global), ("", None));
    let d = DistributionLayout::default().key_space();
    assert_eq!(d.repositories, REPOS);
    assert_eq!(d.global.as_deref(), Some(BLOBS));
    // The two spaces do not overlap, and the global one sorts first: the engine lists it on
    // its own.
    assert!(!d.repositories.starts_with(BLOBS) && !BLOBS.starts_with(&d.repositories));
}

fn level(prefix: &str, objects: &[&str], prefixes: &[&str]) -> (Vec<ObjectMeta>, Vec<String>) {
    (
        objects
            .iter()
            .map(|k| obj(&format!("{prefix}{k}"), 1))
            .collect(),
        prefixes.iter().map(|p| format!("{prefix}{p}")).collect(),
    )
}

#[test]
fn may_split_only_where_no_repository_is() {
    let oci = OciLayout;
    for (prefix, objects, prefixes, want) in [
        ("", vec!["README"], vec!["a/", "b/"], true),
        // A layout at the bucket root owns every key no nested layout owns.
        (
            "",
            vec!["oci-layout", "index.json"],
            vec!["a/", "blobs/"],
            false,
        ),
        ("team/", vec![], vec!["app/", "blobs/"], true),
        (
            "team/app/",
            vec!["index.json", "oci-layout"],
            vec!["blobs/", "tools/"],
            false,
        ),
        // A marker of another directory is not this one's.
        ("team/", vec!["oci-layout.bak"], vec!["app/"], true),
    ] {
        let (o, p) = level(prefix, &objects, &prefixes);
        assert_eq!(
            oci.may_split(prefix, &o, &p),
            want,
            "oci {prefix} {objects:?}"
        );
    }
    let sr = ServerlessRegistryLayout::default();
    for (prefix, objects, prefixes, want) in [
        ("", vec!["README"], vec!["a/", "b/"], true),
        // Whether a temp object is stale depends on the uploads of every repository.
        ("", vec![U1], vec!["a/", "b/"], false),
        ("", vec![&*format!("{U1}-helper")], vec!["a/"], false),
        ("team/", vec![], vec!["app/", "web/"], true),
        ("team/app/", vec![], vec!["blobs/", "tools/"], false),
        ("team/app/", vec![], vec!["manifests/"], false),
        ("team/app/", vec![], vec!["_referrers/"], false),
        ("team/app/", vec![], vec!["uploads/"], false),
        ("team/app/", vec![], vec!["gc/", "x/"], false),
        ("team/app/", vec![], vec!["insertion/"], false),
        ("team/app/", vec!["blobs"], vec!["x/"], false),
    ] {
        let (o, p) = level(prefix, &objects, &prefixes);
        assert_eq!(
            sr.may_split(prefix, &o, &p),
            want,
            "serverless {prefix} {prefixes:?}"
        );
    }
    let dist = DistributionLayout::default();
    for (prefix, objects, prefixes, want) in [
        (REPOS, vec![], vec!["a/", "b/"], true),
        // The global blobs never part from the revision links that are their roots.
        ("", vec![], vec!["docker/"], false),
        (BLOBS, vec![], vec!["sha256/"], true),
        (
            "docker/registry/v2/",
            vec![],
            vec!["blobs/", "repositories/"],
            false,
        ),
        (
            &*format!("{REPOS}a/"),
            vec![],
            vec!["b/", "_manifests/"],
            false,
        ),
        (&*format!("{REPOS}a/"), vec![], vec!["_layers/"], false),
        (&*format!("{REPOS}a/"), vec![], vec!["_uploads/"], false),
        (&*format!("{REPOS}a/"), vec!["_uploads"], vec!["b/"], false),
        (
            &*format!("{REPOS}a/"),
            vec!["README"],
            vec!["b/", "c/"],
            true,
        ),
    ] {
        let (o, p) = level(prefix, &objects, &prefixes);
        assert_eq!(
            dist.may_split(prefix, &o, &p),
            want,
            "distribution {prefix} {prefixes:?}"
        );
    }
}

/// Splitting where `may_split` allows and partitioning each part on its own gives the same
/// repositories as one partition of the whole listing.
#[test]
fn parts_that_may_split_partition_alike() {
    let layout = OciLayout;
    let objects = listing(
        [
            "t/a/oci-layout",
            "t/a/blobs/sha256/aa",
            "t/a/z/oci-layout",
            "t/b/oci-layout",
            "t/b/blobs/x/oci-layout",
            "t/README",
            "u/oci-layout",
        ]
        .iter()
        .map(|k| (k.to_string(), 1))
        .collect(),
    );
    let whole = layout.partition(objects.clone());
    let (direct, subs) = level("t/", &["README"], &["a/", "b/"]);
    assert!(layout.may_split("t/", &direct, &subs));
    let mut parts: Vec<Repository> = Vec::new();
    for part in ["t/a/", "t/b/", "t/R", "u/"] {
        let keys: Vec<ObjectMeta> = objects
            .iter()
            .filter(|o| o.key.starts_with(part))
            .cloned()
            .collect();
        parts.extend(layout.partition(keys).repositories);
    }
    assert_eq!(shapes(&parts), shapes(&whole.repositories));
}

fn repo(name: &str, objects: Vec<ObjectMeta>) -> Repository {
    Repository {
        kind: UnitKind::Repository,
        name: name.into(),
        prefix: format!("{name}/"),
        objects,
    }
}

#[test]
fn placeholders_and_content_copies() {
    let layout = OciLayout;
    let d1 = Digest::from_parts("sha256", H1).expect("d1");
    let d2 = Digest::from_parts("sha256", H2).expect("d2");
    let r = repo(
        "a",
        vec![
            obj(&format!("a/blobs/sha256/{H1}"), 0),
            obj(&format!("a/blobs/sha256/{H2}"), 9),
            obj(&format!("a/blobs/sha256/{EMPTY}"), 0),
            obj("a/blobs/sha256/zz", 0),
            obj("a/index.json", 0),
        ],
    );
    assert_eq!(layout.placeholders_in(&r), vec![d1.clone()]);
    let copies = layout.content_copies(&r, &|d| *d == d2);
    assert_eq!(
        copies,
        vec![(
            d2.clone(),
            ContentCopy {
                key: format!("a/blobs/sha256/{H2}"),
                size: 9
            }
        )]
    );
    // A placeholder is never a copy; the empty blob is content, wanted or not.
    assert!(layout.content_copies(&r, &|d| *d == d1).is_empty());
    assert_eq!(layout.content_copies(&r, &|_| true).len(), 2);
    // Layouts without placeholders name none.
    for other in [
        &ServerlessRegistryLayout::default() as &dyn Layout,
        &DistributionLayout::default(),
    ] {
        assert!(other.placeholders_in(&r).is_empty());
        assert!(other.content_copies(&r, &|_| true).is_empty());
    }
}

/// A listing out of order never hands a late key to a repository (it may be handed out
/// already): the key counts as unowned.
#[test]
fn keys_out_of_order_are_left_alone() {
    for (layout, late) in [
        (&OciLayout as &dyn Layout, "aa/oci-layout".to_string()),
        (
            &ServerlessRegistryLayout::default(),
            "aa/manifests/v1".into(),
        ),
        (
            &DistributionLayout::default(),
            format!("{REPOS}aa/_uploads"),
        ),
    ] {
        // Each late key makes a repository when in order.
        assert_eq!(layout.partition(vec![obj(&late, 1)]).repositories.len(), 1);
        let mut p = layout.streaming_partitioner().expect("streams");
        let first = p.push(vec![obj("zz/late", 1)]);
        assert!(first.is_empty());
        let _ = p.push(vec![obj(&late, 1), obj("zz/late", 1)]);
        let rest = p.finish();
        assert_eq!(rest.unowned, 3, "{}", layout.name());
        assert!(rest.repositories.is_empty(), "{}", layout.name());
    }
}

/// Mount links of serverless-registry: `links_in` finds them by a size bound (a link holds a
/// key, so no more than 1024 bytes), not by the lengths of the repository names listed so
/// far, so a link to a repository not listed yet is read too; links of sha512 blobs count.
async fn links_in_reads_every_link_a_size_allows(t: common::TestStore) {
    let s = &t.store;
    let put = |key: String, body: Vec<u8>| async move {
        s.put(&key, body.into(), PutCondition::None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    };
    let content = b"{\"config\": true}".to_vec();
    let d = common::sha256(&content);
    let d512 = format!("sha512:{}", "ab".repeat(64));
    let d3 = format!("sha256:{}", "ef".repeat(32));
    let far = format!("z/{}", "y".repeat(300));
    put(format!("a/blobs/{d}"), content.clone()).await;
    put(format!("b/blobs/{d}"), format!("a/blobs/{d}").into_bytes()).await;
    put(
        format!("b/blobs/{d512}"),
        format!("a/blobs/{d512}").into_bytes(),
    )
    .await;
    put(
        format!("b/blobs/{d3}"),
        format!("{far}/blobs/{d3}").into_bytes(),
    )
    .await;
    // Small real content and a key-sized blob that names another digest are no links.
    let small = b"tiny".to_vec();
    put(format!("b/blobs/{}", common::sha256(&small)), small).await;
    let other = format!("sha256:{}", "cd".repeat(32));
    put(
        format!("b/blobs/{other}"),
        format!("a/blobs/{d}").into_bytes(),
    )
    .await;
    put("b/manifests/v1".into(), b"{}".to_vec()).await;
    let layout = ServerlessRegistryLayout::default();
    let listed = {
        use futures::TryStreamExt;
        let pages: Vec<Vec<ObjectMeta>> = s.list("").try_collect().await.expect("list");
        pages.into_iter().flatten().collect::<Vec<_>>()
    };
    let partition = layout.partition(listed);
    let repo = |name: &str| {
        partition
            .repositories
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("repository {name}"))
    };
    let mut links = layout
        .links_in(s.as_ref(), repo("b"), 4)
        .await
        .expect("links_in");
    links.sort();
    let d = Digest::parse(&d).expect("d");
    let d512 = Digest::parse(&d512).expect("d512");
    let d3 = Digest::parse(&d3).expect("d3");
    let a = "a".to_string();
    assert_eq!(
        links,
        vec![(a.clone(), d.clone()), (a.clone(), d512.clone()), (far, d3)]
    );
    let none = layout
        .links_in(s.as_ref(), repo("a"), 4)
        .await
        .expect("links_in");
    assert!(none.is_empty(), "{none:?}");
    let linked = layout
        .linked_blobs(s.as_ref(), &partition, 4)
        .await
        .expect("linked_blobs");
    let mut linked: BTreeMap<String, Vec<Digest>> = linked.into_iter().collect();
    linked.values_mut().for_each(|v| v.sort());
    // With every repository listed, only links to a listed one matter.
    assert_eq!(linked, BTreeMap::from([(a, vec![d, d512])]));
}

both_stores!(links_in_reads_every_link_a_size_allows);
