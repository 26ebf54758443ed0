//! `--protect-file`: image references that retention never removes, whatever the rules say
//! (typically what the cluster runs, from `kubectl get pods -A -o jsonpath=…`).
//!
//! One reference a line: `repo:tag`, `repo@sha256:…`, `repo:tag@sha256:…`, or any of these
//! with a registry host in front (`registry.example.com:5000/team/app:1.2`), which is
//! ignored; a bare `repo` is `repo:latest`. Blank lines and `#` comments are skipped; anything else that does not parse is an
//! error naming its line, so a broken file never protects less than it says.

use std::collections::HashSet;

use crate::digest::Digest;
use crate::layout::validate_repository_name;

/// A line of the protect file that is no image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ProtectError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The protected images: tags by name and manifests by digest.
#[derive(Clone, Debug, Default)]
pub struct Protected {
    tags: HashSet<(String, String)>,
    digests: HashSet<(String, Digest)>,
}

/// Why a protect file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable.
    #[error("reading the protect file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A line is no image reference.
    #[error("protect file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: ProtectError,
    },
}

impl Protected {
    /// Reads and parses the protect file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Protected, LoadError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: shown.clone(),
            source,
        })?;
        Protected::parse(&text).map_err(|source| LoadError::Parse {
            path: shown,
            source,
        })
    }

    /// Parses the text of a protect file.
    pub fn parse(text: &str) -> Result<Protected, ProtectError> {
        let mut out = Protected::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            // `kubectl … jsonpath` output separates with spaces as well as newlines.
            for reference in line.split_whitespace() {
                out.add(reference).map_err(|message| ProtectError {
                    line: i + 1,
                    message,
                })?;
            }
        }
        Ok(out)
    }

    fn add(&mut self, reference: &str) -> Result<(), String> {
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => {
                let digest =
                    Digest::parse(d).ok_or_else(|| format!("{reference:?}: invalid digest"))?;
                (n, Some(digest))
            }
            None => (reference, None),
        };
        // A tag follows the last `:` after the last `/` (a `:` before it is a host's port).
        let (path, tag) = match name.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (name, None),
        };
        let repo = strip_host(path);
        validate_repository_name(repo).map_err(|e| format!("{reference:?}: {e}"))?;
        // A bare name is `:latest`, as every container runtime reads it (pod specs say `nginx`).
        let tag = match (tag, &digest) {
            (None, None) => Some("latest"),
            (t, _) => t,
        };
        if let Some(t) = tag {
            self.tags.insert((repo.to_string(), t.to_string()));
        }
        if let Some(d) = digest {
            self.digests.insert((repo.to_string(), d));
        }
        Ok(())
    }

    /// Whether tag `tag` of `repo`, pointing at `digest`, is protected.
    pub fn protects_tag(&self, repo: &str, tag: &str, digest: &Digest) -> bool {
        self.tags.contains(&(repo.to_string(), tag.to_string())) || self.protects(repo, digest)
    }

    /// Whether manifest `digest` of `repo` is protected.
    pub fn protects(&self, repo: &str, digest: &Digest) -> bool {
        self.digests.contains(&(repo.to_string(), digest.clone()))
    }

    /// How many references it holds.
    pub fn len(&self) -> usize {
        self.tags.len() + self.digests.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `path` without a registry host: a first component with a `.` or a `:`, or `localhost`,
/// is a host (the rule docker and containerd apply).
fn strip_host(path: &str) -> &str {
    match path.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn references_with_and_without_hosts() {
        let text = format!(
            "# running\nteam/app:1.2\nregistry.example.com:5000/team/web:latest  other/x@{D}\n\
             localhost/svc:v1@{D}\n\n"
        );
        let p = Protected::parse(&text).expect("valid");
        let d = Digest::parse(D).expect("digest");
        let other = Digest::sha256_of(b"x");
        assert!(p.protects_tag("team/app", "1.2", &other));
        assert!(p.protects_tag("team/web", "latest", &other));
        assert!(!p.protects_tag("team/web", "latest2", &other));
        assert!(p.protects_tag("other/x", "any", &d), "by digest");
        assert!(p.protects_tag("svc", "v1", &other) && p.protects("svc", &d));
        assert!(!p.protects("team/app", &d));
    }

    #[test]
    fn a_bare_name_is_latest() {
        let bare = Protected::parse("nginx\nghcr.io/team/app\n").expect("bare names");
        let d = Digest::sha256_of(b"x");
        assert!(bare.protects_tag("nginx", "latest", &d));
        assert!(bare.protects_tag("team/app", "latest", &d));
        assert!(!bare.protects_tag("team/app", "1.0", &d));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            Protected::parse("a:1\nteam//app:1\n")
                .map(|_| ())
                .unwrap_err()
                .line,
            2
        );
        assert_eq!(
            Protected::parse("a@sha256:zz\n")
                .map(|_| ())
                .unwrap_err()
                .line,
            1
        );
        assert_eq!(
            Protected::parse("Bad/Name:1\n")
                .map(|_| ())
                .unwrap_err()
                .line,
            1
        );
    }
}
