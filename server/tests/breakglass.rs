//! Break-glass in-process, with a clock the test moves: activation rules, the two-person
//! rule, and expiry, without waiting real time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the value is the failure report"
)]

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kinvoke_gateway::access::grant::GrantState;
use kinvoke_gateway::audit::{Audit, AuditConfig, FsyncPolicy};
use kinvoke_gateway::authn::AuthMethod;
use kinvoke_gateway::authn::Principal;
use kinvoke_gateway::breakglass::{BreakGlass, BreakGlassError, Clock};
use kinvoke_gateway::store::Store;

/// `oncall` may take `Cluster Admin` on `prod` for 30 minutes with an incident
/// number; `solo` may take it without approval, `pair` only with a lead's.
const POLICY: &str = r#"
state_dir = "state"
[[listener]]
address = "127.0.0.1:0"
tls = { cert = "s.crt", key = "s.key", client_ca = "ca.crt" }
[[cluster]]
name = "prod"
[[assignment]]
name = "solo"
principal = "olga"
role = "Cluster Admin"
scope = "clusters/prod"
eligible = true
max_duration = "30m"
require_justification = "^INC-\\d+"
[[assignment]]
name = "pair"
principal = "pete"
role = "Cluster Admin"
scope = "clusters/prod"
eligible = true
max_duration = "30m"
require_approval_from = { group = "leads" }
"#;

fn who(id: &str, groups: &[&str]) -> Principal {
    Principal {
        id: id.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        claims: Default::default(),
        subject: String::new(),
        auth_method: AuthMethod::Mtls,
        source: "10.0.0.1".parse().unwrap(),
        listener: "main".into(),
    }
}

/// Break-glass over the policy, with a clock the test moves.
async fn breakglass(
    dir: &std::path::Path,
) -> (
    Arc<BreakGlass>,
    Arc<Mutex<SystemTime>>,
    (Audit, std::path::PathBuf),
) {
    let config = kinvoke_gateway::config::Config::parse(POLICY, dir).unwrap();
    let (store, _) = Store::open(&dir.join("kinvoke.db")).unwrap();
    let audit_path = dir.join("audit.jsonl");
    let audit = Audit::open(&AuditConfig {
        path: audit_path.clone(),
        fsync: FsyncPolicy::Always,
        max_file_bytes: 1 << 20,
        tracing: false,
        replica: None,
    })
    .unwrap();
    let now = Arc::new(Mutex::new(SystemTime::now()));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || *clock_now.lock().unwrap());
    let bg =
        BreakGlass::load_with_clock(Arc::new(config.policy), None, store, audit.clone(), clock)
            .await
            .unwrap();
    (bg, now, (audit, audit_path))
}

#[tokio::test]
async fn an_eligible_caller_gets_a_grant_that_expires_by_the_clock_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, now, audit) = breakglass(dir.path()).await;
    let olga = who("olga", &[]);
    let grant = bg
        .activate(
            &olga,
            "prod",
            "Cluster Admin",
            "INC-7: etcd full",
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(grant.state, GrantState::Active);
    assert_eq!(bg.grants_of("olga").len(), 1);

    // nine minutes on: still in force; eleven: expired, and the expiry audited
    *now.lock().unwrap() += Duration::from_secs(540);
    bg.expire_due().await;
    assert_eq!(bg.list(&olga, None, false, |_| false).len(), 1);
    *now.lock().unwrap() += Duration::from_secs(120);
    bg.expire_due().await;
    assert!(bg.list(&olga, None, false, |_| false).is_empty());
    let all = bg.list(&olga, None, true, |_| false);
    assert_eq!(all[0].state, GrantState::Expired);
    // events are written in order: once a durable one is on disk, the expiry is too
    let (audit, audit_path) = audit;
    audit
        .record_durable(kinvoke_gateway::audit::AuditEvent::GatewayStopped {
            reason: "test".into(),
        })
        .await
        .unwrap();
    let text = std::fs::read_to_string(audit_path).unwrap();
    assert!(text.contains("\"break_glass_expired\""), "{text}");
}

#[tokio::test]
async fn activation_refuses_the_ineligible_a_long_duration_and_a_missing_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, _, _) = breakglass(dir.path()).await;
    let cases = [
        ("mallory", "Cluster Admin", "INC-1", 60, "NotEligible"),
        ("olga", "Cluster Admin", "INC-1", 3600, "max_duration"),
        ("olga", "Cluster Admin", "etcd full", 60, "INC"),
        ("olga", "Reader", "INC-1", 60, "NotEligible"),
    ];
    for (id, role, why, secs, expected) in cases {
        let err = bg
            .activate(&who(id, &[]), "prod", role, why, Duration::from_secs(secs))
            .await
            .unwrap_err();
        let shown = format!("{err:?} {err}");
        assert!(shown.contains(expected), "{id} {role} {why}: {shown}");
    }
    assert!(bg.grants_of("olga").is_empty());
}

#[tokio::test]
async fn a_grant_needing_approval_waits_for_a_second_person_and_runs_from_the_approval() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, now, _) = breakglass(dir.path()).await;
    let pete = who("pete", &["leads"]);
    let grant = bg
        .activate(
            &pete,
            "prod",
            "Cluster Admin",
            "rotate certs",
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(grant.state, GrantState::Pending);
    // not by the requester, even one in the approving group; not by a stranger
    assert!(matches!(
        bg.approve(&pete, &grant.id).await,
        Err(BreakGlassError::SelfApproval(_))
    ));
    assert!(bg.approve(&who("sam", &[]), &grant.id).await.is_err());
    *now.lock().unwrap() += Duration::from_secs(300);
    let approved = bg
        .approve(&who("lea", &["leads"]), &grant.id)
        .await
        .unwrap();
    assert_eq!(approved.state, GrantState::Active);
    assert_eq!(approved.approved_by.as_deref(), Some("lea"));
    // the ten minutes count from the approval, not from the request
    *now.lock().unwrap() += Duration::from_secs(540);
    bg.expire_due().await;
    assert_eq!(bg.list(&pete, None, false, |_| false).len(), 1);
    // approving twice is refused by state
    assert!(matches!(
        bg.approve(&who("lea", &["leads"]), &grant.id).await,
        Err(BreakGlassError::WrongState { .. })
    ));
}
