//! The real, pinned helm (4.1.4) against the simulated cluster: install, list, upgrade,
//! uninstall of a chart with a ConfigMap template (releases stored as protobuf Secrets).

mod common;

use common::{Env, tool};
use kinvoke_simcluster::SimOptions;

fn write_chart(env: &Env, greeting: &str) -> String {
    env.write(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: demo-chart\nversion: 0.1.0\nappVersion: \"1.0\"\n",
    );
    env.write(
        "chart/templates/cm.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{{{ .Release.Name }}}}-cm\ndata:\n  greeting: {greeting}\n"
        ),
    );
    env.dir.path().join("chart").to_string_lossy().into_owned()
}

#[test]
fn helm_install_list_upgrade_uninstall() {
    let (Some(helm), Some(kubectl)) = (tool("helm"), tool("kubectl")) else {
        return;
    };
    let env = Env::new(SimOptions::default());
    let chart = write_chart(&env, "hello");

    let install = env.run(&helm, &["install", "demo-release", &chart, "-n", "demo"]);
    assert!(
        install.success().contains("STATUS: deployed"),
        "{}",
        install.stdout
    );

    let list = env.run(&helm, &["list", "-n", "demo"]);
    let row = list
        .success()
        .lines()
        .find(|l| l.starts_with("demo-release"))
        .unwrap_or_else(|| panic!("release listed:\n{}", list.stdout))
        .to_string();
    assert!(row.contains("deployed"), "{row}");
    assert!(row.contains("demo-chart-0.1.0"), "{row}");

    let value = env.run(
        &kubectl,
        &[
            "get",
            "configmap",
            "demo-release-cm",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.greeting}",
        ],
    );
    assert_eq!(value.success(), "hello");

    let requests = env.sim.requests();
    let release_secret_as_protobuf = requests.iter().any(|r| {
        r.method == "POST"
            && r.path == "/api/v1/namespaces/demo/secrets"
            && r.header("content-type")
                .iter()
                .any(|ct| ct.starts_with("application/vnd.kubernetes.protobuf"))
    });
    assert!(
        release_secret_as_protobuf,
        "helm stores the release as a protobuf Secret"
    );
    let server_side_applied = requests.iter().any(|r| {
        r.method == "PATCH"
            && r.path == "/api/v1/namespaces/demo/configmaps/demo-release-cm"
            && r.header("content-type")
                .iter()
                .any(|ct| ct.starts_with("application/apply-patch+yaml"))
    });
    assert!(server_side_applied, "helm 4 applies resources server-side");

    write_chart(&env, "upgraded");
    let upgrade = env.run(&helm, &["upgrade", "demo-release", &chart, "-n", "demo"]);
    assert!(
        upgrade.success().contains("REVISION: 2"),
        "{}",
        upgrade.stdout
    );
    let value = env.run(
        &kubectl,
        &[
            "get",
            "configmap",
            "demo-release-cm",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.greeting}",
        ],
    );
    assert_eq!(value.success(), "upgraded");

    let uninstall = env.run(&helm, &["uninstall", "demo-release", "-n", "demo"]);
    assert!(
        uninstall
            .success()
            .contains("release \"demo-release\" uninstalled"),
        "{}",
        uninstall.stdout
    );
    let list = env.run(&helm, &["list", "-n", "demo"]);
    assert!(!list.success().contains("demo-release"), "{}", list.stdout);
    let gone = env.run(
        &kubectl,
        &["get", "configmap", "demo-release-cm", "-n", "demo"],
    );
    assert!(gone.failure().contains("NotFound"), "{}", gone.stderr);
}

#[test]
fn helm_as_an_impersonated_user_sends_impersonation_headers() {
    let Some(helm) = tool("helm") else {
        return;
    };
    let env = Env::new(SimOptions::default());
    env.sim.clear_requests();
    let list = env.run(
        &helm,
        &[
            "list",
            "-n",
            "demo",
            "--kube-as-user",
            "alice",
            "--kube-as-group",
            "devs",
        ],
    );
    list.success();
    let secrets = env
        .sim
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v1/namespaces/demo/secrets")
        .expect("helm list reads release secrets");
    assert_eq!(secrets.header("impersonate-user"), ["alice"]);
    assert_eq!(secrets.user.as_deref(), Some("alice"));
    // helm repeats the group header; the simulated cluster de-duplicates it
    assert_eq!(
        secrets
            .groups
            .iter()
            .filter(|g| g.as_str() == "devs")
            .count(),
        1,
        "{:?}",
        secrets.groups
    );
    assert!(secrets.query.unwrap_or_default().contains("owner%3Dhelm"));
}
