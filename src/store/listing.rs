//! Splitting a listing into parts that can be listed concurrently, and into shards.
//!
//! A plan starts from delimiter listings of the upper levels ([`Store::list_level`]): the
//! sub-prefixes and direct objects of a prefix are its *units*, in key order. A prefix that the
//! [`SplitPolicy`] allows to split is replaced by its own units, breadth-first, until there are
//! enough; one it refuses (a repository, or what may be one) stays a single unit, so all of its
//! keys land in one part. Consecutive units are then grouped into contiguous key ranges
//! ([`Part`]) that [`list_part`] lists with `StartAfter`.
//!
//! Boundaries are exact: between a unit ending at `x` (an object key, or the first string past
//! a prefix, `p/` → `p0`) and the next, the lower part takes the keys `<= x` and the upper one
//! the keys `> x`, so every key under the root, including one created after planning, falls in
//! exactly one part of a plan. Excluded prefixes are cut out: the part before one ends at its
//! start, the part after it begins at its end. Two things a plan cannot see:
//!
//! - a key named exactly like the end of an excluded prefix (`_ocigc0` after `_ocigc/`) that
//!   is created after planning lies in no part;
//! - an excluded prefix inside a unit the policy refuses to split stays in that unit's part
//!   (the repository stays whole), so a consumer still filters excluded keys itself.
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

/// The first string greater than every string starting with `p/`: `p0` (`'0'` follows `'/'`).
fn past_prefix(p: &str) -> String {
    match p.strip_suffix('/') {
        Some(stem) => format!("{stem}0"),
        // Units from a delimiter listing always end in '/'; any other prefix is bounded the
        // same way by its last byte's successor, found by the general rule below.
        None => {
            let mut bytes = p.as_bytes().to_vec();
            while let Some(last) = bytes.pop() {
                if last < 0x7f {
                    bytes.push(last + 1);
                    return String::from_utf8(bytes).unwrap_or_default();
                }
            }
            String::new()
        }
    }
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

/// Plans the parts of `root`: at most `target_parts` contiguous ranges (plus one per excluded
/// prefix that falls between units) that together hold every key under `root` not under an
/// `exclude` prefix exactly once, none splitting a prefix the `policy` refuses to split.
///
/// With `shard` = `(i, n)`, plans only the `i`-th of `n` contiguous slices of the units (shard
/// 0 from the start of `root`, shard `n - 1` to its end): `n` shards planned on the same bucket
/// are disjoint and together cover every key once. A shard may get no part at all (fewer units
/// than shards). Level listings made: at most about `2 * target_parts`, plus those needed to cut
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
    let target = target_parts.max(1);
    if exclude.iter().any(|e| root.starts_with(e)) {
        return Ok(Vec::new());
    }
    let whole = || {
        let all = Part {
            prefix: root.to_string(),
            after: None,
            before: None,
        };
        // The root as one unit: it goes to the first shard.
        Ok(if index == 0 { vec![all] } else { Vec::new() })
    };
    let level = store.list_level(root).await?;
    if !policy.may_split(root, &level) {
        return whole();
    }
    let mut slots = expand(&level, 1, exclude);
    let mut listings = 1usize;
    let budget = 2 * target + 1;
    // Prefixes that hold an excluded prefix deeper down are split to cut it out, whatever the
    // count; the others only while there are too few units.
    let mut queue: VecDeque<(String, usize)> = prefixes_of(&slots).collect();
    while let Some((prefix, depth)) = queue.pop_front() {
        let holds_excluded = exclude
            .iter()
            .any(|e| e.starts_with(prefix.as_str()) && *e != prefix);
        let wanted = normal_units(&slots) < target && listings < budget && depth <= MAX_DEPTH;
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
        queue.extend(prefixes_of(&children));
        slots.splice(at..=at, children);
    }
    if slots.is_empty() {
        // Nothing to divide: one part, which also holds whatever appears later.
        return whole();
    }
    let (lo, hi) = shard_slice(&slots, index, count);
    Ok(group(root, &slots, lo, hi, target))
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

/// The slot range `[lo, hi)` of shard `index` of `count`: the units are dealt by count, in
/// order, ignoring excluded ones; the first shard reaches back to slot 0 and the last to the
/// end.
fn shard_slice(slots: &[Slot], index: u32, count: u32) -> (usize, usize) {
    let total = normal_units(slots);
    let (index, count) = (index as usize, count as usize);
    // Ordinal o of the normal units belongs to shard o * count / total.
    let first = (index * total).div_ceil(count);
    let last = ((index + 1) * total).div_ceil(count);
    let slot_of = |ordinal: usize| {
        slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.excluded)
            .nth(ordinal)
            .map_or(slots.len(), |(i, _)| i)
    };
    let lo = if index == 0 { 0 } else { slot_of(first) };
    let hi = if index + 1 == count {
        slots.len()
    } else {
        slot_of(last)
    };
    (lo, hi.max(lo))
}

/// Parts for the slots `[lo, hi)`: runs of normal units cut at excluded ones and into about
/// `target` groups of equal unit count, plus the gaps next to excluded prefixes that no run
/// borders (they hold no key at planning, but may later).
fn group(root: &str, slots: &[Slot], lo: usize, hi: usize, target: usize) -> Vec<Part> {
    let total = slots[lo..hi].iter().filter(|s| !s.excluded).count();
    let range = |after: Option<String>, before: Option<String>| Part {
        prefix: root.to_string(),
        after,
        before,
    };
    let mut parts = Vec::new();
    let mut run: Option<(usize, usize)> = None; // (first slot, group)
    let mut ordinal = 0usize;
    for i in lo..hi {
        let slot = &slots[i];
        if slot.excluded {
            if let Some((first, _)) = run.take() {
                parts.push(part(root, slots, first, i));
            }
            if i == 0 {
                parts.push(range(None, Some(slot.unit.start().to_string())));
            }
            let end = slot.unit.end();
            match slots.get(i + 1) {
                // A key equal to the end of an excluded prefix (an object `p0` after `p/`) is
                // before no `after` that follows it: a part of its own.
                Some(next) if matches!(&next.unit, Unit::Object(k) if *k == end) => {
                    parts.push(Part {
                        prefix: end.clone(),
                        after: None,
                        before: Some(just_after(&end)),
                    });
                }
                Some(next) if next.excluded => {
                    parts.push(range(Some(end), Some(next.unit.start().to_string())));
                }
                None => parts.push(range(Some(end), None)),
                Some(_) => {}
            }
            continue;
        }
        let g = ordinal * target / total.max(1);
        ordinal += 1;
        match run {
            Some((first, group)) if group != g => {
                parts.push(part(root, slots, first, i));
                run = Some((i, g));
            }
            Some(_) => {}
            None => run = Some((i, g)),
        }
    }
    if let Some((first, _)) = run {
        parts.push(part(root, slots, first, hi));
    }
    parts
}

/// The part of the normal slots `[a, b)`: from the end of the slot before `a` (or the root's
/// start) to the end of slot `b - 1`, or to the start of slot `b` where that one is excluded
/// (or to the root's end).
fn part(root: &str, slots: &[Slot], a: usize, b: usize) -> Part {
    let after = a.checked_sub(1).map(|prev| slots[prev].unit.end());
    let before = match slots.get(b) {
        Some(next) if next.excluded => Some(next.unit.start().to_string()),
        Some(_) => Some(just_after(&slots[b - 1].unit.end())),
        None => None,
    };
    Part {
        prefix: root.to_string(),
        after,
        before,
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
    }

    /// Every key, present or not at planning, has exactly one part; excluded ones none.
    #[test]
    fn groups_cover_each_key_once_around_exclusions() {
        let slots = vec![
            obj("A"),
            pre("X/", false),
            pre("_ocigc/", true),
            obj("_ocigc0"),
            pre("a/", false),
            pre("b/", false),
            obj("c"),
        ];
        for target in 1..=7 {
            let parts = group("", &slots, 0, slots.len(), target);
            for key in [
                "",
                "0",
                "A",
                "A0",
                "X",
                "X/1",
                "X0",
                "Y",
                "_ocigc0",
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
                "\u{10FFFF}",
            ] {
                assert_eq!(owners(&parts, key), 1, "{key:?} target {target}: {parts:?}");
            }
            for key in ["_ocigc/", "_ocigc/lease"] {
                assert_eq!(owners(&parts, key), 0, "{key:?}: {parts:?}");
            }
        }
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_root() {
        let slots: Vec<Slot> = (0..10)
            .map(|i| pre(&format!("r{i}/"), i == 4))
            .chain([obj("z")])
            .collect();
        for count in 1..=13u32 {
            let mut all = Vec::new();
            for index in 0..count {
                let (lo, hi) = shard_slice(&slots, index, count);
                all.push(group("", &slots, lo, hi, 2));
            }
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
