//! Cost accounting (issue 14, part 2) end to end: a run with prices reports what its requests
//! cost and what its deletions save, from its own figures, and the metrics carry the same.

mod common;

use std::sync::Arc;

use common::*;
use ocigc::cost::{Pricing, BYTES_PER_GB};
use ocigc::gc::GcOptions;
use ocigc::metrics::Metrics;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

#[tokio::test]
async fn a_priced_run_reports_and_exports_its_cost() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    f.neighbours().await;
    let prices = Pricing::S3Standard.prices().expect("prices");
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        prices: Some(prices.clone()),
        metrics: Some(metrics.clone()),
        ..eager()
    };
    let report = gc(&t.store, &opts).await;
    assert!(report.all_ok());
    let cost = report.cost.as_ref().expect("a cost object with prices");
    assert!(report.totals.bytes_deleted > 0);
    assert_eq!(cost.reclaimed_bytes, report.totals.bytes_deleted);
    let per_month = report.totals.bytes_deleted as f64 / BYTES_PER_GB * 0.023;
    assert!((cost.reclaimed_dollars_per_month - per_month).abs() < 1e-15);
    let r = report.requests;
    assert_eq!(cost.class_a_requests, r.list + r.put);
    assert_eq!(cost.class_b_requests, r.get + r.head);
    assert_eq!(cost.free_requests, r.delete);
    assert!(r.delete > 0, "the deletions were requests too, and free");
    let dollars = ((r.list + r.put) as f64 * 5.0 + (r.get + r.head) as f64 * 0.40) / 1e6;
    assert!((cost.request_dollars - dollars).abs() < 1e-15);

    let text = metrics.encode();
    let gauge = metric(&text, "ocigc_reclaimed_dollars_per_month");
    assert!(
        (gauge - cost.reclaimed_dollars_per_month).abs() < 1e-15,
        "{text}"
    );
    let counter = metric(&text, "ocigc_request_cost_dollars_total");
    assert!((counter - cost.request_dollars).abs() < 1e-15, "{text}");

    // Without prices: no cost object, and the metrics stay at 0.
    let metrics = Arc::new(Metrics::new());
    let plain = gc(
        &t.store,
        &GcOptions {
            metrics: Some(metrics.clone()),
            ..eager()
        },
    )
    .await;
    assert!(plain.cost.is_none());
    assert_eq!(
        metric(&metrics.encode(), "ocigc_request_cost_dollars_total"),
        0.0
    );
}
