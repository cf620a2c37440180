//! End-to-end tests of the pod executor: the real gateway and client, a cluster whose API
//! server is a `kinvoke-simcluster` (a simulated Kubernetes API server, a test double)
//! with its simulated kubelet on. Each command runs in a Pod of its own; the simulated
//! kubelet runs the Pod's containers as local processes in the gateway's command sandbox
//! (the image is ignored), so the pinned kubectl and helm do the work inside the Pod and
//! reach the cluster through the relay as the caller.
//!
//! Without the pinned kubectl and helm (`scripts/fetch-kube-tools`) every test prints a
//! SKIPPED line and passes, except under `CI=true`, where they fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinvoke_gateway::exec::pod::{LABEL_MANAGED_BY, MANAGED_BY};
use kinvoke_gateway::sandbox::SandboxSettings;
use kinvoke_gateway::sandbox::launch::Sandbox;
use kinvoke_gateway::sim_kubelet::SandboxRuntime;
use kinvoke_simcluster::{KubeletOptions, SimCluster, SimOptions};
use kinvoke_tests::{Client, Gateway, GatewayOptions, Output, binary, kube_tools, kube_tools_path};
use serde_json::Value;

/// The cluster whose commands run in Pods.
const PODS: &str = "pods";
/// The pod executor's namespace (its default).
const NAMESPACE: &str = "kinvoke-command";
/// Exit status of `kinvoke` when the command could not run.
const EXIT_FAILED: i32 = 125;
/// Exit status of `kinvoke` when the command timed out.
const EXIT_TIMED_OUT: i32 = 124;

/// A simulated cluster with a kubelet, and a gateway running commands on it in Pods.
struct Pods {
    // declared first, so dropped first: the gateway stops its commands while the API
    // server still answers
    gw: Gateway,
    sim: SimCluster,
}

impl Pods {
    fn start() -> Option<Self> {
        Self::start_with(|k| k, "")
    }

    /// `kubelet` adjusts the simulated kubelet; `pod_toml` is added to `[cluster.pod]`.
    fn start_with(
        kubelet: impl FnOnce(KubeletOptions) -> KubeletOptions,
        pod_toml: &str,
    ) -> Option<Self> {
        Self::start_full(kubelet, "", pod_toml, GatewayOptions::default())
    }

    /// Like [`Pods::start_with`], with more keys of the cluster (`mode = "argv"`) and the
    /// gateway's other options (limits).
    fn start_full(
        kubelet: impl FnOnce(KubeletOptions) -> KubeletOptions,
        cluster_toml: &str,
        pod_toml: &str,
        options: GatewayOptions,
    ) -> Option<Self> {
        let tools = kube_tools().unwrap()?;
        let sandbox = Sandbox::with_launcher(
            SandboxSettings::default(),
            binary("kinvoke-gateway").unwrap(),
        );
        let path = kube_tools_path(&tools);
        let runtime = Arc::new(SandboxRuntime::new(Arc::new(sandbox), path.clone()));
        let kubelet =
            kubelet(KubeletOptions::new(runtime).only_labelled(LABEL_MANAGED_BY, MANAGED_BY));
        let sim = SimCluster::spawn(SimOptions::default().with_kubelet(kubelet))
            .expect("the simulated cluster starts");
        sim.create_namespace(NAMESPACE).unwrap();
        // shell mode unless cluster_toml says otherwise
        let mode = if cluster_toml.contains("mode =") {
            ""
        } else {
            "mode = \"shell\"\n"
        };
        let options = options
            .file("pods.kubeconfig", sim.admin_kubeconfig())
            .extra_toml(&format!(
                "[[cluster]]\nname = \"{PODS}\"\nexecutor = \"pod\"\nkubeconfig = \"pods.kubeconfig\"\npath = {path:?}\n{mode}{cluster_toml}\n\n[cluster.pod]\nloopback_relay = true\n{pod_toml}\n"
            ));
        let gw = Gateway::start_with(options).expect("the gateway starts");
        Some(Self { gw, sim })
    }

    fn client(&self) -> Client {
        self.gw.client().unwrap()
    }

    fn invoke(&self, command: &str, extra: &[&str]) -> Output {
        self.client()
            .args(["invoke", "--cluster", PODS, "--command", command])
            .args(extra)
            .run()
            .unwrap()
    }

    /// Starts `command` with `--no-wait`; its id.
    fn start_command(&self, command: &str) -> String {
        let out = self
            .client()
            .args([
                "-o",
                "tsv",
                "invoke",
                "--cluster",
                PODS,
                "--no-wait",
                "--command",
                command,
            ])
            .run()
            .unwrap();
        assert_eq!(out.code, Some(0), "{out}");
        out.stdout.split_whitespace().next().unwrap().to_owned()
    }

    /// Starts a command that prints `started` and then sleeps, and waits (following its
    /// output) until it runs: its id and the follower.
    fn start_sleeper(&self) -> (String, kinvoke_tests::Background) {
        let id = self.start_command("echo started; exec sleep 300");
        let mut follower = self
            .client()
            .args(["logs", "--cluster", PODS, "--command-id", &id, "--follow"])
            .spawn()
            .unwrap();
        follower.wait_for_line("started").unwrap();
        (id, follower)
    }

    /// Cancels a command, checks the client says so, and waits for its Pod and Secret to
    /// go.
    fn cancel(&self, id: &str) {
        let canceled = self
            .client()
            .args(["cancel", "--cluster", PODS, "--command-id", id])
            .run()
            .unwrap();
        assert_eq!(canceled.code, Some(0), "{canceled}");
        assert!(
            canceled.stdout.contains("command canceled with reason"),
            "{canceled}"
        );
        self.await_no_leftovers("after cancel");
    }

    fn names(&self, plural: &str) -> Vec<String> {
        self.sim
            .objects(plural, NAMESPACE)
            .iter()
            .filter_map(|o| {
                o.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Waits until the command namespace holds no Pod and no Secret. The simulated
    /// cluster cannot wake the test, so this polls; the pause only paces the polls.
    fn await_no_leftovers(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (pods, secrets) = (self.names("pods"), self.names("secrets"));
            if pods.is_empty() && secrets.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: Pods {pods:?} and Secrets {secrets:?} are still there; gateway log:\n{}",
                self.gw.stderr_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The (resource, verb) pairs README.md and the Helm chart grant the gateway in the
/// command namespace.
const GRANTED: [(&str, &str); 9] = [
    ("pods", "create"),
    ("pods", "list"),
    ("pods", "watch"),
    ("pods", "delete"),
    ("pods/log", "get"),
    ("secrets", "create"),
    ("secrets", "patch"),
    ("secrets", "list"),
    ("secrets", "delete"),
];

/// Every request the gateway made with its own identity (not a caller's) in the command
/// namespace needs only the documented rights.
fn assert_gateway_used_only_its_documented_rights(sim: &SimCluster) {
    let prefix = format!("/api/v1/namespaces/{NAMESPACE}/");
    let mut seen = 0;
    for r in sim.requests() {
        let own = r.user.as_deref() == Some(kinvoke_simcluster::ADMIN_USER);
        let Some(rest) = r.path.strip_prefix(&prefix).filter(|_| own) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let resource = match parts.as_slice() {
            [kind, _, sub] => format!("{kind}/{sub}"),
            [kind, ..] => (*kind).to_owned(),
            [] => continue,
        };
        let watch = r.query.as_deref().is_some_and(|q| q.contains("watch=true"));
        let verb = match (r.method.as_str(), parts.len(), watch) {
            ("GET", _, true) => "watch",
            ("GET", 1, false) => "list",
            ("GET", _, false) => "get",
            ("POST", _, _) => "create",
            ("PATCH", _, _) => "patch",
            ("DELETE", _, _) => "delete",
            (other, _, _) => other,
        };
        assert!(
            GRANTED.contains(&(resource.as_str(), verb)),
            "the gateway used {verb} on {resource}: {r:?}"
        );
        seen += 1;
    }
    assert!(seen > 0, "no request of the gateway's own was seen");
}

/// The lines after the result header, which must say `exitcode=CODE`.
fn body(out: &Output, code: i32) -> Vec<&str> {
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.ends_with(&format!("with exitcode={code}")), "{out}");
    lines.collect()
}

#[test]
fn kubectl_in_a_pod_prints_the_clusters_table_and_its_exit_code_is_the_clients() {
    let Some(pods) = Pods::start() else { return };
    let out = pods.invoke("kubectl get pods -n demo; exit 3", &[]);
    assert_eq!(out.code, Some(3), "{out}");
    let lines = body(&out, 3);
    assert!(lines[0].starts_with("NAME"), "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with("web-5d9c7b8f6d-4hx2p")),
        "{out}"
    );
    // the command ran in a Pod, as the caller, and nothing of it is left
    let created = pods
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == format!("/api/v1/namespaces/{NAMESPACE}/pods"))
        .count();
    assert_eq!(created, 1, "one Pod per command");
    let listed = pods
        .sim
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v1/namespaces/demo/pods" && r.method == "GET")
        .expect("kubectl listed the pods");
    assert_eq!(
        listed.user.as_deref(),
        Some(kinvoke_tests::USER),
        "{listed:?}"
    );
    pods.await_no_leftovers("after the command ended");
    assert_gateway_used_only_its_documented_rights(&pods.sim);
}

#[test]
fn output_printed_over_seconds_streams_live_to_logs_follow() {
    let Some(pods) = Pods::start() else { return };
    // the command waits for the test to answer its first line, so "second" can only
    // come after "first" was seen live
    let id = pods.start_command(
        "echo first; until kubectl get configmap go -n default >/dev/null 2>&1; do sleep 0.2; done; echo second",
    );
    let mut follower = pods
        .client()
        .args(["logs", "--cluster", PODS, "--command-id", &id, "--follow"])
        .spawn()
        .unwrap();
    follower.wait_for_line("first").unwrap();
    assert!(!follower.stdout_so_far().contains("second"));
    let go = pods.invoke("kubectl create configmap go -n default", &[]);
    assert_eq!(go.code, Some(0), "{go}");
    follower.wait_for_line("second").unwrap();
    let out = follower.wait().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let result = pods
        .client()
        .args(["result", "--cluster", PODS, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(body(&result, 0), ["first", "second"], "{result}");
}

#[test]
fn an_attached_chart_installs_with_helm_in_a_pod() {
    let Some(pods) = Pods::start() else { return };
    let chart = pods.gw.scratch("chart");
    fs::create_dir_all(chart.join("templates")).unwrap();
    fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: pod-demo\ndescription: installed from a command Pod\ntype: application\nversion: 0.1.0\n",
    )
    .unwrap();
    fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-settings\ndata:\n  release: {{ .Release.Name | quote }}\n",
    )
    .unwrap();
    let script = pods.gw.scratch("check.sh");
    fs::write(
        &script,
        "#!/bin/sh\nkubectl get configmap \"$1-settings\" -n demo -o jsonpath='{.data.release}'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).unwrap();
    let out = pods.invoke(
        "helm install pod-release ./chart -n demo >/dev/null && ./check.sh pod-release",
        &[
            "--file",
            chart.to_str().unwrap(),
            "--file",
            script.to_str().unwrap(),
        ],
    );
    assert_eq!(body(&out, 0), ["pod-release"], "{out}");
}

#[test]
fn an_unschedulable_pod_fails_with_the_schedulers_message_within_the_startup_timeout() {
    let Some(pods) = Pods::start_with(
        |k| k.with_taint("CriticalAddonsOnly", "true", "NoSchedule"),
        "startup_timeout = \"2s\"",
    ) else {
        return;
    };
    let started = Instant::now();
    let out = pods.invoke("echo never", &[]);
    assert_eq!(out.code, Some(EXIT_FAILED), "{out}");
    assert!(
        out.stdout.contains("did not start within 2s")
            && out.stdout.contains(
                "Unschedulable: 0/1 nodes are available: 1 node(s) had untolerated taint {CriticalAddonsOnly: true}"
            ),
        "{out}"
    );
    assert!(!out.stdout.contains("never"), "{out}");
    // bounded by the start-up timeout, not the command's
    assert!(started.elapsed() < Duration::from_secs(60), "{out}");
    pods.await_no_leftovers("after a Pod that never started");
}

#[test]
fn tolerations_let_a_pod_run_on_a_tainted_node() {
    let Some(pods) = Pods::start_with(
        |k| k.with_taint("CriticalAddonsOnly", "true", "NoSchedule"),
        "tolerations = [{ key = \"CriticalAddonsOnly\", operator = \"Exists\" }]",
    ) else {
        return;
    };
    let out = pods.invoke("echo ran", &[]);
    assert_eq!(body(&out, 0), ["ran"], "{out}");
}

#[test]
fn an_image_that_cannot_be_pulled_is_named_in_the_error() {
    let Some(pods) = Pods::start_with(
        |k| k.with_unpullable_image("registry.example/toolbox:missing"),
        "image = \"registry.example/toolbox:missing\"\nstartup_timeout = \"2s\"",
    ) else {
        return;
    };
    let out = pods.invoke("echo never", &[]);
    assert_eq!(out.code, Some(EXIT_FAILED), "{out}");
    assert!(
        out.stdout.contains(
            "ImagePullBackOff: Back-off pulling image \"registry.example/toolbox:missing\""
        ),
        "{out}"
    );
}

#[test]
fn cancel_deletes_the_pod() {
    let Some(pods) = Pods::start() else { return };
    let (id, follower) = pods.start_sleeper();
    assert_eq!(pods.names("pods"), [format!("kinvoke-{id}")]);
    pods.cancel(&id);
    assert_gateway_used_only_its_documented_rights(&pods.sim);
    let requests = pods.sim.requests();
    assert!(
        requests.iter().any(|r| r.method == "DELETE"
            && r.path == format!("/api/v1/namespaces/{NAMESPACE}/pods/kinvoke-{id}")),
        "the gateway deleted the Pod"
    );
    let _ = follower.wait();
}

#[test]
fn a_gateway_killed_mid_command_leaves_no_pod_or_secret_after_restart() {
    let Some(mut pods) = Pods::start() else {
        return;
    };
    let (id, mut follower) = pods.start_sleeper();
    follower.kill().unwrap();
    pods.gw.kill().unwrap();
    // the Pod outlives the gateway that made it
    assert_eq!(pods.names("pods"), [format!("kinvoke-{id}")]);
    assert_eq!(pods.names("secrets"), [format!("kinvoke-{id}")]);
    pods.gw.restart().unwrap();
    pods.await_no_leftovers("after the restart");
    let out = pods
        .client()
        .args(["result", "--cluster", PODS, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_FAILED), "{out}");
    assert!(
        out.stdout
            .contains("command failed with reason: gateway restarted before the command finished"),
        "{out}"
    );
}

#[test]
fn a_command_pod_is_pending_until_it_runs() {
    let Some(pods) = Pods::start_with(
        |k| k,
        "node_selector = { pool = \"gpu\" }\nstartup_timeout = \"30s\"",
    ) else {
        return;
    };
    let id = pods.start_command("echo never");
    let out = pods
        .client()
        .args([
            "-o",
            "json",
            "result",
            "--cluster",
            PODS,
            "--command-id",
            &id,
        ])
        .run()
        .unwrap();
    assert_eq!(out.json().unwrap()["provisioningState"], "Pending", "{out}");
    pods.cancel(&id);
}

#[test]
fn a_command_past_its_timeout_is_stopped_by_the_pods_deadline() {
    let Some(pods) = Pods::start() else { return };
    let out = pods.invoke("echo started; exec sleep 300", &["--timeout", "2s"]);
    assert_eq!(out.code, Some(EXIT_TIMED_OUT), "{out}");
    assert!(out.stdout.contains("command timed out"), "{out}");
    pods.await_no_leftovers("after a timeout");
}

#[test]
fn pods_not_made_by_kinvoke_are_not_run_on_the_gateways_host() {
    let Some(pods) = Pods::start() else { return };
    // a caller's own Pod with a command stays a simulated one: nothing of it runs here
    let out = pods.invoke(
        "kubectl run probe -n default --restart=Never --image=busybox --command -- sh -c 'echo RAN' && kubectl get pod probe -n default -o jsonpath='{.status.phase}'",
        &[],
    );
    assert_eq!(body(&out, 0), ["pod/probe created", "Running"], "{out}");
}

#[test]
fn argv_mode_applies_its_rules_before_any_pod_is_made() {
    let Some(pods) = Pods::start_full(|k| k, "mode = \"argv\"", "", GatewayOptions::default())
    else {
        return;
    };
    let ok = pods.invoke("kubectl get pods -n demo", &[]);
    let lines = body(&ok, 0);
    assert!(lines.iter().any(|l| l.starts_with("web-")), "{ok}");
    let before = pods.sim.requests().len();
    for refused in [
        "kubectl get pods -A | grep web",
        "kubectl --kubeconfig=/x get ns",
        "sh -c 'kubectl get ns'",
    ] {
        let out = pods.invoke(refused, &[]);
        assert_ne!(out.code, Some(0), "{refused}: {out}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{refused}: {out}");
    }
    let created = pods
        .sim
        .requests()
        .into_iter()
        .skip(before)
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(created, 0, "a refused command made no Pod or Secret");
}

#[test]
fn output_past_the_cap_is_cut_and_reported_as_with_the_local_executor() {
    let Some(pods) = Pods::start_full(
        |k| k,
        "",
        "",
        GatewayOptions::default().limit("max_output_bytes", "1KiB"),
    ) else {
        return;
    };
    let command =
        "printf 'start\\n'; head -c 5000 /dev/zero | tr '\\0' a; printf '\\nfinal error line\\n'";
    let out = pods.invoke(command, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("[kinvoke: 4000 bytes of output left out here (limits.max_output_bytes)]"),
        "{out}"
    );
    assert!(out.stdout.ends_with("final error line\n"), "{out}");
    assert!(out.stdout.contains("start\naaa"), "{out}");
    assert!(
        out.stderr
            .contains("kinvoke: output was cut: 5024 bytes were written"),
        "{out}"
    );
}

#[test]
fn attached_files_keep_their_modes_in_the_pod() {
    let Some(pods) = Pods::start() else { return };
    use std::os::unix::fs::PermissionsExt;
    let dir = pods.gw.scratch("modes");
    fs::create_dir_all(dir.join("sub")).unwrap();
    for (name, mode) in [
        ("secret.yaml", 0o600),
        ("run.sh", 0o750),
        ("sub/plain.txt", 0o644),
    ] {
        let file = dir.join(name);
        fs::write(&file, "x\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = pods.invoke(
        "stat -c '%a %n' modes/secret.yaml modes/run.sh modes/sub/plain.txt",
        &["--file", dir.to_str().unwrap()],
    );
    assert_eq!(
        body(&out, 0),
        [
            "600 modes/secret.yaml",
            "750 modes/run.sh",
            "644 modes/sub/plain.txt"
        ],
        "{out}"
    );
}

#[test]
fn output_that_is_not_utf8_arrives_byte_for_byte_from_the_pod() {
    let Some(pods) = Pods::start() else { return };
    let out = pods.invoke("printf 'ok\\377\\376\\n'", &["-o", "json"]);
    assert_eq!(out.code, Some(0), "{out}");
    let json = out.json().unwrap();
    assert_eq!(json["logsEncoding"], "utf-8-lossy", "{out}");
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(json["logsBase64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, b"ok\xff\xfe\n", "{out}");
}

#[test]
fn a_pod_that_mounts_a_volume_over_the_kernels_file_systems_never_runs() {
    let Some(pods) = Pods::start() else { return };
    // a caller's own Pod, labelled like the gateway's so the simulated kubelet takes it,
    // with a writable volume at /proc/sys: were it to run, its Landlock rights would land
    // on the host's kernel settings
    let script = r#"kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Pod
metadata:
  name: evil
  namespace: default
  labels: {app.kubernetes.io/managed-by: kinvoke}
spec:
  restartPolicy: Never
  volumes: [{name: p, emptyDir: {}}]
  containers:
  - name: c
    image: x
    command: ["sh", "-c", "echo RAN"]
    volumeMounts: [{name: p, mountPath: /proc/sys}]
YAML
for i in $(seq 200); do
  phase=$(kubectl get pod evil -n default -o jsonpath='{.status.phase}')
  case "$phase" in Succeeded|Failed) break ;; esac
  sleep 0.05
done
echo "phase=$phase"
kubectl get pod evil -n default -o jsonpath='{.status.message}'; echo
kubectl logs evil -n default 2>&1; true"#;
    let out = pods.invoke(script, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("phase=Failed"), "{out}");
    assert!(
        out.stdout
            .contains("at /proc/sys, where the kernel's file systems are"),
        "{out}"
    );
    assert!(!out.stdout.contains("RAN"), "the container ran: {out}");
}
