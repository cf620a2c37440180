//! The audit trail: every refused connection, failed authentication, authorization
//! decision (allowed or denied), command transition, result read, cancel and gateway
//! start/stop becomes one line of a hash-chained JSON Lines file (`chain`), written by
//! one thread that batches fsyncs (group commit). Events that gate an action (a command
//! being accepted) wait until their line is durable; if the file cannot be written the
//! gateway fails closed. Events never carry secrets: no tokens, keys, file contents,
//! output or environment, only names, sizes and digests.

pub mod chain;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{oneshot, watch};

use chain::{ChainFile, Head};

/// A duration in whole milliseconds, as audit events carry it.
pub fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How often the file is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync after every write batch, each event's waiter released after its fsync.
    Always,
    /// Group commit: wait up to this long to gather more events into one fsync.
    Batch(Duration),
}

/// Audit log settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The JSON Lines file.
    pub path: PathBuf,
    /// Durability policy.
    pub fsync: FsyncPolicy,
    /// Rotate when the file grows past this many bytes.
    pub max_file_bytes: u64,
    /// Also emit every event as a `tracing` event on target `kinvoke::audit`.
    pub tracing: bool,
    /// The replica's name, written in every event (`"replica"`) when several replicas
    /// share a store: each keeps its own chain, and the lines say whose they are.
    pub replica: Option<String>,
}

/// The audit log cannot be written: actions that need an audit record are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log unavailable")]
pub struct AuditUnavailable;

/// A file digest as audited.
#[derive(Debug, Clone, Serialize)]
pub struct AuditFile {
    /// Relative path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: String,
}

/// The grant behind a break-glass action.
#[derive(Debug, Clone, Serialize)]
pub struct AuditGrantUse {
    /// Grant id.
    pub grant_id: String,
    /// Its justification.
    pub justification: String,
}

/// An auditable event. Fields never hold secrets.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The gateway started with this configuration.
    GatewayStarted {
        /// Gateway version.
        version: String,
        /// SHA-256 of the config file's bytes.
        config_sha256: String,
    },
    /// The gateway is stopping.
    GatewayStopped {
        /// Why.
        reason: String,
    },
    /// A connection refused before TLS.
    ConnectionRefused {
        /// Listener name.
        listener: String,
        /// The TCP peer.
        peer: String,
        /// Why; names the rule (ranges, untrusted PROXY header).
        reason: String,
        /// Refusals of this address left out since the last recorded one: their lines
        /// are capped per second.
        #[serde(skip_serializing_if = "Option::is_none")]
        unrecorded_before: Option<u64>,
    },
    /// An authorized request to run a command was refused before the command existed:
    /// invalid or over a limit, refused by argv mode's policy, no Kubernetes identity,
    /// the gateway full or shutting down.
    CommandRefused {
        /// Principal id.
        principal: String,
        /// Caller address.
        source: String,
        /// The cluster asked for.
        cluster: String,
        /// The gRPC code the caller got, e.g. `InvalidArgument`.
        code: String,
        /// The message the caller got (never a credential or a file's content).
        reason: String,
    },
    /// A request refused before it reached its handler: a message over the size limit
    /// (refused before its caller was identified), the gateway's in-flight cap, or the
    /// caller's request rate.
    RequestRefused {
        /// Listener name.
        listener: String,
        /// Caller address.
        source: String,
        /// The principal, when the caller was identified.
        #[serde(skip_serializing_if = "Option::is_none")]
        principal: Option<String>,
        /// The gRPC method, e.g. `/kinvoke.v1.CommandService/InvokeCommand` (its first
        /// 256 bytes).
        method: String,
        /// The gRPC code the caller got.
        code: String,
        /// The message the caller got.
        reason: String,
        /// Refusals of this source (or principal) left out since the last recorded
        /// one: their lines are capped per second.
        #[serde(skip_serializing_if = "Option::is_none")]
        unrecorded_before: Option<u64>,
    },
    /// Credentials were missing or wrong.
    AuthenticationFailed {
        /// Listener name.
        listener: String,
        /// Caller address.
        source: String,
        /// Why (never the credential).
        reason: String,
        /// Failures from this address left out since the last recorded one: their
        /// lines are capped per second.
        #[serde(skip_serializing_if = "Option::is_none")]
        unrecorded_before: Option<u64>,
    },
    /// An authorization decision.
    Authorization {
        /// Principal id.
        principal: String,
        /// Auth method.
        auth_method: String,
        /// Caller address.
        source: String,
        /// Action name.
        action: String,
        /// Cluster (or `*`).
        cluster: String,
        /// Command id when the decision is about one command.
        #[serde(skip_serializing_if = "Option::is_none")]
        command_id: Option<String>,
        /// `allow` or `deny`.
        decision: &'static str,
        /// The granting assignment, or the reason for a deny.
        detail: String,
    },
    /// A command was accepted and is about to start.
    CommandAccepted {
        /// Id.
        command_id: String,
        /// Cluster.
        cluster: String,
        /// Who.
        principal: String,
        /// Caller address.
        source: String,
        /// The command line (put secrets in attached files, which are audited as digests).
        command: String,
        /// Attached files, by name, size and digest.
        files: Vec<AuditFile>,
        /// Timeout in milliseconds.
        timeout_ms: u64,
        /// The break-glass grant it runs under.
        #[serde(skip_serializing_if = "Option::is_none")]
        break_glass: Option<AuditGrantUse>,
    },
    /// A command's process started.
    CommandStarted {
        /// Id.
        command_id: String,
        /// Cluster.
        cluster: String,
    },
    /// A command ended.
    CommandFinished {
        /// Id.
        command_id: String,
        /// Cluster.
        cluster: String,
        /// Final state.
        state: String,
        /// Exit code.
        exit_code: Option<i32>,
        /// Run time in milliseconds.
        duration_ms: u64,
        /// Output bytes written (all of them, kept or not).
        output_bytes: u64,
        /// SHA-256 of all output bytes.
        output_sha256: String,
        /// Why it failed, was canceled or timed out.
        reason: String,
    },
    /// A command's result or output was read.
    ResultRead {
        /// Id.
        command_id: String,
        /// Cluster.
        cluster: String,
        /// Reader.
        principal: String,
    },
    /// A cancel was requested.
    CommandCancelRequested {
        /// Id.
        command_id: String,
        /// Cluster.
        cluster: String,
        /// Who asked.
        principal: String,
    },
    /// An eligible assignment was activated (pending when approval is needed).
    BreakGlassActivated {
        /// Grant id.
        grant_id: String,
        /// The eligible assignment.
        assignment: String,
        /// Cluster.
        cluster: String,
        /// Role.
        role: String,
        /// Requester.
        principal: String,
        /// Requester's address.
        source: String,
        /// Why.
        justification: String,
        /// Requested length in milliseconds.
        duration_ms: u64,
        /// `Active` or `Pending`.
        state: &'static str,
        /// Whose approval it waits for.
        #[serde(skip_serializing_if = "Option::is_none")]
        approval_from: Option<String>,
    },
    /// A pending grant was approved and is now in force.
    BreakGlassApproved {
        /// Grant id.
        grant_id: String,
        /// Approver.
        approver: String,
        /// Requester.
        principal: String,
        /// When it stops.
        expires_at: String,
    },
    /// A grant was ended early.
    BreakGlassRevoked {
        /// Grant id.
        grant_id: String,
        /// Who ended it.
        by: String,
    },
    /// A grant reached its expiry (or lapsed without approval).
    BreakGlassExpired {
        /// Grant id.
        grant_id: String,
        /// Requester.
        principal: String,
    },
    /// A Kubernetes API request a command made through the relay.
    RelayRequest {
        /// The command.
        command_id: String,
        /// The gateway principal.
        principal: String,
        /// Who the cluster saw (Impersonate-User).
        kube_user: String,
        /// get, list, watch, create, update, patch, delete, ...
        verb: String,
        /// Request path.
        path: String,
        /// Namespace, when the path names one.
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// HTTP status the API server answered (502 when unreachable).
        status: u16,
        /// Time to the response headers, in milliseconds.
        duration_ms: u64,
    },
    /// A relay request refused (bad token, impersonation attempt, exec/attach, ...).
    RelayRefused {
        /// The command, when the token was valid.
        #[serde(skip_serializing_if = "Option::is_none")]
        command_id: Option<String>,
        /// The principal, when the token was valid.
        #[serde(skip_serializing_if = "Option::is_none")]
        principal: Option<String>,
        /// The verb attempted.
        verb: String,
        /// Request path (its first 1 KiB).
        path: String,
        /// Why.
        reason: String,
        /// Refusals without a valid token not recorded one by one since the last
        /// recorded one (their rate is capped, so a command cannot flood the log).
        #[serde(skip_serializing_if = "Option::is_none")]
        unrecorded_before: Option<u64>,
    },
    /// The break-glass webhook could not be told.
    BreakGlassNotificationFailed {
        /// Grant id.
        grant_id: String,
        /// Why (URL and HTTP error).
        error: String,
    },
}

impl AuditEvent {
    fn name(&self) -> &'static str {
        match self {
            Self::GatewayStarted { .. } => "gateway_started",
            Self::GatewayStopped { .. } => "gateway_stopped",
            Self::ConnectionRefused { .. } => "connection_refused",
            Self::AuthenticationFailed { .. } => "authentication_failed",
            Self::CommandRefused { .. } => "command_refused",
            Self::RequestRefused { .. } => "request_refused",
            Self::Authorization { .. } => "authorization",
            Self::CommandAccepted { .. } => "command_accepted",
            Self::CommandStarted { .. } => "command_started",
            Self::CommandFinished { .. } => "command_finished",
            Self::ResultRead { .. } => "result_read",
            Self::CommandCancelRequested { .. } => "command_cancel_requested",
            Self::BreakGlassActivated { .. } => "break_glass_activated",
            Self::BreakGlassApproved { .. } => "break_glass_approved",
            Self::BreakGlassRevoked { .. } => "break_glass_revoked",
            Self::BreakGlassExpired { .. } => "break_glass_expired",
            Self::BreakGlassNotificationFailed { .. } => "break_glass_notification_failed",
            Self::RelayRequest { .. } => "relay_request",
            Self::RelayRefused { .. } => "relay_refused",
        }
    }
}

/// Caps how many audit lines one key (a source address, a command) may cause for
/// refusals it can repeat at will, so a flood of refused requests cannot flood the log:
/// `per_second` lines a second per key after a burst; the next line recorded carries
/// how many were left out (`unrecorded_before`).
pub struct Throttle<K: std::hash::Hash + Eq + Clone> {
    limiter: governor::DefaultKeyedRateLimiter<K>,
    unrecorded: std::sync::Mutex<Unrecorded<K>>,
}

/// Events left out per key, and those whose key was forgotten under a flood of keys
/// (reported with the next recorded event of any key, so none goes uncounted).
struct Unrecorded<K> {
    per_key: std::collections::HashMap<K, u64>,
    forgotten: u64,
}

/// Audit lines a second, and their burst, for refusals one source, principal or command
/// can repeat at will.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;
/// See [`REFUSAL_LINES_PER_SECOND`].
pub const REFUSAL_LINES_BURST: u32 = 50;

/// Keys a [`Throttle`] keeps counts for before it forgets the oldest counts.
const THROTTLE_KEYS: usize = 10_000;

impl<K: std::hash::Hash + Eq + Clone> Throttle<K> {
    /// At most `per_second` lines a second per key, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            unrecorded: std::sync::Mutex::new(Unrecorded {
                per_key: std::collections::HashMap::new(),
                forgotten: 0,
            }),
        }
    }

    /// `Some(left out before this one)` when an event of `key` may be recorded now;
    /// `None` when it is left out (and counted for the next recorded one).
    pub fn admit(&self, key: &K) -> Option<u64> {
        let mut unrecorded = self
            .unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.limiter.len() > THROTTLE_KEYS {
            // keys whose budget is whole again cost nothing to forget
            self.limiter.retain_recent();
        }
        if self.limiter.check_key(key).is_ok() {
            let own = unrecorded.per_key.remove(key).unwrap_or(0);
            return Some(own + std::mem::take(&mut unrecorded.forgotten));
        }
        if unrecorded.per_key.len() >= THROTTLE_KEYS && !unrecorded.per_key.contains_key(key) {
            // bounded memory under a flood from many keys: the counts lose their keys,
            // not their number
            let total: u64 = unrecorded.per_key.drain().map(|(_, n)| n).sum();
            unrecorded.forgotten += total;
            self.limiter.retain_recent();
        }
        *unrecorded.per_key.entry(key.clone()).or_insert(0) += 1;
        None
    }
}

/// `text` as an audit line carries a value a caller chooses (the path of a refused
/// request): whole up to `max` bytes, else its first `max` bytes (at a character
/// boundary) and a marker with the full length, so a cut value never reads as whole.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut: {} bytes in all]", &text[..end], text.len())
}

struct Entry {
    fields: Map<String, Value>,
    durable: Option<oneshot::Sender<Result<(), AuditUnavailable>>>,
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    head: Arc<std::sync::Mutex<Head>>,
    tx: mpsc::SyncSender<Entry>,
    healthy: Arc<AtomicBool>,
    health: watch::Receiver<bool>,
    tracing: bool,
    replica: Option<Arc<str>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

/// Events queued before senders wait for the writer (backpressure, bounded memory).
const QUEUE: usize = 8192;
/// Most events written per batch.
const MAX_BATCH: usize = 1024;

impl Audit {
    /// Opens the file (continuing its chain) and starts the writer thread.
    pub fn open(config: &AuditConfig) -> std::io::Result<Self> {
        let (file, note) = ChainFile::open(&config.path)?;
        if let Some(note) = note {
            tracing::error!("audit log: {note}");
        }
        let (tx, rx) = mpsc::sync_channel::<Entry>(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let (health_tx, health) = watch::channel(true);
        let head = Arc::new(std::sync::Mutex::new(file.head().clone()));
        let writer = Writer {
            head: head.clone(),
            file,
            changed: None,
            config: config.clone(),
            healthy: healthy.clone(),
            health: health_tx,
        };
        std::thread::Builder::new()
            .name("kinvoke-audit".to_owned())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            head,
            tx,
            healthy,
            health,
            tracing: config.tracing,
            replica: config.replica.as_deref().map(Arc::from),
        })
    }

    /// The last line written: its sequence number and hash.
    pub fn head(&self) -> Head {
        self.head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// True while the log is being written.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Follows the log's health (for the gRPC health service).
    pub fn health(&self) -> watch::Receiver<bool> {
        self.health.clone()
    }

    fn fields(&self, event: &AuditEvent) -> Map<String, Value> {
        let mut map = match serde_json::to_value(event) {
            Ok(Value::Object(map)) => map,
            _ => {
                let mut map = Map::new();
                map.insert("event".to_owned(), Value::from(event.name()));
                map
            }
        };
        if let Some(replica) = &self.replica {
            map.insert("replica".to_owned(), Value::from(replica.as_ref()));
        }
        map
    }

    fn emit_tracing(&self, fields: &Map<String, Value>) {
        if self.tracing {
            let name = fields
                .get("event")
                .and_then(Value::as_str)
                .unwrap_or("event");
            tracing::info!(target: "kinvoke::audit", event = name, "{}", serde_json::Value::Object(fields.clone()));
        }
    }

    /// Records an event; returns at once (the line is written with the next batch).
    pub fn record(&self, event: AuditEvent) {
        let fields = self.fields(&event);
        self.emit_tracing(&fields);
        if self
            .tx
            .send(Entry {
                fields,
                durable: None,
            })
            .is_err()
        {
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// Records the event `make` builds, unless `key` has caused more lines than
    /// `throttle` allows lately; `make` gets how many were left out before this one
    /// (`None` for none). For refusals a caller can repeat at will.
    pub fn record_throttled<K: std::hash::Hash + Eq + Clone>(
        &self,
        throttle: &Throttle<K>,
        key: &K,
        make: impl FnOnce(Option<u64>) -> AuditEvent,
    ) {
        if let Some(unrecorded) = throttle.admit(key) {
            self.record(make((unrecorded > 0).then_some(unrecorded)));
        }
    }

    /// Records an event and waits until its line is durable (per the fsync policy).
    pub async fn record_durable(&self, event: AuditEvent) -> Result<(), AuditUnavailable> {
        if !self.is_healthy() {
            return Err(AuditUnavailable);
        }
        let fields = self.fields(&event);
        let traced = self.tracing.then(|| fields.clone());
        let (ack, done) = oneshot::channel();
        let tx = self.tx.clone();
        // a full queue blocks the sender: do that off the async threads
        tokio::task::spawn_blocking(move || {
            tx.send(Entry {
                fields,
                durable: Some(ack),
            })
        })
        .await
        .map_err(|_| AuditUnavailable)?
        .map_err(|_| AuditUnavailable)?;
        done.await.map_err(|_| AuditUnavailable)??;
        // only once it is on disk: a refused action must not look accepted in the log
        if let Some(fields) = traced {
            self.emit_tracing(&fields);
        }
        Ok(())
    }
}

struct Writer {
    head: Arc<std::sync::Mutex<Head>>,
    file: ChainFile,
    /// Set once the file was found changed by another process: sticky.
    changed: Option<chain::FileChanged>,
    config: AuditConfig,
    healthy: Arc<AtomicBool>,
    health: watch::Sender<bool>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Entry>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            // group commit: gather what arrives within the bound into one fsync
            let deadline = match self.config.fsync {
                FsyncPolicy::Always => None,
                FsyncPolicy::Batch(wait) => Some(Instant::now() + wait),
            };
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(mpsc::TryRecvError::Disconnected) => break,
                    Err(mpsc::TryRecvError::Empty) => {
                        let Some(deadline) = deadline else { break };
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(entry) => batch.push(entry),
                            Err(_) => break,
                        }
                    }
                }
            }
            let started = Instant::now();
            let result = self.write_checked(&batch);
            let metrics = crate::metrics::metrics();
            metrics
                .audit_write_seconds
                .observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                metrics.audit_write_failures.inc();
            }
            if let Err(err) = &result {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(path = %self.config.path.display(), %err, "audit log write failed; refusing new commands until it recovers");
                    let _ = self.health.send(false);
                }
            } else if !self.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!("audit log writable again");
                let _ = self.health.send(true);
            }
            for entry in batch {
                if let Some(ack) = entry.durable {
                    let _ = ack.send(result.as_ref().map(|_| ()).map_err(|_| AuditUnavailable));
                }
            }
        }
        let _ = self.file.sync();
    }

    /// Writes a batch unless the file on disk was changed by someone else, now or
    /// before: then nothing more is written to it until the gateway restarts, so the
    /// chain on disk is never continued by lines that no one will see.
    fn write_checked(&mut self, batch: &[Entry]) -> std::io::Result<()> {
        if self.changed.is_none()
            && let Err(changed) = self.file.check_unchanged()
        {
            tracing::error!(
                "audit log tampered with: {changed}; refusing new commands; keep the file \
                 and the rotated ones as evidence, check them with `kinvoke-gateway audit \
                 verify --head {}:{}`, then restart the gateway",
                changed.seq,
                changed.hash
            );
            self.changed = Some(changed);
        }
        if let Some(changed) = &self.changed {
            return Err(std::io::Error::other(changed.to_string()));
        }
        self.write(batch)
    }

    fn write(&mut self, batch: &[Entry]) -> std::io::Result<()> {
        let time = jiff::Timestamp::now().to_string();
        let mut head: Head = self.file.head().clone();
        let mut bytes = Vec::with_capacity(batch.len() * 256);
        for entry in batch {
            let (line, next) = chain::next_line(&head, &time, &entry.fields);
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
            head = next;
        }
        self.file.append(&bytes, head.clone())?;
        self.file.sync()?;
        // the anchor: a second sink an edit of the file cannot reach
        tracing::info!(target: "kinvoke::audit::head", seq = head.seq, sha256 = %head.hash, "audit log head");
        *self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = head;
        if self.file.size() >= self.config.max_file_bytes {
            let rotated = self.file.rotate()?;
            tracing::info!(rotated = %rotated.display(), "audit log rotated");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, fsync: FsyncPolicy) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit.jsonl"),
            fsync,
            max_file_bytes: 1 << 20,
            tracing: false,
            replica: None,
        }
    }

    fn stopped(reason: &str) -> AuditEvent {
        AuditEvent::GatewayStopped {
            reason: reason.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_durable_event_is_in_the_file_when_it_returns_under_either_policy() {
        for fsync in [
            FsyncPolicy::Always,
            FsyncPolicy::Batch(Duration::from_millis(5)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), fsync);
            let audit = Audit::open(&cfg).unwrap();
            audit.record(stopped("queued first"));
            audit.record_durable(stopped("durable")).await.unwrap();
            let text = std::fs::read_to_string(&cfg.path).unwrap();
            // everything queued before a durable event is written with or before it
            assert!(
                text.contains("queued first") && text.contains("durable"),
                "{fsync:?}: {text}"
            );
            let (count, head) = chain::verify(&cfg.path, None).unwrap();
            assert_eq!(count, 2);
            assert_eq!(head, audit.head());
        }
    }

    #[tokio::test]
    async fn every_event_of_a_replica_names_it_and_its_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            replica: Some("kinvoke-1".to_owned()),
            ..config(dir.path(), FsyncPolicy::Always)
        };
        let audit = Audit::open(&cfg).unwrap();
        audit.record(stopped("one"));
        audit.record_durable(stopped("two")).await.unwrap();
        let text = std::fs::read_to_string(&cfg.path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            assert_eq!(line["replica"], "kinvoke-1", "{line}");
        }
        assert_eq!(chain::verify(&cfg.path, None).unwrap().0, 2);
        // without several replicas, no such field
        let single = tempfile::tempdir().unwrap();
        let cfg = config(single.path(), FsyncPolicy::Always);
        Audit::open(&cfg)
            .unwrap()
            .record_durable(stopped("alone"))
            .await
            .unwrap();
        assert!(
            !std::fs::read_to_string(&cfg.path)
                .unwrap()
                .contains("replica")
        );
    }

    #[tokio::test]
    async fn concurrent_durable_events_share_batches_and_keep_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), FsyncPolicy::Batch(Duration::from_millis(5)));
        let audit = Audit::open(&cfg).unwrap();
        let writers: Vec<_> = (0..50)
            .map(|i| {
                let audit = audit.clone();
                tokio::spawn(async move { audit.record_durable(stopped(&format!("n{i}"))).await })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(chain::verify(&cfg.path, None).unwrap().0, 50);
    }

    #[tokio::test]
    async fn an_unwritable_log_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), FsyncPolicy::Always);
        cfg.path = std::path::PathBuf::from("/dev/full");
        let audit = Audit::open(&cfg).unwrap();
        let mut health = audit.health();
        assert_eq!(
            audit.record_durable(stopped("x")).await,
            Err(AuditUnavailable)
        );
        health.wait_for(|ok| !ok).await.unwrap();
        assert!(!audit.is_healthy());
        // refused at once from now on
        assert_eq!(
            audit.record_durable(stopped("y")).await,
            Err(AuditUnavailable)
        );
    }

    #[tokio::test]
    async fn a_deleted_log_fails_closed_and_stays_closed_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), FsyncPolicy::Always);
        let audit = Audit::open(&cfg).unwrap();
        audit.record_durable(stopped("before")).await.unwrap();
        std::fs::remove_file(&cfg.path).unwrap();
        let mut health = audit.health();
        assert_eq!(
            audit.record_durable(stopped("after")).await,
            Err(AuditUnavailable)
        );
        health.wait_for(|ok| !ok).await.unwrap();
        // a new file at the path does not make the writer continue somewhere else
        std::fs::write(&cfg.path, b"").unwrap();
        audit.record(stopped("queued"));
        assert_eq!(
            audit.record_durable(stopped("later")).await,
            Err(AuditUnavailable)
        );
        assert!(!audit.is_healthy());
        assert_eq!(std::fs::read(&cfg.path).unwrap(), b"");
    }

    #[test]
    fn a_cut_value_says_so_and_its_length() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc…[cut: 6 bytes in all]");
    }

    #[test]
    fn throttled_events_are_counted_even_when_their_keys_are_forgotten() {
        let throttle = Throttle::<u32>::new(1, 1);
        let keys = THROTTLE_KEYS as u32 + 5;
        let mut reported = 0;
        // every key records one event and has one left out: more keys than are kept
        for key in 0..keys {
            reported += throttle.admit(&key).expect("its first event is recorded");
            assert_eq!(throttle.admit(&key), None);
        }
        // the next recorded event carries the counts whose keys were forgotten
        reported += throttle.admit(&u32::MAX).unwrap();
        let pending: u64 = throttle.unrecorded.lock().unwrap().per_key.values().sum();
        assert_eq!(reported + pending, u64::from(keys), "none goes uncounted");
    }
}
