//! Splitting a listing into parts that can be listed concurrently, and into shards.
//!
//! A plan starts from delimiter listings of the upper levels ([`Store::list_level`]): the
//! sub-prefixes and direct objects of a prefix are its *units*, in key order. A prefix that the
//! [`SplitPolicy`] allows to split is replaced by its own units, breadth-first, until there are
//! enough; one it refuses (a repository, or what may be one) stays a single unit, so all of its
//! keys land in one part. Consecutive units are then grouped into contiguous key ranges
//! ([`Part`]) that [`list_part`] lists with `StartAfter`.
//!
//! Cuts are exact: between a unit ending at `x` (an object key, or the first string past a
//! prefix, `p/` → `p0`) and the next, the lower part takes the keys `<= x` and the upper one
//! the keys `> x`, so every key under the root, including one created after planning, falls in
//! exactly one part. Cuts are placed only where byte order (S3, the directory store) and tree
//! order (SeaweedFS, see [`Store::list`]) agree, so one plan serves both kinds of store, and
//! every part lists the same keys on either.
//!
//! Excluded prefixes are cut out where such a cut is allowed: the part before one ends at its
//! start, the part after it begins at its end. What a plan cannot see:
//!
//! - a key created after planning between two excluded prefixes, or named exactly like the end
//!   of one (`_ocigc0` after `_ocigc/`), lies in no part;
//! - an excluded prefix where no cut is allowed (inside a unit the policy refuses to split, or
//!   next to a sibling the two orders disagree on) stays in its neighbour's part, so consumers
//!   still filter excluded keys themselves.
//!
//! Shards planned at different moments see different units: their boundaries can move, so two
//! shards may overlap at a boundary, or leave out a prefix created in between at one. The
//! engine's leases make the overlap safe; a prefix left out is collected by the next run.

use std::collections::VecDeque;

use futures::stream::BoxStream;
use futures::StreamExt as _;

use super::{Level, ObjectMeta, Op, Store, StoreError, StoreResult};

/// A contiguous part of the key space: keys k with k.starts_with(prefix), k > after (if set),
/// k < before (if set).
///
/// `before` may end in NUL: `x\0` is the first string after `x`, so "< `x\0`" means "<= `x`".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Every key of the part starts with this.
    pub prefix: String,
    /// Keys are strictly greater than this (S3's `StartAfter`).
    pub after: Option<String>,
    /// Keys are strictly less than this.
    pub before: Option<String>,
}

impl Part {
    /// Whether `key` belongs to this part.
    pub fn contains(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && self.after.as_deref().is_none_or(|a| key > a)
            && self.before.as_deref().is_none_or(|b| key < b)
    }
}

/// Whether a prefix may be split among parts at its sub-prefixes (false where the prefix is, or
/// may be, one repository: a repository's keys must stay in one part).
pub trait SplitPolicy: Send + Sync {
    /// Decides from the prefix and its level listing (its direct objects and sub-prefixes).
    fn may_split(&self, prefix: &str, level: &Level) -> bool;
}

/// Deepest level below the root that is listed to find units.
const MAX_DEPTH: usize = 4;

/// One unit of a plan, in key order.
#[derive(Clone, Debug)]
enum Unit {
    /// A single object directly under a split prefix.
    Object(String),
    /// Every key under a prefix ending in `/`.
    Prefix(String),
}

impl Unit {
    /// The smallest key the unit can hold (a prefix: the prefix itself).
    fn start(&self) -> &str {
        match self {
            Unit::Object(k) | Unit::Prefix(k) => k,
        }
    }

    /// A string at or above every key of the unit and below every key of any later unit: an
    /// object's own key, or for `p/` the first string past all of `p/…`, `p0`.
    fn end(&self) -> String {
        match self {
            Unit::Object(k) => k.clone(),
            Unit::Prefix(p) => past_prefix(p),
        }
    }
}

/// The first string greater than every string starting with `p`: for `p/`, `p0` (`'0'` follows
/// `'/'`). Delimiter listings give prefixes ending in `/`; any other has its last character
/// raised the same way.
fn past_prefix(p: &str) -> String {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        // The next scalar value (surrogates are not characters).
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return chars.into_iter().collect();
        }
    }
    // Only for a prefix made of `char::MAX` alone: nothing lies past it but longer keys.
    format!("{p}{}", char::MAX)
}

/// The first string after `x`.
fn just_after(x: &str) -> String {
    format!("{x}\0")
}

/// A unit with its place in the plan.
#[derive(Clone, Debug)]
struct Slot {
    unit: Unit,
    /// Under an excluded prefix: in no part.
    excluded: bool,
    /// Depth below the root (its sub-prefixes are at 1).
    depth: usize,
}

/// Plans the parts of `root`: about `target_parts` contiguous ranges (fewer where cuts are not
/// allowed, up to two more per excluded prefix) that together hold every key under `root` not
/// under an `exclude` prefix exactly once, none splitting a prefix the `policy` refuses to
/// split. A root the policy refuses to split is one part.
///
/// With `shard` = `(i, n)`, plans only the `i`-th of `n` contiguous slices of the units (shard
/// 0 from the start of `root`, shard `n - 1` to its end): `n` shards planned on the same bucket
/// are disjoint and together cover every key once. A shard may get no part at all (fewer units
/// than shards). Level listings made: at most about `2 * target_parts * n`, plus those needed to cut
/// out excluded prefixes.
pub async fn plan_parts(
    store: &dyn Store,
    root: &str,
    policy: &dyn SplitPolicy,
    target_parts: usize,
    exclude: &[&str],
    shard: Option<(u32, u32)>,
) -> StoreResult<Vec<Part>> {
    let (index, count) = shard.unwrap_or((0, 1));
    if count == 0 || index >= count {
        return Err(StoreError::Request {
            op: Op::List,
            key: root.to_string(),
            message: format!("shard {index}/{count} does not exist"),
        });
    }
    let mut shards = plan_shards(store, root, policy, target_parts, exclude, count).await?;
    Ok(std::mem::take(&mut shards[index as usize]))
}

/// Plans every shard's parts at once, from one set of level listings: element `i` is what
/// [`plan_parts`] gives shard `i` of `shards` (at least one shard is planned). A run that
/// lists its own shard but needs facts from the others' keys lists those parts too.
pub async fn plan_shards(
    store: &dyn Store,
    root: &str,
    policy: &dyn SplitPolicy,
    target_parts: usize,
    exclude: &[&str],
    shards: u32,
) -> StoreResult<Vec<Vec<Part>>> {
    let count = shards.max(1);
    let target = target_parts.max(1);
    let mut planned: Vec<Vec<Part>> = vec![Vec::new(); count as usize];
    if exclude.iter().any(|e| root.starts_with(e)) {
        return Ok(planned);
    }
    // Each shard is grouped into `target` parts: the plan needs that many units per shard.
    let units = target.saturating_mul(count as usize);
    match plan_units(store, root, policy, units, exclude).await? {
        Some(slots) => {
            let safe = safe_cuts(&slots);
            for (index, parts) in (0..count).zip(planned.iter_mut()) {
                let (lo, hi) = shard_slice(&slots, &safe, index, count);
                *parts = group(root, &slots, &safe, lo, hi, target);
            }
        }
        // The root as one unit: it goes to the first shard.
        None => planned[0].push(Part {
            prefix: root.to_string(),
            after: None,
            before: None,
        }),
    }
    Ok(planned)
}

/// The units of `root` in key order, split breadth-first as far as the policy allows and the
/// target wants; `None` when the root is not to be divided at all.
async fn plan_units(
    store: &dyn Store,
    root: &str,
    policy: &dyn SplitPolicy,
    target: usize,
    exclude: &[&str],
) -> StoreResult<Option<Vec<Slot>>> {
    let level = store.list_level(root).await?;
    if !policy.may_split(root, &level) {
        return Ok(None);
    }
    let mut slots = expand(&level, 1, exclude);
    let mut listings = 1usize;
    let budget = 2 * target + 1;
    // Prefixes that hold an excluded prefix deeper down are split to cut it out, whatever the
    // count; the others only while there are too few units.
    let mut queue: VecDeque<(String, usize)> = prefixes_of(&slots).collect();
    // Kept up to date rather than counted again: a wide root queues a prefix per unit.
    let mut units = normal_units(&slots);
    while let Some((prefix, depth)) = queue.pop_front() {
        let holds_excluded = exclude
            .iter()
            .any(|e| e.starts_with(prefix.as_str()) && *e != prefix);
        let wanted = units < target && listings < budget && depth <= MAX_DEPTH;
        if !holds_excluded && !wanted {
            continue;
        }
        let Some(at) = slots
            .iter()
            .position(|s| matches!(&s.unit, Unit::Prefix(p) if *p == prefix))
        else {
            continue;
        };
        let level = store.list_level(&prefix).await?;
        listings += 1;
        if !policy.may_split(&prefix, &level) {
            continue;
        }
        let children = expand(&level, depth + 1, exclude);
        units = units + normal_units(&children) - 1;
        queue.extend(prefixes_of(&children));
        slots.splice(at..=at, children);
    }
    // Nothing to divide: one part, which also holds whatever appears later.
    Ok((!slots.is_empty()).then_some(slots))
}

/// The units of one level, in key order, excluded ones marked.
fn expand(level: &Level, depth: usize, exclude: &[&str]) -> Vec<Slot> {
    let mut units: Vec<Unit> = level
        .objects
        .iter()
        .map(|o| Unit::Object(o.key.clone()))
        .chain(level.prefixes.iter().cloned().map(Unit::Prefix))
        .collect();
    units.sort_by(|a, b| a.start().cmp(b.start()));
    units
        .into_iter()
        .map(|unit| Slot {
            excluded: exclude.iter().any(|e| unit.start().starts_with(e)),
            unit,
            depth,
        })
        .collect()
}

/// The prefixes among `slots` that may be split further, with their depth.
fn prefixes_of(slots: &[Slot]) -> impl Iterator<Item = (String, usize)> + '_ {
    slots.iter().filter_map(|s| match &s.unit {
        Unit::Prefix(p) if !s.excluded => Some((p.clone(), s.depth)),
        _ => None,
    })
}

fn normal_units(slots: &[Slot]) -> usize {
    slots.iter().filter(|s| !s.excluded).count()
}

/// The key order of a store that lists a file tree (SeaweedFS): component by component, so
/// `/` sorts before every other character (`a/b/1` before `a/b-c`). Each byte moves up one
/// so that `/` alone maps below everything.
fn tree_key(key: &str) -> Vec<u16> {
    key.bytes()
        .map(|b| if b == b'/' { 0 } else { u16::from(b) + 1 })
        .collect()
}

/// Where a cut between slots `j - 1` and `j` gives the same two sides whichever order the
/// store lists in. Byte order (S3, the directory store) and tree order (SeaweedFS) differ only
/// where a sibling's name continues a directory's name with a character below `/`
/// (`alpine-edge` and `alpine/`): a cut never separates such a pair. And a tree-ordered
/// store skips a whole sibling named like the cut's `StartAfter` (`l0` after `l/`), so a cut
/// is not placed right before one.
fn safe_cuts(slots: &[Slot]) -> Vec<bool> {
    let n = slots.len();
    let keys: Vec<Vec<u16>> = slots.iter().map(|s| tree_key(s.unit.start())).collect();
    let mut below_max: Vec<Option<&Vec<u16>>> = vec![None; n + 1];
    for j in 1..=n {
        below_max[j] = below_max[j - 1].max(Some(&keys[j - 1]));
    }
    let mut above_min: Vec<Option<&Vec<u16>>> = vec![None; n + 1];
    for j in (0..n).rev() {
        above_min[j] = match above_min[j + 1] {
            Some(m) => Some(m.min(&keys[j])),
            None => Some(&keys[j]),
        };
    }
    (0..=n)
        .map(|j| {
            if j == 0 || j == n {
                return true;
            }
            let consistent = match (below_max[j], above_min[j]) {
                (Some(lo), Some(hi)) => lo < hi,
                _ => true,
            };
            let end = slots[j - 1].unit.end();
            let dir_end = format!("{end}/");
            let shadowed = matches!(slots[j - 1].unit, Unit::Prefix(_))
                && slots[j..]
                    .iter()
                    .take_while(|s| s.unit.start().starts_with(end.as_str()))
                    .any(|s| s.unit.start() == end || s.unit.start().starts_with(&dir_end));
            consistent && !shadowed
        })
        .collect()
}

/// The first safe cut at or after `j`.
fn snap(safe: &[bool], j: usize) -> usize {
    (j..safe.len()).find(|&i| safe[i]).unwrap_or(safe.len() - 1)
}

/// Slot index of the normal unit with this ordinal (the end if there is none).
fn slot_of(slots: &[Slot], ordinal: usize) -> usize {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.excluded)
        .nth(ordinal)
        .map_or(slots.len(), |(i, _)| i)
}

/// The slot range `[lo, hi)` of shard `index` of `count`: the normal units are dealt by
/// count, in order, each shard starting at the first safe cut at or after its share; the first
/// shard reaches back to slot 0 and the last to the end.
fn shard_slice(slots: &[Slot], safe: &[bool], index: u32, count: u32) -> (usize, usize) {
    let total = normal_units(slots);
    let (index, count) = (index as usize, count as usize);
    let start = |i: usize| {
        if i == 0 {
            0
        } else if i >= count {
            slots.len()
        } else {
            snap(safe, slot_of(slots, (i * total).div_ceil(count)))
        }
    };
    (start(index), start(index + 1))
}

/// Parts for the slots `[lo, hi)`: about `target` ranges of equal unit count, cut only where
/// [`safe_cuts`] allows, and cut around excluded prefixes where it allows; a range of excluded
/// prefixes only is no part.
fn group(
    root: &str,
    slots: &[Slot],
    safe: &[bool],
    lo: usize,
    hi: usize,
    target: usize,
) -> Vec<Part> {
    if lo >= hi {
        return Vec::new();
    }
    let total = slots[lo..hi].iter().filter(|s| !s.excluded).count();
    let first = slots[..lo].iter().filter(|s| !s.excluded).count();
    let mut cuts = std::collections::BTreeSet::from([lo, hi]);
    for k in 1..target {
        let at = snap(safe, slot_of(slots, first + (k * total).div_ceil(target)));
        if at > lo && at < hi {
            cuts.insert(at);
        }
    }
    for h in (lo..hi).filter(|&h| slots[h].excluded) {
        for at in [h, h + 1] {
            if at > lo && at < hi && safe[at] {
                cuts.insert(at);
            }
        }
    }
    let cuts: Vec<usize> = cuts.into_iter().collect();
    let only_excluded = |a: usize, b: usize| slots[a..b].iter().all(|s| s.excluded);
    let mut parts = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        if !only_excluded(a, b) {
            let mut p = part(root, slots, a, b);
            // Up to the excluded prefix that follows, not just to this range's last unit: a
            // key created in between is not lost.
            if cuts.get(i + 2).is_some_and(|&c| only_excluded(b, c)) {
                p.before = Some(slots[b].unit.start().to_string());
            }
            parts.push(p);
            continue;
        }
        // The ends of the root beyond an excluded prefix: empty when planned, not later.
        if a == 0 {
            parts.push(Part {
                prefix: root.to_string(),
                after: None,
                before: Some(slots[0].unit.start().to_string()),
            });
        }
        if b == slots.len() {
            parts.push(Part {
                prefix: root.to_string(),
                after: Some(slots[b - 1].unit.end()),
                before: None,
            });
        }
    }
    parts
}

/// The part of the slots `[a, b)`: the keys after the end of slot `a - 1` (or from the
/// root's start) up to and including the end of slot `b - 1` (or to the root's end).
fn part(root: &str, slots: &[Slot], a: usize, b: usize) -> Part {
    Part {
        prefix: root.to_string(),
        after: a.checked_sub(1).map(|prev| slots[prev].unit.end()),
        before: (b < slots.len()).then(|| just_after(&slots[b - 1].unit.end())),
    }
}

/// Lists one part in key order, in pages: `list_after(prefix, after)` cut at `before`, asking
/// for no page after the one that reached it.
pub fn list_part<'a>(
    store: &'a dyn Store,
    part: &'a Part,
) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
    let pages = store.list_after(&part.prefix, part.after.as_deref());
    Box::pin(futures::stream::unfold(
        Some(pages),
        move |pages| async move {
            let mut pages = pages?;
            let mut page = match pages.next().await? {
                Ok(page) => page,
                Err(e) => return Some((Err(e), None)),
            };
            let Some(before) = part.before.as_deref() else {
                return Some((Ok(page), Some(pages)));
            };
            match page.iter().position(|o| o.key.as_str() >= before) {
                Some(cut) => {
                    page.truncate(cut);
                    Some((Ok(page), None))
                }
                None => Some((Ok(page), Some(pages))),
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(k: &str) -> Slot {
        Slot {
            unit: Unit::Object(k.into()),
            excluded: false,
            depth: 1,
        }
    }
    fn pre(p: &str, excluded: bool) -> Slot {
        Slot {
            unit: Unit::Prefix(p.into()),
            excluded,
            depth: 1,
        }
    }

    fn owners(parts: &[Part], key: &str) -> usize {
        parts.iter().filter(|p| p.contains(key)).count()
    }

    #[test]
    fn a_prefix_ends_where_its_keys_end() {
        assert_eq!(past_prefix("a/b/"), "a/b0");
        assert!("a/b/\u{10FFFF}\u{10FFFF}" < past_prefix("a/b/").as_str());
        assert!("a/b.x" < "a/b/");
        assert_eq!(past_prefix("ab"), "ac");
        assert_eq!(past_prefix("a\u{d7ff}"), "a\u{e000}");
        assert_eq!(past_prefix("a\u{10FFFF}"), "b");
    }

    fn plan(slots: &[Slot], index: u32, count: u32, target: usize) -> Vec<Part> {
        let safe = safe_cuts(slots);
        let (lo, hi) = shard_slice(slots, &safe, index, count);
        group("", slots, &safe, lo, hi, target)
    }

    /// Every key, present or not at planning, has exactly one part; excluded ones none.
    #[test]
    fn groups_cover_each_key_once_around_exclusions() {
        let slots = vec![
            obj("A"),
            pre("X/", false),
            pre("_ocigc/", true),
            pre("a/", false),
            pre("b/", false),
            obj("c"),
            pre("zz/", true),
        ];
        for target in 1..=7 {
            let parts = plan(&slots, 0, 1, target);
            assert!(parts.len() <= target + 3, "{parts:?}");
            for key in [
                "",
                "0",
                "A",
                "A0",
                "X",
                "X/1",
                "X0",
                "Y",
                "_ocigc0/x",
                "a",
                "a/",
                "a/x",
                "a0",
                "b/\u{10FFFF}",
                "b0",
                "c",
                "c\0",
                "d",
            ] {
                assert_eq!(owners(&parts, key), 1, "{key:?} target {target}: {parts:?}");
            }
            for key in ["_ocigc/", "_ocigc/lease", "zz/1"] {
                assert_eq!(owners(&parts, key), 0, "{key:?}: {parts:?}");
            }
        }
    }

    /// A tree-ordered store would skip `_ocigc0` after `_ocigc/`: the excluded prefix then
    /// stays in the next part rather than lose it.
    #[test]
    fn a_sibling_named_like_the_end_keeps_the_exclusion_in() {
        let slots = vec![pre("_ocigc/", true), obj("_ocigc0"), pre("a/", false)];
        let parts = plan(&slots, 0, 1, 2);
        for key in ["_ocigc0", "a/1", "_ocigc/x"] {
            assert_eq!(owners(&parts, key), 1, "{key:?}: {parts:?}");
        }
        assert_eq!(parts[0].after, None, "{parts:?}");
    }

    /// `alpine-edge/` sorts before `alpine/` by bytes and after it by tree: never cut between.
    #[test]
    fn cuts_never_separate_what_the_two_orders_disagree_on() {
        let slots = vec![
            pre("lib/a/", false),
            pre("lib/alpine-edge/", false),
            obj("lib/alpine.z"),
            pre("lib/alpine/", false),
            pre("lib/alpine0/", false),
            pre("lib/b/", false),
        ];
        let safe = safe_cuts(&slots);
        assert_eq!(safe, [true, true, false, false, false, true, true]);
        for target in 1..=6 {
            let parts = plan(&slots, 0, 1, target);
            let edge = parts.iter().position(|p| p.contains("lib/alpine-edge/x"));
            assert_eq!(edge, parts.iter().position(|p| p.contains("lib/alpine/x")));
            assert_eq!(edge, parts.iter().position(|p| p.contains("lib/alpine0/x")));
        }
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_root() {
        let slots: Vec<Slot> = (0..10)
            .map(|i| pre(&format!("r{i}/"), i == 4))
            .chain([obj("z")])
            .collect();
        for count in 1..=13u32 {
            let all: Vec<Vec<Part>> = (0..count).map(|i| plan(&slots, i, count, 2)).collect();
            for key in [
                "", "r0/a", "r1", "r3/x", "r41", "r5/", "r9/z", "s", "z", "zz",
            ] {
                let n: usize = all.iter().map(|p| owners(p, key)).sum();
                assert_eq!(n, 1, "{key:?} with {count} shards: {all:?}");
            }
            let n: usize = all.iter().map(|p| owners(p, "r4/x")).sum();
            assert_eq!(n, 0);
        }
    }
}
