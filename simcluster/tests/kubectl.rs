//! The real, pinned kubectl (1.35.2; 1.37.1 where fetched) against the simulated cluster.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{Env, tool};
use kinvoke_simcluster::{SimOptions, kubeconfig_yaml};

/// Upper bound for a streamed line to arrive; a bound on a hang, not a timing assertion.
const STREAM_DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn kubectl_version_shows_the_server_version() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let out = env.run(&kubectl, &["version"]);
    let stdout = out.success();
    assert!(stdout.contains("Client Version: v1.35.2"), "{stdout}");
    assert!(
        stdout.contains("Server Version: v1.35.2+kinvoke-sim"),
        "{stdout}"
    );
}

#[test]
fn kubectl_get_pods_all_namespaces_prints_a_table() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let out = env.run(&kubectl, &["get", "pods", "-A"]);
    let stdout = out.success();
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    assert!(
        rows.iter()
            .all(|r| r[2] == "1/1" && r[3] == "Running" && r[4] == "0")
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == "kube-system" && r[1].starts_with("coredns-"))
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == "demo" && r[1].starts_with("web-"))
    );
}

#[test]
fn kubectl_get_other_kinds_prints_their_columns() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let ns = env.run(&kubectl, &["get", "namespaces"]);
    assert!(ns.success().starts_with("NAME"), "{}", ns.stdout);
    for name in ["default", "kube-system", "demo"] {
        assert!(ns.stdout.contains(name), "{}", ns.stdout);
    }
    let cms = env.run(&kubectl, &["get", "configmaps", "-n", "demo"]);
    let header: Vec<&str> = cms
        .success()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "DATA", "AGE"]);
    assert!(cms.stdout.contains("web-config"));
    let svc = env.run(&kubectl, &["get", "services", "-n", "default"]);
    assert!(svc.success().contains("10.96.0.1"), "{}", svc.stdout);
    assert!(svc.stdout.contains("443/TCP"), "{}", svc.stdout);
}

#[test]
fn kubectl_get_pods_json_is_a_list_of_running_pods() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let out = env.run(&kubectl, &["get", "pods", "-n", "demo", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(out.success()).expect("kubectl prints JSON");
    let items = list["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2);
    for pod in items {
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["namespace"], "demo");
        assert_eq!(pod["status"]["phase"], "Running");
    }
}

#[test]
fn kubectl_apply_creates_updates_and_delete_removes() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let manifest = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: demo\ndata:\n  k: {value}\n"
        )
    };
    let file = env.write("cm.yaml", &manifest("first"));
    let file = file.to_string_lossy().into_owned();

    let created = env.run(&kubectl, &["apply", "-f", &file]);
    assert!(
        created.success().contains("configmap/applied created"),
        "{}",
        created.stdout
    );
    let value = env.run(
        &kubectl,
        &[
            "get",
            "configmap",
            "applied",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.k}",
        ],
    );
    assert_eq!(value.success(), "first");

    env.write("cm.yaml", &manifest("second"));
    let updated = env.run(&kubectl, &["apply", "-f", &file]);
    assert!(
        updated.success().contains("configmap/applied configured"),
        "{}",
        updated.stdout
    );
    let value = env.run(
        &kubectl,
        &[
            "get",
            "configmap",
            "applied",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.k}",
        ],
    );
    assert_eq!(value.success(), "second");

    // the update went through a strategic merge PATCH, as client-side apply does
    let patched = env.sim.requests().into_iter().any(|r| {
        r.method == "PATCH"
            && r.path == "/api/v1/namespaces/demo/configmaps/applied"
            && r.header("content-type")
                .iter()
                .any(|ct| ct.starts_with("application/strategic-merge-patch+json"))
    });
    assert!(patched, "no strategic merge PATCH recorded");

    let deleted = env.run(&kubectl, &["delete", "configmap", "applied", "-n", "demo"]);
    assert!(
        deleted.success().contains("\"applied\" deleted"),
        "{}",
        deleted.stdout
    );
    let gone = env.run(&kubectl, &["get", "configmap", "applied", "-n", "demo"]);
    assert!(
        gone.failure()
            .contains("Error from server (NotFound): configmaps \"applied\" not found"),
        "{}",
        gone.stderr
    );
}

#[test]
fn kubectl_server_side_apply_creates_and_updates() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let file = env.write(
        "ssa.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: demo\ndata:\n  a: \"1\"\n  b: \"2\"\n",
    );
    let file = file.to_string_lossy().into_owned();
    let out = env.run(&kubectl, &["apply", "--server-side", "-f", &file]);
    assert!(
        out.success().contains("configmap/ssa serverside-applied"),
        "{}",
        out.stdout
    );
    env.write(
        "ssa.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: demo\ndata:\n  a: \"3\"\n",
    );
    env.run(&kubectl, &["apply", "--server-side", "-f", &file])
        .success();
    let data = env.run(
        &kubectl,
        &[
            "get",
            "configmap",
            "ssa",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data}",
        ],
    );
    // the field the same manager stopped applying is gone
    assert_eq!(data.success(), r#"{"a":"3"}"#);
}

#[test]
fn kubectl_get_pods_watch_streams_a_pod_created_later() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let mut watcher = env
        .command(&kubectl)
        .args(["get", "pods", "-w", "-n", "demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w starts");
    let stdout = watcher.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        lines
            .recv_timeout(STREAM_DEADLINE)
            .expect("watch output line")
    };

    // the initial list: header and the two demo pods
    assert!(next().starts_with("NAME"));
    assert!(next().starts_with("web-"));
    assert!(next().starts_with("web-"));

    let created = env.run(
        &kubectl,
        &[
            "run",
            "watched-pod",
            "-n",
            "demo",
            "--image=busybox",
            "--restart=Never",
        ],
    );
    assert!(
        created.success().contains("pod/watched-pod created"),
        "{}",
        created.stdout
    );

    let line = loop {
        let line = next();
        if line.starts_with("watched-pod") {
            break line;
        }
    };
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cells[..4], ["watched-pod", "1/1", "Running", "0"]);

    watcher.kill().expect("stop kubectl get -w");
    let _ = watcher.wait();
    let _ = reader.join();
    let watched = env.sim.requests().into_iter().any(|r| {
        r.path == "/api/v1/namespaces/demo/pods"
            && r.query.unwrap_or_default().contains("watch=true")
    });
    assert!(watched, "no watch request recorded");
}

#[test]
fn kubectl_auth_whoami_reports_the_admin_and_impersonated_users() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let admin = env.run(&kubectl, &["auth", "whoami"]);
    assert!(
        admin.success().contains("kinvoke-gateway"),
        "{}",
        admin.stdout
    );
    assert!(admin.stdout.contains("system:masters"), "{}", admin.stdout);

    env.sim.clear_requests();
    let alice = env.run(
        &kubectl,
        &["auth", "whoami", "--as=alice", "--as-group=devs"],
    );
    let stdout = alice.success();
    assert!(stdout.contains("alice"), "{stdout}");
    assert!(stdout.contains("devs"), "{stdout}");
    assert!(!stdout.contains("kinvoke-gateway"), "{stdout}");

    let review = env
        .sim
        .requests()
        .into_iter()
        .find(|r| r.path == "/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .expect("selfsubjectreview recorded");
    assert_eq!(review.header("impersonate-user"), ["alice"]);
    assert_eq!(review.header("impersonate-group"), ["devs"]);
    assert_eq!(review.user.as_deref(), Some("alice"));
    assert!(review.groups.iter().any(|g| g == "devs"));
    assert!(
        review
            .header("content-type")
            .iter()
            .any(|ct| ct.starts_with("application/vnd.kubernetes.protobuf")),
        "kubectl sends the review as protobuf"
    );
}

#[test]
fn kubectl_auth_can_i_is_yes_unless_denied() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let yes = env.run(&kubectl, &["auth", "can-i", "list", "pods", "--as=alice"]);
    assert_eq!(yes.success().trim(), "yes");
    env.sim.deny_user("alice");
    let no = env.run(&kubectl, &["auth", "can-i", "list", "pods", "--as=alice"]);
    no.failure();
    assert!(no.stdout.starts_with("no"), "{}", no.stdout);
}

#[test]
fn denied_user_is_forbidden_and_impersonation_is_recorded() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    env.sim.deny_user("mallory");
    env.sim.clear_requests();
    let out = env.run(&kubectl, &["--as=mallory", "get", "pods"]);
    let stderr = out.failure();
    assert!(
        stderr.contains(
            "Error from server (Forbidden): pods is forbidden: User \"mallory\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
        "{stderr}"
    );
    let requests = env.sim.requests();
    let list = requests
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/default/pods")
        .expect("pod list recorded");
    assert_eq!(list.header("impersonate-user"), ["mallory"]);
    assert_eq!(list.user.as_deref(), Some("mallory"));
    assert_eq!(list.status, 403);
    // discovery stays open to the denied user, so kubectl got as far as the list
    assert!(requests.iter().any(|r| r.path == "/api" && r.status == 200));
}

#[test]
fn wrong_token_is_unauthorized_and_plain_http_fails() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let bad = env.write(
        "bad-token",
        &kubeconfig_yaml(&env.sim.url(), &env.sim.ca_pem(), "not-the-token"),
    );
    let out = env.run(
        &kubectl,
        &["--kubeconfig", &bad.to_string_lossy(), "get", "pods"],
    );
    assert!(
        out.failure()
            .contains("You must be logged in to the server"),
        "{}",
        out.stderr
    );
    let recorded = env.sim.requests();
    assert!(recorded.iter().all(|r| r.status == 401 && r.user.is_none()));

    let plain = env.write(
        "plain-http",
        &kubeconfig_yaml(
            &env.sim.url().replace("https://", "http://"),
            &env.sim.ca_pem(),
            &env.sim.admin_token(),
        )
        .replace("    certificate-authority-data:", "    x-unused-ca:"),
    );
    let out = env.run(
        &kubectl,
        &["--kubeconfig", &plain.to_string_lossy(), "get", "pods"],
    );
    out.failure();
}

#[test]
fn non_admin_token_cannot_impersonate() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default().with_user_token("bob-token", "bob", &["devs"]));
    let bob = env.write(
        "bob",
        &kubeconfig_yaml(&env.sim.url(), &env.sim.ca_pem(), "bob-token"),
    );
    let bob = bob.to_string_lossy().into_owned();
    let whoami = env.run(&kubectl, &["--kubeconfig", &bob, "auth", "whoami"]);
    assert!(whoami.success().contains("bob"), "{}", whoami.stdout);
    let out = env.run(&kubectl, &["--kubeconfig", &bob, "--as=x", "get", "pods"]);
    assert!(
        out.failure().contains("Error from server (Forbidden)"),
        "{}",
        out.stderr
    );
    // `get --raw` prints the Status message (discovery-driven commands print only the reason)
    let out = env.run(
        &kubectl,
        &[
            "--kubeconfig",
            &bob,
            "--as=x",
            "get",
            "--raw",
            "/api/v1/namespaces/demo/pods",
        ],
    );
    assert!(
        out.failure().contains(
            "users \"x\" is forbidden: User \"bob\" cannot impersonate resource \"users\" in API group \"\""
        ),
        "{}",
        out.stderr
    );
}

#[test]
fn kubectl_logs_and_unsupported_exec() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let pods = env.run(
        &kubectl,
        &[
            "get",
            "pods",
            "-n",
            "demo",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    let pod = pods.success().to_string();
    let logs = env.run(&kubectl, &["logs", "-n", "demo", &pod]);
    assert!(
        logs.success().contains(&format!("pod demo/{pod} started")),
        "{}",
        logs.stdout
    );
    let exec = env.run(&kubectl, &["exec", "-n", "demo", &pod, "--", "ls"]);
    assert!(
        exec.failure()
            .contains("not supported by the simulated cluster"),
        "{}",
        exec.stderr
    );
}

#[test]
fn unknown_resource_is_reported_by_kubectl() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let out = env.run(&kubectl, &["get", "widgets"]);
    assert!(
        out.failure()
            .contains("the server doesn't have a resource type \"widgets\""),
        "{}",
        out.stderr
    );
    let missing = env.run(&kubectl, &["get", "pod", "nope", "-n", "demo"]);
    assert!(
        missing
            .failure()
            .contains("Error from server (NotFound): pods \"nope\" not found"),
        "{}",
        missing.stderr
    );
}

#[test]
fn kubectl_137_basics_work_when_fetched() {
    let path = common::tools_dir().join("kubectl-1.37");
    if !path.is_file() {
        common::skip(&format!("optional {} is not fetched", path.display()));
        return;
    }
    let env = Env::new(SimOptions::default());
    assert!(env.run(&path, &["version"]).success().contains("v1.37.1"));
    assert!(
        env.run(&path, &["get", "pods", "-A"])
            .success()
            .contains("coredns-")
    );
    let file = env.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-137\n  namespace: demo\ndata:\n  k: v\n",
    );
    let out = env.run(&path, &["apply", "-f", &file.to_string_lossy()]);
    assert!(
        out.success().contains("configmap/from-137 created"),
        "{}",
        out.stdout
    );
    let who = env.run(&path, &["auth", "whoami", "--as=alice"]);
    assert!(who.success().contains("alice"), "{}", who.stdout);
}

#[test]
fn scripted_pods_complete_with_their_logs() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    // stands in for running the container: echo its arguments, fail on "false"
    let env = Env::new(SimOptions::default().with_pod_runner(|pod| {
        let args: Vec<String> = pod
            .pointer("/spec/containers/0/args")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match args.split_first() {
            Some((cmd, rest)) if cmd == "echo" => Some(kinvoke_simcluster::PodOutcome {
                exit_code: 0,
                logs: format!("{}\n", rest.join(" ")),
            }),
            Some((cmd, _)) if cmd == "false" => Some(kinvoke_simcluster::PodOutcome {
                exit_code: 1,
                logs: String::new(),
            }),
            _ => None,
        }
    }));
    let run = |name: &str, args: &[&str]| {
        let mut all = vec![
            "run",
            name,
            "-n",
            "demo",
            "--image=busybox",
            "--restart=Never",
            "--",
        ];
        all.extend_from_slice(args);
        env.run(&kubectl, &all).success().to_string()
    };
    run("says-hello", &["echo", "hello", "world"]);
    run("fails", &["false"]);
    let logs = env.run(&kubectl, &["logs", "-n", "demo", "says-hello"]);
    assert_eq!(logs.success(), "hello world\n");
    let pods = env.run(
        &kubectl,
        &["get", "pods", "-n", "demo", "says-hello", "fails"],
    );
    let rows: Vec<Vec<&str>> = pods
        .success()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        &rows[0][..3],
        ["says-hello", "0/1", "Completed"],
        "{}",
        pods.stdout
    );
    assert_eq!(&rows[1][..3], ["fails", "0/1", "Error"], "{}", pods.stdout);
    let phase = env.run(
        &kubectl,
        &[
            "get",
            "pod",
            "fails",
            "-n",
            "demo",
            "-o",
            "jsonpath={.status.phase} {.status.containerStatuses[0].state.terminated.exitCode}",
        ],
    );
    assert_eq!(phase.success(), "Failed 1");
}
