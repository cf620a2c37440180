//! Label and field selectors, parsed once from the query string and then matched as pure
//! functions of an object.

use serde_json::{Map, Value};

/// Why a selector could not be parsed; answered as 400 BadRequest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SelectorError {
    /// A requirement that is not `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (..)` or `k notin (..)`.
    #[error("unable to parse requirement {requirement:?} in selector {selector:?}")]
    BadRequirement {
        /// the requirement as written
        requirement: String,
        /// the whole selector
        selector: String,
    },
    /// A field selector term without `=`, `==` or `!=`.
    #[error("invalid field selector {selector:?}: {term:?} is not field=value or field!=value")]
    BadFieldTerm {
        /// the term as written
        term: String,
        /// the whole selector
        selector: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    requirements: Vec<(String, LabelOp)>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_set(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

impl LabelSelector {
    /// Parses the Kubernetes label selector syntax.
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        let bad = |req: &str| SelectorError::BadRequirement {
            requirement: req.to_string(),
            selector: selector.to_string(),
        };
        for raw in split_top_level(selector) {
            let req = raw.trim();
            if req.is_empty() {
                continue;
            }
            let parsed = if let Some(key) = req.strip_prefix('!') {
                (key.trim().to_string(), LabelOp::DoesNotExist)
            } else if let Some((key, value)) = req.split_once("!=") {
                (
                    key.trim().to_string(),
                    LabelOp::NotEquals(value.trim().to_string()),
                )
            } else if let Some((key, value)) = req.split_once("==") {
                (
                    key.trim().to_string(),
                    LabelOp::Equals(value.trim().to_string()),
                )
            } else if let Some((key, value)) = req.split_once('=') {
                (
                    key.trim().to_string(),
                    LabelOp::Equals(value.trim().to_string()),
                )
            } else if let Some((key, rest)) = split_set_op(req, "notin") {
                (key, LabelOp::NotIn(parse_set(rest)))
            } else if let Some((key, rest)) = split_set_op(req, "in") {
                (key, LabelOp::In(parse_set(rest)))
            } else if req.contains(char::is_whitespace) || req.contains(['(', ')']) {
                return Err(bad(req));
            } else {
                (req.to_string(), LabelOp::Exists)
            };
            if parsed.0.is_empty() || parsed.0.contains(char::is_whitespace) {
                return Err(bad(req));
            }
            requirements.push(parsed);
        }
        Ok(Self { requirements })
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let value = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                LabelOp::Equals(v) => value == Some(v.as_str()),
                LabelOp::NotEquals(v) => value != Some(v.as_str()),
                LabelOp::In(set) => value.is_some_and(|x| set.iter().any(|s| s == x)),
                LabelOp::NotIn(set) => !value.is_some_and(|x| set.iter().any(|s| s == x)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// `key in (a,b)` → `("key", "a,b")`; `None` when `req` is not that operator.
fn split_set_op<'a>(req: &'a str, op: &str) -> Option<(String, &'a str)> {
    let open = req.find('(')?;
    let close = req.rfind(')')?;
    if close < open || !req[close + 1..].trim().is_empty() {
        return None;
    }
    let head = req[..open].trim_end();
    let key = head.strip_suffix(op)?;
    // the operator must be a separate word: "xin (" is not "x in ("
    if !key.ends_with(char::is_whitespace) {
        return None;
    }
    Some((key.trim().to_string(), &req[open + 1..close]))
}

/// A parsed `fieldSelector`: `path=value` / `path==value` / `path!=value` terms over the
/// object's JSON (dotted paths, e.g. `metadata.name`, `status.phase`, `spec.nodeName`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a comma-separated list of field terms.
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in selector.split(',') {
            let term = raw.trim();
            if term.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError::BadFieldTerm {
                    term: term.to_string(),
                    selector: selector.to_string(),
                });
            };
            terms.push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(Self { terms })
    }

    /// Whether `object` satisfies every term (a missing field reads as the empty string).
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(field, equal, value)| {
            let mut cur = Some(object);
            for part in field.split('.') {
                cur = cur.and_then(|v| v.get(part));
            }
            let actual = match cur {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

/// Both selectors of a list or watch request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    /// Whether `object` is selected by both.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.labels.matches(labels) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_selector_cases() {
        let l = labels(json!({"app": "web", "tier": "front", "owner": "helm", "name": "demo"}));
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("name=demo,owner=helm", true),
            ("name=demo,owner=other", false),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("app notin (db, cache)", true),
            ("missing notin (db)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app in (web),tier=front", true),
        ];
        for (sel, want) in cases {
            let parsed = LabelSelector::parse(sel);
            assert!(parsed.is_ok(), "{sel}: {parsed:?}");
            let got = parsed.map(|p| p.matches(Some(&l))).unwrap_or(false);
            assert_eq!(got, *want, "selector {sel:?}");
        }
    }

    #[test]
    fn label_selector_rejects_garbage() {
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("=x").is_err());
        assert!(LabelSelector::parse("a in b)").is_err());
    }

    #[test]
    fn object_without_labels_matches_only_negative_requirements() {
        let sel = LabelSelector::parse("app!=web,!tier").unwrap_or_default();
        assert!(sel.matches(None));
        let sel = LabelSelector::parse("app=web").unwrap_or_default();
        assert!(!sel.matches(None));
    }

    #[test]
    fn field_selector_matches_dotted_paths() {
        let pod = json!({"metadata": {"name": "web-1", "namespace": "demo"}, "status": {"phase": "Running"}});
        let cases: &[(&str, bool)] = &[
            ("metadata.name=web-1", true),
            ("metadata.name==web-1", true),
            ("metadata.name=web-2", false),
            ("metadata.name!=web-2,metadata.namespace=demo", true),
            ("status.phase!=Running", false),
            ("spec.nodeName=", true),
        ];
        for (sel, want) in cases {
            let got = FieldSelector::parse(sel)
                .map(|f| f.matches(&pod))
                .unwrap_or(false);
            assert_eq!(got, *want, "selector {sel:?}");
        }
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
