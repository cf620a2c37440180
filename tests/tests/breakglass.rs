//! End-to-end tests of break-glass access: the real `kinvoke` CLI against the real
//! `kinvoke-gateway` binary, one gateway per test. An eligible assignment gives nothing
//! until its holder activates it with a justification and a duration; the grant may
//! need a second person's approval, runs out by itself, can be revoked, survives a
//! restart, marks every command run under it, and is announced to a webhook (a tiny
//! HTTP server in the test) whose failure never blocks it.
//!
//! The cast, told apart by their certificates' common names and the gateway's
//! `[[authn.mtls_rule]]`s: olga is on call (group `oncall`, eligible, nothing standing),
//! lee leads the team (group `leads`, may approve), bob has no part in it, and the
//! harness's test user holds a standing `Cluster Admin` assignment (an auditor who may
//! read every result).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use kinvoke_tests::{
    AuditLine, AuditRecord, CLUSTER, Client, ClientCert, Gateway, GatewayOptions, Output,
    WebhookReceiver, closed_loopback_port, command_id_from_tsv, is_utc_time,
};
use serde_json::{Value, json};

/// Exit status of `kinvoke` when the gateway rejected the request (not found, invalid,
/// failed precondition).
const EXIT_REJECTED: i32 = 65;
/// Exit status of `kinvoke` when the caller is not authenticated or not allowed.
const EXIT_DENIED: i32 = 77;

/// The on-call engineer: group `oncall`, eligible for break-glass, nothing standing.
const OLGA: &str = "olga";
/// The team lead: group `leads`, who may approve olga's requests.
const LEE: &str = "lee";
/// Someone with no assignment at all.
const BOB: &str = "bob";

/// The role olga may activate.
const ADMIN_ROLE: &str = "Cluster Admin";
/// The name of olga's eligible assignment.
const ASSIGNMENT: &str = "oncall-local";
/// A justification in the shape the ticket pattern wants.
const REASON: &str = "INC-1234: etcd full";

/// Guard on waits for something the gateway does on its own time (a grant running out,
/// the background expiry record, a webhook delivery): far longer than it should take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Certificates give olga and lee their groups; bob gets none.
const GROUPS: &str = r#"
[[authn.mtls_rule]]
identity = "olga"
groups = ["oncall"]

[[authn.mtls_rule]]
identity = "lee"
groups = ["leads"]
"#;

/// Olga's eligible `Cluster Admin` assignment on `local`, with more keys (`max_duration`
/// is required).
fn eligible(keys: &str) -> String {
    format!(
        "\n[[assignment]]\nname = \"{ASSIGNMENT}\"\ngroup = \"oncall\"\nrole = \"{ADMIN_ROLE}\"\n\
         scope = \"clusters/local\"\neligible = true\n{keys}\n"
    )
}

/// A gateway with the cast's groups, the test user's standing admin assignment and
/// this TOML.
fn gateway_with(toml: &str) -> Gateway {
    Gateway::start_with(
        GatewayOptions::default()
            .extra_toml(GROUPS)
            .extra_toml(toml),
    )
    .expect("the gateway starts")
}

/// A certificate for one of the cast, issued by the gateway's CA.
fn cert(gw: &Gateway, who: &str) -> ClientCert {
    gw.pki().client_cert(who).unwrap()
}

/// `client` runs `invoke --cluster local --command COMMAND` (default output).
fn invoke(client: Client, command: &str) -> Output {
    client
        .args(["invoke", "--cluster", CLUSTER, "--command", command])
        .run()
        .unwrap()
}

/// `client` runs `-o json invoke --cluster local --command COMMAND`, which must
/// succeed; returns the result object.
fn invoked(client: Client, command: &str) -> Value {
    let out = client
        .args([
            "-o",
            "json",
            "invoke",
            "--cluster",
            CLUSTER,
            "--command",
            command,
        ])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    out.json().unwrap()
}

/// `client` runs `-o json break-glass activate` for `role` on `local`.
fn activate_role(client: Client, role: &str, reason: &str, duration: &str) -> Output {
    client
        .args([
            "-o",
            "json",
            "break-glass",
            "activate",
            "--cluster",
            CLUSTER,
        ])
        .args(["--role", role, "--reason", reason, "--duration", duration])
        .run()
        .unwrap()
}

/// `client` activates `Cluster Admin` on `local`, which must succeed; returns the grant.
fn activated(client: Client, reason: &str, duration: &str) -> Value {
    let out = activate_role(client, ADMIN_ROLE, reason, duration);
    assert_eq!(out.code, Some(0), "{out}");
    out.json().unwrap()
}

/// `client` runs `-o json break-glass VERB ID` (approve, revoke).
fn grant_verb(client: Client, verb: &str, id: &str) -> Output {
    client
        .args(["-o", "json", "break-glass", verb, id])
        .run()
        .unwrap()
}

/// `client` runs `-o json break-glass list EXTRA...`, which must succeed.
fn grants_listed(client: Client, extra: &[&str]) -> Vec<Value> {
    let out = client
        .args(["-o", "json", "break-glass", "list"])
        .args(extra)
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    out.json()
        .unwrap()
        .as_array()
        .unwrap_or_else(|| panic!("break-glass list -o json prints an array:\n{out}"))
        .clone()
}

/// The `id` of a grant or result object.
fn id_of(object: &Value) -> String {
    object["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {object}"))
        .to_owned()
}

/// The ids of listed grants.
fn ids(grants: &[Value]) -> Vec<String> {
    grants.iter().map(id_of).collect()
}

/// Waits until the gateway records that `grant` ran out (its expiry tick runs every
/// second), reading the audit log rather than polling the gateway, whose per-principal
/// request rate a tight loop would spend; then olga holds no actions on `local`.
fn wait_for_expiry(gw: &Gateway, grant: &str, olga: Client, what: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !gw
        .audit_events_named("break_glass_expired")
        .iter()
        .any(|e| e.get("grant_id") == Some(grant))
    {
        assert!(
            Instant::now() < deadline,
            "{what} was not recorded as expired after {EVENT_TIMEOUT:?}"
        );
    }
    assert_eq!(actions_on_local(olga), Vec::<String>::new(), "{what}");
}

/// The actions `whoami -o json` says `client`'s caller holds on `local` now (none when
/// the cluster is not listed).
fn actions_on_local(client: Client) -> Vec<String> {
    local_access(client).0
}

/// `whoami -o json`: the actions on cluster `local` and the break-glass grants behind them.
fn local_access(client: Client) -> (Vec<String>, Vec<String>) {
    let out = client.args(["-o", "json", "whoami"]).run().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let me = out.json().unwrap();
    let clusters = me["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("no clusters array: {me}"));
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    clusters
        .iter()
        .find(|c| c["cluster"] == CLUSTER)
        .map(|c| (strings(&c["actions"]), strings(&c["grantIds"])))
        .unwrap_or_default()
}

/// A shell command that creates `marker`: proof that a command ran.
fn touch(marker: &Path) -> String {
    format!("touch '{}'", marker.display())
}

/// Asserts a refusal: exit `code`, and one stderr line `kinvoke: ...` containing every
/// one of `needles`.
fn assert_refused(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "{out}");
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out}");
    for needle in needles {
        assert!(out.stderr.contains(needle), "expected {needle:?}:\n{out}");
    }
}

/// Asserts that `client` may not run commands on `local`, and that the command did not
/// run.
fn assert_cannot_run(gw: &Gateway, client: Client) {
    let marker = gw.scratch("must-not-run");
    let out = invoke(client, &touch(&marker));
    assert_refused(
        &out,
        EXIT_DENIED,
        &["PERMISSION_DENIED", "lacks runcommand/action"],
    );
    assert!(!marker.exists(), "the command ran:\n{out}");
}

/// Asserts that a result object is marked as run under break-glass `grant` for `reason`.
fn assert_marked(result: &Value, grant: &str, reason: &str) {
    assert_eq!(
        result["breakGlass"],
        json!({ "grantId": grant, "justification": reason }),
        "{result}"
    );
}

/// The break-glass audit events of this kind about `grant` logged so far.
fn grant_events(gw: &Gateway, event: &str, grant: &str) -> Vec<AuditRecord> {
    gw.audit_events()
        .into_iter()
        .filter(|e| e.event() == event && e.get("grant_id") == Some(grant))
        .collect()
}

/// All lines, for failure messages.
fn show(lines: &[AuditLine]) -> String {
    lines
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Index of the first line that is `event` and satisfies `found`.
fn position(lines: &[AuditLine], event: &str, found: impl Fn(&AuditLine) -> bool) -> usize {
    lines
        .iter()
        .position(|l| l.event() == event && found(l))
        .unwrap_or_else(|| panic!("no such {event} line:\n{}", show(lines)))
}

// ---------------------------------------------------------------------------------------
// the life of a grant

#[test]
fn a_principal_without_rights_breaks_glass_runs_a_marked_command_and_is_denied_after_expiry() {
    // short enough to wait out, long enough for the few calls made under it
    let mut gw = gateway_with(&eligible(r#"max_duration = "5s""#));
    let olga = cert(&gw, OLGA);
    let as_olga = || gw.client_as(&olga).unwrap();
    let standing = invoked(gw.client().unwrap(), "echo standing");

    assert_cannot_run(&gw, as_olga());
    assert_eq!(actions_on_local(as_olga()), Vec::<String>::new());

    let out = as_olga()
        .args([
            "break-glass",
            "activate",
            "--cluster",
            CLUSTER,
            "--role",
            ADMIN_ROLE,
        ])
        .args(["--reason", REASON, "--duration", "5s"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    // grant <ID> is Active: Cluster Admin on local for olga until <time> (<reason>)
    let line = out.stdout.trim_end();
    let grant = line
        .strip_prefix("grant ")
        .and_then(|rest| rest.split_once(' '))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("no grant id:\n{out}"));
    let until = line
        .strip_prefix(&format!(
            "grant {grant} is Active: {ADMIN_ROLE} on {CLUSTER} for {OLGA} until "
        ))
        .and_then(|rest| rest.strip_suffix(&format!(" ({REASON})")))
        .unwrap_or_else(|| panic!("not the activation line expected:\n{out}"));
    assert!(is_utc_time(until), "{out}");

    // under the grant; the calls between activation and expiry are kept to these two
    let (during, grants) = local_access(as_olga());
    assert!(
        during.iter().any(|a| a == "runcommand/action"),
        "{during:?}"
    );
    assert_eq!(
        grants,
        std::slice::from_ref(&grant),
        "whoami names the grant in force"
    );
    let result = invoked(as_olga(), "echo fixed");
    assert_eq!(result["logs"], "fixed\n", "{result}");
    assert_eq!(result["principal"], OLGA, "{result}");
    assert_marked(&result, &grant, REASON);
    let command = id_of(&result);

    wait_for_expiry(&gw, &grant, as_olga(), "the 5s grant");
    assert_cannot_run(&gw, as_olga());

    // the auditor sees the mark on the result and in the list
    let read = gw
        .client()
        .unwrap()
        .args([
            "-o",
            "json",
            "result",
            "--cluster",
            CLUSTER,
            "--command-id",
            &command,
        ])
        .run()
        .unwrap();
    assert_eq!(read.code, Some(0), "{read}");
    assert_marked(&read.json().unwrap(), &grant, REASON);
    assert_eq!(standing["breakGlass"], Value::Null, "{standing}");
    let listed = gw.client().unwrap().arg("list").run().unwrap();
    assert_eq!(listed.code, Some(0), "{listed}");
    let lines = listed.lines();
    assert!(lines[0].contains("BREAK-GLASS"), "{listed}");
    let row = |id: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{listed}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let marked = row(&command);
    let mark = format!("({grant})");
    assert!(
        marked.windows(2).any(|w| w == ["yes", mark.as_str()]),
        "{listed}"
    );
    assert!(marked.contains(&OLGA), "{listed}");
    assert!(row(&id_of(&standing)).contains(&"-"), "{listed}");

    // olga's own list keeps the grant, as Expired, only with --all
    assert!(grants_listed(as_olga(), &[]).is_empty());
    let all = grants_listed(as_olga(), &["--all"]);
    assert_eq!(ids(&all), [grant.as_str()], "{all:?}");
    assert_eq!(all[0]["state"], "Expired", "{all:?}");

    // the background task records the expiry on its own time
    gw.await_audit_event("break_glass_expired", EVENT_TIMEOUT, |e| {
        e.event() == "break_glass_expired" && e.get("grant_id") == Some(grant.as_str())
    })
    .unwrap();

    let lines = gw.stop_and_read_audit().unwrap();
    let is_grant = |l: &AuditLine| l.str_field("grant_id") == Some(grant.as_str());
    let activation = position(&lines, "break_glass_activated", is_grant);
    let a = &lines[activation].value;
    assert_eq!(a["assignment"], ASSIGNMENT, "{a}");
    assert_eq!(a["cluster"], CLUSTER, "{a}");
    assert_eq!(a["role"], ADMIN_ROLE, "{a}");
    assert_eq!(a["principal"], OLGA, "{a}");
    assert_eq!(a["source"], "127.0.0.1", "{a}");
    assert_eq!(a["justification"], REASON, "{a}");
    assert_eq!(a["duration_ms"], 5000, "{a}");
    assert_eq!(a["state"], "Active", "{a}");
    assert!(a.get("approval_from").is_none(), "{a}");
    let via = format!("via break-glass grant {grant}");
    let allowed = position(&lines, "authorization", |l| {
        l.str_field("principal") == Some(OLGA)
            && l.str_field("decision") == Some("allow")
            && l.str_field("action") == Some("runcommand/action")
            && l.str_field("detail").is_some_and(|d| d.contains(&via))
    });
    let accepted = position(&lines, "command_accepted", |l| {
        l.str_field("command_id") == Some(command.as_str())
    });
    assert_eq!(
        lines[accepted].value["break_glass"],
        json!({ "grant_id": grant, "justification": REASON }),
        "{}",
        lines[accepted]
    );
    let standing_accepted = position(&lines, "command_accepted", |l| {
        l.str_field("command_id") == Some(id_of(&standing).as_str())
    });
    assert!(
        lines[standing_accepted].value.get("break_glass").is_none(),
        "{}",
        lines[standing_accepted]
    );
    let expired = position(&lines, "break_glass_expired", is_grant);
    assert_eq!(
        lines[expired].value["principal"], OLGA,
        "{}",
        lines[expired]
    );
    assert!(
        activation < allowed && allowed < accepted && accepted < expired,
        "{}",
        show(&lines)
    );
    let denials = lines
        .iter()
        .filter(|l| {
            l.event() == "authorization"
                && l.str_field("principal") == Some(OLGA)
                && l.str_field("action") == Some("runcommand/action")
                && l.str_field("decision") == Some("deny")
        })
        .count();
    assert_eq!(
        denials,
        2,
        "one denial before the grant, one after:\n{}",
        show(&lines)
    );
}

#[test]
fn a_command_running_when_its_grant_ends_finishes() {
    let gw = gateway_with(&eligible(r#"max_duration = "3s""#));
    let olga = cert(&gw, OLGA);
    let as_olga = || gw.client_as(&olga).unwrap();
    let go = gw.scratch("go");

    let grant = id_of(&activated(as_olga(), REASON, "3s"));
    // the command waits for the test's go-file, so it is still running when the grant ends
    let started = as_olga()
        .args([
            "-o",
            "tsv",
            "invoke",
            "--cluster",
            CLUSTER,
            "--no-wait",
            "--command",
        ])
        .arg(format!(
            "while [ ! -e '{}' ]; do sleep 0.05; done; echo finished",
            go.display()
        ))
        .run()
        .unwrap();
    assert_eq!(started.code, Some(0), "{started}");
    let command =
        command_id_from_tsv(&started.stdout).unwrap_or_else(|| panic!("no command id:\n{started}"));

    wait_for_expiry(&gw, &grant, as_olga(), "the 3s grant");
    assert_cannot_run(&gw, as_olga());
    std::fs::write(&go, "").unwrap();

    let read = gw
        .client()
        .unwrap()
        .args([
            "-o",
            "json",
            "result",
            "--wait",
            "--cluster",
            CLUSTER,
            "--command-id",
        ])
        .arg(&command)
        .run()
        .unwrap();
    assert_eq!(read.code, Some(0), "{read}");
    let result = read.json().unwrap();
    assert_eq!(result["provisioningState"], "Succeeded", "{result}");
    assert_eq!(result["logs"], "finished\n", "{result}");
    assert_marked(&result, &grant, REASON);
}

#[test]
fn approval_needs_a_second_person() {
    let gw = gateway_with(&eligible(
        r#"max_duration = "30m"
require_approval_from = { group = "leads" }"#,
    ));
    let (olga, lee, bob) = (cert(&gw, OLGA), cert(&gw, LEE), cert(&gw, BOB));
    let as_olga = || gw.client_as(&olga).unwrap();
    let as_lee = || gw.client_as(&lee).unwrap();
    let as_bob = || gw.client_as(&bob).unwrap();

    let out = as_olga()
        .args([
            "break-glass",
            "activate",
            "--cluster",
            CLUSTER,
            "--role",
            ADMIN_ROLE,
        ])
        .args(["--reason", REASON, "--duration", "10m"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("is pending approval from group leads: "),
        "{out}"
    );
    let pending = grants_listed(as_olga(), &[]);
    assert_eq!(pending.len(), 1, "{pending:?}");
    let grant = id_of(&pending[0]);
    assert!(
        out.stdout
            .contains(&format!("kinvoke break-glass approve {grant}")),
        "{out}"
    );
    let g = &pending[0];
    assert_eq!(g["state"], "Pending", "{g}");
    assert_eq!(g["approvalFrom"], "group leads", "{g}");
    assert_eq!(g["assignment"], ASSIGNMENT, "{g}");
    assert_eq!(g["expiresAt"], Value::Null, "{g}");
    assert_eq!(g["startsAt"], Value::Null, "{g}");
    assert_cannot_run(&gw, as_olga());

    let own = grant_verb(as_olga(), "approve", &grant);
    assert_refused(
        &own,
        EXIT_DENIED,
        &[
            "PERMISSION_DENIED",
            "principal olga requested this grant and cannot approve it (two-person rule)",
        ],
    );
    let stranger = grant_verb(as_bob(), "approve", &grant);
    assert_refused(
        &stranger,
        EXIT_REJECTED,
        &["NOT_FOUND", &format!("grant \"{grant}\" was not found")],
    );
    assert!(grants_listed(as_bob(), &["--all"]).is_empty());
    assert_cannot_run(&gw, as_olga());

    let for_lee = grants_listed(as_lee(), &[]);
    assert_eq!(ids(&for_lee), [grant.as_str()], "{for_lee:?}");
    assert_eq!(for_lee[0]["principal"], OLGA, "{for_lee:?}");
    assert_eq!(for_lee[0]["state"], "Pending", "{for_lee:?}");

    let approved = grant_verb(as_lee(), "approve", &grant);
    assert_eq!(approved.code, Some(0), "{approved}");
    let g = approved.json().unwrap();
    assert_eq!(g["id"], grant.as_str(), "{g}");
    assert_eq!(g["state"], "Active", "{g}");
    assert_eq!(g["approvedBy"], LEE, "{g}");
    assert!(
        g["startsAt"].is_string() && g["expiresAt"].is_string(),
        "{g}"
    );
    // the duration runs from the approval, not from the request
    assert!(g["startsAt"].as_str() >= g["requestedAt"].as_str(), "{g}");
    let again = grant_verb(as_lee(), "approve", &grant);
    assert_refused(&again, EXIT_REJECTED, &["is Active, not Pending"]);

    let result = invoked(as_olga(), "echo fixed");
    assert_marked(&result, &grant, REASON);
    let for_lee = grants_listed(as_lee(), &["--cluster", CLUSTER]);
    assert_eq!(ids(&for_lee), [grant.as_str()], "{for_lee:?}");
    assert_eq!(for_lee[0]["state"], "Active", "{for_lee:?}");

    let revoked = grant_verb(as_lee(), "revoke", &grant);
    assert_eq!(revoked.code, Some(0), "{revoked}");
    let g = revoked.json().unwrap();
    assert_eq!(g["state"], "Revoked", "{g}");
    assert_eq!(g["revokedBy"], LEE, "{g}");
    assert_cannot_run(&gw, as_olga());
    assert!(grants_listed(as_olga(), &[]).is_empty());
    let all = grants_listed(as_olga(), &["--all"]);
    assert_eq!(all[0]["state"], "Revoked", "{all:?}");

    let approvals = grant_events(&gw, "break_glass_approved", &grant);
    assert_eq!(approvals.len(), 1, "{approvals:?}");
    assert_eq!(approvals[0].get("approver"), Some(LEE), "{}", approvals[0]);
    assert_eq!(
        approvals[0].get("principal"),
        Some(OLGA),
        "{}",
        approvals[0]
    );
    let revocations = grant_events(&gw, "break_glass_revoked", &grant);
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    assert_eq!(revocations[0].get("by"), Some(LEE), "{}", revocations[0]);
    let activations = grant_events(&gw, "break_glass_activated", &grant);
    assert_eq!(activations.len(), 1, "{activations:?}");
    assert_eq!(
        activations[0].get("state"),
        Some("Pending"),
        "{}",
        activations[0]
    );
    assert_eq!(
        activations[0].get("approval_from"),
        Some("group leads"),
        "{}",
        activations[0]
    );
}

#[test]
fn the_justification_pattern_is_enforced() {
    let gw = gateway_with(&eligible(
        r#"max_duration = "30m"
require_justification = "^INC-\\d+""#,
    ));
    let olga = cert(&gw, OLGA);
    let as_olga = || gw.client_as(&olga).unwrap();

    let free_text = activate_role(as_olga(), ADMIN_ROLE, "etcd full", "10m");
    assert_refused(
        &free_text,
        EXIT_REJECTED,
        &[
            "INVALID_ARGUMENT",
            r"the justification must match the pattern ^INC-\d+",
        ],
    );
    for blank in ["", "   "] {
        let out = activate_role(as_olga(), ADMIN_ROLE, blank, "10m");
        assert_refused(
            &out,
            EXIT_REJECTED,
            &["INVALID_ARGUMENT", "a justification is required"],
        );
    }
    let too_long = activate_role(as_olga(), ADMIN_ROLE, "INC-7 etcd full", "31m");
    assert_refused(
        &too_long,
        EXIT_REJECTED,
        &[
            "INVALID_ARGUMENT",
            "duration must be between 1s and 30m",
            ASSIGNMENT,
        ],
    );
    let zero = activate_role(as_olga(), ADMIN_ROLE, "INC-7 etcd full", "0s");
    assert_refused(&zero, EXIT_REJECTED, &["INVALID_ARGUMENT", "duration"]);
    assert!(grants_listed(as_olga(), &["--all"]).is_empty());
    assert_cannot_run(&gw, as_olga());

    let g = activated(as_olga(), "INC-7 etcd full", "30m");
    assert_eq!(g["state"], "Active", "{g}");
    assert_eq!(g["justification"], "INC-7 etcd full", "{g}");
    let result = invoked(as_olga(), "echo fixed");
    assert_marked(&result, &id_of(&g), "INC-7 etcd full");

    let activations: Vec<_> = gw
        .audit_events()
        .into_iter()
        .filter(|e| e.event() == "break_glass_activated")
        .collect();
    assert_eq!(
        activations.len(),
        1,
        "refusals are no activations: {activations:?}"
    );
}

#[test]
fn no_eligible_assignment_means_no_break_glass() {
    let gw = gateway_with(&format!(
        "{}\n[[cluster]]\nname = \"other\"\nexecutor = \"local\"\nmode = \"shell\"\n",
        eligible(r#"max_duration = "30m""#)
    ));
    let (olga, bob) = (cert(&gw, OLGA), cert(&gw, BOB));
    let as_olga = || gw.client_as(&olga).unwrap();

    let stranger = activate_role(gw.client_as(&bob).unwrap(), ADMIN_ROLE, REASON, "10m");
    assert_refused(
        &stranger,
        EXIT_DENIED,
        &[
            "PERMISSION_DENIED",
            "principal bob has no eligible (break-glass) assignment for role \"Cluster Admin\" on clusters/local",
        ],
    );
    // a standing assignment is not an eligible one
    let admin = activate_role(gw.client().unwrap(), ADMIN_ROLE, REASON, "10m");
    assert_refused(&admin, EXIT_DENIED, &["has no eligible"]);
    let wrong_role = activate_role(as_olga(), "Command Invoker", REASON, "10m");
    assert_refused(
        &wrong_role,
        EXIT_DENIED,
        &["has no eligible", "\"Command Invoker\""],
    );
    let wrong_cluster = as_olga()
        .args([
            "break-glass",
            "activate",
            "--cluster",
            "other",
            "--role",
            ADMIN_ROLE,
        ])
        .args(["--reason", REASON, "--duration", "10m"])
        .run()
        .unwrap();
    assert_refused(
        &wrong_cluster,
        EXIT_DENIED,
        &["has no eligible", "clusters/other"],
    );
    let unknown = as_olga()
        .args([
            "break-glass",
            "activate",
            "--cluster",
            "nowhere",
            "--role",
            ADMIN_ROLE,
        ])
        .args(["--reason", REASON, "--duration", "10m"])
        .run()
        .unwrap();
    assert_refused(
        &unknown,
        EXIT_REJECTED,
        &["NOT_FOUND", "cluster \"nowhere\" is not configured"],
    );

    assert!(grants_listed(as_olga(), &["--all"]).is_empty());
    assert_cannot_run(&gw, as_olga());
    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e.event() != "break_glass_activated"),
        "{}",
        gw.stderr_log()
    );
}

#[test]
fn grants_survive_a_restart() {
    let mut gw = gateway_with(&eligible(r#"max_duration = "30m""#));
    let olga = cert(&gw, OLGA);

    let g = activated(gw.client_as(&olga).unwrap(), REASON, "30m");
    let grant = id_of(&g);
    gw.restart().unwrap();

    let as_olga = || gw.client_as(&olga).unwrap();
    let result = invoked(as_olga(), "echo after restart");
    assert_marked(&result, &grant, REASON);
    let listed = grants_listed(as_olga(), &[]);
    assert_eq!(ids(&listed), [grant.as_str()], "{listed:?}");
    let kept = &listed[0];
    assert_eq!(kept["state"], "Active", "{kept}");
    for field in [
        "justification",
        "requestedAt",
        "startsAt",
        "expiresAt",
        "assignment",
    ] {
        assert_eq!(kept[field], g[field], "{field}: {kept} vs {g}");
    }

    // a revocation after the restart holds too
    let revoked = grant_verb(as_olga(), "revoke", &grant);
    assert_eq!(revoked.code, Some(0), "{revoked}");
    assert_eq!(revoked.json().unwrap()["revokedBy"], OLGA, "{revoked}");
    gw.restart().unwrap();
    assert_cannot_run(&gw, gw.client_as(&olga).unwrap());
    let all = grants_listed(gw.client_as(&olga).unwrap(), &["--all"]);
    assert_eq!(all[0]["state"], "Revoked", "{all:?}");
}

// ---------------------------------------------------------------------------------------
// the webhook

/// Olga's eligible assignments with a webhook: `Cluster Admin` at once, `Command
/// Invoker` with lee's approval.
fn with_webhook(url: &str) -> String {
    format!(
        "\n[break_glass]\nwebhook_url = \"{url}\"\n{}\n\
         [[assignment]]\nname = \"oncall-invoker\"\ngroup = \"oncall\"\nrole = \"Command Invoker\"\n\
         scope = \"clusters/local\"\neligible = true\nmax_duration = \"1h\"\n\
         require_approval_from = {{ group = \"leads\" }}\n",
        eligible(r#"max_duration = "30m""#)
    )
}

#[test]
fn the_webhook_hears_of_every_activation() {
    let hook = WebhookReceiver::start().unwrap();
    let gw = gateway_with(&with_webhook(&hook.url()));
    let (olga, lee) = (cert(&gw, OLGA), cert(&gw, LEE));

    let g = activated(gw.client_as(&olga).unwrap(), REASON, "10m");
    let grant = id_of(&g);
    let request = hook.next_request(EVENT_TIMEOUT).unwrap();
    assert_eq!(request.method, "POST", "{request:?}");
    assert_eq!(request.path, "/hook", "{request:?}");
    assert!(
        request
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{request:?}"
    );
    let body = request.json().unwrap();
    assert_eq!(body["event"], "break_glass_activated", "{body}");
    let announced = &body["grant"];
    assert_eq!(announced["id"], grant.as_str(), "{body}");
    assert_eq!(announced["principal"], OLGA, "{body}");
    assert_eq!(announced["justification"], REASON, "{body}");
    assert_eq!(announced["cluster"], CLUSTER, "{body}");
    assert_eq!(announced["role"], ADMIN_ROLE, "{body}");
    assert_eq!(announced["state"], "Active", "{body}");
    assert_eq!(announced["duration_seconds"], 600, "{body}");
    assert!(announced["expires_at"].is_string(), "{body}");
    assert_eq!(announced["approved_by"], Value::Null, "{body}");
    assert_eq!(announced["approval_from"], Value::Null, "{body}");

    // a request that waits for approval is announced, and so is its approval
    let out = activate_role(
        gw.client_as(&olga).unwrap(),
        "Command Invoker",
        "INC-9",
        "20m",
    );
    assert_eq!(out.code, Some(0), "{out}");
    let pending = id_of(&out.json().unwrap());
    let body = hook.next_request(EVENT_TIMEOUT).unwrap().json().unwrap();
    assert_eq!(body["event"], "break_glass_activated", "{body}");
    assert_eq!(body["grant"]["id"], pending.as_str(), "{body}");
    assert_eq!(body["grant"]["state"], "Pending", "{body}");
    assert_eq!(body["grant"]["approval_from"], "group leads", "{body}");
    assert_eq!(body["grant"]["expires_at"], Value::Null, "{body}");

    let approved = grant_verb(gw.client_as(&lee).unwrap(), "approve", &pending);
    assert_eq!(approved.code, Some(0), "{approved}");
    let body = hook.next_request(EVENT_TIMEOUT).unwrap().json().unwrap();
    assert_eq!(body["event"], "break_glass_approved", "{body}");
    assert_eq!(body["grant"]["id"], pending.as_str(), "{body}");
    assert_eq!(body["grant"]["state"], "Active", "{body}");
    assert_eq!(body["grant"]["approved_by"], LEE, "{body}");
    assert_eq!(body["grant"]["principal"], OLGA, "{body}");

    assert!(
        gw.audit_events()
            .iter()
            .all(|e| e.event() != "break_glass_notification_failed"),
        "{}",
        gw.stderr_log()
    );
}

#[test]
fn an_unreachable_webhook_never_blocks_an_activation() {
    let port = closed_loopback_port().unwrap();
    let mut gw = gateway_with(&with_webhook(&format!("http://127.0.0.1:{port}/hook")));
    let olga = cert(&gw, OLGA);

    // the grant is in force while the gateway still retries the announcement
    let g = activated(gw.client_as(&olga).unwrap(), REASON, "10m");
    assert_eq!(g["state"], "Active", "{g}");
    let grant = id_of(&g);
    let result = invoked(gw.client_as(&olga).unwrap(), "echo fixed");
    assert_marked(&result, &grant, REASON);

    let failed = gw
        .await_audit_event("break_glass_notification_failed", EVENT_TIMEOUT, |e| {
            e.event() == "break_glass_notification_failed"
                && e.get("grant_id") == Some(grant.as_str())
        })
        .unwrap();
    let error = failed.get("error").unwrap_or_default();
    assert!(
        error.contains(&format!("127.0.0.1:{port}")) && error.contains("after 3 attempts"),
        "{failed}"
    );

    let lines = gw.stop_and_read_audit().unwrap();
    let is_grant = |l: &AuditLine| l.str_field("grant_id") == Some(grant.as_str());
    let activation = position(&lines, "break_glass_activated", is_grant);
    let failure = position(&lines, "break_glass_notification_failed", is_grant);
    assert!(activation < failure, "{}", show(&lines));
}
