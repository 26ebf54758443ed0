//! S3 and S3-compatible stores (R2, MinIO, Ceph, B2) through aws-sdk-s3.
//!
//! Every S3 detail lives here: client settings that S3-compatible stores need (checksums only
//! when required, path-style addressing, region `auto`), time-outs, retries and error mapping.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{
    ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_types::date_time::Format as DateFormat;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use futures::stream::BoxStream;

use super::{
    DeleteFailure, Level, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, Store,
    StoreError, StoreResult,
};

/// Behaviour defaults are pinned so an SDK upgrade cannot silently change retries or checksums.
fn behavior_version() -> BehaviorVersion {
    BehaviorVersion::v2026_01_12()
}

/// How to reach an S3 bucket.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`), may be empty.
    pub prefix: String,
    /// Endpoint URL; `None` uses `AWS_ENDPOINT_URL` or AWS itself.
    pub endpoint: Option<String>,
    /// Region; `None` uses `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by MinIO and most local servers.
    pub path_style: bool,
    /// Static credentials; `None` uses the AWS default chain (environment, profile, web identity).
    pub credentials: Option<StaticCredentials>,
    /// Time-out for establishing a connection.
    pub connect_timeout: Duration,
    /// Time-out for one attempt of one request.
    pub attempt_timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
}

/// An access key pair, optionally with a session token.
#[derive(Clone)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl StaticCredentials {
    /// Reads `AWS_ACCESS_KEY_ID_FILE`, `AWS_SECRET_ACCESS_KEY_FILE` and optionally
    /// `AWS_SESSION_TOKEN_FILE` (mounted Kubernetes secrets); `None` when the first two are unset.
    pub fn from_env_files() -> Result<Option<StaticCredentials>, String> {
        let read = |var: &str| -> Result<Option<String>, String> {
            match std::env::var_os(var) {
                None => Ok(None),
                Some(path) => std::fs::read_to_string(&path)
                    .map(|s| Some(s.trim().to_string()))
                    .map_err(|e| format!("{var}={}: {e}", path.to_string_lossy())),
            }
        };
        match (
            read("AWS_ACCESS_KEY_ID_FILE")?,
            read("AWS_SECRET_ACCESS_KEY_FILE")?,
        ) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: read("AWS_SESSION_TOKEN_FILE")?,
            })),
            (None, None) => Ok(None),
            _ => Err(
                "AWS_ACCESS_KEY_ID_FILE and AWS_SECRET_ACCESS_KEY_FILE must be set together".into(),
            ),
        }
    }
}

/// A bucket (and prefix) on an S3-compatible service.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    answered: DateWatch,
}

/// The `Date` of the latest answer, with the moment it arrived (see [`Store::answered_time`]).
/// The store stamps `Date` before the answer leaves and truncates it to whole seconds, and the
/// moment is taken once it is here: a clock read from it errs late, as one from a HEAD does.
#[derive(Clone, Debug, Default)]
struct DateWatch(Arc<std::sync::Mutex<Option<(SystemTime, tokio::time::Instant)>>>);

impl Intercept for DateWatch {
    fn name(&self) -> &'static str {
        "ocigc: the store's Date"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let arrived = tokio::time::Instant::now();
        if let Some(date) = context.response().headers().get("date").and_then(http_date) {
            if let Ok(mut last) = self.0.lock() {
                *last = Some((date, arrived));
            }
        }
        Ok(())
    }
}

/// An HTTP `Date` (IMF-fixdate); `None` for anything else, or a time before 1970 (a broken
/// clock, not a time).
fn http_date(value: &str) -> Option<SystemTime> {
    aws_smithy_types::DateTime::from_str(value, DateFormat::HttpDate)
        .ok()
        .and_then(|t| SystemTime::try_from(t).ok())
        .filter(|t| *t > SystemTime::UNIX_EPOCH)
}

impl S3Store {
    /// Builds a client from the settings; makes no request.
    pub async fn connect(settings: S3Settings) -> S3Store {
        let region = settings
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string());
        let attempts = settings.max_attempts.max(1);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.attempt_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .operation_timeout(settings.attempt_timeout * attempts + Duration::from_secs(1))
            .build();
        // Region is resolved above so the loader never falls back to probing instance metadata.
        let mut loader = aws_config::defaults(behavior_version())
            .region(Region::new(region))
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(attempts));
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(c) = &settings.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "ocigc-static",
            ));
        }
        let sdk = loader.load().await;
        let answered = DateWatch::default();
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(settings.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_classifier(ThrottlingAbove)
            .interceptor(answered.clone())
            .build();
        S3Store {
            client: Client::from_conf(conf),
            bucket: settings.bucket,
            prefix: settings.prefix,
            answered,
        }
    }

    /// The underlying SDK client (tests use it to create buckets).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn object_meta(&self, o: &aws_sdk_s3::types::Object) -> Option<ObjectMeta> {
        Some(ObjectMeta::new(
            self.relative_key(o.key()?)?,
            o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            to_system_time(o.last_modified()),
            o.e_tag().map(str::to_string),
        ))
    }

    fn relative_key<'k>(&self, full: &'k str) -> Option<&'k str> {
        if self.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }
}

fn map_err<E>(op: Op, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    if status == Some(404) {
        return StoreError::NotFound {
            op,
            key: key.to_string(),
        };
    }
    let code = match &err {
        SdkError::ServiceError(ctx) => ctx.err().code(),
        _ => None,
    };
    if is_throttling(status, code) {
        return StoreError::Throttled {
            op,
            key: key.to_string(),
            message: match (status, code) {
                (Some(s), Some(c)) => format!("HTTP {s} {c}"),
                (Some(s), None) => format!("HTTP {s}"),
                (None, c) => c.unwrap_or("throttled").to_string(),
            },
        };
    }
    let message = match (&err, status) {
        (SdkError::TimeoutError(_), _) => "timed out".to_string(),
        (SdkError::ServiceError(ctx), Some(s)) => {
            let e = ctx.err();
            match (e.code(), e.message()) {
                (Some(code), Some(msg)) => format!("HTTP {s} {code}: {msg}"),
                (Some(code), None) => format!("HTTP {s} {code}"),
                _ => format!("HTTP {s}"),
            }
        }
        _ => error_chain(&err),
    };
    StoreError::Request {
        op,
        key: key.to_string(),
        message,
    }
}

/// Error codes with which S3-compatible stores ask a client to slow down.
const THROTTLING_CODES: [&str; 6] = [
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
];

/// A throttling answer: `503` (S3's `SlowDown`; a 503 means the request was not carried out),
/// `429 Too Many Requests` (R2 and others), or a throttling code on any status.
fn is_throttling(status: Option<u16>, code: Option<&str>) -> bool {
    matches!(status, Some(429 | 503)) || code.is_some_and(|c| THROTTLING_CODES.contains(&c))
}

/// Leaves throttling answers to [`super::Instrumented`] instead of the SDK's retry loop, so
/// that each one is counted, waits for the rate limit, and backs off within the request's one
/// time-out. Listing pages are the exception: a page cannot be asked for again from above (the
/// listing ends at its first error), so the SDK's standard retry (exponential back-off with
/// full jitter, [`S3Settings::max_attempts`] attempts) keeps them.
#[derive(Debug)]
struct ThrottlingAbove;

impl aws_sdk_s3::config::retry::ClassifyRetry for ThrottlingAbove {
    fn classify_retry(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::InterceptorContext,
    ) -> aws_sdk_s3::config::retry::RetryAction {
        use aws_sdk_s3::config::retry::RetryAction;
        let Some(response) = ctx.response() else {
            return RetryAction::NoActionIndicated;
        };
        // The request itself is gone by now; the error says which operation it was.
        let listing = matches!(ctx.output_or_error(), Some(Err(e))
        if e.as_operation_error().is_some_and(|e| {
            e.downcast_ref::<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Error>()
                .is_some()
        }));
        let status = response.status().as_u16();
        if !listing && matches!(status, 429 | 503) {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "ocigc: throttling is retried above the SDK"
    }
}

/// The error and its causes on one line, without the SDK's Debug dumps.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    // A store that omits LastModified gets "now": such an object then always looks young,
    // which can only keep it, never delete it early.
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or_else(SystemTime::now)
}

struct ListState {
    token: Option<String>,
    done: bool,
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let full_prefix = self.full_key(prefix);
        let start_after = start_after.map(|k| self.full_key(k));
        let init = ListState {
            token: None,
            done: false,
        };
        Box::pin(futures::stream::try_unfold(init, move |state| {
            let full_prefix = full_prefix.clone();
            let start_after = start_after.clone();
            async move {
                if state.done {
                    return Ok(None);
                }
                // StartAfter only matters for the first request; the token carries it on.
                let first = state.token.is_none();
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .max_keys(1000)
                    .set_start_after(start_after.filter(|_| first))
                    .set_continuation_token(state.token)
                    .send()
                    .await
                    .map_err(|e| map_err(Op::List, &full_prefix, e))?;
                let page = out
                    .contents()
                    .iter()
                    .filter_map(|o| self.object_meta(o))
                    .collect();
                let token = out.next_continuation_token().map(str::to_string);
                let next = ListState {
                    done: !out.is_truncated().unwrap_or(false) || token.is_none(),
                    token,
                };
                Ok(Some((page, next)))
            }
        }))
    }

    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        let full_prefix = self.full_key(prefix);
        let init = ListState {
            token: None,
            done: false,
        };
        Box::pin(futures::stream::try_unfold(init, move |state| {
            let full_prefix = full_prefix.clone();
            async move {
                if state.done {
                    return Ok(None);
                }
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .delimiter("/")
                    .max_keys(1000)
                    .set_continuation_token(state.token)
                    .send()
                    .await
                    .map_err(|e| map_err(Op::List, &full_prefix, e))?;
                let level = Level {
                    objects: out
                        .contents()
                        .iter()
                        .filter_map(|o| self.object_meta(o))
                        .collect(),
                    prefixes: out
                        .common_prefixes()
                        .iter()
                        .filter_map(|p| Some(self.relative_key(p.prefix()?)?.to_string()))
                        .collect(),
                };
                let token = out.next_continuation_token().map(str::to_string);
                let next = ListState {
                    done: !out.is_truncated().unwrap_or(false) || token.is_none(),
                    token,
                };
                Ok(Some((level, next)))
            }
        }))
    }

    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        let mut out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| map_err(Op::Get, key, e))?;
        let too_large = || StoreError::TooLarge {
            op: Op::Get,
            key: key.to_string(),
            limit,
        };
        // No Range request: stores answer 416 for a range of an empty object. The declared
        // length refuses most oversize objects unread; the running count bounds the rest.
        if out
            .content_length()
            .is_some_and(|n| u64::try_from(n).map_or(true, |n| n > limit))
        {
            return Err(too_large());
        }
        let etag = out.e_tag().map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = out.body.try_next().await.map_err(|e| StoreError::Request {
            op: Op::Get,
            key: key.to_string(),
            message: format!("reading body: {e}"),
        })? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Object {
            body: Bytes::from(body),
            etag,
        })
    }

    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => {
                let meta = ObjectMeta::new(
                    key,
                    out.content_length()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                    to_system_time(out.last_modified()),
                    out.e_tag().map(str::to_string),
                );
                let metadata = out
                    .metadata()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect();
                Ok(Some((meta, metadata)))
            }
            Err(e) => match map_err(Op::Head, key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    fn answered_time(&self) -> Option<(SystemTime, tokio::time::Instant)> {
        *self.answered.0.lock().ok()?
    }

    async fn server_time(&self) -> StoreResult<SystemTime> {
        // A HEAD of a key nobody writes: the 404 carries the store's `Date`, and reading it
        // needs no write permission.
        let key = crate::namespace::clock_probe_key(&uuid::Uuid::new_v4().to_string());
        let result = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(&key))
            .send()
            .await;
        let date = match &result {
            Ok(_) => None,
            Err(e) => e
                .raw_response()
                .and_then(|r| r.headers().get("date"))
                .map(str::to_string),
        };
        match (date, result) {
            (Some(d), _) => http_date(&d).ok_or_else(|| StoreError::Request {
                op: Op::Head,
                key,
                message: format!("unparseable Date header {d:?}"),
            }),
            (None, Err(e)) => Err(map_err(Op::Head, &key, e)),
            (None, Ok(_)) => Err(StoreError::Request {
                op: Op::Head,
                key,
                message: "the store sent no Date header".into(),
            }),
        }
    }

    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
        metadata: Metadata,
    ) -> StoreResult<PutOutcome> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_metadata((!metadata.is_empty()).then(|| metadata.into_iter().collect()))
            .body(ByteStream::from(body));
        let if_match = matches!(condition, PutCondition::IfMatch(_));
        req = match condition {
            PutCondition::None => req,
            PutCondition::IfNoneMatch => req.if_none_match("*"),
            PutCondition::IfMatch(etag) => req.if_match(etag),
        };
        match req.send().await {
            Ok(out) => Ok(PutOutcome::Written {
                etag: out.e_tag().unwrap_or_default().to_string(),
            }),
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                // 409: a concurrent conditional write to the same key won.
                Some(412 | 409) => Ok(PutOutcome::PreconditionFailed),
                // If-Match on a key that does not exist: S3 answers 404.
                Some(404) if if_match => Ok(PutOutcome::PreconditionFailed),
                _ => Err(map_err(Op::Put, key, e)),
            },
        }
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let first = keys[0].as_str();
        let invalid = |message: String| StoreError::Request {
            op: Op::Delete,
            key: first.to_string(),
            message,
        };
        let objects = keys
            .iter()
            .map(|k| {
                ObjectIdentifier::builder()
                    .key(self.full_key(k))
                    .build()
                    .map_err(|e| invalid(e.to_string()))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| map_err(Op::Delete, first, e))?;
        Ok(out
            .errors()
            .iter()
            .map(|e| {
                let full = e.key().unwrap_or_default();
                DeleteFailure {
                    key: self.relative_key(full).unwrap_or(full).to_string(),
                    message: format!(
                        "{}: {}",
                        e.code().unwrap_or("error"),
                        e.message().unwrap_or("")
                    ),
                }
            })
            .collect())
    }
}
