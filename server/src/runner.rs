//! The life of a command on this gateway: admit it (limits, cluster, concurrency), record
//! it, run it on its executor in a task of its own (so a caller that goes away does not
//! stop it), store how it ended, and let callers wait for, follow or cancel it. On
//! shutdown, new commands are refused and running ones get a grace period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::access::authz::GrantUse;
use crate::admission::{PrincipalPermit, PrincipalSlots};
use crate::audit::{Audit, AuditEvent, AuditFile, AuditGrantUse};
use crate::authn::Principal;
use crate::command::Limits;
use crate::command::{CommandId, CommandSpec, CommandState, FileInfo, InvalidRequest};
use crate::config::ClusterConfig;
use crate::exec::output::OutputLog;
use crate::exec::{Executor, Job, Outcome, Progress, SecretText, plan_argv};
use crate::relay::{Binding, IdentityError, Relay, RelayError, identity_for};
use crate::store::{CommandRecord, ListQuery, Store, StoreError};

/// Reason recorded for commands stopped because the gateway shut down.
pub const SHUTDOWN_REASON: &str = "gateway shut down before the command finished";

/// Why a command could not be started or found.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request breaks a rule or a limit.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// The cluster is not configured here.
    #[error("cluster \"{cluster}\" is not configured on this gateway")]
    ClusterNotFound {
        /// The name asked for.
        cluster: String,
    },
    /// No command with that id (on that cluster).
    #[error("command \"{id}\" was not found on cluster \"{cluster}\"")]
    CommandNotFound {
        /// Id asked for.
        id: String,
        /// Cluster asked for.
        cluster: String,
    },
    /// Too many commands are running.
    #[error(
        "too many commands are running on this gateway (limit limits.max_concurrent_commands = {limit}); retry later"
    )]
    TooManyCommands {
        /// The limit.
        limit: usize,
    },
    /// The caller has as many commands running as one principal may.
    #[error(
        "principal \"{principal}\" has {limit} commands running, as many as one principal may \
         (limits.max_commands_per_principal = {limit}); wait for one to end or cancel one"
    )]
    TooManyCommandsForPrincipal {
        /// Who.
        principal: String,
        /// The limit.
        limit: usize,
    },
    /// The gateway is shutting down.
    #[error(
        "the gateway is shutting down and accepts no new commands; retry on another replica or later"
    )]
    ShuttingDown,
    /// The result store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller cannot be mapped to a Kubernetes identity the relay can send on this
    /// cluster (PERMISSION_DENIED: the command must not run as anyone else).
    #[error("cannot run as a Kubernetes identity on cluster \"{cluster}\": {source}")]
    NoKubeIdentity {
        /// The cluster.
        cluster: String,
        /// Why (boxed: it is large, and rare).
        source: Box<IdentityError>,
    },
    /// The audit log cannot record the command, so it may not run (fail closed).
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The result store cannot be written, so the command's result could not be kept.
    #[error(
        "the result store cannot be written (the gateway's log says why: a full disk, a \
         read-only file); new commands are refused until it can, retry later"
    )]
    StoreUnavailable,
    /// The system random source failed.
    #[error("cannot generate a command id or relay token: {0}")]
    Random(getrandom::Error),
    /// The relay could not issue the command's token.
    #[error("the relay cannot issue a token: {0}")]
    Relay(String),
}

/// A relay token issued for a command that has not started yet. Dropped before
/// [`PendingToken::hand_over`] (a refused start, or a caller who went away while the
/// start awaited the audit log or the store), it revokes the token, so none outlives a
/// command that never ran.
struct PendingToken {
    relay: Arc<Relay>,
    /// `None` once handed over.
    key: Option<String>,
}

impl PendingToken {
    /// The token's key, now the running command's to revoke.
    fn hand_over(mut self) -> Option<String> {
        self.key.take()
    }
}

impl Drop for PendingToken {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.relay.revoke(key);
        }
    }
}

/// A command that is running now.
struct Running {
    record: CommandRecord,
    /// `Pending` or `Running`, as the executor reports.
    progress: Progress,
    output: Arc<OutputLog>,
    cancel: CancellationToken,
    cancel_reason: Mutex<Option<String>>,
    done: watch::Receiver<bool>,
}

/// A command that passed admission, not yet recorded or running.
struct Admitted {
    id: CommandId,
    cluster: ClusterConfig,
    argv: Vec<String>,
    spec: CommandSpec,
    /// Its place among the gateway's and its principal's running commands, held until
    /// it ends.
    permit: (OwnedSemaphorePermit, PrincipalPermit),
    /// Its relay token (revoked on drop until handed over) and kubeconfig.
    token: Option<(PendingToken, String)>,
    break_glass: Option<GrantUse>,
}

/// Where a follower reads a command's output from.
pub enum Follow {
    /// Still running: follow its live output.
    Live(Arc<OutputLog>),
    /// Already finished: the stored record.
    Finished(Box<CommandRecord>),
}

/// What the runner needs of the configuration, and no more.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The clusters commands may run on.
    pub clusters: Vec<ClusterConfig>,
    /// Request and execution limits.
    pub limits: Limits,
    /// How long a finished command's record is kept.
    pub retention: Duration,
}

impl RunnerSettings {
    fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name.as_str() == name)
    }
}

/// Runs and tracks commands.
pub struct Runner {
    config: RunnerSettings,
    store: Store,
    executor: Arc<dyn Executor>,
    running: Mutex<HashMap<CommandId, Arc<Running>>>,
    slots: Arc<Semaphore>,
    principal_slots: PrincipalSlots,
    accepting: CancellationToken,
    tasks: TaskTracker,
    audit: Audit,
    relay: Option<Arc<Relay>>,
}

impl Runner {
    /// A runner over a store and an executor.
    pub fn new(
        config: RunnerSettings,
        store: Store,
        executor: Arc<dyn Executor>,
        audit: Audit,
        relay: Option<Arc<Relay>>,
    ) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(config.limits.max_concurrent_commands));
        let principal_slots = PrincipalSlots::new(config.limits.max_commands_per_principal);
        Arc::new(Self {
            principal_slots,
            config,
            store,
            executor,
            running: Mutex::new(HashMap::new()),
            slots,
            accepting: CancellationToken::new(),
            tasks: TaskTracker::new(),
            audit,
            relay,
        })
    }

    fn running_map(&self) -> std::sync::MutexGuard<'_, HashMap<CommandId, Arc<Running>>> {
        // map operations are single inserts/removes; a poisoned lock still holds a valid map
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits and starts a command; returns its record in state `Running`.
    pub async fn start(
        self: &Arc<Self>,
        principal: &Principal,
        spec: CommandSpec,
        break_glass: Option<GrantUse>,
    ) -> Result<CommandRecord, RunError> {
        let admitted = self.admit(principal, spec, break_glass)?;
        let record = self.record_accepted(principal, &admitted).await?;
        self.launch(principal, admitted, record.clone());
        Ok(record)
    }

    /// Everything that may refuse a command before it exists: shutdown, the cluster, argv
    /// mode's policy, a free slot, and credentials for the relay (a caller who cannot be
    /// mapped to a Kubernetes identity is refused here).
    fn admit(
        &self,
        principal: &Principal,
        spec: CommandSpec,
        break_glass: Option<GrantUse>,
    ) -> Result<Admitted, RunError> {
        if self.accepting.is_cancelled() {
            return Err(RunError::ShuttingDown);
        }
        if !self.store.is_healthy() {
            return Err(RunError::StoreUnavailable);
        }
        let cluster = self
            .config
            .cluster(&spec.cluster)
            .ok_or_else(|| RunError::ClusterNotFound {
                cluster: spec.cluster.clone(),
            })?
            .clone();
        let argv = plan_argv(&cluster.name, &cluster.exec, &spec.command)?;
        if cluster.pod.is_some() {
            // the files travel in a Secret, which Kubernetes caps
            let total: usize = spec.files.iter().map(|f| f.content.len()).sum();
            if total > crate::exec::pod::MAX_SECRET_FILE_BYTES {
                return Err(InvalidRequest::OverLimit {
                    what: "attached files (all together)",
                    limit: "the pod executor's Secret size (Kubernetes caps a Secret at 1 MiB)",
                    max: format!("{} bytes", crate::exec::pod::MAX_SECRET_FILE_BYTES),
                    got: format!("{total} bytes"),
                }
                .into());
            }
        }
        let principal_permit =
            self.principal_slots
                .try_acquire(&principal.id)
                .ok_or_else(|| RunError::TooManyCommandsForPrincipal {
                    principal: principal.id.clone(),
                    limit: self.principal_slots.limit(),
                })?;
        let permit: OwnedSemaphorePermit =
            self.slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| RunError::TooManyCommands {
                    limit: self.config.limits.max_concurrent_commands,
                })?;
        let id = CommandId::random().map_err(RunError::Random)?;
        let token = self.issue_token(&cluster, principal, &id, &spec, break_glass.as_ref())?;
        Ok(Admitted {
            id,
            cluster,
            argv,
            spec,
            permit: (permit, principal_permit),
            token,
            break_glass,
        })
    }

    /// The command's own credentials: a relay token bound to this command and to an
    /// identity the relay can send whole; `None` when its cluster has no API server.
    /// Revoked again if the command never starts.
    fn issue_token(
        &self,
        cluster: &ClusterConfig,
        principal: &Principal,
        id: &CommandId,
        spec: &CommandSpec,
        break_glass: Option<&GrantUse>,
    ) -> Result<Option<(PendingToken, String)>, RunError> {
        let Some(relay) = self
            .relay
            .as_ref()
            .filter(|r| r.serves(cluster.name.as_str()))
        else {
            return Ok(None);
        };
        let identity = identity_for(&cluster.identity, principal, id.as_str(), break_glass)
            .map_err(|source| {
                tracing::info!(
                    // Debug: the id may hold the very control characters refused here
                    principal = ?principal.id,
                    cluster = %cluster.name,
                    error = %source,
                    "command refused: no Kubernetes identity"
                );
                RunError::NoKubeIdentity {
                    cluster: cluster.name.to_string(),
                    source: Box::new(source),
                }
            })?;
        let startup = cluster
            .pod
            .as_ref()
            .map(|p| p.startup_timeout)
            .unwrap_or_default();
        let issued = relay
            .issue(
                Binding {
                    command_id: id.to_string(),
                    cluster: cluster.name.to_string(),
                    principal: principal.id.clone(),
                    identity,
                    // revoked when the command ends; this bounds a token that is never
                    // revoked
                    deadline: std::time::Instant::now()
                        + startup
                        + spec.timeout
                        + self.config.limits.kill_grace
                        + Duration::from_secs(60),
                },
                cluster.pod.is_some(),
            )
            .map_err(|err| match err {
                RelayError::Random(e) => RunError::Random(e),
                other => RunError::Relay(other.to_string()),
            })?;
        let pending = PendingToken {
            relay: relay.clone(),
            key: Some(issued.key),
        };
        Ok(Some((pending, issued.kubeconfig)))
    }

    /// Audits (durably) and stores the admitted command before it runs: no command
    /// without a durable trace, and a crash from here on leaves a record that is marked
    /// failed at restart.
    async fn record_accepted(
        &self,
        principal: &Principal,
        admitted: &Admitted,
    ) -> Result<CommandRecord, RunError> {
        let spec = &admitted.spec;
        let record = CommandRecord {
            id: admitted.id.clone(),
            cluster: admitted.cluster.name.to_string(),
            principal: principal.id.clone(),
            command: spec.command.clone(),
            files: spec.files.iter().map(FileInfo::of).collect(),
            timeout: spec.timeout,
            // a Pod must be scheduled and started first
            state: if admitted.cluster.pod.is_some() {
                CommandState::Pending
            } else {
                CommandState::Running
            },
            exit_code: None,
            started_at: SystemTime::now(),
            finished_at: None,
            reason: String::new(),
            output: Vec::new(),
            output_size: 0,
            output_truncated: false,
            break_glass: admitted.break_glass.clone(),
        };
        self.audit
            .record_durable(AuditEvent::CommandAccepted {
                command_id: record.id.to_string(),
                cluster: record.cluster.clone(),
                principal: principal.id.clone(),
                source: principal.source.to_string(),
                command: record.command.clone(),
                files: record
                    .files
                    .iter()
                    .map(|f| AuditFile {
                        path: f.path.clone(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                    })
                    .collect(),
                timeout_ms: crate::audit::duration_ms(record.timeout),
                break_glass: record.break_glass.as_ref().map(|g| AuditGrantUse {
                    grant_id: g.id.clone(),
                    justification: g.justification.clone(),
                }),
            })
            .await
            .map_err(|_| RunError::AuditUnavailable)?;
        self.store
            .put(record.clone())
            .await
            .map_err(|err| match err {
                err if err.is_unavailable() => RunError::StoreUnavailable,
                err => RunError::Store(err),
            })?;
        Ok(record)
    }

    /// Runs the recorded command on its executor, in a task of its own: a caller that
    /// goes away does not stop it. The task revokes the token, stores the outcome and
    /// frees the slot.
    fn launch(self: &Arc<Self>, principal: &Principal, admitted: Admitted, record: CommandRecord) {
        let Admitted {
            id,
            cluster,
            argv,
            spec,
            permit,
            token,
            break_glass: _,
        } = admitted;
        let output = Arc::new(OutputLog::with_head(
            self.config.limits.max_output_bytes,
            self.config.limits.output_head_bytes(),
        ));
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        let progress = Progress::new(record.state);
        let running = Arc::new(Running {
            progress: progress.clone(),
            record,
            output: output.clone(),
            cancel: cancel.clone(),
            cancel_reason: Mutex::new(None),
            done: done_rx,
        });
        self.running_map().insert(id.clone(), running.clone());
        tracing::info!(
            command_id = %id,
            cluster = %cluster.name,
            principal = %principal.id,
            subject = %principal.subject,
            source = %principal.source,
            files = running.record.files.len(),
            "command started"
        );

        // from here the command owns its token and revokes it when it ends
        let (relay_key, kubeconfig) = match token {
            Some((pending, kubeconfig)) => (pending.hand_over(), Some(kubeconfig)),
            None => (None, None),
        };
        let job = Job {
            id,
            argv,
            spec,
            exec: cluster.exec.clone(),
            cluster: cluster.name.clone(),
            output,
            cancel,
            kubeconfig: kubeconfig.map(SecretText),
            progress: progress.clone(),
        };
        if progress.state() == CommandState::Pending {
            // the store follows, so `list` and other readers see it start
            let (store, id) = (self.store.clone(), running.record.id.clone());
            let mut state = progress.subscribe();
            self.tasks.spawn(async move {
                if state.wait_for(|s| *s != CommandState::Pending).await.is_ok()
                    && let Err(err) = store.mark_running(&id).await
                {
                    tracing::warn!(command_id = %id, %err, "could not record that the command runs");
                }
            });
        }
        let this = self.clone();
        crate::metrics::metrics().command_started(cluster.name.as_str());
        // one span per command: every log line of its life names it
        let span = tracing::info_span!("command", command_id = %running.record.id, cluster = %cluster.name);
        let task = async move {
            this.audit.record(AuditEvent::CommandStarted {
                command_id: running.record.id.to_string(),
                cluster: running.record.cluster.clone(),
            });
            let outcome = this.executor.run(job).await;
            // the token dies with the command
            if let (Some(relay), Some(key)) = (&this.relay, &relay_key) {
                relay.revoke(key);
            }
            this.finish(&running, outcome).await;
            this.running_map().remove(&running.record.id);
            // free the slot before waking waiters, so a caller that saw this command end
            // can start the next one at once
            drop(permit);
            let _ = done_tx.send(true);
        };
        self.tasks.spawn(task.instrument(span));
    }

    async fn finish(&self, running: &Running, outcome: Outcome) {
        let output = running.output.close();
        let mut record = running.record.clone();
        record.state = outcome.state;
        record.exit_code = outcome.exit_code;
        record.finished_at = Some(SystemTime::now());
        record.reason = match outcome.state {
            CommandState::Canceled => running
                .cancel_reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or(outcome.reason),
            _ => outcome.reason,
        };
        record.output_size = output.total;
        record.output_truncated = output.truncated;
        record.output = output.data;
        self.audit.record(AuditEvent::CommandFinished {
            command_id: record.id.to_string(),
            cluster: record.cluster.clone(),
            state: record.state.as_str().to_owned(),
            exit_code: record.exit_code,
            duration_ms: record
                .finished_at
                .and_then(|f| f.duration_since(record.started_at).ok())
                .map(crate::audit::duration_ms)
                .unwrap_or_default(),
            output_bytes: output.total,
            output_sha256: output.sha256.unwrap_or_default(),
            reason: record.reason.clone(),
        });
        let elapsed = record
            .finished_at
            .and_then(|f| f.duration_since(record.started_at).ok())
            .unwrap_or_default();
        crate::metrics::metrics().command_finished(
            &record.cluster,
            record.state.as_str(),
            elapsed,
            output.total,
        );
        tracing::info!(
            command_id = %record.id,
            cluster = %record.cluster,
            state = record.state.as_str(),
            exit_code = ?record.exit_code,
            output_bytes = record.output_size,
            duration_ms = crate::audit::duration_ms(elapsed),
            reason = %record.reason,
            "command finished"
        );
        self.keep(record).await;
    }

    /// Stores a finished record; while the store cannot be written, tries again each
    /// time it reports writable (or each second), so a full disk delays a result but
    /// does not lose it. Gives up only when the gateway is shutting down: the record then
    /// stays `Running` in the store, and the next start marks it failed.
    async fn keep(&self, record: CommandRecord) {
        let mut health = self.store.health();
        loop {
            let err = match self.store.put(record.clone()).await {
                Ok(()) => return,
                Err(err) => err,
            };
            if !err.is_unavailable() || self.accepting.is_cancelled() {
                tracing::error!(command_id = %record.id, %err, "could not store the command result");
                return;
            }
            tracing::warn!(command_id = %record.id, %err, "could not store the command result yet; trying again when the store is writable");
            tokio::select! {
                _ = health.wait_for(|ok| *ok) => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.accepting.cancelled() => {}
            }
        }
    }

    /// Follows whether the result store can be written.
    pub fn store_health(&self) -> watch::Receiver<bool> {
        self.store.health()
    }

    /// Tries a write to the result store (see [`Store::probe`]).
    pub async fn probe_store(&self) -> Result<(), RunError> {
        Ok(self.store.probe().await?)
    }

    /// The record of a command on a cluster, optionally after waiting for it to end.
    pub async fn result(
        &self,
        cluster: &str,
        id: &str,
        wait: bool,
    ) -> Result<CommandRecord, RunError> {
        let not_found = || RunError::CommandNotFound {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
        };
        let id = CommandId::parse(id).ok_or_else(not_found)?;
        let running = self.running_map().get(&id).cloned();
        if let Some(running) = running {
            if running.record.cluster != cluster {
                return Err(not_found());
            }
            if !wait {
                let mut record = running.record.clone();
                record.state = running.progress.state();
                let out = running.output.snapshot();
                record.output_size = out.total;
                record.output_truncated = out.truncated;
                record.output = out.data;
                return Ok(record);
            }
            let mut done = running.done.clone();
            // an error means the task is gone, which also means it is done
            let _ = done.wait_for(|d| *d).await;
        }
        match self.store.get(&id).await? {
            Some(record) if record.cluster == cluster => Ok(record),
            _ => Err(not_found()),
        }
    }

    /// How to follow a command's output.
    pub async fn follow(&self, cluster: &str, id: &str) -> Result<Follow, RunError> {
        let not_found = || RunError::CommandNotFound {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
        };
        let cid = CommandId::parse(id).ok_or_else(not_found)?;
        let running = self.running_map().get(&cid).cloned();
        if let Some(running) = running {
            if running.record.cluster != cluster {
                return Err(not_found());
            }
            return Ok(Follow::Live(running.output.clone()));
        }
        self.result(cluster, id, false)
            .await
            .map(|r| Follow::Finished(Box::new(r)))
    }

    /// Stops a running command and returns its final record; a finished command's
    /// record is returned unchanged.
    pub async fn cancel(
        &self,
        cluster: &str,
        id: &str,
        reason: String,
    ) -> Result<CommandRecord, RunError> {
        if let Some(cid) = CommandId::parse(id) {
            let running = self.running_map().get(&cid).cloned();
            if let Some(running) = running.filter(|r| r.record.cluster == cluster) {
                running.request_cancel(reason);
            }
        }
        self.result(cluster, id, true).await
    }

    /// Newest-first records.
    pub async fn list(&self, query: ListQuery) -> Result<Vec<CommandRecord>, RunError> {
        Ok(self.store.list(query).await?)
    }

    /// Number of commands running now.
    pub fn running_count(&self) -> usize {
        self.running_map().len()
    }

    /// How many followers a running command's live output has (`None` when it is not
    /// running): a follower whose client went away must not count.
    pub fn followers(&self, id: &str) -> Option<usize> {
        let id = CommandId::parse(id)?;
        self.running_map().get(&id).map(|r| r.output.followers())
    }

    /// Refuses new commands, lets running ones finish for `grace`, then cancels the rest
    /// and waits until they are recorded.
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.cancel();
        self.tasks.close();
        let running = self.running_count();
        if running > 0 {
            tracing::info!(running, grace = %humantime::format_duration(grace), "waiting for running commands to finish");
        }
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            let left: Vec<Arc<Running>> = self.running_map().values().cloned().collect();
            tracing::warn!(
                canceled = left.len(),
                "shutdown grace period over; canceling running commands"
            );
            for running in left {
                running.request_cancel(SHUTDOWN_REASON.to_owned());
            }
            self.tasks.wait().await;
        }
    }

    /// Deletes records past their retention.
    pub async fn purge_expired(&self) -> Result<usize, RunError> {
        Ok(self.store.purge_expired(self.config.retention).await?)
    }
}

impl Running {
    fn request_cancel(&self, reason: String) {
        let mut slot = self
            .cancel_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // the first reason wins: a later shutdown does not rewrite a user's cancel
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{AuditConfig, FsyncPolicy};
    use crate::authn::AuthMethod;
    use crate::command::ClusterName;
    use crate::exec::ExecSettings;
    use crate::exec::local::LocalExecutor;
    use crate::sandbox::SandboxMode;

    /// A runner over one unsandboxed shell cluster `c` (the sandbox has its own tests),
    /// with its store and audit log in `dir`.
    fn runner(dir: &std::path::Path, limits: Limits) -> Arc<Runner> {
        let cluster = ClusterConfig {
            name: ClusterName::parse("c").unwrap(),
            exec: ExecSettings {
                sandbox: SandboxMode::Off,
                ..ExecSettings::default()
            },
            api: None,
            identity: Default::default(),
            description: String::new(),
            disable_run_command: false,
            authorized_ip_ranges: Default::default(),
            pod: None,
        };
        let (store, _) = Store::open(&dir.join("kinvoke.db")).unwrap();
        let audit = Audit::open(&AuditConfig {
            path: dir.join("audit.jsonl"),
            fsync: FsyncPolicy::Batch(Duration::from_millis(1)),
            max_file_bytes: 1 << 20,
            tracing: false,
            replica: None,
        })
        .unwrap();
        let executor = Arc::new(LocalExecutor::new(limits.kill_grace, None, None));
        Runner::new(
            RunnerSettings {
                clusters: vec![cluster],
                limits,
                retention: Duration::from_secs(3600),
            },
            store,
            executor,
            audit,
            None,
        )
    }

    fn alice() -> Principal {
        Principal {
            id: "alice".into(),
            groups: Vec::new(),
            claims: Default::default(),
            subject: String::new(),
            auth_method: AuthMethod::Mtls,
            source: "10.0.0.7".parse().unwrap(),
            listener: "main".into(),
        }
    }

    fn spec(command: &str) -> CommandSpec {
        CommandSpec {
            cluster: "c".into(),
            command: command.into(),
            files: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_started_command_is_recorded_running_then_finished_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let runner = runner(dir.path(), Limits::default());
        let started = runner
            .start(&alice(), spec("echo hi; exit 4"), None)
            .await
            .unwrap();
        assert_eq!(started.state, CommandState::Running);
        assert_eq!(started.principal, "alice");
        let done = runner.result("c", started.id.as_str(), true).await.unwrap();
        assert_eq!(done.state, CommandState::Succeeded);
        assert_eq!(done.exit_code, Some(4));
        assert_eq!(done.output, b"hi\n");
        assert_eq!(runner.running_count(), 0);
        // another cluster's name does not find it
        assert!(matches!(
            runner.result("other", started.id.as_str(), false).await,
            Err(RunError::CommandNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn admission_refuses_unknown_clusters_a_full_gateway_and_a_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let runner = runner(
            dir.path(),
            Limits {
                max_concurrent_commands: 1,
                ..Limits::default()
            },
        );
        let mut other = spec("true");
        other.cluster = "nowhere".into();
        assert!(matches!(
            runner.start(&alice(), other, None).await,
            Err(RunError::ClusterNotFound { .. })
        ));
        let first = runner
            .start(&alice(), spec("sleep 30"), None)
            .await
            .unwrap();
        assert!(matches!(
            runner.start(&alice(), spec("true"), None).await,
            Err(RunError::TooManyCommands { limit: 1 })
        ));
        runner
            .cancel("c", first.id.as_str(), "test".into())
            .await
            .unwrap();
        let canceled = runner.result("c", first.id.as_str(), true).await.unwrap();
        assert_eq!(canceled.state, CommandState::Canceled);
        assert_eq!(canceled.reason, "test");

        runner.shutdown(Duration::ZERO).await;
        assert!(matches!(
            runner.start(&alice(), spec("true"), None).await,
            Err(RunError::ShuttingDown)
        ));
    }

    #[tokio::test]
    async fn shutdown_cancels_what_runs_past_the_grace_with_the_shutdown_reason() {
        let dir = tempfile::tempdir().unwrap();
        let runner = runner(dir.path(), Limits::default());
        let quick = runner.start(&alice(), spec("true"), None).await.unwrap();
        let slow = runner
            .start(&alice(), spec("sleep 30"), None)
            .await
            .unwrap();
        runner.shutdown(Duration::from_millis(200)).await;
        let quick = runner.result("c", quick.id.as_str(), false).await.unwrap();
        assert_eq!(quick.state, CommandState::Succeeded);
        let slow = runner.result("c", slow.id.as_str(), false).await.unwrap();
        assert_eq!(slow.state, CommandState::Canceled);
        assert_eq!(slow.reason, SHUTDOWN_REASON);
    }
}
