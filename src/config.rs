//! The TOML configuration file (`--config FILE`): every flag may be set there, under its long
//! name with underscores (`timeout_request = "30s"`). Flags and `OCIGC_*` variables win over
//! the file; unknown keys are rejected so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Settings read from the configuration file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--bucket`.
    pub bucket: Option<String>,
    /// `--layout`.
    pub layout: Option<String>,
    /// `--dry-run`.
    pub dry_run: Option<bool>,
    /// `--report`.
    pub report: Option<PathBuf>,
    /// `--concurrency`.
    pub concurrency: Option<u16>,
    /// `--timeout-request`.
    pub timeout_request: Option<String>,
    /// `--s3-path-style`.
    pub s3_path_style: Option<bool>,
    /// `--lease-ttl`.
    pub lease_ttl: Option<String>,
    /// `--pushgateway`.
    pub pushgateway: Option<String>,
    /// `--repo` (list of globs).
    pub repos: Option<Vec<String>>,
    /// `--grace`.
    pub grace: Option<String>,
    /// `--delay`.
    pub delay: Option<String>,
    /// `--timeout-repo`.
    pub timeout_repo: Option<String>,
    /// `--timeout-run`.
    pub timeout_run: Option<String>,
    /// `--shard` (`I/N`).
    pub shard: Option<String>,
    /// `--delete-untagged`.
    pub delete_untagged: Option<bool>,
    /// `serve --listen`.
    pub listen: Option<String>,
    /// `serve --interval`.
    pub interval: Option<String>,
    /// `serve --token-file`.
    pub token_file: Option<PathBuf>,
    /// `serve --insecure-no-auth`.
    pub insecure_no_auth: Option<bool>,
    /// `serve --drain-timeout`.
    pub drain_timeout: Option<String>,
    /// `serve --max-queued-jobs`.
    pub max_queued_jobs: Option<u64>,
    /// `serve --max-connections`.
    pub max_connections: Option<u64>,
    /// `serve --header-read-timeout`.
    pub header_read_timeout: Option<String>,
}

/// Why the configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl FileConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown,
            message: describe(&text, &e),
        })
    }
}

/// Where and why the file did not parse, without its text: toml's own message quotes the
/// offending line, and serde's quotes the value, either of which may be a secret (a
/// Pushgateway password, a token pasted into the wrong key).
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = without_quoted_values(e.message().trim());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.len() - line_start + 1;
            // The key is what precedes `=` on that line; only a plain key name is shown.
            let key = text
                .get(line_start..)
                .and_then(|rest| rest.lines().next())
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
            match key {
                Some(key) => format!("line {line}, column {column}, key {key}: {message}"),
                None => format!("line {line}, column {column}: {message}"),
            }
        }
        None => message,
    }
}

/// `message` with every double-quoted part (serde quotes values so) replaced by `"…"`; the
/// back-quoted key names stay.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"…");
        } else {
            out.push('"');
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("grace = \"1h\"\ngrase = \"2h\"\n")
            .expect_err("typo must be rejected");
        assert!(err.to_string().contains("grase"), "{err}");
        let ok: FileConfig =
            toml::from_str("bucket = \"s3://b\"\nrepos = [\"a/*\"]\nconcurrency = 4\n")
                .expect("valid");
        assert_eq!(ok.concurrency, Some(4));
        assert!(toml::from_str::<FileConfig>("concurrency = \"many\"").is_err());
    }

    #[test]
    fn parse_errors_show_no_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        for text in [
            "grace = \"1h\"\ntoken = \"hunter2-secret\"\n",
            "concurrency = \"hunter2-secret\"\n",
            "pushgateway = \"http://u:hunter2-secret@gw\" trailing\n",
            "pushgateway = \"http://u:hunter2-secret@gw\n",
        ] {
            std::fs::write(&path, text).expect("write");
            let err = FileConfig::load(&path).expect_err("invalid").to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
    }
}
