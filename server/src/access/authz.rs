//! Authorization: may this principal do this action on this cluster? A pure function of
//! the policy (roles, assignments, cluster gates) and the caller. Deny by default; an
//! allow names the assignment that granted it, a deny says why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use crate::access::cidr::CidrSet;
use crate::access::grant::{Eligibility, Grant};
use crate::authn::Principal;

/// What a caller may do, named after the AKS permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Start commands; read, stream and cancel one's own.
    RunCommand,
    /// Read one's own results.
    ReadResults,
    /// Read anyone's results on the cluster.
    ReadAllResults,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 3] = [Self::RunCommand, Self::ReadResults, Self::ReadAllResults];

    /// The action's name in config, messages and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunCommand => "runcommand/action",
            Self::ReadResults => "commandResults/read",
            Self::ReadAllResults => "commandResults/readAll",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named bundle of actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Name, e.g. `Command Invoker`.
    pub name: String,
    /// What it allows.
    pub actions: BTreeSet<Action>,
}

/// The built-in roles: `Command Invoker`, `Command Auditor`, `Cluster Admin`.
pub fn builtin_roles() -> Vec<Role> {
    use Action::*;
    vec![
        Role {
            name: "Command Invoker".to_owned(),
            actions: [RunCommand, ReadResults].into(),
        },
        Role {
            name: "Command Auditor".to_owned(),
            actions: [ReadResults, ReadAllResults].into(),
        },
        Role {
            name: "Cluster Admin".to_owned(),
            actions: [RunCommand, ReadResults, ReadAllResults].into(),
        },
    ]
}

/// Who an assignment applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One principal id.
    Principal(String),
    /// Members of a group.
    Group(String),
    /// Principals whose token claims have all these values (e.g. a CI repository and ref).
    Claims(BTreeMap<String, String>),
}

impl Subject {
    /// True when the principal is this subject.
    pub fn matches(&self, who: &Principal) -> bool {
        match self {
            Self::Principal(id) => &who.id == id,
            Self::Group(g) => who.groups.iter().any(|x| x == g),
            Self::Claims(wanted) => {
                !wanted.is_empty()
                    && wanted.iter().all(|(k, v)| {
                        who.claims
                            .get(k)
                            .is_some_and(|values| values.iter().any(|x| x == v))
                    })
            }
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Principal(id) => write!(f, "principal {id}"),
            Self::Group(g) => write!(f, "group {g}"),
            Self::Claims(c) => {
                let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "claims {}", parts.join(","))
            }
        }
    }
}

/// Where an assignment applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `clusters/*`.
    AllClusters,
    /// `clusters/<name>`.
    Cluster(String),
}

impl Scope {
    /// Parses `clusters/<name>` or `clusters/*`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("clusters/")? {
            "*" => Some(Self::AllClusters),
            "" => None,
            name => Some(Self::Cluster(name.to_owned())),
        }
    }

    fn covers(&self, cluster: &str) -> bool {
        match self {
            Self::AllClusters => true,
            Self::Cluster(c) => c == cluster,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllClusters => f.write_str("clusters/*"),
            Self::Cluster(c) => write!(f, "clusters/{c}"),
        }
    }
}

/// A role given to a subject on a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Stable label for decisions and audit, e.g. `assignment[2]` or its configured name.
    pub name: String,
    /// Who.
    pub subject: Subject,
    /// Which role (by name).
    pub role: String,
    /// Where.
    pub scope: Scope,
    /// Set for break-glass assignments: never in force by themselves, only through an
    /// activated grant.
    pub eligibility: Option<Eligibility>,
}

/// Per-cluster gates that apply whatever the role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterGate {
    /// Refuse every command (like AKS `disableRunCommand`).
    pub disable_run_command: bool,
    /// Caller addresses allowed for this cluster; empty = no extra restriction.
    pub authorized_ip_ranges: CidrSet,
}

/// Roles, assignments and cluster gates.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roles: BTreeMap<String, Role>,
    assignments: Vec<Assignment>,
    gates: BTreeMap<String, ClusterGate>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this assignment.
    Allow {
        /// The assignment's label.
        assignment: String,
        /// Its role.
        role: String,
        /// The break-glass grant in force, when it is an eligible assignment.
        grant: Option<GrantUse>,
    },
    /// Refused.
    Deny(Denied),
}

/// The break-glass grant behind an allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantUse {
    /// Grant id.
    pub id: String,
    /// Its justification.
    pub justification: String,
}

/// Why a check refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No assignment grants the action.
    #[error("principal {principal} lacks {action} on clusters/{cluster}")]
    NoAssignment {
        /// Who.
        principal: String,
        /// What.
        action: Action,
        /// Where.
        cluster: String,
    },
    /// Commands are switched off on the cluster.
    #[error("run command is disabled on cluster \"{cluster}\"")]
    RunCommandDisabled {
        /// The cluster.
        cluster: String,
    },
    /// The caller's address is outside the cluster's ranges.
    #[error("source address {address} is not in the authorized IP ranges of cluster \"{cluster}\"")]
    SourceNotAllowed {
        /// The cluster.
        cluster: String,
        /// The caller's address.
        address: IpAddr,
    },
}

/// A policy that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An assignment names a role that does not exist.
    #[error("{assignment}: unknown role \"{role}\" (roles: {known})")]
    UnknownRole {
        /// The assignment.
        assignment: String,
        /// The role asked for.
        role: String,
        /// Known role names.
        known: String,
    },
    /// Two roles share a name.
    #[error(
        "role \"{0}\" is defined twice (built-in roles: Command Invoker, Command Auditor, Cluster Admin)"
    )]
    DuplicateRole(String),
}

impl Policy {
    /// Builds a policy; custom roles are added to the built-in ones.
    pub fn new(
        custom_roles: Vec<Role>,
        assignments: Vec<Assignment>,
        gates: BTreeMap<String, ClusterGate>,
    ) -> Result<Self, PolicyError> {
        let mut roles = BTreeMap::new();
        for role in builtin_roles().into_iter().chain(custom_roles) {
            if roles.contains_key(&role.name) {
                return Err(PolicyError::DuplicateRole(role.name));
            }
            roles.insert(role.name.clone(), role);
        }
        for a in &assignments {
            if !roles.contains_key(&a.role) {
                return Err(PolicyError::UnknownRole {
                    assignment: a.name.clone(),
                    role: a.role.clone(),
                    known: roles.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(Self {
            roles,
            assignments,
            gates,
        })
    }

    /// Why `cluster`'s gate refuses `action` from `source` whatever the caller's roles
    /// (run command disabled, address outside the cluster's ranges), or `None`. The one
    /// evaluation of the gate: authorization and `whoami` both use it.
    pub fn gate_refusal(
        &self,
        cluster: &str,
        action: Action,
        source: std::net::IpAddr,
    ) -> Option<Denied> {
        let gate = self.gates.get(cluster)?;
        if action == Action::RunCommand && gate.disable_run_command {
            return Some(Denied::RunCommandDisabled {
                cluster: cluster.to_owned(),
            });
        }
        if !gate.authorized_ip_ranges.is_empty() && !gate.authorized_ip_ranges.contains(source) {
            return Some(Denied::SourceNotAllowed {
                cluster: cluster.to_owned(),
                address: source,
            });
        }
        None
    }

    /// May `who` do `action` on `cluster`, by active assignments only?
    pub fn check(&self, who: &Principal, action: Action, cluster: &str) -> Decision {
        self.check_with(who, action, cluster, &[], std::time::SystemTime::now())
    }

    /// May `who` do `action` on `cluster`, by active assignments or by one of `grants`
    /// in force at `now` (the grants of this principal)?
    pub fn check_with(
        &self,
        who: &Principal,
        action: Action,
        cluster: &str,
        grants: &[Grant],
        now: std::time::SystemTime,
    ) -> Decision {
        if let Some(denied) = self.gate_refusal(cluster, action, who.source) {
            return Decision::Deny(denied);
        }
        let grants_role = |role: &str| {
            self.roles
                .get(role)
                .is_some_and(|r| r.actions.contains(&action))
        };
        let standing = self.assignments.iter().find(|a| {
            a.eligibility.is_none()
                && a.scope.covers(cluster)
                && a.subject.matches(who)
                && grants_role(&a.role)
        });
        if let Some(a) = standing {
            return Decision::Allow {
                assignment: a.name.clone(),
                role: a.role.clone(),
                grant: None,
            };
        }
        // a grant counts only while its eligible assignment still exists and still
        // covers this principal: removing it from the config ends its grants
        let by_grant = grants.iter().find(|g| {
            g.principal == who.id
                && g.cluster == cluster
                && g.in_force(now)
                && grants_role(&g.role)
                && self.assignments.iter().any(|a| {
                    a.name == g.assignment
                        && a.eligibility.is_some()
                        && a.role == g.role
                        && a.scope.covers(cluster)
                        && a.subject.matches(who)
                })
        });
        match by_grant {
            Some(g) => Decision::Allow {
                assignment: g.assignment.clone(),
                role: g.role.clone(),
                grant: Some(GrantUse {
                    id: g.id.clone(),
                    justification: g.justification.clone(),
                }),
            },
            None => Decision::Deny(Denied::NoAssignment {
                principal: who.id.clone(),
                action,
                cluster: cluster.to_owned(),
            }),
        }
    }

    /// The eligible assignment through which `who` may activate `role` on `cluster`.
    pub fn eligible_for(&self, who: &Principal, cluster: &str, role: &str) -> Option<&Assignment> {
        self.assignments.iter().find(|a| {
            a.eligibility.is_some()
                && a.role == role
                && a.scope.covers(cluster)
                && a.subject.matches(who)
        })
    }

    /// The assignment with this label.
    pub fn assignment(&self, name: &str) -> Option<&Assignment> {
        self.assignments.iter().find(|a| a.name == name)
    }

    /// May `who` approve (or revoke) grants of this eligible assignment? Never their own
    /// request: the caller checks that.
    pub fn may_approve(&self, who: &Principal, assignment: &str) -> bool {
        self.assignment(assignment)
            .and_then(|a| a.eligibility.as_ref())
            .and_then(|e| e.approval_from.as_ref())
            .is_some_and(|approvers| approvers.matches(who))
    }

    /// The actions `who` holds on `cluster` right now (gates applied).
    pub fn effective_actions(
        &self,
        who: &Principal,
        cluster: &str,
        grants: &[Grant],
        now: std::time::SystemTime,
    ) -> Vec<Action> {
        Action::ALL
            .into_iter()
            .filter(|a| {
                matches!(
                    self.check_with(who, *a, cluster, grants, now),
                    Decision::Allow { .. }
                )
            })
            .collect()
    }

    /// True when `who` holds some action on `cluster` by assignment, gates aside
    /// (used to decide whether a cluster is shown to them at all).
    pub fn holds_any(&self, who: &Principal, cluster: &str) -> bool {
        self.assignments
            .iter()
            .any(|a| a.scope.covers(cluster) && a.subject.matches(who))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::AuthMethod;

    fn who(id: &str, groups: &[&str], claims: &[(&str, &str)], source: &str) -> Principal {
        Principal {
            id: id.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect(),
            subject: String::new(),
            auth_method: AuthMethod::Mtls,
            source: source.parse().unwrap(),
            listener: "main".into(),
        }
    }

    fn assignment(name: &str, subject: Subject, role: &str, scope: &str) -> Assignment {
        Assignment {
            name: name.into(),
            subject,
            role: role.into(),
            scope: Scope::parse(scope).unwrap(),
            eligibility: None,
        }
    }

    fn policy() -> Policy {
        let gates = BTreeMap::from([
            ("prod".to_owned(), ClusterGate::default()),
            (
                "frozen".to_owned(),
                ClusterGate {
                    disable_run_command: true,
                    ..ClusterGate::default()
                },
            ),
            (
                "office-only".to_owned(),
                ClusterGate {
                    authorized_ip_ranges: CidrSet::parse(&["10.0.0.0/8"]).unwrap(),
                    ..ClusterGate::default()
                },
            ),
        ]);
        Policy::new(
            vec![Role {
                name: "Reader".into(),
                actions: [Action::ReadResults].into(),
            }],
            vec![
                assignment(
                    "alice-prod",
                    Subject::Principal("alice".into()),
                    "Command Invoker",
                    "clusters/prod",
                ),
                assignment(
                    "sre-all",
                    Subject::Group("sre".into()),
                    "Cluster Admin",
                    "clusters/*",
                ),
                assignment(
                    "auditors",
                    Subject::Group("audit".into()),
                    "Command Auditor",
                    "clusters/*",
                ),
                assignment(
                    "ci-main",
                    Subject::Claims(BTreeMap::from([
                        ("repository".to_owned(), "org/app".to_owned()),
                        ("ref".to_owned(), "refs/heads/main".to_owned()),
                    ])),
                    "Command Invoker",
                    "clusters/prod",
                ),
                assignment(
                    "bob-reader",
                    Subject::Principal("bob".into()),
                    "Reader",
                    "clusters/prod",
                ),
            ],
            gates,
        )
        .unwrap()
    }

    #[test]
    fn decisions_table() {
        use Action::*;
        let p = policy();
        let alice = who("alice", &[], &[], "10.1.1.1");
        let sre = who("sam", &["sre"], &[], "192.0.2.1");
        let auditor = who("ann", &["audit"], &[], "10.1.1.1");
        let ci_main = who(
            "ci",
            &[],
            &[("repository", "org/app"), ("ref", "refs/heads/main")],
            "203.0.113.5",
        );
        let ci_branch = who(
            "ci",
            &[],
            &[("repository", "org/app"), ("ref", "refs/heads/dev")],
            "203.0.113.5",
        );
        let bob = who("bob", &[], &[], "10.1.1.1");
        let nobody = who("eve", &["sre-ish"], &[], "10.1.1.1");
        let cases: Vec<(&Principal, Action, &str, Result<&str, &str>)> = vec![
            (&alice, RunCommand, "prod", Ok("alice-prod")),
            (&alice, ReadResults, "prod", Ok("alice-prod")),
            (
                &alice,
                ReadAllResults,
                "prod",
                Err("lacks commandResults/readAll"),
            ),
            (
                &alice,
                RunCommand,
                "other",
                Err("lacks runcommand/action on clusters/other"),
            ),
            (&sre, RunCommand, "anything", Ok("sre-all")),
            (
                &sre,
                RunCommand,
                "frozen",
                Err("run command is disabled on cluster \"frozen\""),
            ),
            (&sre, ReadAllResults, "frozen", Ok("sre-all")),
            (
                &sre,
                RunCommand,
                "office-only",
                Err("not in the authorized IP ranges"),
            ),
            (&alice, ReadResults, "office-only", Err("lacks")),
            (&auditor, ReadAllResults, "prod", Ok("auditors")),
            (&auditor, RunCommand, "prod", Err("lacks")),
            (&ci_main, RunCommand, "prod", Ok("ci-main")),
            (&ci_branch, RunCommand, "prod", Err("lacks")),
            (&bob, ReadResults, "prod", Ok("bob-reader")),
            (&bob, RunCommand, "prod", Err("lacks")),
            (
                &nobody,
                RunCommand,
                "prod",
                Err("principal eve lacks runcommand/action on clusters/prod"),
            ),
        ];
        for (who, action, cluster, expected) in cases {
            let got = p.check(who, action, cluster);
            match (expected, &got) {
                (Ok(name), Decision::Allow { assignment, .. }) => assert_eq!(assignment, name),
                (Err(text), Decision::Deny(denied)) => {
                    assert!(denied.to_string().contains(text), "{}: {denied}", who.id)
                }
                _ => panic!(
                    "{} {action} {cluster}: expected {expected:?}, got {got:?}",
                    who.id
                ),
            }
        }
    }

    #[test]
    fn effective_actions_apply_gates() {
        let p = policy();
        let sre = who("sam", &["sre"], &[], "192.0.2.1");
        assert_eq!(
            p.effective_actions(&sre, "frozen", &[], std::time::SystemTime::now()),
            vec![Action::ReadResults, Action::ReadAllResults]
        );
        assert!(
            p.effective_actions(&sre, "office-only", &[], std::time::SystemTime::now())
                .is_empty()
        );
        assert!(p.holds_any(&sre, "office-only"));
    }

    #[test]
    fn a_clusters_gate_is_evaluated_in_one_place_whatever_the_role() {
        let p = policy();
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let cases = [
            ("prod", Action::RunCommand, "192.0.2.1", None),
            (
                "frozen",
                Action::RunCommand,
                "10.1.1.1",
                Some("run command is disabled"),
            ),
            ("frozen", Action::ReadResults, "10.1.1.1", None),
            ("office-only", Action::RunCommand, "10.1.1.1", None),
            (
                "office-only",
                Action::ReadResults,
                "192.0.2.1",
                Some("192.0.2.1 is not in the authorized IP ranges"),
            ),
            ("unknown", Action::RunCommand, "192.0.2.1", None),
        ];
        for (cluster, action, source, refused) in cases {
            let got = p
                .gate_refusal(cluster, action, ip(source))
                .map(|d| d.to_string());
            match (refused, &got) {
                (None, None) => {}
                (Some(text), Some(message)) if message.contains(text) => {}
                _ => panic!("{cluster} {action:?} from {source}: {got:?}"),
            }
        }
        // and authorization says the same, even to an admin of every cluster
        let sre = who("sam", &["sre"], &[], "192.0.2.1");
        assert_eq!(
            p.check(&sre, Action::ReadResults, "office-only"),
            Decision::Deny(
                p.gate_refusal("office-only", Action::ReadResults, ip("192.0.2.1"))
                    .unwrap()
            )
        );
    }

    #[test]
    fn unknown_roles_and_duplicates_are_rejected() {
        let err = Policy::new(
            vec![],
            vec![assignment(
                "a",
                Subject::Group("g".into()),
                "Root",
                "clusters/*",
            )],
            BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown role \"Root\""), "{err}");
        let dup = Role {
            name: "Cluster Admin".into(),
            actions: BTreeSet::new(),
        };
        assert!(matches!(
            Policy::new(vec![dup], vec![], BTreeMap::new()),
            Err(PolicyError::DuplicateRole(_))
        ));
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(Scope::parse("clusters/*"), Some(Scope::AllClusters));
        assert_eq!(
            Scope::parse("clusters/prod"),
            Some(Scope::Cluster("prod".into()))
        );
        assert_eq!(Scope::parse("prod"), None);
        assert_eq!(Scope::parse("clusters/"), None);
    }

    #[test]
    fn an_eligible_assignment_gives_nothing_until_a_grant_is_in_force() {
        use crate::access::grant::{GrantState, JustificationRule};
        use std::time::{Duration, SystemTime};
        let mut oncall = assignment(
            "oncall",
            Subject::Group("oncall".into()),
            "Cluster Admin",
            "clusters/prod",
        );
        oncall.eligibility = Some(Eligibility {
            max_duration: Duration::from_secs(1800),
            justification: JustificationRule::FreeText,
            approval_from: Some(Subject::Group("leads".into())),
        });
        let p = Policy::new(vec![], vec![oncall], BTreeMap::new()).unwrap();
        let olga = who("olga", &["oncall"], &[], "10.0.0.1");
        let lead = who("lee", &["leads"], &[], "10.0.0.1");
        let now = SystemTime::now();
        assert!(matches!(
            p.check(&olga, Action::RunCommand, "prod"),
            Decision::Deny(_)
        ));
        assert_eq!(
            p.eligible_for(&olga, "prod", "Cluster Admin").unwrap().name,
            "oncall"
        );
        assert!(p.eligible_for(&olga, "prod", "Command Invoker").is_none());
        assert!(p.eligible_for(&lead, "prod", "Cluster Admin").is_none());
        assert!(p.may_approve(&lead, "oncall"));
        assert!(!p.may_approve(&olga, "oncall"));
        let mut grant = Grant {
            id: "g1".into(),
            assignment: "oncall".into(),
            cluster: "prod".into(),
            role: "Cluster Admin".into(),
            principal: "olga".into(),
            justification: "INC-1".into(),
            duration: Duration::from_secs(600),
            state: GrantState::Pending,
            requested_at: now,
            starts_at: None,
            expires_at: None,
            approved_by: None,
            revoked_by: None,
            approval_from: None,
        };
        let grants = std::slice::from_ref(&grant);
        assert!(matches!(
            p.check_with(&olga, Action::RunCommand, "prod", grants, now),
            Decision::Deny(_)
        ));
        grant.activate(now);
        let grants = std::slice::from_ref(&grant);
        match p.check_with(&olga, Action::RunCommand, "prod", grants, now) {
            Decision::Allow { grant: Some(g), .. } => assert_eq!(g.id, "g1"),
            other => panic!("{other:?}"),
        }
        // not for someone else, not elsewhere, not after expiry
        assert!(matches!(
            p.check_with(&lead, Action::RunCommand, "prod", grants, now),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.check_with(&olga, Action::RunCommand, "other", grants, now),
            Decision::Deny(_)
        ));
        let later = now + Duration::from_secs(601);
        assert!(matches!(
            p.check_with(&olga, Action::RunCommand, "prod", grants, later),
            Decision::Deny(_)
        ));
    }
}
