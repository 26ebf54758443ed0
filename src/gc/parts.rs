//! How a run lists a key space (SPEC §6b): parts listed concurrently, each in key order, so
//! that a listing's wall time follows the store's parallelism rather than its page count.
//!
//! The first page is read as a plain listing: a key space that fits in it (most hook runs,
//! small buckets) costs exactly what it did, with no planning. A longer one is planned into
//! parts ([`plan_shards`], cut only between repositories, see [`Layout::may_split`]); the
//! first page's keys are handed to the parts that own them and each part resumes where the
//! page ended, so no key is listed twice. A shard lists its own parts, and the other shards'
//! too where its decisions depend on keys there (cross-repository links, or the global
//! unit's roots), collecting only what is its own.

use futures::stream::{self, BoxStream};
use futures::StreamExt as _;

use super::options::Shard;
use crate::layout::Layout;
use crate::store::{list_part, plan_shards, Level, ObjectMeta, Part, SplitPolicy, Store};
use crate::store::{StoreError, StoreResult};

/// A first page this long means the listing goes on (stores page by 1000 keys).
const FULL_PAGE: usize = 1000;

/// A listing's first page, already read, and the rest of that listing.
pub(super) type FirstPage<'a> = (Vec<ObjectMeta>, BoxStream<'a, StoreResult<Vec<ObjectMeta>>>);

/// The first page of the listing of `prefix`, and the rest of that listing.
pub(super) async fn first_page<'a>(
    store: &'a dyn Store,
    prefix: &'a str,
) -> Result<FirstPage<'a>, StoreError> {
    let mut pages = store.list(prefix);
    let page = match pages.next().await {
        Some(page) => page?,
        None => Vec::new(),
    };
    Ok((page, pages))
}

/// The layout's answer to "may this prefix be listed in parts" ([`Layout::may_split`]).
pub(super) struct LayoutSplit<'a>(pub &'a dyn Layout);

impl SplitPolicy for LayoutSplit<'_> {
    fn may_split(&self, prefix: &str, level: &Level) -> bool {
        self.0.may_split(prefix, &level.objects, &level.prefixes)
    }
}

/// Pages a part should have at least: each part ends in a partial page and the plan costs level
/// listings, so parts pay only where they save many pages' round trips.
const PAGES_PER_PART: u64 = 64;

/// How many parts to list at once, at most `max`: fewer where the last run saw so few keys
/// (`expected_keys`, from the incremental cache) that parts would cost more requests than
/// they save time; `max` when nothing is known. A shard divides the expected keys first.
pub(super) fn parts_for(max: usize, expected_keys: Option<u64>, shards: u32) -> usize {
    let Some(keys) = expected_keys else {
        return max.max(1);
    };
    let pages = (keys / u64::from(shards.max(1))).div_ceil(FULL_PAGE as u64);
    let wanted = pages.div_ceil(PAGES_PER_PART).max(1);
    usize::try_from(wanted)
        .unwrap_or(usize::MAX)
        .clamp(1, max.max(1))
}

/// How a key space is to be listed.
pub(super) struct Request<'a> {
    /// The prefix to list.
    pub prefix: &'a str,
    /// Prefixes under it that are never listed as part of it (ocigc's own state).
    pub exclude: &'a [&'a str],
    /// About how many parts to list at once; 1 lists sequentially.
    pub parts: usize,
    /// This run's shard, if it is one.
    pub shard: Option<Shard>,
    /// A shard lists the other shards' parts too (for facts, not to collect them).
    pub others: bool,
    /// The listing's first page where the run read it already (unsharded runs only).
    pub first: Option<FirstPage<'a>>,
}

/// One part of a planned listing.
pub(super) struct PlannedPart {
    /// Keys of the first page that fall in this part.
    seed: Vec<ObjectMeta>,
    /// What is left to list of the part (its range, resumed after the first page where that
    /// ended inside it); `None` when the first page held all of it.
    rest: Option<Part>,
    /// The run's own: a shard collects only the repositories of its own parts.
    pub own: bool,
}

impl PlannedPart {
    /// The part's pages in key order: the first page's share, then the rest of the part.
    pub fn pages<'a>(
        &'a self,
        store: &'a dyn Store,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let seed = stream::iter((!self.seed.is_empty()).then(|| Ok(self.seed.clone())));
        match &self.rest {
            Some(rest) => seed.chain(list_part(store, rest)).boxed(),
            None => seed.boxed(),
        }
    }
}

/// A key space's listing, as planned.
pub(super) enum Listing<'a> {
    /// One listing in key order (the first page already read, handed out again first).
    Sequential(BoxStream<'a, StoreResult<Vec<ObjectMeta>>>),
    /// Parts to list concurrently.
    Parts(Vec<PlannedPart>),
}

/// Plans the listing of `req.prefix`: sequential when it fits in one page or one part is
/// asked for (and the run is no shard), in parts otherwise.
pub(super) async fn plan<'a>(
    store: &'a dyn Store,
    layout: &dyn Layout,
    req: Request<'a>,
) -> Result<Listing<'a>, StoreError> {
    let policy = LayoutSplit(layout);
    let Some(shard) = req.shard else {
        let (first, pages) = match req.first {
            Some(read) => read,
            None => first_page(store, req.prefix).await?,
        };
        if req.parts <= 1 || first.len() < FULL_PAGE {
            return Ok(Listing::Sequential(
                stream::iter([Ok(first)]).chain(pages).boxed(),
            ));
        }
        drop(pages);
        let planned = plan_shards(store, req.prefix, &policy, req.parts, req.exclude, 1).await?;
        let parts = planned.into_iter().flatten().collect();
        return Ok(Listing::Parts(after_first_page(parts, first)));
    };
    // A shard plans first: the first page of the bucket is usually another shard's.
    let planned = plan_shards(
        store,
        req.prefix,
        &policy,
        req.parts,
        req.exclude,
        shard.count,
    )
    .await?;
    let parts = planned
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i == shard.index as usize || req.others)
        .flat_map(|(i, parts)| {
            parts.into_iter().map(move |part| PlannedPart {
                seed: Vec::new(),
                rest: Some(part),
                own: i == shard.index as usize,
            })
        })
        .collect();
    Ok(Listing::Parts(parts))
}

/// The parts of an unsharded listing whose first page (`first`, full) has been read: each
/// part gets the page's keys that fall in it and resumes after the page's last key if that
/// lies inside it; a part wholly before that key is complete already.
fn after_first_page(parts: Vec<Part>, first: Vec<ObjectMeta>) -> Vec<PlannedPart> {
    let last = first.last().map(|o| o.key.clone()).unwrap_or_default();
    let mut first = first;
    parts
        .into_iter()
        .map(|part| {
            let (seed, kept): (Vec<ObjectMeta>, Vec<ObjectMeta>) =
                first.drain(..).partition(|o| part.contains(&o.key));
            first = kept;
            let rest = if part.contains(&last) {
                Some(Part {
                    after: Some(last.clone()),
                    ..part
                })
            } else if part.before.as_deref().is_some_and(|b| b <= last.as_str()) {
                // Every key of it sorts before the page's last one: the page held them all
                // (cuts lie where the stores' orders agree).
                None
            } else {
                Some(part)
            };
            PlannedPart {
                seed,
                rest,
                own: true,
            }
        })
        .collect()
}

/// Pages of one listing passed on through a channel by a driver future. The run polls the
/// drivers apart from the collection, so a page request, once started, is always driven to
/// its end: none is left half-done while the collection is busy (holding one of the store's
/// request permits, its time-out running), which could starve the collection of permits.
/// Before each request the driver waits for room in `backlog`, which bounds what the listing
/// runs ahead of the collection.
pub(super) fn drive<'a, T: Send + 'a>(
    mut pages: BoxStream<'a, StoreResult<Vec<ObjectMeta>>>,
    backlog: &'a Backlog<T>,
) -> (
    impl std::future::Future<Output = ()> + Send + 'a,
    BoxStream<'a, StoreResult<Vec<ObjectMeta>>>,
) {
    let (mut tx, rx) = futures::channel::mpsc::channel(1);
    let driver = async move {
        use futures::SinkExt as _;
        loop {
            backlog.room().await;
            let Some(page) = pages.next().await else {
                break;
            };
            // The receiving end stopped (an error there, or the run ended): so does this.
            if tx.send(page).await.is_err() {
                break;
            }
        }
    };
    (driver, rx.boxed())
}

/// Units the listing completed, waiting for the collection: a queue whose weight (listed
/// objects) is bounded by holding back the listing's drivers, never by blocking the one who
/// pushes (which would leave requests half-done, see [`drive`]).
pub(super) struct Backlog<T> {
    state: std::sync::Mutex<BacklogState<T>>,
    budget: usize,
    ready: tokio::sync::Notify,
    room: tokio::sync::Notify,
}

struct BacklogState<T> {
    queue: std::collections::VecDeque<(T, usize)>,
    weight: usize,
    closed: bool,
}

impl<T> Backlog<T> {
    /// A backlog that holds back the listing while it weighs `budget` or more.
    pub fn new(budget: usize) -> Backlog<T> {
        Backlog {
            state: std::sync::Mutex::new(BacklogState {
                queue: std::collections::VecDeque::new(),
                weight: 0,
                closed: false,
            }),
            budget,
            ready: tokio::sync::Notify::new(),
            room: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BacklogState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` of `weight`; never waits.
    pub fn push(&self, item: T, weight: usize) {
        let mut s = self.lock();
        s.weight += weight;
        s.queue.push_back((item, weight));
        drop(s);
        self.ready.notify_one();
    }

    /// No more items come.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits until the backlog weighs less than its budget.
    async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().weight < self.budget {
                return;
            }
            notified.await;
        }
    }

    /// The items as they come, until closed and empty.
    pub fn stream(&self) -> BoxStream<'_, T>
    where
        T: Send,
    {
        stream::unfold(self, Self::next_of).boxed()
    }

    async fn next_of(&self) -> Option<(T, &Self)> {
        self.pop().await.map(|item| (item, self))
    }

    /// The next item, waiting for one; `None` once closed and empty.
    async fn pop(&self) -> Option<T> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if let Some((item, weight)) = s.queue.pop_front() {
                    s.weight -= weight;
                    drop(s);
                    self.room.notify_waiters();
                    return Some(item);
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// Every object under `prefix`, handed to `page` one page at a time as the parts deliver them:
/// in key order within a part, in no order across parts. Nothing is held beyond the pages in
/// flight, so a caller that keeps only what it needs lists any number of keys in bounded
/// memory (the global blob space, streamed against its reachable set).
pub(super) async fn each_page(
    store: &dyn Store,
    layout: &dyn Layout,
    prefix: &str,
    list_parts: usize,
    concurrency: usize,
    mut page: impl FnMut(Vec<ObjectMeta>),
) -> Result<(), StoreError> {
    let request = Request {
        prefix,
        exclude: &[],
        parts: list_parts,
        shard: None,
        others: false,
        first: None,
    };
    match plan(store, layout, request).await? {
        Listing::Sequential(mut pages) => {
            while let Some(p) = pages.next().await {
                page(p?);
            }
        }
        Listing::Parts(planned) => {
            // Streams built first: a closure over `&PlannedPart` in the stream would make the
            // run's future not provably `Send`.
            let streams: Vec<_> = planned.iter().map(|p| p.pages(store)).collect();
            let mut pages = stream::iter(streams).flatten_unordered(concurrency.max(1));
            while let Some(p) = pages.next().await {
                page(p?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_the_expected_pages() {
        // Unknown size: as many as asked.
        assert_eq!(parts_for(16, None, 1), 16);
        assert_eq!(parts_for(0, None, 1), 1);
        // A small bucket is listed sequentially; each part gets 64 pages or more.
        assert_eq!(parts_for(16, Some(17_000), 1), 1);
        assert_eq!(parts_for(16, Some(64_000), 1), 1);
        assert_eq!(parts_for(16, Some(64_001), 1), 2);
        assert_eq!(parts_for(16, Some(300_000), 1), 5);
        assert_eq!(parts_for(16, Some(10_000_000), 1), 16);
        // A shard lists its share.
        assert_eq!(parts_for(16, Some(1_000_000), 4), 4);
        assert_eq!(parts_for(16, Some(0), 4), 1);
    }
}
