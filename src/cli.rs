//! Command-line interface: argument parsing (every flag also from an `OCIGC_*` variable and
//! the `--config` file), store and layout set-up, report output, metrics push and exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::FileConfig;
use crate::daemon::{self, ServeOptions};
use crate::digest::Digest;
use crate::gc::{self, intent, DeleteRepoOptions, GcOptions, RepoFilter};
use crate::layout::{self, validate_repository_name, Layout, LayoutOptions};
use crate::metrics::{redact_url, Metrics};
use crate::report::Report;
use crate::store::{BucketUrl, DirStore, S3Settings, S3Store, StaticCredentials, Store};

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
}

/// Flags shared by every command that touches a bucket.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The bucket: s3://bucket[/prefix], file:///path or a plain directory path (required).
    #[arg(long, env = "OCIGC_BUCKET")]
    pub bucket: Option<BucketUrl>,
    /// Bucket layout.
    #[arg(long, env = "OCIGC_LAYOUT", default_value = "oci", value_parser = layout::NAMES)]
    pub layout: String,
    /// Report what would be deleted; delete nothing.
    #[arg(long, env = "OCIGC_DRY_RUN")]
    pub dry_run: bool,
    /// Write the JSON report to FILE ('-' for stdout).
    #[arg(long, env = "OCIGC_REPORT", value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Store requests in flight at most.
    #[arg(long, env = "OCIGC_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Time-out of one attempt of one store request (S3 requests are tried 3 times).
    #[arg(long, env = "OCIGC_TIMEOUT_REQUEST", default_value = "30s", value_parser = parse_duration)]
    pub timeout_request: Duration,
    /// Path-style S3 addressing (endpoint/bucket/key), as MinIO and most local servers need.
    #[arg(long, env = "OCIGC_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Lifetime of a repository lease between renewals; at least 4 request time-outs.
    #[arg(long, env = "OCIGC_LEASE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Push the run's metrics to this Prometheus Pushgateway at the end (job `ocigc`, grouped
    /// by bucket), whatever the outcome; `user:password@` in it is sent as basic auth and
    /// never printed.
    #[arg(long, env = "OCIGC_PUSHGATEWAY", value_name = "URL")]
    pub pushgateway: Option<String>,
    /// Pretend the bucket clock is this far ahead (drills and crash tests only).
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    pub clock_offset: Duration,
}

/// Flags of `ocigc gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
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
    pub grace: Duration,
    /// Delete only blobs seen unreferenced at observations this far apart; 0s deletes in this run.
    #[arg(long, env = "OCIGC_DELAY", default_value = "1h", value_parser = parse_duration)]
    pub delay: Duration,
    /// Abandon a repository (between delete batches) after this long.
    #[arg(long, env = "OCIGC_TIMEOUT_REPO", value_parser = parse_duration)]
    pub timeout_repo: Option<Duration>,
    /// Stop starting repositories, and abandon running ones, after this long.
    #[arg(long, env = "OCIGC_TIMEOUT_RUN", value_parser = parse_duration)]
    pub timeout_run: Option<Duration>,
    /// Collect only shard I of N (a stable hash of the repository name decides).
    #[arg(long, env = "OCIGC_SHARD", value_name = "I/N", value_parser = gc::Shard::parse)]
    pub shard: Option<gc::Shard>,
    /// Also delete manifests no tag reaches (serverless-registry and distribution layouts);
    /// an index's children and the referrers of a kept manifest are always kept.
    #[arg(long, env = "OCIGC_DELETE_UNTAGGED")]
    pub delete_untagged: bool,
}

/// Flags of `ocigc delete-repo`.
#[derive(Debug, Args)]
pub struct DeleteRepoArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Repositories to delete, by full name (e.g. team/app).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// Flags of `ocigc serve` (plus every flag of `gc`). The hook token comes from `--token-file`
/// or the `OCIGC_TOKEN` variable, never from the command line.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub gc: GcArgs,
    /// Address of the HTTP API and /metrics.
    #[arg(long, env = "OCIGC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Run a full GC at start and then every DURATION; without it, only on request.
    #[arg(long, env = "OCIGC_INTERVAL", value_parser = parse_duration)]
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
    pub drain_timeout: Duration,
    /// Hook jobs waiting for a slot at most; further hook requests are answered 429 with
    /// Retry-After.
    #[arg(long, env = "OCIGC_MAX_QUEUED_JOBS", default_value_t = daemon::DEFAULT_MAX_QUEUED_JOBS,
          value_parser = parse_count::<MAX_QUEUED_JOBS>)]
    pub max_queued_jobs: usize,
    /// HTTP connections open at most; more wait until one closes.
    #[arg(long, env = "OCIGC_MAX_CONNECTIONS", default_value_t = daemon::DEFAULT_MAX_CONNECTIONS,
          value_parser = parse_count::<MAX_CONNECTIONS>)]
    pub max_connections: usize,
    /// Close a connection that takes longer than this to send a request head, or stays idle
    /// this long between requests.
    #[arg(long, env = "OCIGC_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = parse_positive_duration)]
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
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

fn config_duration(key: &str, value: &str) -> Result<Duration, CliError> {
    parse_duration(value).map_err(|e| usage(anyhow!("config key {key}: {e}")))
}

/// Fills every setting not given as a flag or variable from the configuration file.
fn apply_store_config(cfg: &FileConfig, m: &ArgMatches, s: &mut StoreArgs) -> Result<(), CliError> {
    if let (false, Some(b)) = (explicit(m, "bucket"), &cfg.bucket) {
        s.bucket = Some(
            b.parse()
                .map_err(|e| usage(anyhow!("config key bucket: {e}")))?,
        );
    }
    if let (false, Some(l)) = (explicit(m, "layout"), &cfg.layout) {
        if !layout::NAMES.contains(&l.as_str()) {
            return Err(usage(anyhow!("config key layout: unknown layout {l:?}")));
        }
        s.layout = l.clone();
    }
    if let (false, Some(v)) = (explicit(m, "dry_run"), cfg.dry_run) {
        s.dry_run = v;
    }
    if let (false, Some(v)) = (explicit(m, "report"), &cfg.report) {
        s.report = Some(v.clone());
    }
    if let (false, Some(v)) = (explicit(m, "concurrency"), cfg.concurrency) {
        if !(1..=1024).contains(&v) {
            return Err(usage(anyhow!(
                "config key concurrency: {v} is not in 1..=1024"
            )));
        }
        s.concurrency = v;
    }
    if let (false, Some(v)) = (explicit(m, "timeout_request"), &cfg.timeout_request) {
        s.timeout_request = config_duration("timeout_request", v)?;
    }
    if let (false, Some(v)) = (explicit(m, "s3_path_style"), cfg.s3_path_style) {
        s.s3_path_style = v;
    }
    if let (false, Some(v)) = (explicit(m, "lease_ttl"), &cfg.lease_ttl) {
        s.lease_ttl = config_duration("lease_ttl", v)?;
    }
    if let (false, Some(v)) = (explicit(m, "pushgateway"), &cfg.pushgateway) {
        s.pushgateway = Some(v.clone());
    }
    Ok(())
}

fn apply_gc_config(cfg: &FileConfig, m: &ArgMatches, g: &mut GcArgs) -> Result<(), CliError> {
    apply_store_config(cfg, m, &mut g.store)?;
    if let (false, Some(v)) = (explicit(m, "repos"), &cfg.repos) {
        g.repos = v.clone();
    }
    if let (false, Some(v)) = (explicit(m, "grace"), &cfg.grace) {
        g.grace = config_duration("grace", v)?;
    }
    if let (false, Some(v)) = (explicit(m, "delay"), &cfg.delay) {
        g.delay = config_duration("delay", v)?;
    }
    if let (false, Some(v)) = (explicit(m, "timeout_repo"), &cfg.timeout_repo) {
        g.timeout_repo = Some(config_duration("timeout_repo", v)?);
    }
    if let (false, Some(v)) = (explicit(m, "timeout_run"), &cfg.timeout_run) {
        g.timeout_run = Some(config_duration("timeout_run", v)?);
    }
    if let (false, Some(v)) = (explicit(m, "shard"), &cfg.shard) {
        g.shard = Some(gc::Shard::parse(v).map_err(|e| usage(anyhow!("config key shard: {e}")))?);
    }
    if let (false, Some(v)) = (explicit(m, "delete_untagged"), cfg.delete_untagged) {
        g.delete_untagged = v;
    }
    Ok(())
}

fn apply_serve_config(cfg: &FileConfig, m: &ArgMatches, s: &mut ServeArgs) -> Result<(), CliError> {
    apply_gc_config(cfg, m, &mut s.gc)?;
    if let (false, Some(v)) = (explicit(m, "listen"), &cfg.listen) {
        s.listen = v
            .parse()
            .map_err(|e| usage(anyhow!("config key listen: {v:?}: {e}")))?;
    }
    if let (false, Some(v)) = (explicit(m, "interval"), &cfg.interval) {
        s.interval = Some(config_duration("interval", v)?);
    }
    if let (false, Some(v)) = (explicit(m, "token_file"), &cfg.token_file) {
        s.token_file = Some(v.clone());
    }
    if let (false, Some(v)) = (explicit(m, "insecure_no_auth"), cfg.insecure_no_auth) {
        s.insecure_no_auth = v;
    }
    if let (false, Some(v)) = (explicit(m, "drain_timeout"), &cfg.drain_timeout) {
        s.drain_timeout = config_duration("drain_timeout", v)?;
    }
    if let (false, Some(v)) = (explicit(m, "max_queued_jobs"), cfg.max_queued_jobs) {
        s.max_queued_jobs = parse_count::<MAX_QUEUED_JOBS>(&v.to_string())
            .map_err(|e| usage(anyhow!("config key max_queued_jobs: {e}")))?;
    }
    if let (false, Some(v)) = (explicit(m, "max_connections"), cfg.max_connections) {
        s.max_connections = parse_count::<MAX_CONNECTIONS>(&v.to_string())
            .map_err(|e| usage(anyhow!("config key max_connections: {e}")))?;
    }
    if let (false, Some(v)) = (explicit(m, "header_read_timeout"), &cfg.header_read_timeout) {
        s.header_read_timeout = parse_positive_duration(v)
            .map_err(|e| usage(anyhow!("config key header_read_timeout: {e}")))?;
    }
    Ok(())
}

/// Applies `--config` to the parsed command.
fn apply_config(cli: &mut Cli, matches: &ArgMatches) -> Result<(), CliError> {
    let Some(path) = &cli.config else {
        return Ok(());
    };
    let cfg = FileConfig::load(path).map_err(|e| usage(e.into()))?;
    let Some((_, m)) = matches.subcommand() else {
        return Ok(());
    };
    match &mut cli.command {
        Command::Gc(g) => apply_gc_config(&cfg, m, g),
        Command::DeleteRepo(d) => apply_store_config(&cfg, m, &mut d.store),
        Command::Serve(s) => apply_serve_config(&cfg, m, s),
        Command::Intent(_) => Ok(()),
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
    let (store, request_timeout) = open_store(&args.store).await?;
    check_lease_ttl(args.store.lease_ttl, request_timeout)?;
    let concurrency = usize::from(args.store.concurrency);
    let gc = GcOptions {
        no_cache: false,
        grace: args.grace,
        delay: args.delay,
        dry_run: args.store.dry_run,
        repos,
        shard: args.shard,
        concurrency,
        request_timeout,
        repo_timeout: args.timeout_repo,
        run_timeout: args.timeout_run,
        lease_ttl: args.store.lease_ttl,
        clock_offset: args.store.clock_offset,
        metrics: None,
        stop: Default::default(),
        progress: None,
        only: None,
    };
    let delete = DeleteRepoOptions {
        dry_run: args.store.dry_run,
        concurrency,
        request_timeout,
        lease_ttl: args.store.lease_ttl,
        clock_offset: args.store.clock_offset,
        metrics: None,
    };
    Ok((store, layout, gc, delete))
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
                dry_run: args.store.dry_run,
                concurrency: usize::from(args.store.concurrency),
                request_timeout,
                lease_ttl: args.store.lease_ttl,
                clock_offset: args.store.clock_offset,
                metrics: Some(metrics.clone()),
            };
            let result = gc::delete_repositories(store.clone(), layout, &args.names, &opts).await;
            push_metrics(&args.store, store.as_ref(), &metrics).await;
            let report = result.map_err(|e| fatal(e.into()))?;
            emit(&report, args.store.report.as_ref())?;
            Ok(exit_for(&report))
        }
        Command::Intent(args) => intent_command(args).await,
        Command::Serve(args) => serve_command(args).await,
    }
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
    let json = serde_json::to_string_pretty(report)
        .context("serialising the report")
        .map_err(fatal)?;
    if target.as_os_str() == "-" {
        println!("{json}");
        return Ok(());
    }
    std::fs::write(target, json + "\n")
        .with_context(|| format!("writing the report to {}", target.display()))
        .map_err(fatal)
}

async fn intent_command(args: IntentArgs) -> Result<u8, CliError> {
    let (store, _) = open_bucket(&args.bucket, args.s3_path_style, Duration::from_secs(30)).await?;
    if let Some(key) = &args.release {
        if !key.starts_with(intent::INTENT_PREFIX) {
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
