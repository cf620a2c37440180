//! The deployment files in `deploy/`, checked with the real tools: the Helm chart with
//! `helm lint` and `helm template` (the pinned helm of `scripts/fetch-kube-tools`), every
//! rendered object against the Kubernetes schemas with `kubernetes-validate`, the chart
//! and the Dockerfile with `checkov` (both from `scripts/fetch-deploy-tools`), and the
//! gateway config the chart renders with the gateway's own parser.
//!
//! Without the tools every test prints a SKIPPED line and passes, except under `CI=true`
//! or `KINVOKE_REQUIRE_KUBE_TOOLS=1` (the README's test command), where they fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kinvoke_gateway::config::Config;
use kinvoke_tests::kube_tools;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/kinvoke")
}

/// The validators' virtualenv, or `None` (after a SKIPPED line) when it is missing and
/// may be.
fn venv() -> Option<PathBuf> {
    let venv = repo().join(".tools/venv/bin");
    if venv.join("checkov").is_file() && venv.join("kubernetes-validate").is_file() {
        return Some(venv);
    }
    let set = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !(set("CI") || set("KINVOKE_REQUIRE_KUBE_TOOLS")),
        "checkov and kubernetes-validate are missing in {}: run scripts/fetch-deploy-tools",
        venv.display()
    );
    println!("SKIPPED: checkov and kubernetes-validate not found: run scripts/fetch-deploy-tools");
    None
}

/// Runs a program; its stdout, or a panic with everything it printed.
fn run(program: &Path, args: &[&str], path_dir: &Path) -> String {
    let path = format!(
        "{}:{}",
        path_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(program)
        .args(args)
        .env("PATH", path)
        .current_dir(chart())
        .output()
        .unwrap_or_else(|e| panic!("{} does not start: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The values files the chart is checked with: its defaults and each example.
const VALUES: [Option<&str>; 3] = [
    None,
    Some("examples/aks-public.yaml"),
    Some("examples/private-peering.yaml"),
];

fn template(helm: &Path, tools: &Path, values: Option<&str>, extra: &[&str]) -> String {
    let mut args = vec!["template", "kinvoke", ".", "--namespace", "kinvoke"];
    if let Some(values) = values {
        args.extend(["-f", values]);
    }
    args.extend(extra);
    run(helm, &args, tools)
}

#[test]
fn the_chart_lints_renders_and_every_object_passes_the_kubernetes_schemas() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let Some(venv) = venv() else { return };
    let helm = tools.join("helm");
    let scratch = tempfile::tempdir().unwrap();
    for values in VALUES {
        let mut lint = vec!["lint", ".", "--strict"];
        if let Some(values) = values {
            lint.extend(["-f", values]);
        }
        run(&helm, &lint, &tools);
        let rendered = template(&helm, &tools, values, &[]);
        let file = scratch
            .path()
            .join(values.unwrap_or("defaults").replace('/', "-"));
        std::fs::write(&file, &rendered).unwrap();
        let validated = run(
            &venv.join("kubernetes-validate"),
            &["--strict", "--quiet", file.to_str().unwrap()],
            &venv,
        );
        assert!(!validated.contains("ERROR"), "{validated}");
        for kind in [
            "kind: Deployment",
            "kind: ServiceAccount",
            "kind: ClusterRole",
            "kind: NetworkPolicy",
            "kind: PodDisruptionBudget",
            "kind: ConfigMap",
            "name: kinvoke-relay",
        ] {
            assert!(
                rendered.contains(kind),
                "{values:?} renders no {kind}:\n{rendered}"
            );
        }
    }
}

#[test]
fn the_config_the_chart_renders_is_one_the_gateway_accepts() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let helm = tools.join("helm");
    for values in VALUES {
        let rendered = template(
            &helm,
            &tools,
            values,
            &["--show-only", "templates/configmap.yaml"],
        );
        let configmap: serde_json::Value = serde_saphyr::from_str(&rendered).unwrap();
        let toml = configmap["data"]["gateway.toml"].as_str().unwrap();
        let config = Config::parse(toml, Path::new("/etc/kinvoke"))
            .unwrap_or_else(|e| panic!("{values:?}: {e}\n{toml}"));
        assert_eq!(config.clusters.len(), 1, "{toml}");
        assert!(
            config.admin.is_some(),
            "the probes need the admin listener:\n{toml}"
        );
        let pod = config.clusters[0].pod.as_ref();
        assert!(
            pod.is_some(),
            "the chart runs commands in Pods by default:\n{toml}"
        );
    }
    // the tolerations of the AKS example reach the pod executor
    let rendered = template(
        &helm,
        &tools,
        Some("examples/aks-public.yaml"),
        &["--show-only", "templates/configmap.yaml"],
    );
    let configmap: serde_json::Value = serde_saphyr::from_str(&rendered).unwrap();
    let config = Config::parse(
        configmap["data"]["gateway.toml"].as_str().unwrap(),
        Path::new("/etc/kinvoke"),
    )
    .unwrap();
    let pod = config.clusters[0].pod.as_ref().unwrap();
    assert_eq!(pod.tolerations.len(), 1);
    assert_eq!(
        pod.tolerations[0].key.as_deref(),
        Some("CriticalAddonsOnly")
    );
    assert_eq!(config.listeners.len(), 1);
    // values of every kind reach the assignment: a bool, a duration, a pattern
    let oncall = config
        .policy
        .assignment("oncall-prod")
        .expect("the break-glass assignment is rendered");
    assert!(
        oncall.eligibility.is_some(),
        "eligible = true was rendered as a bool"
    );
}

#[test]
fn the_rbac_is_exactly_what_the_gateway_uses() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let helm = tools.join("helm");
    let rendered = template(&helm, &tools, None, &["--show-only", "templates/rbac.yaml"]);
    let documents: Vec<serde_json::Value> = rendered
        .split("\n---")
        .filter(|d| d.contains("kind:"))
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let rules = |kind: &str| -> Vec<(Vec<String>, Vec<String>)> {
        let doc = documents.iter().find(|d| d["kind"] == kind).unwrap();
        doc["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let strings = |key: &str| -> Vec<String> {
                    r[key]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect()
                };
                (strings("resources"), strings("verbs"))
            })
            .collect()
    };
    for (resources, verbs) in rules("ClusterRole") {
        assert_eq!(
            verbs,
            ["impersonate"],
            "cluster-wide: impersonation only ({resources:?})"
        );
    }
    let role = rules("Role");
    assert_eq!(
        role,
        [
            (
                vec!["pods".to_owned()],
                ["create", "list", "watch", "delete"]
                    .map(str::to_owned)
                    .to_vec()
            ),
            (vec!["pods/log".to_owned()], vec!["get".to_owned()]),
            (
                vec!["secrets".to_owned()],
                ["create", "patch", "list", "delete"]
                    .map(str::to_owned)
                    .to_vec()
            ),
        ]
    );
    let namespace =
        documents.iter().find(|d| d["kind"] == "Role").unwrap()["metadata"]["namespace"].clone();
    assert_eq!(
        namespace, "kinvoke-command",
        "the pod executor's rights are in its namespace only"
    );
}

#[test]
fn values_that_cannot_work_are_refused_when_rendering_naming_why() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let cases = [
        (
            vec!["--set", "podExecutor.enabled=false"],
            "podExecutor.enabled=false would run commands in the gateway's own container",
        ),
        (
            vec!["--set", "replicaCount=2"],
            "store.persistence.enabled with replicaCount > 1",
        ),
        (
            vec!["--set", "listeners.public.enabled=true"],
            "listeners.public.authorizedIpRanges is empty",
        ),
        (
            vec!["--set", "tls.existingSecret="],
            "tls.existingSecret is required",
        ),
    ];
    for (args, reason) in cases {
        let mut all = vec!["template", "kinvoke", ".", "--namespace", "kinvoke"];
        all.extend(args.iter().copied());
        let out = Command::new(tools.join("helm"))
            .args(&all)
            .current_dir(chart())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} rendered");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

/// Runs checkov; panics naming any failed check. Skips are allowed only with a reason
/// (`checkov.io/skipN: CHECK=why` in the chart).
fn checkov(venv: &Path, tools: &Path, args: &[&str]) -> String {
    let mut all = vec!["--skip-download", "--compact", "--quiet", "--output", "cli"];
    all.extend(args);
    let path = format!(
        "{}:{}:{}",
        venv.display(),
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(venv.join("checkov"))
        .args(&all)
        .env("PATH", path)
        // no phone-home: the machine reaches no such service
        .env("BC_SKIP_MAPPING", "TRUE")
        .current_dir(chart())
        .output()
        .expect("checkov starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("Failed checks: 0"),
        "checkov {args:?} ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn checkov_finds_no_unexplained_problem_in_the_chart_or_the_dockerfile() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    let Some(venv) = venv() else { return };
    checkov(&venv, &tools, &["-d", ".", "--framework", "helm"]);
    let dockerfile = repo().join("deploy/Dockerfile");
    checkov(
        &venv,
        &tools,
        &[
            "-f",
            dockerfile.to_str().unwrap(),
            "--framework",
            "dockerfile",
        ],
    );
    // every skip in the chart says why
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines().filter(|l| l.contains("checkov.io/skip")) {
            let reason = line
                .split_once('=')
                .map(|(_, r)| r.trim())
                .unwrap_or_default();
            assert!(reason.len() > 20, "a skip without a reason: {line}");
        }
    }
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit =
        std::fs::read_to_string(repo().join("deploy/systemd/kinvoke-gateway.service")).unwrap();
    let has = |directive: &str| unit.lines().any(|l| l.trim() == directive);
    for directive in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "User=kinvoke",
        "KillMode=mixed",
        "StateDirectory=kinvoke",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/kinvoke-gateway serve --config /etc/kinvoke/gateway.toml",
    ] {
        assert!(has(directive), "{directive} missing:\n{unit}");
    }
    // the sandbox needs these namespaces and nothing more
    assert!(has("RestrictNamespaces=user pid mnt ipc"), "{unit}");
    // the user it names exists once systemd-sysusers has read the file shipped with it
    let sysusers =
        std::fs::read_to_string(repo().join("deploy/systemd/kinvoke.sysusers.conf")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u kinvoke ")),
        "{sysusers}"
    );
}
