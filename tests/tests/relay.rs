//! End-to-end tests of the relay: the real `kubectl` and `helm`, run by the real gateway
//! on a cluster whose API server is a `kinvoke-simcluster` (a simulated Kubernetes API
//! server, a test double). Each test starts its own simulated cluster and gateway; the
//! gateway holds the simulator's admin kubeconfig, and the commands only ever see a
//! kubeconfig for the relay with a token of their own.
//!
//! The pinned kubectl 1.35.2 and helm 4.1.4 come from `scripts/fetch-kube-tools`; without
//! them every test prints a SKIPPED line and passes, except under `CI=true`, where they
//! fail. The tests never sleep: they wait for exits and for lines.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;

use jsonwebtoken::Algorithm;
use kinvoke_simcluster::{ADMIN_USER, RecordedRequest, SimCluster, SimOptions};
use kinvoke_tests::{
    AuditRecord, Client, Gateway, GatewayOptions, Output, RelayKubeconfig, TestIssuer, USER,
    gateway_cli, https_get, kube_tools, kube_tools_path, parse_header, read_audit_file, unix_now,
};
use serde_json::{Value, json};

/// Name of the cluster whose commands go through the relay.
const KUBE: &str = "kube";

/// The demo namespace's seeded `web` pods.
const WEB_PODS: [&str; 2] = ["web-5d9c7b8f6d-4hx2p", "web-5d9c7b8f6d-9qmzt"];

/// The groups the test user's certificate maps to, in the order configured.
const GROUPS: [&str; 2] = ["devs", "ops"];

/// Gives the test user's certificate the groups in [`GROUPS`].
const MTLS_RULE: &str = r#"
[[authn.mtls_rule]]
identity = "test-user"
groups = ["devs", "ops"]
"#;

/// Exit status of `kinvoke` when the command was canceled.
const EXIT_CANCELED: i32 = 130;

/// What the relay answers a request that carries its own `Impersonate-*` header.
const IMPERSONATION_REFUSED: &str = "impersonation is not allowed through kinvoke";

/// What the relay answers an exec, attach or port-forward (a connection upgrade).
const UPGRADE_REFUSED: &str =
    "exec, attach and port-forward are not supported through the kinvoke relay yet";

/// What the relay answers a request with a token it does not (or no longer) know.
const TOKEN_REFUSED: &str = "the kinvoke relay token is missing, unknown or no longer valid";

/// A simulated cluster and a gateway with a cluster [`KUBE`] whose API server it is.
struct Kube {
    // declared first, so dropped first: the gateway stops its commands while the API
    // server they talk to still answers
    gw: Gateway,
    sim: SimCluster,
}

impl Kube {
    /// Starts both, or `None` (after a SKIPPED line) when kubectl and helm are missing.
    fn start() -> Option<Self> {
        Self::start_with(|options, _| options)
    }

    /// Like [`Kube::start`], with more gateway settings: `more` gets the options (the
    /// [`KUBE`] cluster last, so a `[cluster.identity]` table applies to it) and the
    /// commands' `PATH`.
    fn start_with(more: impl FnOnce(GatewayOptions, &str) -> GatewayOptions) -> Option<Self> {
        let tools = kube_tools().unwrap()?;
        let sim = SimCluster::spawn(SimOptions::default()).expect("the simulated cluster starts");
        let path = kube_tools_path(&tools);
        let options = GatewayOptions::default()
            .extra_toml(MTLS_RULE)
            .kube_cluster(KUBE, &sim.admin_kubeconfig(), &path);
        let gw = Gateway::start_with(more(options, &path)).expect("the gateway starts");
        Some(Self { gw, sim })
    }

    /// A client for [`KUBE`] as the test user.
    fn client(&self) -> Client {
        self.gw.client().unwrap()
    }

    /// `kinvoke invoke --cluster kube --command COMMAND EXTRA...`.
    fn invoke(&self, command: &str, extra: &[&str]) -> Output {
        self.client()
            .args(["invoke", "--cluster", KUBE, "--command", command])
            .args(extra)
            .run()
            .unwrap()
    }

    /// `kinvoke -o json invoke ...`: the output, the command's id and what it printed.
    fn invoke_json(&self, command: &str, extra: &[&str]) -> (Output, String, String) {
        let out = self
            .client()
            .args([
                "-o",
                "json",
                "invoke",
                "--cluster",
                KUBE,
                "--command",
                command,
            ])
            .args(extra)
            .run()
            .unwrap();
        let json = out.json().unwrap();
        let id = json["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in the json output:\n{out}"))
            .to_owned();
        let logs = json["logs"]
            .as_str()
            .unwrap_or_else(|| panic!("no logs in the json output:\n{out}"))
            .to_owned();
        (out, id, logs)
    }

    /// The first `kinvoke::audit` event named `event` for which `matches` holds; `what`
    /// names it in the failure message.
    fn audit_event(
        &self,
        event: &str,
        what: &str,
        matches: impl Fn(&AuditRecord) -> bool,
    ) -> AuditRecord {
        self.audit_events(event)
            .into_iter()
            .find(|e| matches(e))
            .unwrap_or_else(|| panic!("no {event} for {what}:\n{}", self.gw.stderr_log()))
    }

    /// The `kinvoke::audit` events named `event` logged so far.
    fn audit_events(&self, event: &str) -> Vec<AuditRecord> {
        self.gw
            .audit_events()
            .into_iter()
            .filter(|e| e.event() == event)
            .collect()
    }
}

/// The lines after the result header, which must say `exitcode=0`.
fn body_of_success(out: &Output) -> Vec<&str> {
    assert_eq!(out.code, Some(0), "{out}");
    let lines = out.lines();
    let header = parse_header(lines[0])
        .unwrap_or_else(|| panic!("first line is not the result header:\n{out}"));
    assert_eq!(header.exit_code, 0, "{out}");
    lines[1..].to_vec()
}

/// Whether `request` is the gateway's own `GET /version`: at start it logs each cluster's
/// version, on its own credentials and impersonating nobody, at a moment a test cannot
/// know (it may land after [`SimCluster::clear_requests`]).
fn is_gateway_version_probe(request: &RecordedRequest) -> bool {
    request.method == "GET"
        && request.path == "/version"
        && !request
            .headers
            .keys()
            .any(|k| k.starts_with("impersonate-"))
}

/// The requests the simulated cluster recorded that came through the relay: all but the
/// gateway's one start-up probe ([`is_gateway_version_probe`]).
fn relayed_requests(sim: &SimCluster) -> Vec<RecordedRequest> {
    let (probes, relayed): (Vec<_>, Vec<_>) = sim
        .requests()
        .into_iter()
        .partition(is_gateway_version_probe);
    assert!(
        probes.len() <= 1,
        "more than one unimpersonated /version: {probes:#?}"
    );
    relayed
}

/// Every header value of a recorded request, with its name.
fn header_values(request: &RecordedRequest) -> impl Iterator<Item = (&str, &str)> {
    request
        .headers
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| (name.as_str(), v.as_str())))
}

/// Whether a `kubectl get pods` row (or the header row) starts with `name`.
fn row_of(line: &str, name: &str) -> bool {
    line.split_whitespace().next() == Some(name)
}

#[test]
fn kubectl_get_pods_through_the_gateway_prints_the_clusters_table() {
    let Some(kube) = Kube::start() else { return };
    let out = kube.invoke("kubectl get pods -n demo", &[]);
    let body = body_of_success(&out);

    let rows: Vec<Vec<&str>> = body
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{out}"
    );
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0]).collect();
    assert_eq!(names, WEB_PODS, "{out}");
    for row in &rows[1..] {
        assert_eq!(row[1..4], ["1/1", "Running", "0"], "{out}");
    }

    // the list went through the relay, audited with who asked and who the cluster saw
    let listed = kube.audit_event("relay_request", "the pod list", |e| {
        e.get("path") == Some("/api/v1/namespaces/demo/pods")
    });
    assert_eq!(listed.get("verb"), Some("list"), "{listed}");
    assert_eq!(listed.get("namespace"), Some("demo"), "{listed}");
    assert_eq!(listed.get("status"), Some("200"), "{listed}");
    assert_eq!(listed.get("principal"), Some(USER), "{listed}");
    assert_eq!(listed.get("kube_user"), Some(USER), "{listed}");
    assert!(listed.get("duration_ms").is_some(), "{listed}");
}

#[test]
fn an_attached_manifest_is_applied_and_later_commands_read_it_back() {
    let Some(kube) = Kube::start() else { return };
    let manifest = kube.gw.scratch("cm.yaml");
    fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: relay-note\n  namespace: demo\ndata:\n  k: written-through-the-relay\n",
    )
    .unwrap();

    let read_back = "kubectl get configmap relay-note -n demo -o jsonpath={.data.k}";
    let out = kube.invoke(
        &format!("kubectl apply -f cm.yaml && {read_back}"),
        &["--file", manifest.to_str().unwrap()],
    );
    let body = body_of_success(&out);
    assert_eq!(
        body,
        ["configmap/relay-note created", "written-through-the-relay"],
        "{out}"
    );

    let again = kube.invoke(read_back, &[]);
    assert_eq!(
        body_of_success(&again),
        ["written-through-the-relay"],
        "{again}"
    );
}

#[test]
fn helm_installs_an_attached_chart_and_lists_the_release_as_deployed() {
    let Some(kube) = Kube::start() else { return };
    let chart = kube.gw.scratch("chart");
    fs::create_dir_all(chart.join("templates")).unwrap();
    fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: relay-demo\ndescription: a chart installed through the kinvoke relay\ntype: application\nversion: 0.1.0\nappVersion: \"1.0\"\n",
    )
    .unwrap();
    fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-settings\ndata:\n  release: {{ .Release.Name | quote }}\n",
    )
    .unwrap();

    let out = kube.invoke(
        "helm install demo-release ./chart -n demo && helm list -n demo",
        &["--file", chart.to_str().unwrap()],
    );
    let body = body_of_success(&out);
    assert!(body.contains(&"STATUS: deployed"), "{out}");
    let release = body
        .iter()
        .find(|l| row_of(l, "demo-release"))
        .unwrap_or_else(|| panic!("helm list shows no demo-release:\n{out}"));
    let columns: Vec<&str> = release.split('\t').map(str::trim).collect();
    assert_eq!(columns[1], "demo", "{out}");
    assert!(columns.contains(&"deployed"), "{out}");
    assert!(columns.contains(&"relay-demo-0.1.0"), "{out}");

    // what the chart templated is in the cluster, for any later command to see
    let cm = kube.invoke(
        "kubectl get configmap demo-release-settings -n demo -o jsonpath={.data.release}",
        &[],
    );
    assert_eq!(body_of_success(&cm), ["demo-release"], "{cm}");
}

#[test]
fn the_cluster_sees_the_caller_impersonated_with_the_gateways_credentials_only() {
    let Some(mut kube) = Kube::start() else {
        return;
    };
    kube.sim.clear_requests();
    let (out, id, logs) = kube.invoke_json(
        "cat \"$KUBECONFIG\" && kubectl get pods -n demo -o name && kubectl get configmap web-config -n demo -o name",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(logs.contains("pod/web-5d9c7b8f6d-4hx2p\n"), "{out}");
    assert!(logs.contains("configmap/web-config\n"), "{out}");
    let relay = RelayKubeconfig::parse(&logs).unwrap();
    assert_ne!(
        relay.server,
        kube.sim.url(),
        "the command was given the API server itself"
    );
    assert_ne!(
        relay.token,
        kube.sim.admin_token(),
        "the command was given the gateway's token"
    );

    let requests = relayed_requests(&kube.sim);
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/demo/pods"),
        "{requests:#?}"
    );
    let admin = format!("Bearer {}", kube.sim.admin_token());
    for r in &requests {
        let what = format!("{} {}", r.method, r.path);
        assert_eq!(r.header("authorization"), [admin.as_str()], "{what}");
        assert_eq!(r.header("impersonate-user"), [USER], "{what}");
        assert_eq!(r.header("impersonate-group"), GROUPS, "{what}");
        assert_eq!(
            r.header("impersonate-extra-kinvoke-command-id"),
            [id.as_str()],
            "{what}"
        );
        assert_eq!(
            r.header("impersonate-extra-kinvoke-source"),
            ["127.0.0.1"],
            "{what}"
        );
        assert_eq!(r.user.as_deref(), Some(USER), "{what}");
        for (name, value) in header_values(r) {
            assert!(
                !value.contains(&relay.token),
                "{what}: header {name} carries the command's relay token"
            );
        }
    }

    // the audit file has each forwarded request, tied to the command; lines are written
    // in batches, so the gateway is stopped first, which completes the file
    kube.gw.terminate().unwrap();
    let file = read_audit_file(&kube.gw.audit_path()).unwrap();
    let forwarded: Vec<_> = file
        .iter()
        .filter(|l| l.event() == "relay_request")
        .collect();
    assert_eq!(forwarded.len(), requests.len(), "{file:#?}");
    for line in forwarded {
        assert_eq!(line.str_field("command_id"), Some(id.as_str()), "{line}");
        assert_eq!(line.str_field("kube_user"), Some(USER), "{line}");
    }
}

#[test]
fn impersonation_by_the_command_is_refused_audited_and_never_reaches_the_cluster() {
    let Some(kube) = Kube::start() else { return };

    // kubectl shows a server's message only once its discovery is cached (a first call
    // is the next test's business), so one plain call comes first, as in any session
    let (out, id, logs) = kube.invoke_json(
        "kubectl get namespaces -o name && kubectl --as=admin get pods -n demo",
        &[],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        logs.lines().last(),
        Some(
            format!(
                "Error from server (Forbidden): {IMPERSONATION_REFUSED} (header impersonate-user): \
                 this command acts as {USER}; remove --as/--as-group/--kube-as-user"
            )
            .as_str()
        ),
        "{out}"
    );
    let refused = kube.audit_event("relay_refused", &id, |e| {
        e.get("command_id") == Some(id.as_str())
    });
    assert_eq!(refused.get("principal"), Some(USER), "{refused}");
    assert_eq!(refused.get("verb"), Some("list"), "{refused}");
    assert_eq!(
        refused.get("path"),
        Some("/api/v1/namespaces/demo/pods"),
        "{refused}"
    );
    assert!(
        refused
            .get("reason")
            .unwrap_or_default()
            .starts_with(&format!(
                "{IMPERSONATION_REFUSED} (header impersonate-user)"
            )),
        "{refused}"
    );

    // by hand, with the command's own token and a header no client library would add
    let by_hand = r#"
server=$(sed -n 's/^ *server: //p' "$KUBECONFIG")
token=$(sed -n 's/^ *token: //p' "$KUBECONFIG")
sed -n 's/^ *certificate-authority-data: //p' "$KUBECONFIG" | base64 -d > relay-ca.pem
/usr/bin/curl -sS --cacert relay-ca.pem -H "Authorization: Bearer $token" \
  -H "Impersonate-User: system:admin" -w '\nhttp=%{http_code}\n' "$server/api/v1/namespaces"
"#;
    let curl = kube.invoke(by_hand, &[]);
    let body = body_of_success(&curl);
    assert_eq!(body.last(), Some(&"http=403"), "{curl}");
    let status: Value = serde_json::from_str(body[0]).unwrap_or_else(|_| panic!("{curl}"));
    assert_eq!(status["kind"], "Status", "{curl}");
    assert_eq!(status["code"], 403, "{curl}");
    assert_eq!(status["reason"], "Forbidden", "{curl}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            "{IMPERSONATION_REFUSED} (header impersonate-user): this command acts as {USER}"
        )),
        "{curl}"
    );

    for r in kube.sim.requests() {
        for (name, value) in header_values(&r) {
            assert!(
                !value.contains("system:admin"),
                "{} {}: header {name} reached the cluster with {value:?}",
                r.method,
                r.path
            );
        }
    }
    for r in relayed_requests(&kube.sim) {
        assert_eq!(
            r.header("impersonate-user"),
            [USER],
            "{} {}",
            r.method,
            r.path
        );
    }
}

#[test]
fn kubectl_as_names_the_impersonation_refusal_even_on_a_first_call() {
    let Some(kube) = Kube::start() else { return };
    // a fresh HOME has no discovery cache, so kubectl's first request is discovery, whose
    // client reads only a text/plain error body (a JSON Status comes out as "unknown")
    let out = kube.invoke("kubectl --as=admin get pods -n demo", &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("Error from server (Forbidden)"),
        "{out}"
    );
    assert!(
        kube.audit_events("relay_refused")
            .iter()
            .any(|e| e.get("path") == Some("/api")),
        "no relay_refused for discovery:\n{}",
        kube.gw.stderr_log()
    );
    assert!(
        out.stdout.contains(IMPERSONATION_REFUSED),
        "the caller is not told why kubectl --as failed:\n{out}"
    );
}

#[test]
fn a_token_used_after_its_command_ended_is_refused() {
    let Some(kube) = Kube::start() else { return };
    let (out, _, logs) = kube.invoke_json(
        "cat \"$KUBECONFIG\" && kubectl get namespace demo -o name",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        logs.ends_with("namespace/demo\n"),
        "the token worked while the command ran:\n{out}"
    );
    let stolen = RelayKubeconfig::parse(&logs).unwrap();

    // the client saw the result, so the command has ended and its token is revoked
    kube.sim.clear_requests();
    let answer = https_get(
        &format!("{}/api/v1/namespaces/demo/pods", stolen.server),
        &stolen.ca_pem,
        &[("Authorization", &format!("Bearer {}", stolen.token))],
    )
    .unwrap();
    assert_eq!(answer.status, 401, "{answer:?}");
    let status = answer.json().unwrap();
    assert_eq!(status["kind"], "Status", "{answer:?}");
    assert_eq!(status["reason"], "Unauthorized", "{answer:?}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with(TOKEN_REFUSED),
        "{answer:?}"
    );
    assert_eq!(
        relayed_requests(&kube.sim),
        [],
        "the refused request reached the cluster"
    );

    let refused = kube.audit_event("relay_refused", "the stolen token", |e| {
        e.get("path") == Some("/api/v1/namespaces/demo/pods")
    });
    assert_eq!(refused.get("verb"), Some("list"), "{refused}");
    // an unknown token names no command or principal: nothing vouches for them
    assert_eq!(refused.get("command_id"), None, "{refused}");
    assert_eq!(refused.get("principal"), None, "{refused}");
    assert!(
        !refused.line.contains(&stolen.token),
        "the audit log holds the token"
    );
    assert!(
        !kube.gw.stderr_log().contains(&stolen.token),
        "the gateway logged the token"
    );
}

#[test]
fn a_caller_the_cluster_denies_gets_kubectls_forbidden_error_and_exit_code() {
    let Some(kube) = Kube::start() else { return };
    kube.sim.deny_user(USER);
    let out = kube.invoke("kubectl get pods -n demo", &[]);
    assert_eq!(out.code, Some(1), "{out}");
    let header = parse_header(out.lines()[0])
        .unwrap_or_else(|| panic!("first line is not the result header:\n{out}"));
    assert_eq!(header.exit_code, 1, "{out}");
    assert!(
        out.stdout.contains(&format!(
            "Error from server (Forbidden): pods is forbidden: User \"{USER}\" cannot list resource \"pods\""
        )),
        "{out}"
    );
    let denied = kube.audit_event("relay_request", "the pod list", |e| {
        e.get("path") == Some("/api/v1/namespaces/demo/pods")
    });
    assert_eq!(denied.get("status"), Some("403"), "{denied}");
}

#[test]
fn a_watch_streams_new_pods_live_until_it_is_canceled() {
    let Some(kube) = Kube::start() else { return };
    let started = kube
        .client()
        .args([
            "-o",
            "json",
            "invoke",
            "--cluster",
            KUBE,
            "--no-wait",
            "--timeout",
            "60s",
        ])
        .args(["--command", "kubectl get pods -w -n demo"])
        .run()
        .unwrap();
    assert_eq!(started.code, Some(0), "{started}");
    let id = started.json().unwrap()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in the json output:\n{started}"))
        .to_owned();

    let mut follower = kube.gw.follow(KUBE, &id).unwrap();
    follower
        .wait_for_line_where("the table header", |l| row_of(l, "NAME"))
        .unwrap();
    for pod in WEB_PODS {
        follower
            .wait_for_line_where(&format!("a row for {pod}"), |l| row_of(l, pod))
            .unwrap();
    }

    let manifest = kube.gw.scratch("pod.yaml");
    fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: watched-pod\n  namespace: demo\nspec:\n  containers:\n  - name: app\n    image: nginx:1.27\n",
    )
    .unwrap();
    let created = kube.invoke(
        "kubectl apply -f pod.yaml",
        &["--file", manifest.to_str().unwrap()],
    );
    assert_eq!(
        body_of_success(&created),
        ["pod/watched-pod created"],
        "{created}"
    );

    // the watch is still running, so this row can only have come live
    let row = follower
        .wait_for_line_where("a row for watched-pod", |l| row_of(l, "watched-pod"))
        .unwrap();
    assert!(row.contains("Running"), "{row}");

    let canceled = kube
        .client()
        .args(["cancel", "--cluster", KUBE, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(canceled.code, Some(0), "{canceled}");
    let followed = follower.wait().unwrap();
    assert_eq!(followed.code, Some(EXIT_CANCELED), "{followed}");

    let watch = kube.audit_event("relay_request", "the watch", |e| {
        e.get("verb") == Some("watch") && e.get("command_id") == Some(id.as_str())
    });
    assert_eq!(watch.get("status"), Some("200"), "{watch}");
}

#[test]
fn kubectl_auth_whoami_names_the_caller_not_the_gateway() {
    let Some(kube) = Kube::start() else { return };
    let out = kube.invoke(
        "kubectl auth whoami -o jsonpath={.status.userInfo.username}",
        &[],
    );
    assert_eq!(body_of_success(&out), [USER], "{out}");

    let table = kube.invoke("kubectl auth whoami", &[]);
    let body = body_of_success(&table);
    let username: Vec<&str> = body
        .iter()
        .find(|l| row_of(l, "Username"))
        .unwrap_or_else(|| panic!("no Username row:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(username, ["Username", USER], "{table}");
    assert!(!table.stdout.contains(ADMIN_USER), "{table}");
    let groups = body
        .iter()
        .find(|l| row_of(l, "Groups"))
        .unwrap_or_else(|| panic!("no Groups row:\n{table}"));
    for group in GROUPS {
        assert!(groups.contains(group), "{table}");
    }
}

#[test]
fn kubectl_exec_is_refused_with_a_clear_message() {
    let Some(kube) = Kube::start() else { return };
    let pod = WEB_PODS[0];
    let out = kube.invoke(&format!("kubectl exec -n demo {pod} -- true"), &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.stdout.lines().last(),
        Some(format!("Error from server (Forbidden): {UPGRADE_REFUSED}").as_str()),
        "{out}"
    );
    let path = format!("/api/v1/namespaces/demo/pods/{pod}/exec");
    let refused = kube.audit_event("relay_refused", "the exec", |e| {
        e.get("path") == Some(path.as_str())
    });
    assert_eq!(refused.get("principal"), Some(USER), "{refused}");
    assert_eq!(refused.get("reason"), Some(UPGRADE_REFUSED), "{refused}");
    let reached: Vec<_> = relayed_requests(&kube.sim)
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert_eq!(reached, [], "the exec upgrade reached the cluster");
}

#[test]
fn kubectl_port_forward_is_refused_with_the_same_message() {
    let Some(kube) = Kube::start() else { return };
    let pod = WEB_PODS[0];
    let out = kube.invoke(&format!("kubectl port-forward -n demo {pod} 8080:80"), &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains(UPGRADE_REFUSED), "{out}");
    assert!(
        !relayed_requests(&kube.sim)
            .iter()
            .any(|r| r.path.ends_with("/portforward")),
        "the port-forward upgrade reached the cluster"
    );
}

/// Waits (bounded) until the gateway's stderr log contains `needle`. The start-up
/// version probe runs in the background, so its lines come when they come; the pause
/// only paces re-reading a plain file.
fn await_log(gw: &Gateway, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = gw.stderr_log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in the gateway log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_cluster_whose_api_server_is_down_does_not_stop_the_others_and_check_config_names_it() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let sim = SimCluster::spawn(SimOptions::default()).expect("the simulated cluster starts");
    let gone = kinvoke_simcluster::kubeconfig_yaml(
        &format!(
            "https://127.0.0.1:{}",
            kinvoke_tests::closed_loopback_port().unwrap()
        ),
        &sim.ca_pem(),
        &sim.admin_token(),
    );
    let options = GatewayOptions::default()
        .kube_cluster(KUBE, &sim.admin_kubeconfig(), &kube_tools_path(&tools))
        .kube_cluster("gone", &gone, &kube_tools_path(&tools));
    let gw = Gateway::start_with(options).expect("the gateway starts with one cluster down");

    let out = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", KUBE, "--command", "kubectl get ns"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("demo"), "{out}");
    let log = await_log(&gw, "cluster API server not reachable");
    assert!(log.contains("cluster=gone"), "{log}");
    await_log(&gw, "v1.35.2+kinvoke-sim");

    let check = gateway_cli([
        std::ffi::OsString::from("check-config"),
        "--config".into(),
        gw.config().as_os_str().to_owned(),
    ])
    .unwrap();
    assert_eq!(check.code, Some(1), "{check}");
    assert!(
        check.stdout.contains(&format!(
            "cluster \"{KUBE}\": API server reachable, Kubernetes v1.35.2+kinvoke-sim"
        )),
        "{check}"
    );
    assert!(
        check
            .stderr
            .contains("cluster \"gone\": API server not reachable"),
        "{check}"
    );
}

#[test]
fn check_config_names_a_cluster_whose_kubeconfig_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    // the listener's certificates must exist for check-config to get to the clusters
    kinvoke_tests::Pki::new(&dir.path().join("pki"), "check CA").unwrap();
    fs::write(
        dir.path().join("broken.kubeconfig"),
        "this: [is not a kubeconfig",
    )
    .unwrap();
    let config = dir.path().join("gateway.toml");
    let text = GatewayOptions::default()
        .extra_toml("[[cluster]]\nname = \"broken\"\nkubeconfig = \"broken.kubeconfig\"\n")
        .render();
    fs::write(&config, text).unwrap();
    let check = gateway_cli([
        std::ffi::OsString::from("check-config"),
        "--config".into(),
        config.into_os_string(),
    ])
    .unwrap();
    assert_eq!(check.code, Some(1), "{check}");
    assert!(check.stderr.contains("cluster \"broken\""), "{check}");
    assert!(check.stderr.contains("broken.kubeconfig"), "{check}");
}

#[test]
fn dev_mode_serves_a_simulated_cluster_through_the_relay() {
    // dev's clusters use the default PATH: the machine's own kubectl
    let kubectl = ["/usr/local/bin/kubectl", "/usr/bin/kubectl", "/bin/kubectl"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if kubectl.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no kubectl on the default PATH under CI"
        );
        println!("SKIPPED: no kubectl in /usr/local/bin, /usr/bin or /bin for the dev sandbox");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut dev = kinvoke_tests::DevGateway::start(root.path()).unwrap();
    let out = dev
        .client()
        .unwrap()
        .args(["invoke", "--cluster", "sandbox", "--command", "kubectl auth whoami -o jsonpath='{.status.userInfo.username}'; echo; kubectl get pods -n demo"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        out.lines()[1],
        "dev-user",
        "the sandbox sees the caller:\n{out}"
    );
    assert!(out.stdout.contains("web-"), "{out}");
    // the same simulated cluster with the pod executor: the command runs in a Pod of
    // its own, and its exit code is the client's
    let in_pod = dev
        .client()
        .unwrap()
        .args(["invoke", "--cluster", "sandbox-pods", "--command", "echo \"$KINVOKE_COMMAND_ID in $PWD\"; kubectl get pods -n kinvoke-command -o name; exit 3"])
        .run()
        .unwrap();
    assert_eq!(in_pod.code, Some(3), "{in_pod}");
    assert!(in_pod.stdout.contains(" in /kinvoke/work"), "{in_pod}");
    assert!(in_pod.stdout.contains("pod/kinvoke-"), "{in_pod}");
    // the admin listener's address is in the config dev wrote, and it answers there
    let toml = fs::read_to_string(dev.state_dir().join("gateway.toml")).unwrap();
    let admin: std::net::SocketAddr = toml
        .split("[admin]\naddress = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no [admin] address in:\n{toml}"))
        .parse()
        .unwrap();
    assert!(admin.ip().is_loopback(), "{admin}");
    let (status, metrics) = kinvoke_tests::http_get(admin, "/metrics").unwrap();
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains(
            "kinvoke_commands_finished_total{cluster=\"sandbox-pods\",state=\"Succeeded\"} 1"
        ),
        "{metrics}"
    );
    let clusters = dev
        .client()
        .unwrap()
        .args(["-o", "json", "clusters"])
        .run()
        .unwrap();
    let json = clusters.json().unwrap();
    let sandbox = json
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "sandbox")
        .unwrap_or_else(|| panic!("no sandbox in:\n{clusters}"));
    assert!(
        sandbox["description"]
            .as_str()
            .unwrap()
            .contains("simulated"),
        "{clusters}"
    );
    dev.terminate().unwrap();
}

#[test]
fn a_request_body_over_the_relays_limit_is_refused_before_the_cluster() {
    let Some(kube) = Kube::start() else {
        return;
    };
    // 16 MiB is the relay's cap; one byte more must not be buffered or forwarded
    let oversized = r#"
server=$(sed -n 's/^ *server: //p' "$KUBECONFIG")
token=$(sed -n 's/^ *token: //p' "$KUBECONFIG")
sed -n 's/^ *certificate-authority-data: //p' "$KUBECONFIG" | base64 -d > relay-ca.pem
head -c 16777217 /dev/zero > big.bin
/usr/bin/curl -sS --cacert relay-ca.pem -H "Authorization: Bearer $token" \
  -H "Content-Type: application/json" --data-binary @big.bin -o /dev/null \
  -w 'http=%{http_code}\n' "$server/api/v1/namespaces/demo/configmaps"
"#;
    kube.sim.clear_requests();
    let out = kube.invoke(oversized, &[]);
    let body = body_of_success(&out);
    assert_eq!(body.last(), Some(&"http=413"), "{out}");
    assert!(
        kube.sim
            .requests()
            .iter()
            .all(|r| r.method != "POST" || !r.path.ends_with("/configmaps")),
        "the oversized request reached the cluster"
    );
}

// ---------------------------------------------------------------------------------------
// identity: fails closed, and UTF-8 names reach the cluster as they are

/// The issuer of the tokens the identity tests sign.
const OIDC_ISSUER: &str = "https://token.ci.example";

/// The audience those tokens are for.
const OIDC_AUDIENCE: &str = "kinvoke";

/// Exit status of `kinvoke` when the gateway answered PERMISSION_DENIED.
const EXIT_DENIED: i32 = 77;

/// Exit status of `kinvoke` when the gateway answered INVALID_ARGUMENT.
const EXIT_REJECTED: i32 = 65;

/// A [`Kube`] whose listener also takes tokens from [`OIDC_ISSUER`], where tokens with
/// `team = "web"` may run commands on [`KUBE`], which maps callers to the Kubernetes
/// user in their `nick` claim.
fn kube_with_nick_mapping(issuer: &TestIssuer) -> Option<Kube> {
    Kube::start_with(|options, _| {
        options
            .file("oidc/jwks.json", issuer.jwks())
            .listener_toml(r#"authentication = ["mtls", "token"]"#)
            // applies to the last [[cluster]] table, KUBE
            .extra_toml("[cluster.identity]\nuser = \"{claim:nick}\"\n")
            .extra_toml(&format!(
                r#"
[[authn.oidc]]
name = "ci"
issuer = "{OIDC_ISSUER}"
audiences = ["{OIDC_AUDIENCE}"]
jwks_file = "oidc/jwks.json"
principal_prefix = "ci:"

[[assignment]]
name = "web-team"
role = "Command Invoker"
scope = "clusters/{KUBE}"
claims = {{ team = "web" }}
"#
            ))
    })
}

/// A token of the web team whose `nick` claim is `nick`, valid for ten minutes.
fn token_with_nick(issuer: &TestIssuer, nick: &str) -> String {
    let now = unix_now().unwrap();
    let claims = json!({
        "iss": OIDC_ISSUER,
        "aud": OIDC_AUDIENCE,
        "sub": "deploy-job",
        "team": "web",
        "nick": nick,
        "iat": now,
        "exp": now + 600,
    });
    issuer
        .sign(Algorithm::RS256, TestIssuer::RSA_KID, &claims)
        .unwrap()
}

#[test]
fn a_caller_mapped_to_an_empty_or_unsendable_user_is_refused_before_the_command_runs() {
    let issuer = TestIssuer::new().unwrap();
    let Some(kube) = kube_with_nick_mapping(&issuer) else {
        return;
    };
    kube.sim.clear_requests();
    let marker = kube.gw.scratch("the-command-ran");
    let command = format!("touch '{}'; kubectl get ns", marker.display());
    let cases = [
        (
            "",
            "is empty; a command cannot run without a user to impersonate",
        ),
        ("alice\r\nx", "contains the control character U+000D"),
        ("alice\u{0}", "contains the control character U+0000"),
    ];
    for (nick, problem) in cases {
        let out = kube
            .gw
            .token_client(&token_with_nick(&issuer, nick))
            .unwrap()
            .args(["invoke", "--cluster", KUBE, "--command", &command])
            .run()
            .unwrap();
        assert_eq!(out.code, Some(EXIT_DENIED), "{nick:?}: {out}");
        let expected_start = format!(
            "kinvoke: PERMISSION_DENIED: cannot run as a Kubernetes identity on cluster \"{KUBE}\": the Kubernetes user "
        );
        assert!(out.stderr.starts_with(&expected_start), "{nick:?}: {out}");
        for needle in ["claim \"nick\" by template \"{claim:nick}\"", problem] {
            assert!(
                out.stderr.contains(needle),
                "{nick:?}: no {needle:?} in {out}"
            );
        }
        assert!(!marker.exists(), "{nick:?}: the command ran");
    }
    assert_eq!(
        kube.audit_events("command_accepted").len(),
        0,
        "{}",
        kube.gw.stderr_log()
    );
    assert_eq!(
        relayed_requests(&kube.sim),
        [],
        "a refused caller reached the cluster"
    );

    // the same gateway runs a caller whose nick can be sent
    let out = kube
        .gw
        .token_client(&token_with_nick(&issuer, "alice"))
        .unwrap()
        .args(["invoke", "--cluster", KUBE, "--command", &command])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(marker.exists(), "{out}");
}

#[test]
fn a_utf8_user_name_reaches_the_cluster_as_it_is() {
    let issuer = TestIssuer::new().unwrap();
    let Some(kube) = kube_with_nick_mapping(&issuer) else {
        return;
    };
    kube.sim.clear_requests();
    let out = kube
        .gw
        .token_client(&token_with_nick(&issuer, "josé"))
        .unwrap()
        .args([
            "invoke",
            "--cluster",
            KUBE,
            "--command",
            "kubectl auth whoami -o jsonpath={.status.userInfo.username}",
        ])
        .run()
        .unwrap();
    assert_eq!(body_of_success(&out), ["josé"], "{out}");
    let requests = relayed_requests(&kube.sim);
    assert!(!requests.is_empty(), "nothing reached the cluster");
    for r in &requests {
        let what = format!("{} {}", r.method, r.path);
        assert_eq!(r.header("impersonate-user"), ["josé"], "{what}");
        assert_eq!(r.user.as_deref(), Some("josé"), "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// argv mode: one program, no shell, no flags that change where or as whom

/// An argv-mode cluster on the same simulated cluster as [`KUBE`].
const KUBE_ARGV: &str = "kube-argv";

fn kube_with_argv_cluster() -> Option<Kube> {
    Kube::start_with(|options, path| {
        // the kubeconfig file kube_cluster wrote for KUBE serves this cluster too
        options.extra_toml(&format!(
            "[[cluster]]\nname = {KUBE_ARGV:?}\nmode = \"argv\"\nallowed_programs = [\"kubectl\", \"helm\"]\nkubeconfig = \"{KUBE}.kubeconfig\"\npath = {path:?}\n"
        ))
    })
}

#[test]
fn argv_mode_refuses_connection_flags_and_shell_operators_before_the_command_starts() {
    let Some(kube) = kube_with_argv_cluster() else {
        return;
    };
    let invoke = |command: &str| {
        kube.client()
            .args(["invoke", "--cluster", KUBE_ARGV, "--command", command])
            .run()
            .unwrap()
    };
    // the cluster works: one program through the relay, a quoted operator is an argument
    let out = invoke("kubectl get pods -n demo -o name");
    let body = body_of_success(&out);
    assert!(
        body.contains(&format!("pod/{}", WEB_PODS[0]).as_str()),
        "{out}"
    );
    // (`&` stays unescaped in the URL path, so the cluster's message shows it as it is)
    let literal = invoke("kubectl get configmap -n demo 'a&&b'");
    assert_eq!(literal.code, Some(1), "{literal}");
    assert!(
        literal
            .stdout
            .contains("Error from server (NotFound): configmaps \"a&&b\" not found"),
        "{literal}"
    );
    let accepted = kube.audit_events("command_accepted").len();
    kube.sim.clear_requests();

    let cases = [
        (
            "kubectl --kubeconfig=/etc/kinvoke/kube.kubeconfig get ns",
            "kinvoke: INVALID_ARGUMENT: argv mode refuses --kubeconfig of kubectl: it loads another kubeconfig",
        ),
        (
            "kubectl get ns --token abc",
            "kinvoke: INVALID_ARGUMENT: argv mode refuses --token of kubectl: ",
        ),
        (
            "kubectl get pods -As https://127.0.0.1:1",
            "kinvoke: INVALID_ARGUMENT: argv mode refuses -s/--server of kubectl: ",
        ),
        (
            "helm list --kube-as-user admin",
            "kinvoke: INVALID_ARGUMENT: argv mode refuses --kube-as-user of helm: ",
        ),
        (
            "kubectl get pods -A | grep web",
            "kinvoke: INVALID_ARGUMENT: argv mode runs one program (kubectl) with its arguments; \"|\" is a shell operator; use a cluster in shell mode for pipelines\n",
        ),
        (
            "kubectl get ns $(id -u)",
            "kinvoke: INVALID_ARGUMENT: argv mode runs one program (kubectl) with its arguments; \"$(\" is a shell operator; ",
        ),
        (
            "kubectl plugin list",
            "kinvoke: INVALID_ARGUMENT: argv mode refuses \"kubectl plugin\": ",
        ),
    ];
    for (command, expected) in cases {
        let out = invoke(command);
        assert_eq!(out.code, Some(EXIT_REJECTED), "{command}: {out}");
        assert!(out.stderr.starts_with(expected), "{command}: {out}");
    }
    assert_eq!(
        kube.audit_events("command_accepted").len(),
        accepted,
        "a refused command was accepted:\n{}",
        kube.gw.stderr_log()
    );
    assert_eq!(
        relayed_requests(&kube.sim),
        [],
        "a refused command reached the cluster"
    );

    // what follows `--` is the remote command's, not kubectl's: this one reaches the
    // relay (which refuses exec), it is not refused as a --token flag
    let exec = invoke(&format!(
        "kubectl exec -n demo {} -- ls --token",
        WEB_PODS[0]
    ));
    assert_eq!(exec.code, Some(1), "{exec}");
    assert!(exec.stdout.contains(UPGRADE_REFUSED), "{exec}");
}
