//! The TOML configuration file (`--config FILE`): every flag may be set there, under its long
//! name with underscores (`timeout_request = "30s"`). Flags and `OCIGC_*` variables win over
//! the file; unknown keys are rejected so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::Path;

/// The configuration file as read: every key with its value and where it stands. Which keys
/// exist and what their values mean is declared once, on the command's flags (`cli.rs`); this
/// type only reads the file and places errors in it.
#[derive(Debug)]
pub struct FileConfig {
    path: String,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    value: serde_json::Value,
    line: usize,
    column: usize,
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
    /// Not valid TOML, an unknown key, or a value of the wrong type or out of range.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl FileConfig {
    /// Reads a configuration file (TOML syntax only; keys and values are checked against the
    /// flags by the caller).
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        FileConfig::parse(shown, &text)
    }

    /// Parses the text of a configuration file shown as `path` in errors.
    pub fn parse(path: String, text: &str) -> Result<FileConfig, ConfigError> {
        let raw: BTreeMap<String, toml::Spanned<toml::Value>> =
            toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                message: describe(text, &e),
            })?;
        let mut entries = BTreeMap::new();
        for (key, spanned) in raw {
            let (line, column) = position(text, spanned.span().start);
            let value =
                serde_json::to_value(spanned.get_ref()).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: format!(
                        "line {line}, column {column}, key {key}: {}",
                        without_quoted_values(&e.to_string())
                    ),
                })?;
            entries.insert(
                key,
                Entry {
                    value,
                    line,
                    column,
                },
            );
        }
        Ok(FileConfig { path, entries })
    }

    /// The keys set in the file.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The value of `key`, as JSON (TOML's strings, integers, booleans and arrays map
    /// one-to-one).
    pub fn value(&self, key: &str) -> Option<&serde_json::Value> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Rejects every key not in `known`, so a typo never silently falls back to a default.
    pub fn check_keys<'k>(
        &self,
        known: impl IntoIterator<Item = &'k str> + Clone,
    ) -> Result<(), ConfigError> {
        let Some(unknown) = self
            .keys()
            .find(|k| !known.clone().into_iter().any(|n| n == *k))
        else {
            return Ok(());
        };
        let expected: Vec<String> = known.into_iter().map(|k| format!("`{k}`")).collect();
        Err(self.error_at(
            unknown,
            &format!(
                "unknown field `{unknown}`, expected one of {}",
                expected.join(", ")
            ),
        ))
    }

    /// An error about `key`'s value, placed at its line; quoted values are left out of it.
    pub fn error_at(&self, key: &str, message: &str) -> ConfigError {
        let message = without_quoted_values(message.trim());
        let message = match self.entries.get(key) {
            Some(e) => format!("line {}, column {}, key {key}: {message}", e.line, e.column),
            None => format!("key {key}: {message}"),
        };
        ConfigError::Parse {
            path: self.path.clone(),
            message,
        }
    }
}

/// Line and column (from 1) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before.len() - line_start + 1)
}

/// Where and why the file did not parse, without its text: toml's own message quotes the
/// offending line, and serde's quotes the value, either of which may be a secret (a
/// Pushgateway password, a token pasted into the wrong key).
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = without_quoted_values(e.message().trim());
    match e.span() {
        Some(span) => {
            let (line, column) = position(text, span.start);
            let before = text.get(..span.start).unwrap_or(text);
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
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
    fn keys_values_and_positions() {
        let cfg = FileConfig::parse(
            "c.toml".into(),
            "bucket = \"s3://b\"\nrepos = [\"a/*\"]\n  concurrency = 4\n",
        )
        .expect("valid");
        assert_eq!(
            cfg.keys().collect::<Vec<_>>(),
            ["bucket", "concurrency", "repos"]
        );
        assert_eq!(cfg.value("concurrency"), Some(&serde_json::json!(4)));
        assert_eq!(cfg.value("repos"), Some(&serde_json::json!(["a/*"])));
        let err = cfg.error_at("concurrency", "\"4\" is wrong").to_string();
        assert_eq!(
            err,
            "c.toml: line 3, column 17, key concurrency: \"…\" is wrong"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let cfg = FileConfig::parse("c.toml".into(), "grace = \"1h\"\ngrase = \"2h\"\n")
            .expect("valid TOML");
        let err = cfg
            .check_keys(["grace", "delay"])
            .expect_err("typo must be rejected")
            .to_string();
        assert!(err.contains("grase") && err.contains("line 2"), "{err}");
        assert!(cfg.check_keys(["grace", "grase"]).is_ok());
    }

    #[test]
    fn parse_errors_show_no_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        for text in [
            "pushgateway = \"http://u:hunter2-secret@gw\" trailing\n",
            "pushgateway = \"http://u:hunter2-secret@gw\n",
            "grace = 1979-05-27T07:32:00Z\nx = {a = \"hunter2-secret\"}\n",
        ] {
            std::fs::write(&path, text).expect("write");
            let err = match FileConfig::load(&path) {
                Err(e) => e.to_string(),
                // Values TOML accepts are checked against the flags later; error_at is what
                // reports them.
                Ok(cfg) => cfg.error_at("x", "value \"hunter2-secret\"").to_string(),
            };
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
    }
}
