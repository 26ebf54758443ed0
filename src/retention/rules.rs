//! The `[[retention]]` tables of the configuration file, validated strictly: a bad regex, an
//! unknown key, a negative count or a malformed duration is an error naming its key
//! (`retention[1].keep_tags[0]`).

use std::time::Duration;

use regex::Regex;
use serde_json::Value;

use crate::gc::RepoFilter;

/// Every key a `[[retention]]` table may hold.
const KEYS: [&str; 7] = [
    "repos",
    "keep_last",
    "keep_tags",
    "delete_tags",
    "older_than",
    "keep_semver",
    "untagged_older_than",
];

/// Why the retention tables were rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {message}")]
pub struct RuleError {
    /// The offending key, e.g. `retention[0].keep_last`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

/// The versions `keep_semver` groups tags by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SemverPer {
    /// Each `major.minor`.
    Minor,
    /// Each `major`.
    Major,
}

/// `keep_semver = { per = "minor", last = 1 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepSemver {
    /// The grouping.
    pub per: SemverPer,
    /// How many of the highest versions of each group are kept.
    pub last: usize,
}

/// One `[[retention]]` table.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Its position in the file (0-based), as reports name it (`retention[0]`).
    pub index: usize,
    repos: RepoFilter,
    /// The `keep_last` most recently pushed tags are kept.
    pub keep_last: Option<usize>,
    /// Tags matching any of these (in full) are kept.
    pub keep_tags: Vec<Regex>,
    /// If set, only tags matching one of these (in full) may be removed.
    pub delete_tags: Option<Vec<Regex>>,
    /// Only tags older than this may be removed.
    pub older_than: Option<Duration>,
    /// The highest versions of each group are kept.
    pub keep_semver: Option<KeepSemver>,
    /// Untagged root manifests older than this are removed too.
    pub untagged_older_than: Option<Duration>,
}

impl Rule {
    /// Whether the table applies to repository `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.repos.matches(name)
    }

    /// Whether the table says which tags go: a table with none of `keep_last`,
    /// `delete_tags`, `older_than` and `keep_semver` removes no tag (it exempts its
    /// repositories from later tables).
    pub fn selects_tags(&self) -> bool {
        self.keep_last.is_some()
            || self.delete_tags.is_some()
            || self.older_than.is_some()
            || self.keep_semver.is_some()
    }

    /// The name reports give the table.
    pub fn name(&self) -> String {
        format!("retention[{}]", self.index)
    }
}

/// The retention tables in file order; the first whose `repos` matches applies.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// The tables.
    pub tables: Vec<Rule>,
}

impl Rules {
    /// The table that applies to repository `name`, if any.
    pub fn for_repository(&self, name: &str) -> Option<&Rule> {
        self.tables.iter().find(|r| r.matches(name))
    }

    /// Whether there are no tables.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Reads the `retention` value of the configuration file (an array of tables).
    pub fn parse(value: &Value) -> Result<Rules, RuleError> {
        let Value::Array(tables) = value else {
            return Err(err("retention", "expected [[retention]] tables"));
        };
        let tables = tables
            .iter()
            .enumerate()
            .map(|(i, t)| parse_table(i, t))
            .collect::<Result<_, _>>()?;
        Ok(Rules { tables })
    }
}

fn err(key: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError {
        key: key.into(),
        message: message.into(),
    }
}

fn parse_table(index: usize, value: &Value) -> Result<Rule, RuleError> {
    let at = |k: &str| format!("retention[{index}].{k}");
    let Value::Object(map) = value else {
        return Err(err(format!("retention[{index}]"), "expected a table"));
    };
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(
            at(unknown),
            format!("unknown key, expected one of {}", KEYS.join(", ")),
        ));
    }
    let repos = match map.get("repos") {
        None => Vec::new(),
        Some(v) => strings(&at("repos"), v)?,
    };
    let filter = RepoFilter::new(&repos).map_err(|e| err(at("repos"), e.to_string()))?;
    let keep_semver = match map.get("keep_semver") {
        None => None,
        Some(v) => Some(keep_semver(&at("keep_semver"), v)?),
    };
    Ok(Rule {
        index,
        repos: filter,
        keep_last: map
            .get("keep_last")
            .map(|v| count(&at("keep_last"), v))
            .transpose()?,
        keep_tags: match map.get("keep_tags") {
            None => Vec::new(),
            Some(v) => regexes(&at("keep_tags"), v)?,
        },
        delete_tags: map
            .get("delete_tags")
            .map(|v| regexes(&at("delete_tags"), v))
            .transpose()?,
        older_than: map
            .get("older_than")
            .map(|v| duration(&at("older_than"), v))
            .transpose()?,
        keep_semver,
        untagged_older_than: map
            .get("untagged_older_than")
            .map(|v| duration(&at("untagged_older_than"), v))
            .transpose()?,
    })
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>, RuleError> {
    let Value::Array(items) = v else {
        return Err(err(key, "expected a list of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(format!("{key}[{i}]"), "expected a string"))
        })
        .collect()
}

/// Regexes that must match a whole tag.
fn regexes(key: &str, v: &Value) -> Result<Vec<Regex>, RuleError> {
    strings(key, v)?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                // The regex crate's message spans lines; one line names the problem.
                let why = e.to_string();
                let why = why.lines().last().unwrap_or("invalid").trim().to_string();
                err(format!("{key}[{i}]"), format!("invalid regex: {why}"))
            })
        })
        .collect()
}

fn count(key: &str, v: &Value) -> Result<usize, RuleError> {
    match v.as_i64() {
        Some(n) if n < 0 => Err(err(key, "must not be negative")),
        Some(n) => usize::try_from(n).map_err(|_| err(key, "too large")),
        None => Err(err(key, "expected a whole number")),
    }
}

fn duration(key: &str, v: &Value) -> Result<Duration, RuleError> {
    let s = v
        .as_str()
        .ok_or_else(|| err(key, "expected a duration such as 30d"))?;
    humantime::parse_duration(s).map_err(|e| err(key, format!("{e} (examples: 12h, 7d, 30d)")))
}

fn keep_semver(key: &str, v: &Value) -> Result<KeepSemver, RuleError> {
    let Value::Object(map) = v else {
        return Err(err(key, "expected { per = minor | major, last = N }"));
    };
    if let Some(unknown) = map.keys().find(|k| *k != "per" && *k != "last") {
        return Err(err(
            format!("{key}.{unknown}"),
            "unknown key, expected per or last",
        ));
    }
    let per = match map.get("per").and_then(Value::as_str) {
        Some("minor") => SemverPer::Minor,
        Some("major") => SemverPer::Major,
        _ => return Err(err(format!("{key}.per"), "expected minor or major")),
    };
    let last = match map.get("last") {
        Some(v) => count(&format!("{key}.last"), v)?,
        None => return Err(err(format!("{key}.last"), "missing")),
    };
    Ok(KeepSemver { per, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_of(v: Value) -> String {
        Rules::parse(&v).expect_err("invalid").key
    }

    #[test]
    fn every_clause_parses() {
        let rules = Rules::parse(&json!([{
            "repos": ["team/**"], "keep_last": 10, "keep_tags": ["latest", "v\\d+\\.\\d+\\.\\d+"],
            "delete_tags": ["pr-.*"], "older_than": "30d",
            "keep_semver": {"per": "minor", "last": 1}, "untagged_older_than": "7d"
        }, {"keep_last": 3}]))
        .expect("valid");
        let r = rules.for_repository("team/app").expect("first table");
        assert_eq!(r.index, 0);
        assert_eq!(r.keep_last, Some(10));
        assert!(r.keep_tags[1].is_match("v1.2.3"));
        assert!(!r.keep_tags[0].is_match("latest-2"), "full match");
        assert_eq!(r.older_than, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(
            r.keep_semver,
            Some(KeepSemver {
                per: SemverPer::Minor,
                last: 1
            })
        );
        assert_eq!(rules.for_repository("other").map(|r| r.index), Some(1));
    }

    #[test]
    fn errors_name_their_key() {
        assert_eq!(
            key_of(json!([{"keep_tags": ["ok", "("]}])),
            "retention[0].keep_tags[1]"
        );
        assert_eq!(
            key_of(json!([{}, {"keep_lats": 1}])),
            "retention[1].keep_lats"
        );
        assert_eq!(key_of(json!([{"keep_last": -1}])), "retention[0].keep_last");
        assert_eq!(
            key_of(json!([{"keep_semver": {"per": "minor", "last": -2}}])),
            "retention[0].keep_semver.last"
        );
        assert_eq!(
            key_of(json!([{"keep_semver": {"per": "patch", "last": 1}}])),
            "retention[0].keep_semver.per"
        );
        assert_eq!(
            key_of(json!([{"older_than": "soon"}])),
            "retention[0].older_than"
        );
        assert_eq!(key_of(json!([{"repos": ["a/[b"]}])), "retention[0].repos");
        assert_eq!(key_of(json!({"keep_last": 1})), "retention");
    }
}
