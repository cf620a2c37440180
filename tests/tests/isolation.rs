//! Command isolation, end to end: hostile commands run through the real gateway and
//! client against a simulated cluster (`kinvoke-simcluster`, a test double) with the
//! pinned kubectl, and each test asserts the refusal or the absence: the secret is not
//! printed, the file is unchanged, the process is gone, the gateway still runs. One table
//! per property of SECURITY.md (P1 secrets out of reach, P2 writes confined, P3 no
//! signals, P4 nothing outlives the command, P6 never interactive).
//!
//! These run for real on a kernel with Landlock and user namespaces (CI's has both); a
//! gateway that cannot sandbox refuses to start, so they cannot pass unsandboxed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;
use std::path::{Path, PathBuf};

use kinvoke_simcluster::{SimCluster, SimOptions};
use kinvoke_tests::{
    Background, ClientCert, Gateway, GatewayOptions, Output, audit_verify, check_config,
    kube_tools, kube_tools_path,
};

/// The shell-mode cluster whose API server is the simulated one.
const KUBE: &str = "kube";

/// The argv-mode cluster on the same simulated API server.
const KUBE_ARGV: &str = "kube-argv";

/// What a hostile command prints only if its attack worked.
const LEAKED: &str = "LEAKED";

/// A gateway with a sandboxed cluster [`KUBE`] in front of a simulated cluster, and a
/// second caller, bob, who may run commands there too.
struct Sandboxed {
    gw: Gateway,
    _sim: SimCluster,
    bob: ClientCert,
}

impl Sandboxed {
    fn start() -> Option<Self> {
        let tools = kube_tools().unwrap()?;
        let sim = SimCluster::spawn(SimOptions::default()).expect("the simulated cluster starts");
        let path = kube_tools_path(&tools);
        let options = GatewayOptions::default()
            .kube_cluster(KUBE, &sim.admin_kubeconfig(), &path)
            // a command whose main process ends must not wait for stragglers: with a
            // grace this long, a test that waited for it would hit the client's timeout
            .limit("kill_grace", "10m")
            .extra_toml(&format!(
                "\n[[cluster]]\nname = \"{KUBE_ARGV}\"\nmode = \"argv\"\nkubeconfig = \"{KUBE}.kubeconfig\"\npath = {path:?}\n\
                 \n[[assignment]]\nprincipal = \"bob\"\nrole = \"Cluster Admin\"\nscope = \"clusters/*\"\n"
            ));
        let gw = Gateway::start_with(options).expect("the gateway starts");
        let bob = gw.pki().client_cert("bob").unwrap();
        Some(Self { gw, _sim: sim, bob })
    }

    /// `kinvoke invoke --cluster kube --command COMMAND EXTRA...` as the test user.
    fn invoke(&self, command: &str, extra: &[&str]) -> Output {
        self.gw
            .client()
            .unwrap()
            .args(["invoke", "--cluster", KUBE, "--command", command])
            .args(extra)
            .run()
            .unwrap()
    }

    /// Starts `command` with `--no-wait` (and `extra`) as the test user, follows it until
    /// it prints `ready`, and returns its id and the follower.
    fn start_until_ready(&self, command: &str, extra: &[&str]) -> (String, Background) {
        let started = self
            .gw
            .client()
            .unwrap()
            .args([
                "-o",
                "tsv",
                "invoke",
                "--cluster",
                KUBE,
                "--no-wait",
                "--command",
            ])
            .arg(command)
            .args(extra)
            .run()
            .unwrap();
        assert_eq!(started.code, Some(0), "{started}");
        let id = started.stdout.split('\t').next().unwrap().trim().to_owned();
        let mut follow = self.gw.follow(KUBE, &id).unwrap();
        follow.wait_for_line("ready").unwrap();
        (id, follow)
    }

    /// Cancels a command and checks its follower saw it end canceled (exit 130).
    fn cancel(&self, id: &str, follow: Background) {
        let cancel = self
            .gw
            .client()
            .unwrap()
            .args(["cancel", "--cluster", KUBE, "--command-id", id])
            .run()
            .unwrap();
        assert_eq!(cancel.code, Some(0), "{cancel}");
        let followed = follow.wait().unwrap();
        assert_eq!(followed.code, Some(130), "canceled: {followed}");
    }

    /// Replaces the placeholders a hostile command names its targets with.
    fn expand(&self, template: &str) -> String {
        template
            .replace("{gw}", &self.gw.dir().display().to_string())
            .replace("{pid}", &self.gw.pid().unwrap().to_string())
            .replace("{work_root}", &self.gw.work_root().display().to_string())
    }
}

/// Runs each `(name, command)` and asserts that none printed [`LEAKED`] nor any of
/// `secrets`, and that the gateway survived.
fn assert_all_refused(env: &Sandboxed, cases: &[(&str, &str)], secrets: &[&str]) {
    for (name, template) in cases {
        let command = env.expand(template);
        let out = env.invoke(&command, &[]);
        assert!(
            out.stdout
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("command started at")),
            "{name}: the command did not run: {out}"
        );
        assert!(
            !out.stdout.contains(LEAKED),
            "{name}: `{command}` worked:\n{out}"
        );
        for secret in secrets {
            assert!(
                !out.stdout.contains(secret),
                "{name}: `{command}` printed {secret:?}:\n{out}"
            );
        }
    }
    assert!(env.gw.is_running(), "the gateway died");
}

#[test]
fn p1_no_command_reads_the_gateways_secrets() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    // what would show if a read worked: the key's PEM header, the admin token's line, the
    // config's first line, an audit line's field
    let secrets = [
        "PRIVATE KEY",
        "token:",
        "# written by kinvoke-tests",
        "\"prev_sha256\"",
        "SQLite format",
        "KINVOKE_",
        "state_dir",
    ];
    let cases = [
        ("config file", "cat {gw}/gateway.toml && echo LEAKED"),
        (
            "gateway's kubeconfig",
            "cat {gw}/kube.kubeconfig && echo LEAKED",
        ),
        (
            "gateway's kubeconfig through kubectl",
            "kubectl --kubeconfig {gw}/kube.kubeconfig auth whoami && echo LEAKED",
        ),
        ("TLS private key", "cat {gw}/pki/server.key && echo LEAKED"),
        ("client CA", "cat {gw}/pki/ca.crt && echo LEAKED"),
        ("result store", "cat {gw}/state/kinvoke.db* && echo LEAKED"),
        ("audit log", "cat {gw}/state/audit.jsonl && echo LEAKED"),
        ("state directory listing", "ls {gw}/state && echo LEAKED"),
        ("gateway directory listing", "ls {gw} && echo LEAKED"),
        (
            "gateway environment",
            "cat /proc/{pid}/environ && echo LEAKED",
        ),
        (
            "gateway memory",
            "head -c 64 /proc/{pid}/mem > \"$TMPDIR/mem\" && echo LEAKED",
        ),
        (
            "gateway command line",
            "cat /proc/{pid}/cmdline && echo LEAKED",
        ),
        ("gateway open files", "ls -l /proc/{pid}/fd && echo LEAKED"),
        (
            "gateway working directory",
            "ls /proc/{pid}/cwd/ && echo LEAKED",
        ),
        (
            "other commands' directories",
            "ls {work_root} && echo LEAKED",
        ),
        ("the host's /tmp", "ls /tmp/ && echo LEAKED"),
        (
            "the host's /var (service-account tokens live below)",
            "ls /var/run/ && echo LEAKED",
        ),
        (
            "the host's /etc beyond what programs need",
            "cat /etc/shadow && echo LEAKED",
        ),
        ("the whole file system", "ls / && echo LEAKED"),
    ];
    assert_all_refused(&env, &cases, &secrets);

    // and what the command may read works: its own files, its relay kubeconfig
    let out = env.invoke("cat \"$KUBECONFIG\" >/dev/null && kubectl auth whoami -o jsonpath='{.status.userInfo.username}'", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("test-user"), "{out}");
}

#[test]
fn p1_the_process_list_shows_only_the_command_itself() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let out = env.invoke("ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let pids: Vec<u32> = out.lines()[1]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // init, bash, ls, grep, tr: nothing of the host's
    assert!(pids.len() <= 8, "{out}");
    assert!(!pids.contains(&env.gw.pid().unwrap()), "{out}");
}

#[test]
fn p2_writes_outside_the_commands_own_directories_fail() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let audit = env.gw.audit_path();
    let marker = format!("kinvoke-p2-{}", std::process::id());
    let cases = [
        (
            "append to the audit log",
            "echo forged >> {gw}/state/audit.jsonl && echo LEAKED",
        ),
        (
            "edit the audit log in place",
            "sed -i 1d {gw}/state/audit.jsonl && echo LEAKED",
        ),
        (
            "delete the audit log",
            "rm {gw}/state/audit.jsonl && echo LEAKED",
        ),
        (
            "replace the config",
            "echo x > {gw}/gateway.toml && echo LEAKED",
        ),
        (
            "write the state directory",
            "touch {gw}/state/planted && echo LEAKED",
        ),
        ("write /etc", "touch /etc/MARKER && echo LEAKED"),
        ("write the host's /tmp", "touch /tmp/MARKER && echo LEAKED"),
        (
            "write next to other commands",
            "mkdir {work_root}/MARKER && echo LEAKED",
        ),
        ("write /usr", "touch /usr/MARKER && echo LEAKED"),
        // each with the file's current mode, so even a failure of the sandbox harms nothing
        ("chmod a device", "chmod 666 /dev/null && echo LEAKED"),
        (
            "chmod a system program",
            "chmod 755 /usr/bin/true && echo LEAKED",
        ),
        (
            "touch a system program",
            "touch -c -m -r /usr/bin/true /usr/bin/true && echo LEAKED",
        ),
        // even in its own directories: no setuid program for a local user to find there
        (
            "setuid program",
            "cp /usr/bin/true ./t && chmod 4755 ./t && echo LEAKED",
        ),
        (
            "setgid program",
            "cp /usr/bin/true ./t2 && chmod g+s ./t2 && echo LEAKED",
        ),
        (
            "setuid mode at creation",
            "python3 -c \"import os; os.open('t3', os.O_CREAT | os.O_WRONLY, 0o4755)\" && echo LEAKED",
        ),
        ("setgid directory", "mkdir -m 2755 d && echo LEAKED"),
    ];
    let cases: Vec<(&str, String)> = cases
        .iter()
        .map(|(name, cmd)| (*name, cmd.replace("MARKER", &marker)))
        .collect();
    let borrowed: Vec<(&str, &str)> = cases.iter().map(|(n, c)| (*n, c.as_str())).collect();
    assert_all_refused(&env, &borrowed, &[]);
    for path in [
        PathBuf::from("/etc").join(&marker),
        PathBuf::from("/tmp").join(&marker),
        PathBuf::from("/usr").join(&marker),
        env.gw.work_root().join(&marker),
        env.gw.state_dir().join("planted"),
    ] {
        assert!(!path.exists(), "{} was created", path.display());
    }
    assert!(
        fs::read_to_string(env.gw.config())
            .unwrap()
            .contains("kinvoke-tests"),
        "the config was replaced"
    );
    // the audit chain is whole: no command could touch it
    let verified = audit_verify(&[&audit]).unwrap();
    assert_eq!(verified.code, Some(0), "{verified}");

    // the command's own directories, its TMPDIR and /dev/null are writable, and no
    // other local user can look into them
    let out = env.invoke(
        "touch ./a \"$HOME/b\" \"$TMPDIR/c\" && mkdir -p \"$HOME/.cache/x\" && echo ok > /dev/null && echo WROTE; stat -c %a . \"$HOME\" \"$TMPDIR\" | tr '\\n' ' '",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("WROTE"), "{out}");
    assert!(out.stdout.contains("700 700 700"), "{out}");
}

#[test]
fn p3_no_command_signals_the_gateway() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let cases = [
        ("SIGTERM the gateway", "kill -TERM {pid} && echo LEAKED"),
        ("SIGKILL the gateway", "kill -KILL {pid} && echo LEAKED"),
        ("SIGSTOP the gateway", "kill -STOP {pid} && echo LEAKED"),
        (
            "signal every process it can",
            "kill -TERM -1; echo survived",
        ),
    ];
    assert_all_refused(&env, &cases, &[]);
    // still serving
    let out = env.invoke("echo alive", &[]);
    assert_eq!(out.code, Some(0), "{out}");
}

/// Host processes running `sleep ARG`, as `pid: command line`.
fn processes_with(arg: &str) -> Vec<String> {
    let wanted = format!("sleep\0{arg}\0");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(bytes) = fs::read(entry.path().join("cmdline"))
            && bytes == wanted.as_bytes()
        {
            found.push(format!(
                "{}: sleep {arg}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Shell that waits until the last background job (`$!`) has become `sleep`, so a test
/// that reads "ready" finds it on the host.
const SLEEPING: &str = "until [ \"$(cat /proc/$!/comm 2>/dev/null)\" = sleep ]; do :; done";

/// A `sleep` argument no other process has: `300.<pid><n>` seconds.
fn unique_sleep(n: u32) -> String {
    format!("300.{}{n}", std::process::id())
}

#[test]
fn p4_nothing_a_command_starts_outlives_it() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let s: Vec<String> = (1..=6).map(unique_sleep).collect();
    // every way of leaving a process behind; the command itself ends at once, and with a
    // ten-minute kill grace the client would time out if the gateway waited for them
    let command = format!(
        "setsid sleep {} & (set -m; sleep {} &); ( (sleep {} &) & ); nohup sleep {} >/dev/null 2>&1 & \
         (trap '' TERM HUP; exec sleep {}) & setsid -f sh -c 'sleep {}' ; echo started",
        s[0], s[1], s[2], s[3], s[4], s[5]
    );
    let out = env.invoke(&command, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("started"), "{out}");
    for sleep in &s {
        assert_eq!(processes_with(sleep), Vec::<String>::new(), "left behind");
    }
}

#[test]
fn p4_a_timed_out_or_canceled_command_takes_its_daemons_with_it() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let (a, b) = (unique_sleep(7), unique_sleep(8));
    let out = env.invoke(
        &format!("setsid sleep {a} & (trap '' TERM; exec sleep {b}) & sleep 300"),
        &["--timeout", "1s"],
    );
    assert_eq!(out.code, Some(124), "timed out: {out}");
    assert_eq!(processes_with(&a), Vec::<String>::new(), "left behind");
    assert_eq!(processes_with(&b), Vec::<String>::new(), "left behind");

    let c = unique_sleep(9);
    let (id, follow) = env.start_until_ready(
        &format!("setsid sleep {c} & {SLEEPING}; echo ready; sleep 300"),
        &[],
    );
    assert_eq!(
        processes_with(&c).len(),
        1,
        "the daemon runs while the command does"
    );
    env.cancel(&id, follow);
    assert_eq!(processes_with(&c), Vec::<String>::new(), "left behind");
}

#[test]
fn p6_editors_and_pagers_fail_at_once_saying_there_is_no_terminal() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    // with a ten-minute default timeout, an editor waiting for a terminal would hit the
    // client's own timeout long before the command's
    let out = env.invoke(
        "echo \"term=$TERM\"; kubectl edit namespace demo; echo \"edit=$?\"; git --version >/dev/null 2>&1; $EDITOR x; $PAGER y; echo done",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("term=dumb"), "{out}");
    assert!(
        out.stdout.contains(
            "kinvoke: commands run without a terminal, so an editor or pager cannot start"
        ),
        "{out}"
    );
    assert!(out.stdout.contains("edit=1"), "{out}");
    assert!(out.stdout.contains("done"), "{out}");
}

#[test]
fn a_kubeconfig_credential_plugin_never_runs() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let scratch = env.gw.scratch("evil");
    fs::create_dir_all(&scratch).unwrap();
    let evil = scratch.join("evil.kubeconfig");
    fs::write(
        &evil,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\"}\n\
         users:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
         command: /bin/sh\n      args: [\"-c\", \"echo PLUGIN-RAN-$((6*7)) >&2\"]\n      interactiveMode: Never\n\
         contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();
    let out = env.invoke(
        "kubectl --kubeconfig evil.kubeconfig get ns --request-timeout=5s; echo done",
        &["--file", evil.to_str().unwrap()],
    );
    assert!(out.stdout.contains("done"), "{out}");
    assert!(
        !out.stdout.contains("PLUGIN-RAN-42"),
        "the plugin ran:\n{out}"
    );
    assert!(out.stdout.contains("DenyAll"), "kubectl says why:\n{out}");
}

#[test]
fn one_caller_cannot_read_or_signal_another_callers_running_command() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let marker = unique_sleep(10);
    // alice (the test user) runs a command that holds its relay kubeconfig
    let (id, follow) = env.start_until_ready(
        &format!("sleep {marker} & {SLEEPING}; echo ready; wait; echo alice-finished"),
        &["--timeout", "2m"],
    );

    // the test (not sandboxed) knows where alice's directory is and which pid her sleep has
    let dirs: Vec<PathBuf> = fs::read_dir(env.gw.work_root())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let alice_dir = &dirs[0];
    let alice_kubeconfig = alice_dir.join("home/.kube/config");
    assert!(alice_kubeconfig.exists());
    let token = relay_token(&alice_kubeconfig);
    let sleep_pid = processes_with(&marker)
        .first()
        .and_then(|l| l.split(':').next().map(str::to_owned))
        .unwrap();

    let cases = [
        format!("cat {}", alice_kubeconfig.display()),
        format!("ls {}/work", alice_dir.display()),
        format!("touch {}/work/planted", alice_dir.display()),
        format!("kill -9 {sleep_pid}"),
    ];
    for case in &cases {
        let out = env
            .gw
            .client_as(&env.bob)
            .unwrap()
            .args(["invoke", "--cluster", KUBE, "--command"])
            .arg(format!("{case} && echo {LEAKED}"))
            .run()
            .unwrap();
        assert!(!out.stdout.contains(LEAKED), "bob: `{case}` worked:\n{out}");
        assert!(
            !out.stdout.contains(&token),
            "bob saw alice's token:\n{out}"
        );
    }
    assert!(!alice_dir.join("work/planted").exists());
    // alice's command was untouched: cancel it and see it was still sleeping
    assert_eq!(
        processes_with(&marker).len(),
        1,
        "bob's kill reached alice's sleep"
    );
    env.cancel(&id, follow);
}

/// The bearer token in a relay kubeconfig kinvoke wrote.
fn relay_token(kubeconfig: &Path) -> String {
    let text = fs::read_to_string(kubeconfig).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .map(|t| t.trim().trim_matches('"').to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no token in {text}"))
}

#[test]
fn check_config_refuses_a_sandbox_that_exposes_a_secret_naming_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let conf = dir.path().join("conf");
    for d in [&secrets, &conf] {
        fs::create_dir(d).unwrap();
    }
    let root = dir.path().display().to_string();
    // configured paths must exist, or check-config refuses them before anything else
    fs::create_dir_all(dir.path().join("shared/a/b")).unwrap();
    fs::create_dir_all(dir.path().join("shared/bin")).unwrap();
    fs::create_dir_all(dir.path().join("state/cache")).unwrap();
    let keys = dir.path().join("keys");
    fs::create_dir(&keys).unwrap();
    fs::write(keys.join("token"), "not read").unwrap();
    // the gateway's kubeconfig names its token file elsewhere: that file is secret too
    fs::write(
        secrets.join("prod.kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"https://10.0.0.1\"}}\n\
             users:\n- name: u\n  user: {{tokenFile: {root}/keys/token}}\n\
             contexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let base = |extra: &str| {
        format!(
            "state_dir = \"{root}/state\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"{root}/pki/server.crt\", key = \"{root}/pki/server.key\", client_ca = \"{root}/pki/ca.crt\" }}\n\n\
             [[cluster]]\nname = \"prod\"\nkubeconfig = \"{root}/secrets/prod.kubeconfig\"\n{extra}"
        )
    };
    let cases = [
        (
            format!("\n[sandbox]\nextra_read_only_paths = [\"{root}/secrets\"]\n"),
            "sandbox.read_only_paths",
            "cluster[0].kubeconfig",
            format!("{root}/secrets"),
        ),
        (
            format!("path = \"{root}/secrets:/usr/bin\"\n"),
            "cluster[0].path",
            "cluster[0].kubeconfig",
            format!("{root}/secrets/prod.kubeconfig"),
        ),
        (
            format!("path = \"{root}/conf:/usr/bin\"\n"),
            "cluster[0].path",
            "the config file",
            format!("{root}/conf/gateway.toml"),
        ),
        (
            format!("\n[sandbox]\nextra_read_only_paths = [\"{root}/keys\"]\n"),
            "sandbox.read_only_paths",
            "a file cluster[0].kubeconfig names",
            format!("{root}/keys/token"),
        ),
        (
            format!("\n[sandbox]\nwritable_paths = [\"{root}/state/cache\"]\n"),
            "sandbox.writable_paths",
            "state_dir",
            format!("{root}/state/cache"),
        ),
        (
            "\n[sandbox]\nextra_read_only_paths = [\"/\"]\n".to_owned(),
            "sandbox.read_only_paths",
            "the Pod's service account",
            "read / (".to_owned(),
        ),
        (
            "\n[sandbox]\nextra_read_only_paths = [\"/run\"]\n".to_owned(),
            "sandbox.read_only_paths",
            // /var/run/secrets lies below /run on most hosts, and /run itself is secret
            "which holds",
            "read /run (".to_owned(),
        ),
        (
            format!("\n[sandbox]\nwritable_paths = [\"{root}/shared\", \"{root}/shared/a/b\"]\n"),
            "sandbox.writable_paths",
            "which every command may write",
            format!("{root}/shared/a/b"),
        ),
        (
            format!(
                "path = \"{root}/shared/bin:/usr/bin\"\n\n[sandbox]\nwritable_paths = [\"{root}/shared\"]\n"
            ),
            "cluster[0].path",
            "which every command may write",
            format!("{root}/shared/bin"),
        ),
        (
            "path = \"/usr/bin:\"\n".to_owned(),
            "cluster[0].path",
            "empty or relative",
            "\"\"".to_owned(),
        ),
        (
            format!("path = \"/usr/bin\"\nshell = \"{root}/state/bash\"\n"),
            "cluster[0].shell",
            "state_dir",
            format!("{root}/state"),
        ),
    ];
    for (extra, readable_key, secret_key, named) in cases {
        let out = check_config(&conf, "gateway.toml", &base(&extra)).unwrap();
        assert_eq!(out.code, Some(1), "{extra}: {out}");
        assert!(out.stderr.contains(readable_key), "{extra}: {out}");
        assert!(out.stderr.contains(secret_key), "{extra}: {out}");
        assert!(out.stderr.contains(&named), "{extra}: {out}");
    }

    // a config that exposes nothing gets the probe's report (the TLS files are missing,
    // so it still fails, after the report), and a root gateway the advice to give
    // commands users of their own
    let out = check_config(&conf, "gateway.toml", &base("")).unwrap();
    assert!(
        out.stdout.contains("sandbox: Landlock fully enforced"),
        "{out}"
    );
    assert!(out.stdout.contains("own root file system: yes"), "{out}");
    if nix::unistd::geteuid().is_root() {
        assert!(
            out.stdout.contains("sandbox.run_as_uids is not set"),
            "{out}"
        );
    }

    // the same cluster with the sandbox off is accepted, with a loud warning
    let out = check_config(
        &conf,
        "gateway.toml",
        &base(&format!(
            "sandbox = \"off\"\npath = \"{root}/secrets:/usr/bin\"\n"
        )),
    )
    .unwrap();
    assert!(
        out.stdout.contains("WITHOUT the sandbox"),
        "check-config warns: {out}"
    );
}

#[test]
fn p1_the_hosts_unix_sockets_do_not_exist_for_a_command() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    // a daemon's socket that file permissions would let the command reach (the gateway
    // runs as root here, and so does the command's user outside its namespace)
    let path = env.gw.dir().join("daemon.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let command = format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{}'); print(s.recv(64).decode())\" && echo {LEAKED}",
        path.display()
    );
    let out = env.invoke(&command, &[]);
    assert!(!out.stdout.contains(LEAKED), "connected:\n{out}");
    assert!(
        out.stdout.contains("No such file or directory"),
        "the socket does not exist for the command:\n{out}"
    );
    // nobody knocked
    assert!(listener.accept().is_err());
}

#[test]
fn no_command_listens_on_tcp_where_other_commands_could_reach_it() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    // a `kubectl proxy` on loopback would serve this caller's relay credentials to any
    // other command on the host
    let out = env.invoke(
        "timeout 20 kubectl proxy --port=0; python3 -c \"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print('BO' + 'UND')\"; true",
        &[],
    );
    assert!(
        !out.stdout.contains("Starting to serve"),
        "kubectl proxy listens:\n{out}"
    );
    assert!(!out.stdout.contains("BOUND"), "bound a TCP port:\n{out}");
    assert!(
        out.stdout.contains("permission denied"),
        "kubectl says why:\n{out}"
    );
    assert!(out.stdout.contains("PermissionError"), "{out}");
    // a listen() without bind() would get a port Landlock never sees
    let out = env.invoke(
        "python3 -c \"import socket; s = socket.socket(); s.listen(); print('LISTEN' + 'ING', s.getsockname())\"; true",
        &[],
    );
    assert!(!out.stdout.contains("LISTENING"), "listens:\n{out}");
    assert!(out.stdout.contains("PermissionError"), "{out}");
    // connecting out still works: the relay is a TCP connection
    let out = env.invoke("kubectl get ns -o name", &[]);
    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn descriptors_the_gateway_inherited_never_reach_a_command() {
    let Some(tools) = kube_tools().unwrap() else {
        return;
    };
    drop(tools);
    // a secret the gateway's parent left open without close-on-exec (a shell's
    // `exec 7<secret`): the gateway inherits it, its commands must not
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    fs::write(&secret, "INHERITED-SECRET").unwrap();
    let file = fs::File::open(&secret).unwrap();
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let gw = Gateway::start_with(GatewayOptions::default()).expect("the gateway starts");
    drop(file);
    let out = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", "local", "--command"])
        .arg(format!("cat <&{fd}; ls /proc/self/fd | tr '\\n' ' '"))
        .run()
        .unwrap();
    assert!(!out.stdout.contains("INHERITED-SECRET"), "{out}");
    assert!(out.stdout.contains("Bad file descriptor"), "{out}");
}

#[test]
fn no_command_holds_capabilities_again_in_a_user_namespace_of_its_own() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let out = env.invoke(
        "unshare -U -r sh -c 'grep CapEff /proc/self/status' && echo LEAKED; \
         python3 -c \"import os; os.unshare(os.CLONE_NEWUSER); print('LEAK' + 'ED')\"; true",
        &[],
    );
    assert!(!out.stdout.contains("LEAKED"), "{out}");
    assert!(!out.stdout.contains("000001ff"), "{out}");
    assert!(out.stdout.contains("Operation not permitted"), "{out}");
}

#[test]
fn a_tree_fifteen_thousand_levels_deep_is_removed_and_the_gateway_survives_it() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    // 15,000 levels overflow a 2 MiB thread stack in std's recursive remove_dir_all
    // (8,000 do not), which the gateway used to remove a command's directory with
    let out = env.invoke(
        "python3 -c \"import os\nfor _ in range(15000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')\"",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("deep"), "{out}");
    // the gateway removed it (in a process of its own) and serves on
    let out = env.invoke("echo alive", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(env.gw.is_running());
    let left: Vec<_> = fs::read_dir(env.gw.work_root())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn argv_mode_holds_every_property_too() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let scratch = env.gw.scratch("argv");
    fs::create_dir_all(&scratch).unwrap();
    let evil = scratch.join("evil.kubeconfig");
    fs::write(
        &evil,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\"}\n\
         users:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
         command: /bin/sh\n      args: [\"-c\", \"echo PLUGIN-RAN >&2\"]\n      interactiveMode: Never\n\
         contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();
    let evil = evil.display().to_string();
    let invoke = |command: &str, extra: &[&str]| {
        env.gw
            .client()
            .unwrap()
            .args(["invoke", "--cluster", KUBE_ARGV, "--command"])
            .arg(env.expand(command))
            .args(extra)
            .run()
            .unwrap()
    };
    // refused before they start: INVALID_ARGUMENT (exit 65) naming what
    let refused = [
        (
            "the gateway's kubeconfig",
            "kubectl --kubeconfig {gw}/kube.kubeconfig auth whoami",
            "--kubeconfig",
        ),
        (
            "an attached kubeconfig's plugin",
            "kubectl --kubeconfig evil.kubeconfig get ns",
            "--kubeconfig",
        ),
        (
            "another server",
            "kubectl -s https://127.0.0.1:1 get ns",
            "-s/--server",
        ),
        (
            "another identity",
            "kubectl --as system:admin get ns",
            "--as",
        ),
        (
            "git through kustomize",
            "kubectl kustomize 'file:///x/r?ref=--upload-pack=id'",
            "kubectl kustomize",
        ),
        (
            "a pipeline",
            "kubectl get pods -A | grep web",
            "shell operator",
        ),
        ("a plugin program", "kubectl evil", "kubectl-evil"),
        (
            "a listening proxy",
            "kubectl proxy --port=0",
            "kubectl proxy",
        ),
        (
            "a create plugin found as a path",
            "kubectl create x/../evil",
            "kubectl-create-x/../evil",
        ),
    ];
    for (name, command, named) in refused {
        let out = invoke(command, &["--file", &evil]);
        assert_eq!(out.code, Some(65), "{name}: {out}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{name}: {out}");
        assert!(out.stderr.contains(named), "{name}: {out}");
        assert!(!out.stdout.contains("PLUGIN-RAN"), "{name}: {out}");
    }
    // run, and confined: a file of the gateway cannot be read through kubectl either
    let out = invoke(
        "kubectl create --dry-run=client -o yaml -f {gw}/pki/server.key",
        &[],
    );
    assert_ne!(out.code, Some(0), "{out}");
    assert!(!out.stdout.contains("PRIVATE KEY"), "{out}");
    // no terminal: the editor fails at once
    let out = invoke("kubectl edit namespace demo", &[]);
    assert!(
        out.stdout.contains("commands run without a terminal"),
        "{out}"
    );
    // and the cluster sees the caller
    let out = invoke(
        "kubectl auth whoami -o jsonpath={.status.userInfo.username}",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.lines()[1], "test-user", "{out}");
}

/// Each system call the seccomp filter refuses, tried with its x86_64 number: the error
/// number the command gets (1, EPERM) for each.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_seccomp_filter_refuses_tracing_keyrings_bpf_perf_userfaultfd_io_uring_xattrs_and_mptcp() {
    let Some(env) = Sandboxed::start() else {
        return;
    };
    let probe = r#"
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno()
buf = ctypes.create_string_buffer(64)
addr = ctypes.addressof(buf)
calls = {
    "ptrace": (101, 16, 1, 0, 0),
    "process_vm_readv": (310, 1, 0, 0, 0, 0, 0),
    "keyctl": (250, 0, 0, 0, 0),
    "add_key": (248, addr, addr, 0, 0, -2),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, addr, 0, -1, -1, 0),
    "userfaultfd": (323, 0),
    "io_uring_setup": (425, 1, addr),
    "setxattr": (188, addr, addr, 0, 0, 0),
}
for name, args in calls.items():
    print(name, call(*args))
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    print("mptcp", 0)
except OSError as e:
    print("mptcp", e.errno)
"#;
    std::fs::create_dir_all(env.gw.scratch("seccomp")).unwrap();
    let script = env.gw.scratch("seccomp").join("probe.py");
    std::fs::write(&script, probe).unwrap();
    let out = env.invoke("python3 probe.py", &["--file", script.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out}");
    for name in [
        "ptrace",
        "process_vm_readv",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "setxattr",
        "mptcp",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == format!("{name} 1")),
            "{name} was not refused with EPERM:\n{out}"
        );
    }
}
