//! Break-glass grants: time-bound activations of an eligible assignment. A grant is
//! `Pending` until approved (when the assignment requires approval), then `Active` from
//! its start until it expires or is revoked. Expiry is a matter of time, so a grant stops
//! at once, whatever the background bookkeeping does.

use std::fmt;
use std::time::{Duration, SystemTime};

/// What a justification must look like.
#[derive(Debug, Clone)]
pub enum JustificationRule {
    /// Any non-empty text.
    FreeText,
    /// Text matching this pattern, e.g. a ticket id `INC-\d+`.
    Pattern(regex::Regex),
}

impl PartialEq for JustificationRule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::FreeText, Self::FreeText) => true,
            (Self::Pattern(a), Self::Pattern(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for JustificationRule {}

impl JustificationRule {
    /// Checks a justification; the error says what is expected.
    pub fn check(&self, text: &str) -> Result<(), String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a justification is required".to_owned());
        }
        if text.len() > 1024 {
            return Err("the justification is longer than 1024 bytes".to_owned());
        }
        match self {
            Self::FreeText => Ok(()),
            Self::Pattern(re) if re.is_match(text) => Ok(()),
            Self::Pattern(re) => Err(format!(
                "the justification must match the pattern {} (e.g. a ticket id)",
                re.as_str()
            )),
        }
    }
}

/// How an assignment may be activated instead of being always in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eligibility {
    /// Longest activation.
    pub max_duration: Duration,
    /// What the justification must be.
    pub justification: JustificationRule,
    /// Who must approve (never the requester); `None` = no approval.
    pub approval_from: Option<super::authz::Subject>,
}

/// Stored lifecycle of a grant; `Expired` is derived from time for active grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantState {
    /// Waiting for approval.
    Pending,
    /// In force between `starts_at` and `expires_at`.
    Active,
    /// Past `expires_at` (or never approved in time).
    Expired,
    /// Ended early.
    Revoked,
}

impl GrantState {
    /// Name used in the store, audit and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Active => "Active",
            Self::Expired => "Expired",
            Self::Revoked => "Revoked",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Pending, Self::Active, Self::Expired, Self::Revoked]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

impl fmt::Display for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a pending request waits for an approver before it lapses.
pub const PENDING_TTL: Duration = Duration::from_secs(24 * 3600);

/// One break-glass grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// 32 hex characters.
    pub id: String,
    /// The eligible assignment it activates.
    pub assignment: String,
    /// Cluster.
    pub cluster: String,
    /// Role.
    pub role: String,
    /// Requester.
    pub principal: String,
    /// Why.
    pub justification: String,
    /// Requested length.
    pub duration: Duration,
    /// Stored state.
    pub state: GrantState,
    /// When it was requested.
    pub requested_at: SystemTime,
    /// When it came into force.
    pub starts_at: Option<SystemTime>,
    /// When it stops.
    pub expires_at: Option<SystemTime>,
    /// Approver, if approval was required.
    pub approved_by: Option<String>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// Whose approval it needs, for display.
    pub approval_from: Option<String>,
}

impl Grant {
    /// The state at `now`: an active grant past its expiry is `Expired`, and so is a
    /// pending one nobody approved within [`PENDING_TTL`].
    pub fn state_at(&self, now: SystemTime) -> GrantState {
        match self.state {
            GrantState::Active if self.expires_at.is_some_and(|e| now >= e) => GrantState::Expired,
            GrantState::Pending
                if now
                    .duration_since(self.requested_at)
                    .is_ok_and(|age| age >= PENDING_TTL) =>
            {
                GrantState::Expired
            }
            s => s,
        }
    }

    /// True while the grant gives its role.
    pub fn in_force(&self, now: SystemTime) -> bool {
        self.state_at(now) == GrantState::Active && self.starts_at.is_some_and(|s| now >= s)
    }

    /// Puts a grant into force from `now` for its duration.
    pub fn activate(&mut self, now: SystemTime) {
        self.state = GrantState::Active;
        self.starts_at = Some(now);
        self.expires_at = Some(now + self.duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            id: "g".into(),
            assignment: "a".into(),
            cluster: "prod".into(),
            role: "Cluster Admin".into(),
            principal: "alice".into(),
            justification: "INC-1".into(),
            duration: Duration::from_secs(60),
            state: GrantState::Pending,
            requested_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
            starts_at: None,
            expires_at: None,
            approved_by: None,
            revoked_by: None,
            approval_from: None,
        }
    }

    #[test]
    fn a_grant_is_in_force_only_between_activation_and_expiry() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut g = grant();
        assert!(!g.in_force(t(1000)));
        g.activate(t(1010));
        assert!(g.in_force(t(1010)));
        assert!(g.in_force(t(1069)));
        assert!(!g.in_force(t(1070)));
        assert_eq!(g.state_at(t(1070)), GrantState::Expired);
        g.state = GrantState::Revoked;
        assert!(!g.in_force(t(1020)));
    }

    #[test]
    fn unapproved_requests_lapse() {
        let g = grant();
        assert_eq!(
            g.state_at(g.requested_at + PENDING_TTL),
            GrantState::Expired
        );
        assert_eq!(g.state_at(g.requested_at), GrantState::Pending);
    }

    #[test]
    fn justification_rules() {
        let ticket = JustificationRule::Pattern(regex::Regex::new(r"^INC-\d+").unwrap());
        assert!(ticket.check("INC-1234: etcd full").is_ok());
        assert!(ticket.check("etcd full").unwrap_err().contains("INC-"));
        assert!(JustificationRule::FreeText.check("  ").is_err());
        assert!(JustificationRule::FreeText.check("why not").is_ok());
    }
}
