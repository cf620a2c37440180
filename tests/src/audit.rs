//! The gateway's audit trail as the tests read it: log events and the chained file.

#[allow(unused_imports)]
use super::*;

// audit log

/// Target of the gateway's audit events.
pub(crate) const AUDIT_TARGET: &str = " kinvoke::audit: ";

/// One `kinvoke::audit` event from the gateway's human-format stderr log: the event's
/// JSON object (the same fields as its line in the audit file, without the chain fields),
/// e.g.
///
/// ```text
/// 2026-01-02T03:04:05.123456Z  INFO kinvoke::audit: {"event":"connection_refused","listener":"main","peer":"127.0.0.3:40000","reason":"..."} event="connection_refused"
/// ```
///
/// String values come out as plain text, others as their JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// `INFO`, `WARN`, ...
    pub level: String,
    /// The fields.
    pub fields: BTreeMap<String, String>,
    /// The whole line, for failure messages.
    pub line: String,
}

impl AuditRecord {
    /// Parses one log line; `None` unless it is an audit event.
    pub fn parse(line: &str) -> Option<Self> {
        let (head, rest) = line.split_once(AUDIT_TARGET)?;
        let level = head.split_whitespace().last()?.to_owned();
        let json = &rest[rest.find('{')?..];
        // the object is followed by tracing's own fields: read just the first value
        let value: serde_json::Value = serde_json::Deserializer::from_str(json)
            .into_iter::<serde_json::Value>()
            .next()?
            .ok()?;
        let fields = value
            .as_object()?
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        Some(Self {
            level,
            fields,
            line: line.to_owned(),
        })
    }

    /// A field's value, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The `event` field: `connection_refused`, `authentication_failed`, `authorization`.
    pub fn event(&self) -> &str {
        self.get("event").unwrap_or_default()
    }
}

impl fmt::Display for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// Name of the current audit file in the state directory.
pub(crate) const AUDIT_FILE: &str = "audit.jsonl";

/// `SEQ` of a rotated audit file's name `audit.<SEQ>.jsonl`.
pub(crate) fn rotated_audit_seq(name: &str) -> Option<u64> {
    name.strip_prefix("audit.")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// One line of an audit file: its exact text (what the next line's `prev` hashes, with
/// [`kinvoke_gateway::audit::chain::line_hash`]) and its JSON object, e.g.
///
/// ```text
/// {"seq":3,"time":"2026-01-02T03:04:05.123456Z","prev":"9f2c…","event":"command_started","command_id":"…","cluster":"local"}
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    /// 1-based line number in its file.
    pub number: usize,
    /// The line without its newline.
    pub text: String,
    /// The parsed object.
    pub value: serde_json::Value,
}

impl AuditLine {
    /// The `seq` field (0 if missing, which no gateway writes).
    pub fn seq(&self) -> u64 {
        self.value["seq"].as_u64().unwrap_or_default()
    }

    /// The `event` field.
    pub fn event(&self) -> &str {
        self.str_field("event").unwrap_or_default()
    }

    /// A string field, if present and a string.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.value.get(key).and_then(serde_json::Value::as_str)
    }

    /// The names of the object's keys in the order written.
    pub fn keys(&self) -> Vec<&str> {
        self.value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for AuditLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.number, self.text)
    }
}

/// Reads a finished audit file (the gateway stopped): every line must be a complete JSON
/// object ending in a newline.
pub fn read_audit_file(path: &Path) -> Result<Vec<AuditLine>> {
    let (lines, tail) = read_audit_lines(path)?;
    if !tail.is_empty() {
        bail!(
            "{} ends inside line {}: {tail:?}",
            path.display(),
            lines.len() + 1
        );
    }
    Ok(lines)
}

/// Reads the complete lines of an audit file a running gateway may be appending to;
/// an incomplete last line (a write in progress) is left out.
pub fn read_audit_file_so_far(path: &Path) -> Result<Vec<AuditLine>> {
    Ok(read_audit_lines(path)?.0)
}

/// The complete lines of an audit file, and the text after the last newline.
pub(crate) fn read_audit_lines(path: &Path) -> Result<(Vec<AuditLine>, String)> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (complete, tail) = match text.rfind('\n') {
        Some(end) => text.split_at(end + 1),
        None => ("", text.as_str()),
    };
    // split on '\n' alone, not `lines()`: a '\r' would be part of the hashed text
    let lines = complete
        .split_terminator('\n')
        .enumerate()
        .map(|(index, line)| {
            let value = serde_json::from_str(line).with_context(|| {
                format!("{} line {} is not JSON: {line}", path.display(), index + 1)
            })?;
            Ok(AuditLine {
                number: index + 1,
                text: line.to_owned(),
                value,
            })
        })
        .collect::<Result<_>>()?;
    Ok((lines, tail.to_owned()))
}

/// What `kinvoke-gateway audit verify` reports for an intact chain:
/// `ok: N events, head seq S sha256 H`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// Lines checked, over all files.
    pub events: usize,
    /// `seq` of the last line.
    pub head_seq: u64,
    /// SHA-256 (hex) of the last line.
    pub head_sha256: String,
}

impl VerifiedChain {
    /// Parses the `ok: ...` line; `None` for any other output.
    pub fn parse(stdout: &str) -> Option<Self> {
        let rest = stdout.trim_end().strip_prefix("ok: ")?;
        let (events, rest) = rest.split_once(" events, head seq ")?;
        let (seq, hash) = rest.split_once(" sha256 ")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            events: events.parse().ok()?,
            head_seq: seq.parse().ok()?,
            head_sha256: hash.to_owned(),
        })
    }
}

/// Runs `kinvoke-gateway audit verify FILE...` (files oldest first).
pub fn audit_verify<P: AsRef<Path>>(files: &[P]) -> Result<Output> {
    let mut args = vec![OsString::from("audit"), OsString::from("verify")];
    args.extend(files.iter().map(|f| f.as_ref().as_os_str().to_owned()));
    gateway_cli(args)
}
