//! The bucket clock: a store whose clock is hours away from the host's must not change what
//! is deleted. The store here reports every `LastModified` shifted by a fixed skew, exactly as
//! a store with a wrong clock would, while the host clock stays right.

mod common;

use common::wrap::{Intercept, Wrapped};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures::stream::BoxStream;
use futures::StreamExt;
use ocigc::gc::GcOptions;
use ocigc::store::{Metadata, ObjectMeta, Store, StoreResult};

/// A store whose clock runs `ahead` (or behind) the host's.
struct Skewed {
    inner: Arc<dyn Store>,
    ahead: bool,
    by: Duration,
}

impl Skewed {
    fn shift(&self, mut o: ObjectMeta) -> ObjectMeta {
        o.last_modified = if self.ahead {
            o.last_modified + self.by
        } else {
            o.last_modified - self.by
        };
        o
    }
}

#[async_trait]
impl Intercept for Skewed {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        Box::pin(
            self.inner
                .list(prefix)
                .map(move |page| page.map(|p| p.into_iter().map(|o| self.shift(o)).collect())),
        )
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        Ok(self
            .inner
            .head_with_metadata(key)
            .await?
            .map(|(o, m)| (self.shift(o), m)))
    }
    async fn server_time(&self) -> StoreResult<std::time::SystemTime> {
        let t = self.inner.server_time().await?;
        Ok(self.shift(ObjectMeta::new("", 0, t, None)).last_modified)
    }
    fn answered_time(&self) -> Option<(std::time::SystemTime, tokio::time::Instant)> {
        let (t, at) = self.inner.answered_time()?;
        Some((
            self.shift(ObjectMeta::new("", 0, t, None)).last_modified,
            at,
        ))
    }
}

/// A run reads the bucket clock from its first listing's `Date` (no HEAD of its own; the
/// directory store's clock is the host's), and that clock is the store's: within a few seconds
/// of a HEAD's, and never ahead of it.
async fn the_clock_comes_from_the_first_answer(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("repo", "v1").await;
    f.layout("repo", &[(Some("v1"), &img)]).await;
    let report = gc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..eager()
        },
    )
    .await;
    // No request for the clock (a directory's clock is the host's, known without one).
    assert_eq!(report.requests.head, 0, "{}: {:?}", t.kind, report.requests);
    let answered = t.store.answered_time();
    let (date, arrived) = answered.expect("an answer's Date");
    let read = date + arrived.elapsed();
    let probed = t.store.server_time().await.expect("server time");
    let skew = probed.duration_since(read).unwrap_or_else(|e| e.duration());
    // Whole seconds on both: the answered clock errs late, never ahead by more than rounding.
    assert!(
        skew < Duration::from_secs(5),
        "{}: {read:?} vs {probed:?}",
        t.kind
    );
    let started = humantime::parse_rfc3339(&report.started_at).expect("started_at");
    assert!(started <= probed + Duration::from_secs(1), "{}", t.kind);
}

async fn skew_does_not_change_decisions(t: TestStore) {
    for ahead in [false, true] {
        let repo = if ahead { "ahead" } else { "behind" };
        let f = Fixture {
            store: t.store.as_ref(),
        };
        let img = f.image(repo, "v1").await;
        let garbage = f.image(repo, "garbage").await;
        f.layout(repo, &[(Some("v1"), &img)]).await;
        let skewed: Arc<dyn Store> = Arc::new(Wrapped(Skewed {
            inner: t.store.clone(),
            ahead,
            by: Duration::from_secs(5 * 3600),
        }));
        let opts = GcOptions {
            grace: Duration::from_secs(3600),
            repos: only(&[repo]),
            ..eager()
        };
        // Just written, on the store's clock: young whatever the host believes. A host-clock
        // GC would call the garbage 5 h old with the store behind, and delete it.
        let report = gc(&skewed, &opts).await;
        assert!(
            repo_report(&report, repo).deleted.is_empty(),
            "{repo}: young garbage deleted"
        );
        assert_intact(
            &keys(t.store.as_ref()).await,
            repo,
            &garbage,
            "young garbage",
        );
        // Two hours later on the store's clock it is old: a host-clock GC with the store ahead
        // would still see it as written in the future, and keep it for ever.
        let later = GcOptions {
            clock_offset: Duration::from_secs(2 * 3600),
            ..opts
        };
        let report = gc(&skewed, &later).await;
        assert_eq!(repo_report(&report, repo).deleted.len(), 3, "{repo}");
        let k = keys(t.store.as_ref()).await;
        assert_gone(&k, repo, &garbage, "old garbage");
        assert_intact(&k, repo, &img, "reachable image");
    }
}

both_stores!(
    skew_does_not_change_decisions,
    the_clock_comes_from_the_first_answer
);
