//! Command-line interface: argument parsing (every flag also from an `OCIGC_*` variable and
//! the `--config` file), store and layout set-up, report output, metrics push and exit codes.
//!
//! Every setting is declared once, as a field of the flag structs below: its flag, variable,
//! default, help and validation in `#[arg]`, its config-file form in `#[serde]` (the key is the
//! field name; the value is checked by the same parser as the flag). `apply_config` merges
//! the file into the parsed flags generically, and `gc_setup` turns the result into the
//! engine's options, in one place each.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::FileConfig;
use crate::cost::{Prices, Pricing};
use crate::daemon::{self, ServeOptions};
use crate::digest::Digest;
use crate::gc::{self, intent, DeleteRepoOptions, GcOptions, RepoFilter};
use crate::layout::{self, validate_repository_name, Layout, LayoutOptions};
use crate::metrics::{redact_url, Metrics};
use crate::namespace::{self, StateKey};
use crate::report::Report;
use crate::retention::protect::Protected;
use crate::retention::restore::{self, Target};
use crate::retention::rules::Rules;
use crate::retention::RetentionOptions;
use crate::store::{BucketUrl, DirStore, RateLimit, S3Settings, S3Store, StaticCredentials, Store};

/// Exit status: every repository done.
pub const EXIT_OK: u8 = 0;
/// Exit status: a fatal error (e.g. the store cannot be listed).
pub const EXIT_FATAL: u8 = 1;
/// Exit status: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: some repository failed closed, timed out or was skipped.
pub const EXIT_PARTIAL: u8 = 3;

/// Attempts per S3 request (the first included).
const S3_ATTEMPTS: u32 = 3;

/// ocigc: online garbage collection for container registries stored in object-store buckets.
#[derive(Debug, Parser)]
#[command(name = "ocigc", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "OCIGC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// TOML file with any of the flags below (long names, `-` as `_`); flags and OCIGC_*
    /// variables win over it; unknown keys are rejected.
    #[arg(long, env = "OCIGC_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Delete unreferenced blobs, repository by repository, online.
    Gc(GcArgs),
    /// Delete whole repositories (idempotent, resumable).
    DeleteRepo(DeleteRepoArgs),
    /// For pushers: declare blobs about to be reused so no collector deletes them meanwhile.
    Intent(IntentArgs),
    /// Run as a service: scheduled GC, the deletion and GC hooks, /metrics.
    Serve(ServeArgs),
    /// Put back tags that retention moved to the trash (never over an existing tag).
    Restore(RestoreArgs),
    /// Where the bytes are, per repository, as `gc` with the same flags sees them (read-only).
    Du(GcArgs),
    /// Why each digest is kept or would be deleted, and one path from a root (read-only).
    Explain(ExplainArgs),
}

/// Flags of `ocigc explain`: those of `gc`, the repository and the digests.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub gc: GcArgs,
    /// The repository the digests are looked up in.
    #[arg(value_name = "REPO")]
    pub repository: String,
    /// Digests to explain (`sha256:…`).
    #[arg(value_name = "DIGEST", required = true)]
    pub digests: Vec<String>,
}

/// Flags shared by every command that touches a bucket.
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct StoreArgs {
    /// The bucket: s3://bucket[/prefix], file:///path or a plain directory path (required).
    #[arg(long, env = "OCIGC_BUCKET")]
    #[serde(with = "setting::bucket")]
    pub bucket: Option<BucketUrl>,
    /// Bucket layout.
    #[arg(long, env = "OCIGC_LAYOUT", default_value = "oci", value_parser = layout::NAMES)]
    #[serde(deserialize_with = "setting::layout")]
    pub layout: String,
    /// Report what would be deleted; delete nothing.
    #[arg(long, env = "OCIGC_DRY_RUN")]
    pub dry_run: bool,
    /// Write the JSON report to FILE ('-' for stdout).
    #[arg(long, env = "OCIGC_REPORT", value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Store requests in flight at most.
    #[arg(long, env = "OCIGC_CONCURRENCY", default_value_t = 16,
          value_parser = parse_count::<MAX_CONCURRENCY>)]
    #[serde(deserialize_with = "setting::count::<MAX_CONCURRENCY, _>")]
    pub concurrency: usize,
    /// Time-out of one attempt of one store request (S3 requests are tried 3 times).
    #[arg(long, env = "OCIGC_TIMEOUT_REQUEST", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub timeout_request: Duration,
    /// Path-style S3 addressing (endpoint/bucket/key), as MinIO and most local servers need.
    #[arg(long, env = "OCIGC_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Lifetime of a repository lease between renewals; at least 4 request time-outs.
    #[arg(long, env = "OCIGC_LEASE_TTL", default_value = "10m", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub lease_ttl: Duration,
    /// Push the run's metrics to this Prometheus Pushgateway at the end (job `ocigc`, grouped
    /// by bucket), whatever the outcome; `user:password@` in it is sent as basic auth and
    /// never printed.
    #[arg(long, env = "OCIGC_PUSHGATEWAY", value_name = "URL")]
    pub pushgateway: Option<String>,
    /// Send at most N store requests per second, shared by every operation of the run (of
    /// every run and job of `serve`); throttling answers are backed off from either way.
    #[arg(long, env = "OCIGC_MAX_REQUESTS_PER_SECOND", value_name = "N",
          value_parser = parse_count::<MAX_REQUESTS_PER_SECOND>)]
    #[serde(deserialize_with = "setting::optional_count::<MAX_REQUESTS_PER_SECOND, _>")]
    pub max_requests_per_second: Option<usize>,
    /// Price list for the report's `cost` and the cost metrics: r2, s3-standard or none.
    #[arg(long, env = "OCIGC_PRICING", default_value = "none",
          value_parser = crate::cost::Pricing::NAMES)]
    #[serde(deserialize_with = "setting::pricing")]
    pub pricing: String,
    /// Storage price in $ per GB-month, instead of the --pricing list's.
    #[arg(long, env = "OCIGC_PRICE_GB_MONTH", value_name = "DOLLARS", value_parser = parse_price)]
    #[serde(deserialize_with = "setting::optional_price")]
    pub price_gb_month: Option<f64>,
    /// Price of a million class A requests (PUT, COPY, POST, LIST), instead of the list's.
    #[arg(long, env = "OCIGC_PRICE_CLASS_A_PER_MILLION", value_name = "DOLLARS",
          value_parser = parse_price)]
    #[serde(deserialize_with = "setting::optional_price")]
    pub price_class_a_per_million: Option<f64>,
    /// Price of a million class B requests (GET, HEAD), instead of the list's.
    #[arg(long, env = "OCIGC_PRICE_CLASS_B_PER_MILLION", value_name = "DOLLARS",
          value_parser = parse_price)]
    #[serde(deserialize_with = "setting::optional_price")]
    pub price_class_b_per_million: Option<f64>,
    /// Pretend the bucket clock is this far ahead (drills and crash tests only). Hidden flags
    /// are no config keys.
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub clock_offset: Duration,
}

/// Upper bound of `--concurrency`.
const MAX_CONCURRENCY: usize = 1024;
/// Upper bound of `--max-requests-per-second`.
const MAX_REQUESTS_PER_SECOND: usize = 1_000_000;

/// Flags of `ocigc gc`.
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct GcArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub store: StoreArgs,
    /// Only repositories matching GLOB (repeatable; '*' stays within a path segment, '**' spans).
    #[arg(
        long = "repo",
        id = "repos",
        env = "OCIGC_REPO",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub repos: Vec<String>,
    /// Keep unreferenced blobs modified less than this long ago.
    #[arg(long, env = "OCIGC_GRACE", default_value = "24h", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub grace: Duration,
    /// Delete only blobs seen unreferenced at observations this far apart; 0s deletes in this run.
    #[arg(long, env = "OCIGC_DELAY", default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub delay: Duration,
    /// Abandon a repository (between delete batches) after this long.
    #[arg(long, env = "OCIGC_TIMEOUT_REPO", value_parser = parse_duration)]
    #[serde(with = "setting::optional_duration")]
    pub timeout_repo: Option<Duration>,
    /// Stop starting repositories, and abandon running ones, after this long.
    #[arg(long, env = "OCIGC_TIMEOUT_RUN", value_parser = parse_duration)]
    #[serde(with = "setting::optional_duration")]
    pub timeout_run: Option<Duration>,
    /// Collect only shard I of N: the I-th of N contiguous slices of the key space, cut between
    /// repositories; it lists its own slice (and the others' where links cross repositories).
    #[arg(long, env = "OCIGC_SHARD", value_name = "I/N", value_parser = gc::Shard::parse)]
    #[serde(with = "setting::shard")]
    pub shard: Option<gc::Shard>,
    /// List a key space longer than one page in about N parts at once (within --concurrency);
    /// 1 lists it in one sequence.
    #[arg(long, env = "OCIGC_LIST_PARTS", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub list_parts: u16,
    /// Also delete manifests no tag reaches (serverless-registry and distribution layouts);
    /// an index's children and the referrers of a kept manifest are always kept.
    #[arg(long, env = "OCIGC_DELETE_UNTAGGED")]
    pub delete_untagged: bool,
    /// Neither read nor write the incremental cache (`_ocigc/cache/`): every repository is
    /// read in full. For measurements and for ruling the cache out; safety never needs it.
    #[arg(long, env = "OCIGC_NO_CACHE")]
    pub no_cache: bool,
    /// A repository whose deletions would exceed this share of its blob bytes deletes
    /// nothing (`budget_exceeded`, exit 3): the guard against a wrong --layout or prefix.
    /// In (0, 1]; 1 disables it. Whole-repository deletion is exempt.
    #[arg(long, env = "OCIGC_MAX_DELETE_FRACTION", value_name = "F",
          default_value_t = gc::DEFAULT_MAX_DELETE_FRACTION, value_parser = parse_fraction)]
    #[serde(deserialize_with = "setting::fraction")]
    pub max_delete_fraction: f64,
    /// The run deletes at most this many bytes (e.g. 500GB, 2TiB): the repository whose
    /// deletions would cross it, and every one after it, delete nothing (exit 3).
    #[arg(long, env = "OCIGC_MAX_DELETE_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
    #[serde(deserialize_with = "setting::optional_bytes")]
    pub max_delete_bytes: Option<u64>,
    /// Image references retention never removes, one a line (repo:tag, repo@sha256:…, with
    /// or without a registry host), e.g. what the cluster runs.
    #[arg(long, env = "OCIGC_PROTECT_FILE", value_name = "FILE")]
    pub protect_file: Option<PathBuf>,
    /// How long tags retention removed stay in the trash (their manifests kept, `ocigc
    /// restore` can put them back).
    #[arg(long, env = "OCIGC_TRASH_TTL", default_value = "7d", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub trash_ttl: Duration,
    /// The `[[retention]]` tables of the configuration file (no flag).
    #[arg(skip)]
    #[serde(default)]
    pub retention: Option<serde_json::Value>,
}

/// Flags of `ocigc restore`.
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct RestoreArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub store: StoreArgs,
    /// Tags to put back from the trash: REPO:TAG (or REPO@sha256:… for an untagged root).
    #[arg(required = true, value_name = "REPO:TAG")]
    #[serde(skip)]
    pub targets: Vec<String>,
}

/// Flags of `ocigc delete-repo`.
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct DeleteRepoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub store: StoreArgs,
    /// Repositories to delete, by full name (e.g. team/app).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// Flags of `ocigc serve` (plus every flag of `gc`). The hook token comes from `--token-file`
/// or the `OCIGC_TOKEN` variable, never from the command line.
#[derive(Debug, Args, Serialize, Deserialize)]
pub struct ServeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub gc: GcArgs,
    /// Address of the HTTP API and /metrics.
    #[arg(long, env = "OCIGC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Run a full GC at start and then every DURATION; without it, only on request.
    #[arg(long, env = "OCIGC_INTERVAL", value_parser = parse_duration)]
    #[serde(with = "setting::optional_duration")]
    pub interval: Option<Duration>,
    /// File holding the bearer token of the hook API.
    #[arg(long, env = "OCIGC_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve the hook API without authentication (for a trusted local network only).
    #[arg(long, env = "OCIGC_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// On SIGTERM/SIGINT, wait at most this long for running work and open connections
    /// before exiting.
    #[arg(long, env = "OCIGC_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "setting::duration")]
    pub drain_timeout: Duration,
    /// Hook jobs waiting for a slot at most; further hook requests are answered 429 with
    /// Retry-After.
    #[arg(long, env = "OCIGC_MAX_QUEUED_JOBS", default_value_t = daemon::DEFAULT_MAX_QUEUED_JOBS,
          value_parser = parse_count::<MAX_QUEUED_JOBS>)]
    #[serde(deserialize_with = "setting::count::<MAX_QUEUED_JOBS, _>")]
    pub max_queued_jobs: usize,
    /// HTTP connections open at most; more wait until one closes.
    #[arg(long, env = "OCIGC_MAX_CONNECTIONS", default_value_t = daemon::DEFAULT_MAX_CONNECTIONS,
          value_parser = parse_count::<MAX_CONNECTIONS>)]
    #[serde(deserialize_with = "setting::count::<MAX_CONNECTIONS, _>")]
    pub max_connections: usize,
    /// Close a connection that takes longer than this to send a request head, or stays idle
    /// this long between requests.
    #[arg(long, env = "OCIGC_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = parse_positive_duration)]
    #[serde(
        serialize_with = "setting::duration::serialize",
        deserialize_with = "setting::positive_duration"
    )]
    pub header_read_timeout: Duration,
}

/// Upper bound of `--max-queued-jobs` (each queued job is a few hundred bytes of memory).
const MAX_QUEUED_JOBS: usize = 100_000;
/// Upper bound of `--max-connections` (each may hold a file descriptor).
const MAX_CONNECTIONS: usize = 65_536;

/// Flags of `ocigc intent`.
#[derive(Debug, Args)]
pub struct IntentArgs {
    /// The bucket: s3://bucket[/prefix], file:///path or a plain directory path.
    #[arg(long, env = "OCIGC_BUCKET")]
    pub bucket: BucketUrl,
    /// Repository the digests will be referenced from.
    #[arg(long, required_unless_present = "release")]
    pub repo: Option<String>,
    /// How long the intent protects the digests (at most 7 days).
    #[arg(long, default_value = "1h", value_parser = parse_intent_ttl)]
    pub ttl: Duration,
    /// How long to wait for a collector's batch in flight that names one of the digests.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub wait: Duration,
    /// Remove an intent written earlier (its key, as printed) instead of writing one.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["repo", "digests"])]
    pub release: Option<String>,
    /// Path-style S3 addressing.
    #[arg(long, env = "OCIGC_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Digests to protect (sha256:…).
    #[arg(value_name = "DIGEST", required_unless_present = "release")]
    pub digests: Vec<String>,
}

/// The longest duration any setting takes, `100y` (humantime's year: 365.25 days): far
/// beyond any sensible value, and far enough from the limits of `Instant`, `SystemTime` and
/// of RFC 3339 timestamps (year 9999) that adding a few of them to the present never
/// overflows or fails to print.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 15m, 24h)"))?;
    if d > MAX_DURATION {
        return Err(format!("{s} is too long (at most 100 years)"));
    }
    Ok(d)
}

/// Collectors honour an intent for at most [`intent::MAX_INTENT_TTL`]: a longer one would
/// protect less than it says.
fn parse_intent_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > intent::MAX_INTENT_TTL {
        return Err(format!(
            "{s} is longer than collectors honour an intent ({})",
            humantime::format_duration(intent::MAX_INTENT_TTL)
        ));
    }
    Ok(d)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be more than 0s".into()),
        d => Ok(d),
    }
}

/// A share in `(0, 1]`.
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a number in (0, 1], e.g. 0.9")),
    }
}

/// A price in dollars: a finite number, 0 or more.
fn parse_price(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("{s:?} is not a price in dollars, e.g. 0.015")),
    }
}

/// A size in bytes, above zero: a whole number with an optional unit (B, KB, MB, GB, TB,
/// KiB, MiB, GiB, TiB).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size above zero, e.g. 500GB"))
}

/// A count in `1..=MAX`.
fn parse_count<const MAX: usize>(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number in 1..={MAX}")),
    }
}

/// Checks a Pushgateway URL; the error never shows its credentials.
fn check_pushgateway(url: &str) -> Result<(), CliError> {
    let shown = redact_url(url);
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(usage(anyhow!(
            "--pushgateway {shown}: expected an http:// or https:// URL"
        ))),
        Err(e) => Err(usage(anyhow!("--pushgateway {shown}: {e}"))),
    }
}

/// An error at the edge, with the exit status it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Exit status.
    pub code: u8,
    /// What went wrong, with context.
    pub error: anyhow::Error,
}

fn usage(error: anyhow::Error) -> CliError {
    CliError {
        code: EXIT_USAGE,
        error,
    }
}

fn fatal(error: anyhow::Error) -> CliError {
    CliError {
        code: EXIT_FATAL,
        error,
    }
}

/// Installs the tracing subscriber (filter from `OCIGC_LOG`, default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OCIGC_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// True when the user gave `id` on the command line or in the environment.
fn explicit(m: &ArgMatches, id: &str) -> bool {
    // Tables of the file (`retention`) are no arguments, and clap panics on an unknown id.
    m.try_contains_id(id).is_ok()
        && matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
}

/// Subcommands whose flags the configuration file sets.
const CONFIGURED: [&str; 4] = ["gc", "delete-repo", "serve", "restore"];
/// Configuration keys that are tables rather than flags.
const TABLES: [&str; 1] = ["retention"];

/// The configuration keys: the long flags of [`CONFIGURED`] commands, hidden ones (drills)
/// and global ones (`--config` itself, `--log-format`) excepted.
fn config_keys() -> Vec<String> {
    let cli = Cli::command();
    let mut keys: Vec<String> = cli
        .get_subcommands()
        .filter(|c| CONFIGURED.contains(&c.get_name()))
        .flat_map(|c| c.get_arguments())
        .filter(|a| a.get_long().is_some() && !a.is_hide_set() && !a.is_global_set())
        .map(|a| a.get_id().to_string())
        .filter(|id| id != "help" && id != "version")
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Sets every field of `args` that the user did not give as a flag or variable, and the file
/// does, from the file. Generic over the flag structs: their serde form is a map from config
/// key to value, so a setting needs no line of its own here. Each value goes through the
/// setting's own deserializer (the flag's parser), so a bad one is named by its key. Without
/// `m`, every key of the file is taken.
fn merge_config<A: Serialize + DeserializeOwned>(
    args: &mut A,
    m: Option<&ArgMatches>,
    cfg: &FileConfig,
) -> Result<(), CliError> {
    let internal = |e: serde_json::Error| fatal(anyhow!("merging the configuration file: {e}"));
    let serde_json::Value::Object(mut fields) = serde_json::to_value(&*args).map_err(internal)?
    else {
        return Err(fatal(anyhow!("flags do not serialise to a map")));
    };
    let mut changed = false;
    for key in cfg.keys() {
        let Some(value) = cfg.value(key) else {
            continue;
        };
        if !fields.contains_key(key) || m.is_some_and(|m| explicit(m, key)) {
            continue;
        }
        let mut trial = fields.clone();
        trial.insert(key.to_string(), value.clone());
        if let Err(e) = serde_json::from_value::<A>(serde_json::Value::Object(trial)) {
            return Err(usage(cfg.error_at(key, &e.to_string()).into()));
        }
        fields.insert(key.to_string(), value.clone());
        changed = true;
    }
    if changed {
        *args = serde_json::from_value(serde_json::Value::Object(fields)).map_err(internal)?;
    }
    Ok(())
}

/// Applies `--config` to the parsed command: precedence flag > variable > file > default.
fn apply_config(cli: &mut Cli, matches: &ArgMatches) -> Result<(), CliError> {
    let Some(path) = &cli.config else {
        return Ok(());
    };
    let cfg = FileConfig::load(path).map_err(|e| usage(e.into()))?;
    check_config(&cfg)?;
    let Some((_, m)) = matches.subcommand() else {
        return Ok(());
    };
    match &mut cli.command {
        Command::Gc(g) => merge_config(g, Some(m), &cfg),
        Command::DeleteRepo(d) => merge_config(d, Some(m), &cfg),
        Command::Serve(s) => merge_config(s, Some(m), &cfg),
        Command::Restore(r) => merge_config(r, Some(m), &cfg),
        Command::Du(g) => merge_config(g, Some(m), &cfg),
        Command::Explain(e) => merge_config(&mut e.gc, Some(m), &cfg),
        Command::Intent(_) => Ok(()),
    }
}

/// Rejects unknown keys and bad values, whichever command runs: `serve` has every key, so
/// its flags (defaults only, variables ignored) take the whole file.
fn check_config(cfg: &FileConfig) -> Result<(), CliError> {
    let keys = config_keys();
    cfg.check_keys(keys.iter().map(String::as_str).chain(TABLES))
        .map_err(|e| usage(e.into()))?;
    if let Some(tables) = cfg.value("retention") {
        Rules::parse(tables)
            .map_err(|e| usage(cfg.error_at("retention", &e.to_string()).into()))?;
    }
    let defaults = Cli::command()
        .mut_args(|a| a.env(None::<&str>))
        .mut_subcommand("serve", |s| s.mut_args(|a| a.env(None::<&str>)))
        .try_get_matches_from(["ocigc", "serve"])
        .and_then(|m| Cli::from_arg_matches(&m));
    let mut serve = match defaults {
        Ok(Cli {
            command: Command::Serve(s),
            ..
        }) => s,
        Ok(_) => return Err(fatal(anyhow!("`serve` parsed as another command"))),
        Err(e) => return Err(fatal(anyhow!("the defaults of `serve` do not parse: {e}"))),
    };
    merge_config(&mut serve, None, cfg)
}

/// The config-file form of settings whose type serde does not read as the flag does: the
/// same parser as the flag's, so bounds and messages are declared once.
mod setting {
    use std::time::Duration;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::gc::Shard;
    use crate::store::BucketUrl;

    /// A duration as `humantime` writes and `--grace` reads it.
    pub mod duration {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&humantime::format_duration(*d))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            super::super::parse_duration(&String::deserialize(d)?).map_err(D::Error::custom)
        }
    }

    /// An optional duration.
    pub mod optional_duration {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.collect_str(&humantime::format_duration(*d)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|v| super::super::parse_duration(&v).map_err(D::Error::custom))
                .transpose()
        }
    }

    /// A duration above zero.
    pub fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::parse_positive_duration(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    /// A count in `1..=MAX`, an integer in the file.
    pub fn count<'de, const MAX: usize, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        // Read as any value: a flattened struct buffers integers as i64 or u64 only.
        match serde_json::Value::deserialize(d)? {
            // The same bound as the flag's; the number is shown, as no secret is one.
            serde_json::Value::Number(n) => super::parse_count::<MAX>(&n.to_string())
                .map_err(|_| D::Error::custom(format!("{n} is not a whole number in 1..={MAX}"))),
            _ => Err(D::Error::custom("expected a whole number")),
        }
    }

    /// An optional count in `1..=MAX`.
    pub fn optional_count<'de, const MAX: usize, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<usize>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => super::parse_count::<MAX>(&n.to_string())
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{n} is not a whole number in 1..={MAX}"))),
            _ => Err(D::Error::custom("expected a whole number")),
        }
    }

    /// A share in `(0, 1]`.
    pub fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => {
                super::parse_fraction(&n.to_string()).map_err(D::Error::custom)
            }
            _ => Err(D::Error::custom("expected a number in (0, 1]")),
        }
    }

    /// An optional price in dollars.
    pub fn optional_price<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => super::parse_price(&n.to_string())
                .map(Some)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom("expected a price in dollars")),
        }
    }

    /// An optional size: a whole number of bytes, or a string with a unit (`"500GB"`).
    pub fn optional_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => super::parse_bytes(&n.to_string())
                .map(Some)
                .map_err(D::Error::custom),
            serde_json::Value::String(s) => {
                super::parse_bytes(&s).map(Some).map_err(D::Error::custom)
            }
            _ => Err(D::Error::custom("expected a size, e.g. \"500GB\"")),
        }
    }

    /// One of the price lists.
    pub fn pricing<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let name = String::deserialize(d)?;
        crate::cost::Pricing::parse(&name).map_err(D::Error::custom)?;
        Ok(name)
    }

    /// One of the layouts.
    pub fn layout<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let name = String::deserialize(d)?;
        if !crate::layout::NAMES.contains(&name.as_str()) {
            return Err(D::Error::custom(format!(
                "unknown layout `{name}` (one of: {})",
                crate::layout::NAMES.join(", ")
            )));
        }
        Ok(name)
    }

    /// A bucket URL, written back in a form that parses to the same bucket.
    pub mod bucket {
        use super::*;

        pub fn serialize<S: Serializer>(b: &Option<BucketUrl>, s: S) -> Result<S::Ok, S::Error> {
            match b {
                None => s.serialize_none(),
                Some(BucketUrl::S3 { bucket, prefix }) => {
                    s.collect_str(&format_args!("s3://{bucket}/{prefix}"))
                }
                Some(BucketUrl::Dir(path)) => {
                    let path = path
                        .to_str()
                        .ok_or_else(|| serde::ser::Error::custom("the bucket path is not UTF-8"))?;
                    // `file://` keeps an absolute path from reading as another scheme.
                    if path.starts_with('/') {
                        s.collect_str(&format_args!("file://{path}"))
                    } else {
                        s.serialize_str(path)
                    }
                }
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BucketUrl>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|v| v.parse().map_err(D::Error::custom))
                .transpose()
        }
    }

    /// `--shard I/N`.
    pub mod shard {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Shard>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(&format_args!("{}/{}", v.index, v.count)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Shard>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|v| Shard::parse(&v).map_err(D::Error::custom))
                .transpose()
        }
    }
}

async fn open_store(args: &StoreArgs) -> Result<(Arc<dyn Store>, Duration), CliError> {
    if let Some(url) = &args.pushgateway {
        check_pushgateway(url)?;
    }
    let bucket = args.bucket.as_ref().ok_or_else(|| {
        usage(anyhow!(
            "--bucket is required (or OCIGC_BUCKET, or `bucket` in the config file)"
        ))
    })?;
    open_bucket(bucket, args.s3_path_style, args.timeout_request).await
}

/// Opens a bucket as `gc` does; also the benchmark's raw-floor client. Returns the store and
/// the whole time-out of one request (retries included).
pub async fn open_bucket(
    bucket: &BucketUrl,
    path_style: bool,
    timeout_request: Duration,
) -> Result<(Arc<dyn Store>, Duration), CliError> {
    match bucket {
        BucketUrl::Dir(path) => {
            let store = DirStore::open(path)
                .with_context(|| format!("cannot use {} as a bucket", path.display()))
                .map_err(usage)?;
            Ok((Arc::new(store), timeout_request))
        }
        BucketUrl::S3 { bucket, prefix } => {
            let credentials = StaticCredentials::from_env_files()
                .map_err(|e| usage(anyhow!("reading credential files: {e}")))?;
            let settings = S3Settings {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: None,
                region: None,
                path_style,
                credentials,
                connect_timeout: timeout_request.min(Duration::from_secs(10)),
                attempt_timeout: timeout_request,
                max_attempts: S3_ATTEMPTS,
            };
            // The outer bound covers every attempt plus back-off between them.
            let total = timeout_request * S3_ATTEMPTS + Duration::from_secs(5);
            Ok((Arc::new(S3Store::connect(settings).await), total))
        }
    }
}

/// A lease must outlive any one request many times over: it is renewed only between batches.
fn check_lease_ttl(ttl: Duration, request_timeout: Duration) -> Result<(), CliError> {
    if ttl < request_timeout * 4 {
        return Err(usage(anyhow!(
            "--lease-ttl {} is too short: it must be at least 4 times the whole request \
             time-out ({} with retries)",
            humantime::format_duration(ttl),
            humantime::format_duration(request_timeout)
        )));
    }
    Ok(())
}

fn pick_layout(name: &str, opts: LayoutOptions) -> Result<Arc<dyn Layout>, CliError> {
    layout::by_name(name, opts).map_err(|e| usage(anyhow!(e)))
}

/// Everything a gc run (one-shot or in the daemon) needs, from the flags.
async fn gc_setup(
    args: &GcArgs,
) -> Result<
    (
        Arc<dyn Store>,
        Arc<dyn Layout>,
        GcOptions,
        DeleteRepoOptions,
    ),
    CliError,
> {
    let repos = RepoFilter::new(&args.repos)
        .context("invalid --repo glob")
        .map_err(usage)?;
    let layout = pick_layout(
        &args.store.layout,
        LayoutOptions {
            delete_untagged: args.delete_untagged,
        },
    )?;
    let retention = retention_options(args)?;
    let (store, request_timeout) = open_store(&args.store).await?;
    check_lease_ttl(args.store.lease_ttl, request_timeout)?;
    let concurrency = args.store.concurrency;
    // One limiter for everything these options run: the daemon's runs and jobs share it.
    let rate_limit = rate_limit(&args.store);
    let gc = GcOptions {
        grace: args.grace,
        delay: args.delay,
        dry_run: args.store.dry_run,
        repos,
        shard: args.shard,
        concurrency,
        list_parts: usize::from(args.list_parts),
        request_timeout,
        repo_timeout: args.timeout_repo,
        run_timeout: args.timeout_run,
        lease_ttl: args.store.lease_ttl,
        clock_offset: args.store.clock_offset,
        metrics: None,
        stop: Default::default(),
        progress: None,
        only: None,
        no_cache: args.no_cache,
        retention: Arc::new(retention),
        max_delete_fraction: args.max_delete_fraction,
        max_delete_bytes: args.max_delete_bytes,
        rate_limit: rate_limit.clone(),
        prices: prices(&args.store)?,
        detail: false,
        explain: None,
    };
    Ok((
        store,
        layout,
        gc,
        delete_options(&args.store, request_timeout, rate_limit),
    ))
}

/// The retention tables, the protect file and the trash TTL, from the flags and the file.
fn retention_options(args: &GcArgs) -> Result<RetentionOptions, CliError> {
    let rules = match &args.retention {
        Some(tables) => {
            Rules::parse(tables).map_err(|e| usage(anyhow!("configuration file: {e}")))?
        }
        None => Rules::default(),
    };
    let protected = match &args.protect_file {
        Some(path) => Protected::load(path).map_err(|e| usage(e.into()))?,
        None => Protected::default(),
    };
    Ok(RetentionOptions {
        rules,
        protected,
        trash_ttl: args.trash_ttl,
        protect_file: args.protect_file.clone(),
    })
}

/// `ocigc restore`: each target back from the trash; exit 3 if any was not.
async fn restore_command(args: RestoreArgs) -> Result<u8, CliError> {
    let targets = args
        .targets
        .iter()
        .map(|t| Target::parse(t).map_err(|e| usage(anyhow!(e))))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = pick_layout(&args.store.layout, LayoutOptions::default())?;
    let (store, _) = open_store(&args.store).await?;
    if args.store.dry_run {
        return Err(usage(anyhow!("restore has no dry run")));
    }
    let now = store
        .server_time()
        .await
        .context("reading the bucket clock")
        .map_err(fatal)?
        + args.store.clock_offset;
    let metrics = Metrics::new();
    let mut failed = 0;
    for t in &targets {
        match restore::restore(store.as_ref(), layout.as_ref(), t, now).await {
            Ok(digest) => {
                metrics.tags_restored(1);
                let what = t.tag.as_deref().unwrap_or("(untagged)");
                println!("restored {}:{what} -> {digest}", t.repo);
            }
            Err(e) => {
                failed += 1;
                tracing::error!(error = %e, "not restored");
                eprintln!("error: {e}");
            }
        }
    }
    // Its own job: replacing the `ocigc` group would drop the last run's series.
    if let Some(gateway) = &args.store.pushgateway {
        let pushed = metrics
            .push_as(
                "ocigc-restore",
                gateway,
                &store.describe(),
                args.store.timeout_request,
            )
            .await;
        if let Err(e) = pushed {
            tracing::error!(error = %e, "metrics push failed");
        }
    }
    Ok(if failed == 0 { EXIT_OK } else { EXIT_PARTIAL })
}

/// The settings of a repository deletion, from the flags.
fn delete_options(
    args: &StoreArgs,
    request_timeout: Duration,
    rate_limit: Option<Arc<RateLimit>>,
) -> DeleteRepoOptions {
    DeleteRepoOptions {
        dry_run: args.dry_run,
        concurrency: args.concurrency,
        request_timeout,
        lease_ttl: args.lease_ttl,
        clock_offset: args.clock_offset,
        metrics: None,
        rate_limit,
    }
}

/// The request-rate limiter of `--max-requests-per-second`, if set.
fn rate_limit(args: &StoreArgs) -> Option<Arc<RateLimit>> {
    let n = u32::try_from(args.max_requests_per_second?).ok()?;
    Some(Arc::new(RateLimit::per_second(NonZeroU32::new(n)?)))
}

/// The prices of `--pricing` and the explicit `--price-*` flags, if any.
fn prices(args: &StoreArgs) -> Result<Option<Prices>, CliError> {
    let pricing = Pricing::parse(&args.pricing).map_err(|e| usage(anyhow!(e)))?;
    Ok(Prices::resolve(
        pricing,
        args.price_gb_month,
        args.price_class_a_per_million,
        args.price_class_b_per_million,
    ))
}

/// Pushes to the Pushgateway, if one is configured. A failed push is logged, not fatal: the
/// run's own outcome stands, and a missing push shows as a stale last-run metric.
async fn push_metrics(args: &StoreArgs, store: &dyn Store, metrics: &Metrics) {
    let Some(gateway) = &args.pushgateway else {
        return;
    };
    match metrics
        .push(gateway, &store.describe(), args.timeout_request)
        .await
    {
        Ok(()) => tracing::info!(gateway = %redact_url(gateway), "metrics pushed"),
        Err(e) => tracing::error!(error = %e, "metrics push failed"),
    }
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
struct TerminalProgress {
    bar: indicatif::ProgressBar,
    deleted: std::sync::atomic::AtomicU64,
}

impl TerminalProgress {
    fn new() -> Option<TerminalProgress> {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} repositories, {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_message("listing the bucket");
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(TerminalProgress {
            bar,
            deleted: Default::default(),
        })
    }
}

impl gc::Progress for TerminalProgress {
    fn start(&self, repositories: u64) {
        self.bar.set_length(repositories);
        self.bar.set_message("0 deleted");
    }

    fn found(&self, repositories: u64) {
        self.bar.set_length(repositories);
    }

    fn repository_done(&self, name: &str, deleted: u64) {
        use std::sync::atomic::Ordering;
        let total = self.deleted.fetch_add(deleted, Ordering::Relaxed) + deleted;
        self.bar.inc(1);
        self.bar
            .set_message(format!("{total} deleted (last: {name})"));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn exit_for(report: &Report) -> u8 {
    if report.all_ok() {
        EXIT_OK
    } else {
        EXIT_PARTIAL
    }
}

/// Runs a parsed command; returns the exit status or an error carrying one.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Gc(args) => {
            let (store, layout, mut opts, _) = gc_setup(&args).await?;
            let metrics = Arc::new(Metrics::new());
            opts.metrics = Some(metrics.clone());
            opts.progress = TerminalProgress::new().map(|p| Arc::new(p) as Arc<dyn gc::Progress>);
            let result = gc::run_gc(store.clone(), layout, &opts).await;
            push_metrics(&args.store, store.as_ref(), &metrics).await;
            let report = result.map_err(|e| fatal(e.into()))?;
            emit(&report, args.store.report.as_ref())?;
            Ok(exit_for(&report))
        }
        Command::DeleteRepo(args) => {
            for name in &args.names {
                validate_repository_name(name).map_err(|e| usage(anyhow!(e)))?;
            }
            let layout = pick_layout(&args.store.layout, LayoutOptions::default())?;
            let (store, request_timeout) = open_store(&args.store).await?;
            check_lease_ttl(args.store.lease_ttl, request_timeout)?;
            let metrics = Arc::new(Metrics::new());
            let opts = DeleteRepoOptions {
                metrics: Some(metrics.clone()),
                ..delete_options(&args.store, request_timeout, rate_limit(&args.store))
            };
            let prices = prices(&args.store)?;
            let result = gc::delete_repositories(store.clone(), layout, &args.names, &opts).await;
            push_metrics(&args.store, store.as_ref(), &metrics).await;
            let mut report = result.map_err(|e| fatal(e.into()))?;
            // Priced at the edge: what the deletion frees and what its requests cost.
            report.price(prices.as_ref());
            emit(&report, args.store.report.as_ref())?;
            Ok(exit_for(&report))
        }
        Command::Intent(args) => intent_command(args).await,
        Command::Serve(args) => serve_command(args).await,
        Command::Restore(args) => restore_command(args).await,
        Command::Du(args) => du_command(args).await,
        Command::Explain(args) => explain_command(args).await,
    }
}

/// The options of a read-only look (`du`, `explain`): a dry run (no lease, no state, no
/// cache write, no retention change) that keeps the plan's details, with no budget (it
/// would hide the plan it guards).
fn read_only(opts: &mut GcOptions) {
    opts.dry_run = true;
    opts.detail = true;
    opts.max_delete_fraction = 1.0;
    opts.max_delete_bytes = None;
}

/// `ocigc du`: exit 3 if a repository could not be looked at.
async fn du_command(args: GcArgs) -> Result<u8, CliError> {
    let (store, layout, mut opts, _) = gc_setup(&args).await?;
    read_only(&mut opts);
    let report = gc::run_gc(store, layout, &opts)
        .await
        .map_err(|e| fatal(e.into()))?;
    let du = crate::du::DuReport::of(&report, opts.prices.as_ref());
    let target = args.store.report.as_ref();
    if target.is_none_or(|t| t.as_os_str() != "-") {
        let mut out = std::io::stdout().lock();
        du.write_table(&mut out)
            .context("writing the table")
            .map_err(fatal)?;
    }
    if let Some(t) = target {
        emit_json(&du, t)?;
    }
    Ok(if du.all_ok() { EXIT_OK } else { EXIT_PARTIAL })
}

/// A repository name as a glob that matches it alone.
fn literal_glob(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '*' | '?' | '[' | ']' | '{' | '}' | '\\' => format!("[{c}]"),
            c => c.to_string(),
        })
        .collect()
}

/// `ocigc explain`: exit 3 if the repository could not be looked at.
async fn explain_command(mut args: ExplainArgs) -> Result<u8, CliError> {
    validate_repository_name(&args.repository).map_err(|e| usage(anyhow!(e)))?;
    let mut digests = Vec::new();
    for d in &args.digests {
        let digest = Digest::parse(d).ok_or_else(|| usage(anyhow!("invalid digest {d:?}")))?;
        digests.push(digest);
    }
    args.gc.repos = vec![
        literal_glob(&args.repository),
        crate::layout::GLOBAL_REPOSITORY.to_string(),
    ];
    let (store, layout, mut opts, _) = gc_setup(&args.gc).await?;
    read_only(&mut opts);
    opts.explain = Some(Arc::new(digests.iter().cloned().collect()));
    let report = gc::run_gc(store, layout, &opts)
        .await
        .map_err(|e| fatal(e.into()))?;
    // In a layout with a global blob space, the global unit's plan decides on its blobs.
    let known = |name: &str| report.repositories.iter().any(|r| r.name == name);
    if !known(&args.repository) && !known(crate::layout::GLOBAL_REPOSITORY) {
        return Err(usage(anyhow!(
            "no repository {} in the bucket (as layout {})",
            args.repository,
            report.layout
        )));
    }
    let explained = crate::du::ExplainReport::of(&report, &args.repository, &digests);
    let target = args.gc.store.report.as_ref();
    if target.is_none_or(|t| t.as_os_str() != "-") {
        let mut out = std::io::stdout().lock();
        explained
            .write_text(&mut out)
            .context("writing the explanation")
            .map_err(fatal)?;
    }
    if let Some(t) = target {
        emit_json(&explained, t)?;
    }
    Ok(if explained.errors.is_empty() {
        EXIT_OK
    } else {
        EXIT_PARTIAL
    })
}

/// Writes `value` as pretty JSON to `target` (`-`: stdout), a file through a renamed
/// `.partial`.
fn emit_json(value: &impl Serialize, target: &PathBuf) -> Result<(), CliError> {
    let write = |out: &mut dyn std::io::Write| -> anyhow::Result<()> {
        serde_json::to_writer_pretty(&mut *out, value)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    };
    if target.as_os_str() == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        return write(&mut out).context("writing the report").map_err(fatal);
    }
    let mut partial = target.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::File::create(&partial)
        .map_err(anyhow::Error::from)
        .and_then(|file| {
            let mut out = std::io::BufWriter::new(file);
            write(&mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&partial, target)?;
            Ok(())
        })
        .with_context(|| format!("writing the report to {}", target.display()))
        .map_err(fatal)
}

fn read_token(args: &ServeArgs) -> Result<Option<String>, CliError> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))
                .map_err(usage)?
                .trim()
                .to_string(),
        ),
        // A trailing newline (`echo tok > file`, a mounted Secret) is not part of the token.
        None => std::env::var("OCIGC_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    match token {
        Some(t) if t.is_empty() => Err(usage(anyhow!("the hook token is empty"))),
        Some(t) => Ok(Some(t)),
        None if args.insecure_no_auth => {
            tracing::warn!("the hook API runs WITHOUT authentication (--insecure-no-auth)");
            Ok(None)
        }
        None => Err(usage(anyhow!(
            "refusing to serve the hook API without a token: set --token-file or OCIGC_TOKEN \
             (or pass --insecure-no-auth on a trusted network)"
        ))),
    }
}

async fn serve_command(args: ServeArgs) -> Result<u8, CliError> {
    let token = read_token(&args)?;
    let (store, layout, gc, delete) = gc_setup(&args.gc).await?;
    let opts = ServeOptions {
        listen: args.listen,
        interval: args.interval,
        token,
        drain_timeout: args.drain_timeout,
        gc,
        delete,
        pushgateway: args.gc.store.pushgateway.clone(),
        max_queued_jobs: args.max_queued_jobs,
        max_connections: args.max_connections,
        header_read_timeout: args.header_read_timeout,
    };
    let metrics = Arc::new(Metrics::new());
    daemon::serve(store, layout, metrics, opts, shutdown_signal())
        .await
        .with_context(|| format!("serving on {}", args.listen))
        .map_err(fatal)?;
    Ok(EXIT_OK)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Parses arguments and the configuration file, runs, and maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format);
    if let Err(CliError { code, error }) = apply_config(&mut cli, &matches) {
        eprintln!("error: {error:#}");
        return ExitCode::from(code);
    }
    // Blocking threads serve the directory store's file I/O; more of them than requests in
    // flight would only compete for the CPU with the HTTP thread and the workers.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FATAL);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(CliError { code, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn emit(report: &Report, target: Option<&PathBuf>) -> Result<(), CliError> {
    let mut stderr = std::io::stderr();
    // The summary is best effort; a closed stderr must not fail the run.
    let _ = report.write_summary(&mut stderr);
    let Some(target) = target else {
        return Ok(());
    };
    // Streamed to its destination, never held whole as text: a report of millions of keys is
    // as big as the run's working set. A file is written beside its name and renamed, so a
    // failed write leaves no half report under it.
    if target.as_os_str() == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        return write_json(report, &mut out)
            .context("writing the report to stdout")
            .map_err(fatal);
    }
    let partial = {
        let mut name = target.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    std::fs::File::create(&partial)
        .map_err(anyhow::Error::from)
        .and_then(|file| {
            let mut out = std::io::BufWriter::new(file);
            write_json(report, &mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&partial, target)?;
            Ok(())
        })
        .with_context(|| format!("writing the report to {}", target.display()))
        .map_err(fatal)
}

/// Pretty JSON of `report` and a final newline, flushed.
fn write_json(report: &Report, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

async fn intent_command(args: IntentArgs) -> Result<u8, CliError> {
    let (store, _) = open_bucket(&args.bucket, args.s3_path_style, Duration::from_secs(30)).await?;
    if let Some(key) = &args.release {
        if !matches!(namespace::classify(key), StateKey::Intent { .. }) {
            return Err(usage(anyhow!("{key:?} is not an intent key")));
        }
        store
            .delete_batch(std::slice::from_ref(key))
            .await
            .with_context(|| format!("removing intent {key}"))
            .map_err(fatal)?;
        return Ok(EXIT_OK);
    }
    let repo = args.repo.unwrap_or_default();
    validate_repository_name(&repo).map_err(|e| usage(anyhow!(e)))?;
    let digests = args
        .digests
        .iter()
        .map(|d| Digest::parse(d).ok_or_else(|| usage(anyhow!("invalid digest {d:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let key = intent::begin_reuse(store.as_ref(), &repo, &digests, args.ttl, args.wait)
        .await
        .context("writing the intent")
        .map_err(fatal)?;
    println!("{key}");
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `args` as the binary would (no config applied).
    fn parse(args: &[&str]) -> (Cli, ArgMatches) {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("ocigc").chain(args.iter().copied()))
            .expect("valid arguments");
        let cli = Cli::from_arg_matches(&matches).expect("valid arguments");
        (cli, matches)
    }

    fn merged(args: &[&str], toml: &str) -> Result<Cli, String> {
        let (mut cli, matches) = parse(args);
        let cfg = FileConfig::parse("c.toml".into(), toml).map_err(|e| e.to_string())?;
        check_config(&cfg).map_err(|e| format!("{:#}", e.error))?;
        let (_, m) = matches.subcommand().expect("a subcommand");
        let done = match &mut cli.command {
            Command::Gc(g) => merge_config(g, Some(m), &cfg),
            Command::DeleteRepo(d) => merge_config(d, Some(m), &cfg),
            Command::Serve(s) => merge_config(s, Some(m), &cfg),
            Command::Restore(r) => merge_config(r, Some(m), &cfg),
            Command::Du(g) => merge_config(g, Some(m), &cfg),
            Command::Explain(e) => merge_config(&mut e.gc, Some(m), &cfg),
            Command::Intent(_) => Ok(()),
        };
        done.map_err(|e| format!("{:#}", e.error))?;
        Ok(cli)
    }

    #[test]
    fn retention_tables_are_checked_and_reach_gc() {
        let toml = "grace = \"1h\"\n[[retention]]\nrepos = [\"team/**\"]\nkeep_last = 3\n";
        let cli = merged(&["gc"], toml).expect("valid");
        let Command::Gc(g) = cli.command else {
            panic!("gc")
        };
        let rules = Rules::parse(g.retention.as_ref().expect("tables")).expect("valid");
        assert_eq!(
            rules.for_repository("team/app").and_then(|r| r.keep_last),
            Some(3)
        );
        for (bad, key) in [
            (
                "[[retention]]\nkeep_tags = [\"(\"]\n",
                "retention[0].keep_tags[0]",
            ),
            ("[[retention]]\nkeep_last = -1\n", "retention[0].keep_last"),
            (
                "[[retention]]\n[[retention]]\nkeep_lsat = 1\n",
                "retention[1].keep_lsat",
            ),
        ] {
            let err = merged(&["gc"], bad).expect_err("invalid");
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn the_config_keys_are_the_historical_ones() {
        // Existing configuration files must keep working: these are the keys of every
        // version so far.
        let mut historical = [
            "bucket",
            "layout",
            "dry_run",
            "report",
            "concurrency",
            "timeout_request",
            "s3_path_style",
            "lease_ttl",
            "pushgateway",
            "repos",
            "grace",
            "delay",
            "timeout_repo",
            "timeout_run",
            "shard",
            "list_parts",
            "delete_untagged",
            "no_cache",
            "protect_file",
            "trash_ttl",
            "listen",
            "interval",
            "token_file",
            "insecure_no_auth",
            "drain_timeout",
            "max_queued_jobs",
            "max_connections",
            "header_read_timeout",
            // Issue 14: blast-radius budget, rate limit, cost.
            "max_delete_fraction",
            "max_delete_bytes",
            "max_requests_per_second",
            "pricing",
            "price_gb_month",
            "price_class_a_per_million",
            "price_class_b_per_million",
        ];
        historical.sort_unstable();
        assert_eq!(config_keys(), historical);
    }

    #[test]
    fn every_key_reaches_its_setting() {
        let toml = r#"
            bucket = "s3://bucket-a/team"
            layout = "distribution"
            dry_run = true
            report = "/tmp/r.json"
            concurrency = 7
            timeout_request = "11s"
            s3_path_style = true
            lease_ttl = "13m"
            pushgateway = "http://gw:9091"
            repos = ["team/{a,b}", "x/**"]
            grace = "2h"
            delay = "3h"
            timeout_repo = "4m"
            timeout_run = "5h"
            shard = "1/3"
            list_parts = 5
            delete_untagged = true
            no_cache = true
            listen = "127.0.0.1:9"
            interval = "6m"
            token_file = "/run/token"
            insecure_no_auth = true
            drain_timeout = "7s"
            max_queued_jobs = 8
            max_connections = 9
            header_read_timeout = "12s"
            max_delete_fraction = 0.5
            max_delete_bytes = "2GiB"
            max_requests_per_second = 250
            pricing = "s3-standard"
            price_gb_month = 0.02
            price_class_a_per_million = 4
            price_class_b_per_million = 0.5
        "#;
        let cli = merged(&["serve"], toml).expect("valid");
        let Command::Serve(s) = cli.command else {
            panic!("serve expected");
        };
        let (g, st) = (&s.gc, &s.gc.store);
        let m = Duration::from_secs(60);
        assert_eq!(
            st.bucket,
            Some(BucketUrl::S3 {
                bucket: "bucket-a".into(),
                prefix: "team".into()
            })
        );
        assert_eq!(st.layout, "distribution");
        assert!(st.dry_run && st.s3_path_style && g.delete_untagged && s.insecure_no_auth);
        assert!(g.no_cache);
        assert_eq!(st.report, Some(PathBuf::from("/tmp/r.json")));
        assert_eq!(st.concurrency, 7);
        assert_eq!(st.timeout_request, Duration::from_secs(11));
        assert_eq!(st.lease_ttl, 13 * m);
        assert_eq!(st.pushgateway.as_deref(), Some("http://gw:9091"));
        assert_eq!(st.clock_offset, Duration::ZERO);
        // A list in the file is never split at commas (a glob's `{a,b}` stays whole).
        assert_eq!(g.repos, ["team/{a,b}", "x/**"]);
        assert_eq!((g.grace, g.delay), (120 * m, 180 * m));
        assert_eq!(
            (g.timeout_repo, g.timeout_run),
            (Some(4 * m), Some(300 * m))
        );
        assert_eq!(g.shard, Some(gc::Shard { index: 1, count: 3 }));
        assert_eq!(g.list_parts, 5);
        assert_eq!(s.listen, "127.0.0.1:9".parse::<SocketAddr>().expect("addr"));
        assert_eq!(s.interval, Some(6 * m));
        assert_eq!(s.token_file, Some(PathBuf::from("/run/token")));
        assert_eq!(s.drain_timeout, Duration::from_secs(7));
        assert_eq!((s.max_queued_jobs, s.max_connections), (8, 9));
        assert_eq!(s.header_read_timeout, Duration::from_secs(12));
        assert_eq!(g.max_delete_fraction, 0.5);
        assert_eq!(g.max_delete_bytes, Some(2 << 30));
        assert_eq!(st.max_requests_per_second, Some(250));
        assert_eq!(st.pricing, "s3-standard");
        assert_eq!(
            (
                st.price_gb_month,
                st.price_class_a_per_million,
                st.price_class_b_per_million
            ),
            (Some(0.02), Some(4.0), Some(0.5))
        );
    }

    #[test]
    fn sizes_fractions_and_prices_parse_within_their_bounds() {
        assert_eq!(parse_bytes("500GB"), Ok(500_000_000_000));
        assert_eq!(parse_bytes("2 TiB"), Ok(2 << 40));
        assert_eq!(parse_bytes("1234"), Ok(1234));
        for bad in ["0", "0GB", "-1", "1.5GB", "12XB", "", "99999999999TB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert_eq!(parse_fraction("0.9"), Ok(0.9));
        for bad in ["0", "-0.1", "1.01", "NaN", "inf", "x"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_price("0"), Ok(0.0));
        for bad in ["-1", "NaN", "inf", "$1"] {
            assert!(parse_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let toml = "grace = \"2h\"\ndelay = \"0s\"\nconcurrency = 3\nlisten = \"127.0.0.1:1\"\n";
        let cli = merged(&["gc", "--grace", "5m", "--concurrency=16"], toml).expect("valid");
        let Command::Gc(g) = cli.command else {
            panic!("gc expected");
        };
        assert_eq!(g.grace, Duration::from_secs(300), "the flag wins");
        assert_eq!(
            g.store.concurrency, 16,
            "a flag equal to the default still wins"
        );
        assert_eq!(g.delay, Duration::ZERO, "the file wins over the default");
        assert_eq!(g.store.layout, "oci", "the default stays");
        // `listen` is a serve key: accepted in the file, ignored by gc.
        let cli = merged(&["delete-repo", "app"], toml).expect("valid");
        let Command::DeleteRepo(d) = cli.command else {
            panic!("delete-repo expected");
        };
        assert_eq!(
            (d.store.concurrency, d.names.as_slice()),
            (3, &["app".to_string()][..])
        );
    }

    #[test]
    fn bad_values_in_the_file_name_their_key_and_line() {
        for (toml, key) in [
            // A serve key is checked when gc runs too (below, every case runs as gc).
            ("listen = \"nowhere\"", "listen"),
            ("max_queued_jobs = 0", "max_queued_jobs"),
            ("concurrency = 0", "concurrency"),
            ("concurrency = 1025", "concurrency"),
            ("concurrency = \"8\"", "concurrency"),
            ("layout = \"zot\"", "layout"),
            ("grace = 5", "grace"),
            ("timeout_run = \"101y\"", "timeout_run"),
            ("header_read_timeout = \"0s\"", "header_read_timeout"),
            ("max_connections = -5", "max_connections"),
            ("shard = \"3/3\"", "shard"),
            ("bucket = \"gs://elsewhere\"", "bucket"),
            ("repos = \"team/*\"", "repos"),
            ("dry_run = \"yes\"", "dry_run"),
            ("clock_offset = \"1h\"", "clock_offset"),
            ("log_format = \"json\"", "log_format"),
        ] {
            let err = merged(&["gc"], &format!("\n{toml}\n")).expect_err(toml);
            assert!(err.contains(&format!("key {key}:")), "{toml}: {err}");
            assert!(err.contains("line 2, column"), "{toml}: {err}");
        }
    }

    #[test]
    fn flag_structs_survive_their_serde_form() {
        // The merge rebuilds a struct from its serde form: every value the flags accept
        // must come back unchanged.
        for bucket in [
            "s3://bucket-a",
            "s3://bucket-a/p/q/",
            "/abs/dir",
            "rel/dir",
            "file:///x",
        ] {
            let (cli, _) = parse(&[
                "serve",
                "--bucket",
                bucket,
                "--timeout-run=100y",
                "--clock-offset=1h 2m 3s 4ms",
                "--shard=2/5",
                "--repo=a,b/**",
            ]);
            let Command::Serve(before) = cli.command else {
                panic!("serve expected");
            };
            let json = serde_json::to_value(&before).expect("serialise");
            let after: ServeArgs = serde_json::from_value(json).expect("deserialise");
            assert_eq!(format!("{after:?}"), format!("{before:?}"), "{bucket}");
        }
    }
}
