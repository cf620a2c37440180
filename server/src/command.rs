//! Domain types of a command: names, ids, states, and the validated request that the
//! executor runs. Request messages become a [`CommandSpec`] here, once; a bad field is an
//! [`InvalidRequest`] naming the field and the limit.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// A cluster name: 1–63 lowercase letters, digits and `-`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    /// Checks the syntax of a cluster name.
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if name.is_empty() || name.len() > 63 || !ok_chars || name.starts_with('-') {
            return Err(format!(
                "\"{name}\" is not a valid cluster name: use 1-63 lowercase letters, digits and '-', not starting with '-'"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A command id: 32 lowercase hex characters (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandId(String);

impl CommandId {
    /// A fresh random id.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Self(hex(&bytes)))
    }

    /// Checks the syntax of an id a caller sent.
    pub fn parse(id: &str) -> Option<Self> {
        (id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

use crate::hex::encode as hex;

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    /// Accepted, waiting for its Pod to be scheduled and started (pod executor only).
    Pending,
    /// Started and not yet ended.
    Running,
    /// Ran to completion; the exit code says how it went.
    Succeeded,
    /// Could not run, or was interrupted.
    Failed,
    /// Stopped on request.
    Canceled,
    /// Stopped because it ran past its timeout.
    TimedOut,
}

impl CommandState {
    /// Name used in the store and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Canceled => "Canceled",
            Self::TimedOut => "TimedOut",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Canceled,
            Self::TimedOut,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// True once the command has ended (every state but `Pending` and `Running`).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// A file to write into the command's working directory.
#[derive(Clone)]
pub struct Attachment {
    /// Validated relative path.
    pub path: PathBuf,
    /// File content; never logged.
    pub content: Vec<u8>,
    /// Permission bits (0o777 at most).
    pub mode: u32,
}

impl fmt::Debug for Attachment {
    // content may hold secrets (kubeconfigs, values files): never print it
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// Name, size and digest of an attachment, kept with the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Relative path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

impl FileInfo {
    /// Describes an attachment.
    pub fn of(a: &Attachment) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &a.content);
        Self {
            path: a.path.to_string_lossy().into_owned(),
            size: a.content.len() as u64,
            sha256: hex(digest.as_ref()),
        }
    }
}

/// A validated request to run a command.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Target cluster (not yet checked against the configuration).
    pub cluster: String,
    /// The command line.
    pub command: String,
    /// Files for the working directory.
    pub files: Vec<Attachment>,
    /// How long it may run.
    pub timeout: Duration,
}

/// A request field that breaks a rule or a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// A required field is empty.
    #[error("{field} is required")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field's value is malformed.
    #[error("{field}: {message}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A size or count limit of the gateway was exceeded.
    #[error("{what} exceeds the gateway limit {limit} = {max} (got {got})")]
    OverLimit {
        /// What was measured.
        what: &'static str,
        /// The config key of the limit.
        limit: &'static str,
        /// The limit's value.
        max: String,
        /// The measured value.
        got: String,
    },
    /// argv mode refuses the command line: a shell operator, a flag, a plugin.
    #[error(transparent)]
    ArgvRefused(#[from] ArgvRefusal),
}

impl InvalidRequest {
    /// True when the request is well formed but too big (RESOURCE_EXHAUSTED).
    pub fn is_over_limit(&self) -> bool {
        matches!(self, Self::OverLimit { .. })
    }
}

/// A request to run a command as it arrived, before validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandRequest {
    /// The cluster asked for.
    pub cluster: String,
    /// The command line.
    pub command: String,
    /// The attached files.
    pub files: Vec<RequestedFile>,
    /// The timeout asked for; `None` = the gateway's default.
    pub timeout: Option<Duration>,
}

/// One attached file as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedFile {
    /// Path relative to the working directory, as the caller wrote it.
    pub path: String,
    /// Content.
    pub content: Vec<u8>,
    /// Unix mode bits; 0 = the default (0644).
    pub mode: u32,
}

impl CommandSpec {
    /// Validates a request against the gateway's limits.
    pub fn validate(req: CommandRequest, limits: &Limits) -> Result<Self, InvalidRequest> {
        if req.cluster.is_empty() {
            return Err(InvalidRequest::Missing { field: "cluster" });
        }
        if req.command.trim().is_empty() {
            return Err(InvalidRequest::Missing { field: "command" });
        }
        if req.command.len() > limits.max_command_bytes {
            return Err(InvalidRequest::OverLimit {
                what: "command length",
                limit: "limits.max_command_bytes",
                max: format!("{} bytes", limits.max_command_bytes),
                got: format!("{} bytes", req.command.len()),
            });
        }
        if req.command.contains('\0') {
            return Err(InvalidRequest::Malformed {
                field: "command",
                message: "must not contain NUL".to_owned(),
            });
        }
        let timeout = match req.timeout {
            None => limits.default_timeout,
            Some(d) => {
                if d.is_zero() {
                    return Err(InvalidRequest::Malformed {
                        field: "timeout",
                        message: "must be longer than 0s".to_owned(),
                    });
                }
                if d > limits.max_timeout {
                    return Err(InvalidRequest::OverLimit {
                        what: "timeout",
                        limit: "limits.max_timeout",
                        max: humantime::format_duration(limits.max_timeout).to_string(),
                        got: humantime::format_duration(d).to_string(),
                    });
                }
                d
            }
        };
        if req.files.len() > limits.max_files {
            return Err(InvalidRequest::OverLimit {
                what: "number of attached files",
                limit: "limits.max_files",
                max: limits.max_files.to_string(),
                got: req.files.len().to_string(),
            });
        }
        let total: u64 = req.files.iter().map(|f| f.content.len() as u64).sum();
        if total > limits.max_total_file_bytes {
            return Err(InvalidRequest::OverLimit {
                what: "total size of attached files",
                limit: "limits.max_total_file_bytes",
                max: format!("{} bytes", limits.max_total_file_bytes),
                got: format!("{total} bytes"),
            });
        }
        let mut files = Vec::with_capacity(req.files.len());
        let mut seen = std::collections::BTreeSet::new();
        for f in req.files {
            let path = validate_file_path(&f.path, limits.max_file_path_bytes)?;
            if !seen.insert(path.clone()) {
                return Err(InvalidRequest::Malformed {
                    field: "files.path",
                    message: format!("\"{}\" is attached twice", f.path),
                });
            }
            let mode = if f.mode == 0 {
                0o644
            } else {
                (f.mode & 0o777) | 0o400
            };
            files.push(Attachment {
                path,
                content: f.content,
                mode,
            });
        }
        // a file may not also be a directory of another ("a" and "a/b")
        for path in &seen {
            let mut parent = path.parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                if seen.contains(p) {
                    return Err(InvalidRequest::Malformed {
                        field: "files.path",
                        message: format!(
                            "\"{}\" is attached as a file and is also the directory of \"{}\"",
                            p.display(),
                            path.display()
                        ),
                    });
                }
                parent = p.parent();
            }
        }
        Ok(Self {
            cluster: req.cluster,
            command: req.command,
            files,
            timeout,
        })
    }
}

/// True for characters a name shown to people must not hold: control characters (Cc)
/// and the format characters that reorder or hide text (bidirectional embeddings,
/// overrides and isolates, zero-width characters, the BOM): a name holding U+202E shows
/// as another name (`invoice\u{202E}txt.sh` reads as `invoicehs.txt`).
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// Checks that an attached file's path stays inside the working directory.
fn validate_file_path(path: &str, max_bytes: usize) -> Result<PathBuf, InvalidRequest> {
    let bad = |message: String| InvalidRequest::Malformed {
        field: "files.path",
        message,
    };
    if path.is_empty() {
        return Err(bad("an attached file has an empty path".to_owned()));
    }
    if path.len() > max_bytes {
        return Err(InvalidRequest::OverLimit {
            what: "attached file path length",
            limit: "limits.max_file_path_bytes",
            max: format!("{max_bytes} bytes"),
            got: format!("{} bytes", path.len()),
        });
    }
    let shown = path.escape_debug();
    if path.contains('\0') {
        return Err(bad(format!("\"{shown}\" contains NUL")));
    }
    if path.chars().any(is_unprintable) {
        return Err(bad(format!(
            "\"{shown}\" contains a control, invisible or text-direction character; \
             attached file names may not hold any (they would reach logs, audit lines and \
             terminals, or show as another name): rename the file"
        )));
    }
    if path.contains('\\') {
        return Err(bad(format!(
            "\"{shown}\" contains '\\'; use '/' between directories"
        )));
    }
    let p = Path::new(path);
    let mut clean = PathBuf::new();
    for component in p.components() {
        match component {
            Component::Normal(part) => {
                if part.len() > 255 {
                    return Err(bad(format!("\"{shown}\" has a name longer than 255 bytes")));
                }
                clean.push(part);
            }
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad(format!(
                    "\"{shown}\" contains \"..\"; attached files must stay inside the working directory"
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "\"{shown}\" is absolute; attached files need relative paths"
                )));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(bad(format!("\"{shown}\" names no file")));
    }
    Ok(clean)
}

/// Why argv mode refuses a command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvRefusal {
    /// The line holds shell syntax a shell would act on, so the caller meant a shell.
    #[error(
        "argv mode runs one program ({program}) with its arguments; {token:?} is a shell operator; use a cluster in shell mode for pipelines"
    )]
    ShellOperator {
        /// The program the line starts with.
        program: String,
        /// The operator as written, e.g. `|`, `2>`, `$(`.
        token: String,
    },
    /// A flag that changes where or as whom the program connects, or runs a program.
    #[error(
        "argv mode refuses {flag} of {program}: it {why}; a command reaches its cluster only through the kinvoke relay, as its caller, so remove the flag"
    )]
    Flag {
        /// The tool (`kubectl` or `helm`).
        program: &'static str,
        /// The flag as the tool names it, e.g. `--kubeconfig` or `-s/--server`.
        flag: String,
        /// What the flag would do.
        why: &'static str,
    },
    /// A subcommand that runs or manages plugin programs.
    #[error("argv mode refuses \"{program} {subcommand}\": {why}")]
    Subcommand {
        /// The tool (`kubectl` or `helm`).
        program: &'static str,
        /// The subcommand as written.
        subcommand: String,
        /// Why, and what to do instead.
        why: String,
    },
}

/// Request limits; each violation is reported to the caller with the limit's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted command line, in bytes.
    pub max_command_bytes: usize,
    /// Most files attached to one command.
    pub max_files: usize,
    /// Largest total size of the attached files, in bytes.
    pub max_total_file_bytes: u64,
    /// Longest attached file path, in bytes.
    pub max_file_path_bytes: usize,
    /// Timeout when the caller gives none.
    pub default_timeout: Duration,
    /// Longest timeout a caller may ask for.
    pub max_timeout: Duration,
    /// Commands running at once on this gateway.
    pub max_concurrent_commands: usize,
    /// Commands running at once per principal.
    pub max_commands_per_principal: usize,
    /// Requests (any RPC) a second per principal, on average: the refill rate of the
    /// principal's token bucket.
    pub requests_per_second_per_principal: u32,
    /// Requests a principal may send at once before the rate applies: the size of its
    /// token bucket.
    pub request_burst_per_principal: u32,
    /// RPCs being handled at once on this gateway, all callers together; a request over
    /// it is refused at once rather than queued.
    pub max_in_flight_requests: usize,
    /// Open connections (TLS handshakes included) from one source address.
    pub max_connections_per_source: usize,
    /// Open connections on this gateway, all listeners together.
    pub max_connections: usize,
    /// Longest a new connection may take to send its PROXY header (when its peer is a
    /// trusted proxy), complete the TLS handshake, and then start HTTP/2.
    pub handshake_timeout: Duration,
    /// Longest a request may take to arrive whole, from its headers to its last byte.
    pub request_read_timeout: Duration,
    /// Output kept per command; the rest is counted but cut.
    pub max_output_bytes: usize,
    /// How much of `max_output_bytes` goes to the output's head, in percent; the rest
    /// keeps its tail (so a long run keeps its final error line).
    pub output_head_percent: u8,
    /// Time between SIGTERM and SIGKILL when a command is stopped.
    pub kill_grace: Duration,
}

impl Limits {
    /// The bytes of `max_output_bytes` that keep the output's head.
    pub fn output_head_bytes(&self) -> usize {
        let percent = usize::from(self.output_head_percent.min(100));
        self.max_output_bytes / 100 * percent + self.max_output_bytes % 100 * percent / 100
    }

    /// Room for protobuf framing per attached file (tag, lengths, the entry itself)
    /// and for the message's other fields, in bytes.
    const FRAMING_PER_FILE: usize = 32;
    const FRAMING: usize = 64 * 1024;

    /// The largest gRPC message, in bytes, a request within these limits can need: the
    /// attached files' bytes, their longest paths, the command line and framing. The
    /// transport refuses longer messages before reading them, so this bounds the memory
    /// one request can take; the service answers such a refusal with the limit's name.
    pub fn max_request_bytes(&self) -> usize {
        usize::try_from(self.max_total_file_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(
                self.max_files.saturating_mul(
                    self.max_file_path_bytes
                        .saturating_add(Self::FRAMING_PER_FILE),
                ),
            )
            .saturating_add(self.max_command_bytes)
            .saturating_add(Self::FRAMING)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_command_bytes: 16 * 1024,
            max_files: 1_000,
            max_total_file_bytes: 4 * 1024 * 1024,
            max_file_path_bytes: 1024,
            default_timeout: Duration::from_secs(10 * 60),
            max_timeout: Duration::from_secs(60 * 60),
            max_concurrent_commands: 64,
            max_commands_per_principal: 16,
            requests_per_second_per_principal: 20,
            request_burst_per_principal: 100,
            max_in_flight_requests: 256,
            max_connections_per_source: 64,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            request_read_timeout: Duration::from_secs(30),
            max_output_bytes: 512 * 1024,
            output_head_percent: 50,
            kill_grace: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(files: Vec<(&str, &[u8])>) -> CommandRequest {
        CommandRequest {
            cluster: "prod".into(),
            command: "kubectl get pods".into(),
            files: files
                .into_iter()
                .map(|(path, content)| RequestedFile {
                    path: path.into(),
                    content: content.to_vec(),
                    mode: 0,
                })
                .collect(),
            timeout: None,
        }
    }

    #[test]
    fn file_paths_that_leave_the_work_dir_are_rejected() {
        let limits = Limits::default();
        for path in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a/..",
            "",
            ".",
            "a\\b",
            "a\0b",
            "a\nb",
            "values\u{1b}[2J.yaml",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
            "invoice\u{202E}txt.sh",
            "zero\u{200B}width",
            "isolate\u{2066}x",
        ] {
            let err = CommandSpec::validate(request(vec![(path, b"x")]), &limits).unwrap_err();
            assert!(err.to_string().starts_with("files.path"), "{path:?}: {err}");
        }
    }

    #[test]
    fn relative_paths_are_normalised() {
        let spec = CommandSpec::validate(
            request(vec![("./chart/values.yaml", b"x")]),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(spec.files[0].path, Path::new("chart/values.yaml"));
        assert_eq!(spec.files[0].mode, 0o644);
    }

    #[test]
    fn duplicate_and_file_as_directory_are_rejected() {
        let limits = Limits::default();
        let err =
            CommandSpec::validate(request(vec![("a", b""), ("./a", b"")]), &limits).unwrap_err();
        assert!(err.to_string().contains("attached twice"), "{err}");
        let err =
            CommandSpec::validate(request(vec![("a", b""), ("a/b", b"")]), &limits).unwrap_err();
        assert!(err.to_string().contains("also the directory"), "{err}");
    }

    #[test]
    fn limits_are_named_when_exceeded() {
        let limits = Limits {
            max_total_file_bytes: 4,
            max_files: 2,
            max_command_bytes: 20,
            ..Limits::default()
        };
        let cases: Vec<(CommandRequest, &str)> = vec![
            (
                request(vec![("a", b"12345")]),
                "limits.max_total_file_bytes",
            ),
            (
                request(vec![("a", b""), ("b", b""), ("c", b"")]),
                "limits.max_files",
            ),
            (
                CommandRequest {
                    command: "x".repeat(21),
                    ..request(vec![])
                },
                "limits.max_command_bytes",
            ),
            (
                CommandRequest {
                    timeout: Some(Duration::from_secs(7201)),
                    ..request(vec![])
                },
                "limits.max_timeout",
            ),
        ];
        for (req, limit) in cases {
            let err = CommandSpec::validate(req, &limits).unwrap_err();
            assert!(err.is_over_limit(), "{err}");
            assert!(err.to_string().contains(limit), "{limit}: {err}");
        }
    }

    #[test]
    fn missing_fields_are_named() {
        let err = CommandSpec::validate(
            CommandRequest {
                command: " ".into(),
                ..request(vec![])
            },
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err, InvalidRequest::Missing { field: "command" });
    }

    #[test]
    fn cluster_names_follow_dns_label_rules() {
        assert!(ClusterName::parse("prod-eu-1").is_ok());
        for bad in ["", "-a", "Prod", "a_b", &"a".repeat(64)] {
            assert!(ClusterName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_ids_are_32_hex() {
        let id = CommandId::random().unwrap();
        assert!(CommandId::parse(id.as_str()).is_some());
        assert!(CommandId::parse("../../etc").is_none());
        assert!(CommandId::parse(&"A".repeat(32)).is_none());
    }

    #[test]
    fn attachment_debug_hides_content() {
        let a = Attachment {
            path: "s".into(),
            content: b"hunter2".to_vec(),
            mode: 0o600,
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
