//! End-to-end tests of what an operator runs the gateway with: the admin listener's
//! `/metrics`, `/healthz` and `/readyz`, scraped over HTTP from the real gateway.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::time::{Duration, Instant};

use kinvoke_simcluster::{SimCluster, SimOptions};
use kinvoke_tests::{Gateway, GatewayOptions, USER, kube_tools, kube_tools_path};

const ADMIN: &str = "\n[admin]\naddress = \"127.0.0.1:0\"\n";

/// The value of the sample `name{labels}` in a metrics text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn scrape(gw: &Gateway) -> String {
    let (status, body) = gw.admin_get("/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn a_scrape_shows_the_counters_move_after_a_command_a_denial_and_a_relay_request() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let sim = SimCluster::spawn(SimOptions::default()).expect("the simulated cluster starts");
    // the test user may run commands on "kube" only: on "local" it is denied
    let options = GatewayOptions::default()
        .without_admin_assignment()
        .kube_cluster("kube", &sim.admin_kubeconfig(), &kube_tools_path(&tools))
        .extra_toml(&format!(
            "\n[[assignment]]\nname = \"kube-admin\"\nprincipal = \"{USER}\"\nrole = \"Cluster Admin\"\nscope = \"clusters/kube\"\n{ADMIN}"
        ));
    let gw = Gateway::start_with(options).unwrap();
    let before = scrape(&gw);
    let started = "kinvoke_commands_started_total{cluster=\"kube\"}";
    let finished = "kinvoke_commands_finished_total{cluster=\"kube\",state=\"Succeeded\"}";
    let denied = "kinvoke_authz_denials_total{action=\"runcommand/action\"}";
    let relayed = "kinvoke_relay_requests_total{verb=\"list\",status=\"2xx\"}";

    let ran = gw
        .client()
        .unwrap()
        .args([
            "invoke",
            "--cluster",
            "kube",
            "--command",
            "kubectl get namespaces",
        ])
        .run()
        .unwrap();
    assert_eq!(ran.code, Some(0), "{ran}");
    let refused = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", "local", "--command", "true"])
        .run()
        .unwrap();
    assert_ne!(refused.code, Some(0), "{refused}");

    let after = scrape(&gw);
    for (series, at_least) in [
        (started, 1.0),
        (finished, 1.0),
        (denied, 1.0),
        (relayed, 1.0),
    ] {
        assert!(
            sample(&after, series) >= sample(&before, series) + at_least,
            "{series} did not move:\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    assert!(
        sample(
            &after,
            "kinvoke_command_duration_seconds_count{cluster=\"kube\"}"
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "kinvoke_commands_in_flight"), 0.0, "{after}");
    // bounded labels only: no principal, no command id
    assert!(!after.contains(USER), "{after}");
    assert!(
        after.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{after}"
    );
    assert_eq!(gw.admin_get("/healthz").unwrap(), (200, "ok\n".to_owned()));
    // every log line of a call names its RPC, every line of a command's life its id
    let log = gw.stderr_log();
    let finished = log
        .lines()
        .find(|l| l.contains("command finished"))
        .unwrap_or_else(|| panic!("no command finished line:\n{log}"));
    assert!(
        finished.contains("command{command_id=") && finished.contains("cluster=kube"),
        "{finished}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("rpc{method=/kinvoke.v1.CommandService/InvokeCommand}")),
        "{log}"
    );
    let (status, _) = gw.admin_get("/nowhere").unwrap();
    assert_eq!(status, 404);
}

/// Makes a file immutable (`chattr +i`: even root's writes fail) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn chattr(file: &std::path::Path, flag: &str) {
        let status = std::process::Command::new("chattr")
            .arg(flag)
            .arg(file)
            .status()
            .expect("chattr runs (e2fsprogs)");
        assert!(status.success(), "chattr {flag} {}", file.display());
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        Self::chattr(&self.0, "-i");
    }
}

/// Waits until `/readyz` answers `status`; the gateway cannot wake the test, so this
/// polls, and the pause only paces the polls.
fn await_readyz(gw: &Gateway, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = gw.admin_get("/readyz").unwrap();
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still answers {got} {body:?}; gateway log:\n{}",
            gw.stderr_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn readyz_turns_false_while_the_audit_log_cannot_be_written_and_back() {
    let gw = Gateway::start_with(GatewayOptions::default().extra_toml(ADMIN)).unwrap();
    assert_eq!(await_readyz(&gw, 200), "ready\n");
    let invoke = || {
        gw.client()
            .unwrap()
            .args(["invoke", "--cluster", "local", "--command", "true"])
            .run()
            .unwrap()
    };
    let fault = Immutable(gw.audit_path());
    Immutable::chattr(&fault.0, "+i");
    // a write attempt finds the fault
    let during = invoke();
    assert_ne!(during.code, Some(0), "{during}");
    let body = await_readyz(&gw, 503);
    assert!(body.contains("the audit log cannot be written"), "{body}");
    assert_eq!(
        gw.admin_get("/healthz").unwrap().0,
        200,
        "alive all the same"
    );

    drop(fault);
    // the next write (this refusal's own audit line) succeeds, and the gateway is ready
    let _ = invoke();
    await_readyz(&gw, 200);
    let after = invoke();
    assert_eq!(after.code, Some(0), "{after}");
}
