//! The raw floor of a GC run, for `bench/bench.py`: one LIST of the whole bucket and one GET per
//! manifest, with ocigc's own store client, request time-out and concurrency. Whatever a GC
//! does beyond this is its own overhead.
//!
//! Usage: `floor BUCKET MANIFEST_KEYS_FILE CONCURRENCY [--s3-path-style]`; prints one JSON
//! line: `{"objects": N, "list": N, "get": N, "seconds": F}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures::{stream, StreamExt, TryStreamExt};
use ocigc::cli::open_bucket;
use ocigc::store::{BucketUrl, Instrumented, Store};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bucket, keys_file, concurrency, rest @ ..] = args.as_slice() else {
        return Err(anyhow!(
            "usage: floor BUCKET MANIFEST_KEYS_FILE CONCURRENCY [--s3-path-style]"
        ));
    };
    let bucket: BucketUrl = bucket.parse().map_err(|e| anyhow!("{e}"))?;
    let concurrency: usize = concurrency.parse().context("CONCURRENCY")?;
    let keys: Vec<String> = std::fs::read_to_string(keys_file)
        .with_context(|| format!("reading {keys_file}"))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let path_style = rest.iter().any(|a| a == "--s3-path-style");
    let (inner, timeout) = open_bucket(&bucket, path_style, Duration::from_secs(30))
        .await
        .map_err(|e| e.error)?;
    let store = Arc::new(Instrumented::new(inner, concurrency, timeout));

    let started = Instant::now();
    let pages: Vec<Vec<_>> = store.list("").try_collect().await?;
    let objects: usize = pages.iter().map(Vec::len).sum();
    let read: Vec<usize> = stream::iter(keys)
        .map(|k| {
            let store = store.clone();
            async move { store.get(&k).await.map(|o| o.body.len()) }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let counts = store.counts();
    println!(
        "{}",
        serde_json::json!({
            "objects": objects,
            "list": counts.list,
            "get": counts.get,
            "bytes_read": read.iter().sum::<usize>(),
            "seconds": seconds,
        })
    );
    Ok(())
}
