//! A `gc` run over the benchmark's generated bucket, for `bench/bench.py` (peak memory at
//! millions of keys without writing them): the same engine as `ocigc gc`, on a
//! [`GeneratedStore`]. Deletes are counted and applied to nothing.
//!
//! Usage: `generated_gc 'generated:?repos=N&tags=T&layers=L&garbage=G&seed=S' [--layout oci]
//! [--dry-run] [--grace D] [--delay D] [--concurrency N] [--clock-offset D] [--shard I/N]`; prints the JSON
//! report on stdout, plus `"generated_deletes"`, the generated keys the run asked to delete.
//! With `--write-dir PATH` it writes the generated bucket there as files instead (a
//! directory-store bucket of identical content) and prints `{"written": N}`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use ocigc::gc::{run_gc, GcOptions, Shard};
use ocigc::layout::{self, LayoutOptions};
use ocigc::store::{GeneratedSpec, GeneratedStore, Store};

/// The report with the generated keys the run asked to delete.
#[derive(serde::Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    report: &'a ocigc::report::Report,
    generated_deletes: u64,
}

/// Writes every generated object as a file under `root` (a directory-store bucket of the same
/// content), one repository's keys at a time.
async fn write_all(store: &GeneratedStore, root: &Path) -> anyhow::Result<u64> {
    let mut pages = store.list("");
    let mut written = 0;
    let mut made: Option<PathBuf> = None;
    while let Some(page) = pages.next().await {
        for object in page? {
            let path = root.join(&object.key);
            if let Some(parent) = path.parent() {
                if made.as_deref() != Some(parent) {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                    made = Some(parent.to_path_buf());
                }
            }
            let body = store.get(&object.key).await?.body;
            std::fs::write(&path, &body).with_context(|| format!("writing {}", path.display()))?;
            written += 1;
        }
    }
    Ok(written)
}

fn duration(flag: &str, value: Option<&String>) -> anyhow::Result<Duration> {
    let value = value.ok_or_else(|| anyhow!("{flag} needs a value"))?;
    humantime::parse_duration(value).with_context(|| format!("{flag} {value}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((url, rest)) = args.split_first() else {
        bail!("usage: generated_gc 'generated:?repos=N&...' [--dry-run] [--grace D] [--delay D] [--concurrency N] [--clock-offset D]");
    };
    let spec: GeneratedSpec = url.parse()?;
    let mut opts = GcOptions {
        grace: Duration::ZERO,
        delay: Duration::ZERO,
        ..GcOptions::default()
    };
    let mut layout_name = "oci".to_string();
    let mut write_dir: Option<PathBuf> = None;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--dry-run" => opts.dry_run = true,
            "--grace" => opts.grace = duration(flag, it.next())?,
            "--delay" => opts.delay = duration(flag, it.next())?,
            "--clock-offset" => opts.clock_offset = duration(flag, it.next())?,
            "--concurrency" => {
                opts.concurrency = it
                    .next()
                    .ok_or_else(|| anyhow!("--concurrency needs a value"))?
                    .parse()
                    .context("--concurrency")?
            }
            "--shard" => {
                let value = it.next().ok_or_else(|| anyhow!("--shard needs a value"))?;
                opts.shard = Some(Shard::parse(value).map_err(|e| anyhow!("--shard {e}"))?);
            }
            "--layout" => {
                layout_name = it
                    .next()
                    .ok_or_else(|| anyhow!("--layout needs a value"))?
                    .clone()
            }
            "--write-dir" => {
                write_dir = Some(
                    it.next()
                        .ok_or_else(|| anyhow!("--write-dir needs a value"))?
                        .into(),
                )
            }
            other => bail!("unknown flag {other:?}"),
        }
    }
    if layout_name != "oci" {
        bail!("the generated bucket is an oci layout");
    }
    if let Some(dir) = write_dir {
        let store = GeneratedStore::new(spec);
        let written = write_all(&store, &dir).await?;
        println!("{}", serde_json::json!({ "written": written }));
        return Ok(());
    }
    let layout = layout::by_name(&layout_name, LayoutOptions::default()).map_err(|e| anyhow!(e))?;
    let store = Arc::new(GeneratedStore::new(spec));
    let report = run_gc(store.clone(), layout, &opts).await?;
    // Written straight out (no JSON tree, no string of it): its peak RSS is the run's.
    let out = Output {
        report: &report,
        generated_deletes: store.deleted_generated(),
    };
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut stdout, &out)?;
    writeln!(stdout)?;
    stdout.flush()?;
    Ok(())
}
