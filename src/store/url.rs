//! Parsing of the `--bucket` argument.

use std::path::PathBuf;
use std::str::FromStr;

/// Where the bucket is: an S3 bucket with an optional prefix, or a local directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketUrl {
    /// `s3://bucket[/prefix]`.
    S3 { bucket: String, prefix: String },
    /// `file:///path` or a plain path.
    Dir(PathBuf),
}

/// Why a bucket URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid bucket URL {url:?}: {reason}")]
pub struct BucketUrlError {
    url: String,
    reason: &'static str,
}

impl FromStr for BucketUrl {
    type Err = BucketUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |reason| BucketUrlError {
            url: url.to_string(),
            reason,
        };
        if url.is_empty() {
            return Err(err("empty"));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket_name(bucket) {
                return Err(err(
                    "bucket names are 3-63 characters of a-z, 0-9, '.' and '-'",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
                return Err(err(
                    "the prefix must not contain empty, '.' or '..' segments",
                ));
            }
            return Ok(BucketUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err("file:// URLs need an absolute path (file:///path)"));
            }
            return Ok(BucketUrl::Dir(PathBuf::from(path)));
        }
        if url.starts_with(super::GENERATED_SCHEME) {
            // Not a directory named so: the benchmark's synthesized bucket, which only the
            // benchmark driver opens (a collection over it changes nothing).
            return Err(err(
                "generated: buckets are benchmark-only (examples/generated_gc.rs opens them)",
            ));
        }
        if url.contains("://") {
            return Err(err(
                "unsupported scheme: use s3://, file:// or a plain path",
            ));
        }
        Ok(BucketUrl::Dir(PathBuf::from(url)))
    }
}

fn valid_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.starts_with(['.', '-'])
        && !b.ends_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(
            "s3://my-bucket/reg/v1/".parse(),
            Ok(BucketUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "reg/v1".into()
            })
        );
        assert_eq!(
            "s3://my-bucket".parse(),
            Ok(BucketUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            })
        );
        assert_eq!("file:///srv/b".parse(), Ok(BucketUrl::Dir("/srv/b".into())));
        assert_eq!(
            "examples/bucket".parse(),
            Ok(BucketUrl::Dir("examples/bucket".into()))
        );
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "s3://",
            "s3://A_B",
            "s3://ok-bucket/a/../b",
            "gs://x",
            "file://rel",
            "generated:?repos=3",
        ] {
            assert!(
                bad.parse::<BucketUrl>().is_err(),
                "{bad} should be rejected"
            );
        }
    }
}
