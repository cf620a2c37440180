//! The life of break-glass grants: activate an eligible assignment with a justification
//! and a duration, approve it (two-person rule, never by the requester), revoke it, and
//! record its expiry. Grants are kept in the store (they survive restarts) and mirrored
//! in memory for the authorization check. Every step is audited; activations and
//! approvals are also announced to an optional webhook, whose failure never blocks.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::access::authz::Policy;
use crate::access::grant::{Grant, GrantState};
use crate::audit::{Audit, AuditEvent, AuditUnavailable};
use crate::authn::Principal;
use crate::command::CommandId;
use crate::store::{Store, StoreError};

/// Why a break-glass request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BreakGlassError {
    /// No eligible assignment gives this role to the caller on this cluster.
    #[error(
        "principal {principal} has no eligible (break-glass) assignment for role \"{role}\" on clusters/{cluster}"
    )]
    NotEligible {
        /// Who asked.
        principal: String,
        /// Role asked for.
        role: String,
        /// Cluster.
        cluster: String,
    },
    /// The request breaks the assignment's rules (duration, justification).
    #[error("{0}")]
    Invalid(String),
    /// No such grant (or not visible to the caller).
    #[error("grant \"{0}\" was not found")]
    NotFound(String),
    /// The grant is not in a state that allows this.
    #[error("grant \"{id}\" is {state}, not {wanted}")]
    WrongState {
        /// Grant id.
        id: String,
        /// Its state.
        state: GrantState,
        /// The state the operation needs.
        wanted: GrantState,
    },
    /// The requester tried to approve their own grant.
    #[error("principal {0} requested this grant and cannot approve it (two-person rule)")]
    SelfApproval(String),
    /// The caller may not approve or revoke this grant.
    #[error("principal {principal} may not {what} grant \"{id}\"")]
    NotAllowed {
        /// Who asked.
        principal: String,
        /// `approve` or `revoke`.
        what: &'static str,
        /// Grant id.
        id: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log cannot record it (fail closed).
    #[error(transparent)]
    Audit(#[from] AuditUnavailable),
    /// The random source failed.
    #[error("cannot generate a grant id: {0}")]
    Random(getrandom::Error),
}

/// Where break-glass reads the time: the system clock, or a test's own.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Break-glass grants of this gateway.
pub struct BreakGlass {
    policy: Arc<Policy>,
    clock: Clock,
    store: Store,
    audit: Audit,
    grants: RwLock<Vec<Grant>>,
    notifier: Option<Notifier>,
}

impl BreakGlass {
    /// Loads the stored grants; activations and approvals follow `policy` and are
    /// announced to `webhook`.
    pub async fn load(
        policy: Arc<Policy>,
        webhook: Option<&Webhook>,
        store: Store,
        audit: Audit,
    ) -> Result<Arc<Self>, StoreError> {
        Self::load_with_clock(policy, webhook, store, audit, Arc::new(SystemTime::now)).await
    }

    /// [`BreakGlass::load`] reading the time from `clock` (tests move it by hand instead
    /// of waiting for grants to expire).
    pub async fn load_with_clock(
        policy: Arc<Policy>,
        webhook: Option<&Webhook>,
        store: Store,
        audit: Audit,
        clock: Clock,
    ) -> Result<Arc<Self>, StoreError> {
        let grants = store.grants().await?;
        let notifier = match webhook {
            Some(w) => match Notifier::new(w) {
                Ok(n) => Some(n),
                Err(err) => {
                    tracing::error!(%err, "break-glass webhook disabled");
                    None
                }
            },
            None => None,
        };
        Ok(Arc::new(Self {
            policy,
            clock,
            store,
            audit,
            grants: RwLock::new(grants),
            notifier,
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Grant>> {
        // writers replace whole entries, so a poisoned lock still holds valid grants
        self.grants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Grant>> {
        self.grants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The grants of a principal that may be in force (for authorization).
    pub fn grants_of(&self, principal: &str) -> Vec<Grant> {
        self.read()
            .iter()
            .filter(|g| g.principal == principal && g.state == GrantState::Active)
            .cloned()
            .collect()
    }

    fn get(&self, id: &str) -> Result<Grant, BreakGlassError> {
        self.read()
            .iter()
            .find(|g| g.id == id)
            .cloned()
            .ok_or_else(|| BreakGlassError::NotFound(id.to_owned()))
    }

    async fn save(&self, grant: Grant) -> Result<(), BreakGlassError> {
        self.store.put_grant(grant.clone()).await?;
        let mut grants = self.write();
        match grants.iter_mut().find(|g| g.id == grant.id) {
            Some(slot) => *slot = grant,
            None => grants.insert(0, grant),
        }
        Ok(())
    }

    /// Activates an eligible assignment; the grant is pending when approval is needed.
    pub async fn activate(
        &self,
        who: &Principal,
        cluster: &str,
        role: &str,
        justification: &str,
        duration: Duration,
    ) -> Result<Grant, BreakGlassError> {
        let assignment = self
            .policy
            .eligible_for(who, cluster, role)
            .ok_or_else(|| BreakGlassError::NotEligible {
                principal: who.id.clone(),
                role: role.to_owned(),
                cluster: cluster.to_owned(),
            })?;
        let Some(rules) = &assignment.eligibility else {
            return Err(BreakGlassError::NotEligible {
                principal: who.id.clone(),
                role: role.to_owned(),
                cluster: cluster.to_owned(),
            });
        };
        if duration.is_zero() || duration > rules.max_duration {
            return Err(BreakGlassError::Invalid(format!(
                "duration must be between 1s and {} (max_duration of assignment \"{}\")",
                humantime::format_duration(rules.max_duration),
                assignment.name
            )));
        }
        rules
            .justification
            .check(justification)
            .map_err(BreakGlassError::Invalid)?;
        let now = (self.clock)();
        let mut grant = Grant {
            id: CommandId::random()
                .map_err(BreakGlassError::Random)?
                .to_string(),
            assignment: assignment.name.clone(),
            cluster: cluster.to_owned(),
            role: role.to_owned(),
            principal: who.id.clone(),
            justification: justification.trim().to_owned(),
            duration,
            state: GrantState::Pending,
            requested_at: now,
            starts_at: None,
            expires_at: None,
            approved_by: None,
            revoked_by: None,
            approval_from: rules.approval_from.as_ref().map(|s| s.to_string()),
        };
        if rules.approval_from.is_none() {
            grant.activate(now);
        }
        // audited durably before it exists: no access without its trace
        self.audit
            .record_durable(AuditEvent::BreakGlassActivated {
                grant_id: grant.id.clone(),
                assignment: grant.assignment.clone(),
                cluster: grant.cluster.clone(),
                role: grant.role.clone(),
                principal: grant.principal.clone(),
                source: who.source.to_string(),
                justification: grant.justification.clone(),
                duration_ms: crate::audit::duration_ms(duration),
                state: grant.state.as_str(),
                approval_from: grant.approval_from.clone(),
            })
            .await?;
        self.save(grant.clone()).await?;
        self.notify("break_glass_activated", &grant);
        Ok(grant)
    }

    /// Approves a pending grant; it runs for its duration from now.
    pub async fn approve(&self, who: &Principal, id: &str) -> Result<Grant, BreakGlassError> {
        let mut grant = self.get(id)?;
        let now = (self.clock)();
        if !self.policy.may_approve(who, &grant.assignment) && grant.principal != who.id {
            // not an approver and not theirs: do not reveal the grant
            return Err(BreakGlassError::NotFound(id.to_owned()));
        }
        if grant.principal == who.id {
            return Err(BreakGlassError::SelfApproval(who.id.clone()));
        }
        if grant.state_at(now) != GrantState::Pending {
            return Err(BreakGlassError::WrongState {
                id: id.to_owned(),
                state: grant.state_at(now),
                wanted: GrantState::Pending,
            });
        }
        grant.activate(now);
        grant.approved_by = Some(who.id.clone());
        self.audit
            .record_durable(AuditEvent::BreakGlassApproved {
                grant_id: grant.id.clone(),
                approver: who.id.clone(),
                principal: grant.principal.clone(),
                expires_at: grant.expires_at.map(rfc3339).unwrap_or_default(),
            })
            .await?;
        self.save(grant.clone()).await?;
        self.notify("break_glass_approved", &grant);
        Ok(grant)
    }

    /// Ends a pending or active grant now; the requester or an approver may.
    pub async fn revoke(&self, who: &Principal, id: &str) -> Result<Grant, BreakGlassError> {
        let mut grant = self.get(id)?;
        let now = (self.clock)();
        let approver = self.policy.may_approve(who, &grant.assignment);
        if grant.principal != who.id && !approver {
            return Err(BreakGlassError::NotFound(id.to_owned()));
        }
        let state = grant.state_at(now);
        if !matches!(state, GrantState::Pending | GrantState::Active) {
            return Err(BreakGlassError::WrongState {
                id: id.to_owned(),
                state,
                wanted: GrantState::Active,
            });
        }
        grant.state = GrantState::Revoked;
        grant.revoked_by = Some(who.id.clone());
        // the in-memory copy goes first: from here on the grant gives nothing, even if
        // the store write below fails
        {
            let mut grants = self.write();
            if let Some(slot) = grants.iter_mut().find(|g| g.id == grant.id) {
                *slot = grant.clone();
            }
        }
        self.audit.record(AuditEvent::BreakGlassRevoked {
            grant_id: grant.id.clone(),
            by: who.id.clone(),
        });
        self.save(grant.clone()).await?;
        Ok(grant)
    }

    /// Grants the caller may see: their own, those they may approve, and with
    /// `read_all(cluster)` every grant on that cluster.
    pub fn list(
        &self,
        who: &Principal,
        cluster: Option<&str>,
        include_inactive: bool,
        read_all: impl Fn(&str) -> bool,
    ) -> Vec<Grant> {
        let now = (self.clock)();
        self.read()
            .iter()
            .filter(|g| cluster.is_none_or(|c| c == g.cluster))
            .filter(|g| {
                include_inactive
                    || matches!(g.state_at(now), GrantState::Pending | GrantState::Active)
            })
            .filter(|g| {
                g.principal == who.id
                    || self.policy.may_approve(who, &g.assignment)
                    || read_all(&g.cluster)
            })
            .cloned()
            .map(|mut g| {
                g.state = g.state_at(now);
                g
            })
            .collect()
    }

    /// Records grants that expired (or lapsed unapproved) since the last call, and sets
    /// the active-grants gauge (called each second).
    pub async fn expire_due(&self) {
        let now = (self.clock)();
        let due: Vec<Grant> = self
            .read()
            .iter()
            .filter(|g| {
                matches!(g.state, GrantState::Active | GrantState::Pending)
                    && g.state_at(now) == GrantState::Expired
            })
            .cloned()
            .collect();
        for mut grant in due {
            grant.state = GrantState::Expired;
            self.audit.record(AuditEvent::BreakGlassExpired {
                grant_id: grant.id.clone(),
                principal: grant.principal.clone(),
            });
            if let Err(err) = self.save(grant).await {
                tracing::warn!(%err, "could not record a grant's expiry");
            }
        }
        let active = self
            .read()
            .iter()
            .filter(|g| g.state_at(now) == GrantState::Active)
            .count();
        crate::metrics::metrics()
            .breakglass_active_grants
            .set(i64::try_from(active).unwrap_or(i64::MAX));
    }

    fn notify(&self, event: &'static str, grant: &Grant) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        let body = serde_json::json!({
            "event": event,
            "grant": {
                "id": grant.id,
                "cluster": grant.cluster,
                "role": grant.role,
                "principal": grant.principal,
                "justification": grant.justification,
                "state": grant.state.as_str(),
                "duration_seconds": grant.duration.as_secs(),
                "expires_at": grant.expires_at.map(rfc3339),
                "approved_by": grant.approved_by,
                "approval_from": grant.approval_from,
            }
        });
        let notifier = notifier.clone();
        let audit = self.audit.clone();
        let grant_id = grant.id.clone();
        tokio::spawn(async move {
            if let Err(error) = notifier.send(&body).await {
                tracing::warn!(%error, grant_id, "break-glass webhook failed");
                audit.record(AuditEvent::BreakGlassNotificationFailed { grant_id, error });
            }
        });
    }
}

/// RFC 3339 text of a time.
pub fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Attempts per webhook notification.
const WEBHOOK_ATTEMPTS: u32 = 3;

/// Posts break-glass events to the configured webhook, with bounded retries.
#[derive(Clone)]
struct Notifier {
    url: String,
    http: reqwest::Client,
}

impl Notifier {
    fn new(hook: &Webhook) -> Result<Self, String> {
        let http =
            crate::outbound_https::client(hook.ca_cert.as_deref(), Duration::from_secs(5), false)?;
        Ok(Self {
            url: hook.url.clone(),
            http,
        })
    }

    async fn send(&self, body: &serde_json::Value) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..WEBHOOK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            match self
                .http
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .and_then(|r| r.error_for_status())
            {
                Ok(_) => return Ok(()),
                Err(err) => last = crate::outbound_https::describe(&err),
            }
        }
        Err(format!(
            "{} after {WEBHOOK_ATTEMPTS} attempts: {last}",
            self.url
        ))
    }
}
/// Where break-glass activity is announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `https://...` (or `http://` to a loopback address).
    pub url: String,
    /// Extra CA (PEM) to trust for it.
    pub ca_cert: Option<std::path::PathBuf>,
}
