//! End-to-end tests of a command's life through the CLI: the real `kinvoke` CLI against the real
//! `kinvoke-gateway` binary over mTLS on 127.0.0.1, one gateway per test.
//!
//! Commands that must stay running until the test says so wait for a "go" file the test
//! creates; the tests themselves never sleep, they wait for lines, exits and results.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kinvoke_proto::v1::{AttachedFile, InvokeCommandRequest, ListCommandsRequest};
use kinvoke_tests::{
    CLUSTER, Client, DevGateway, Gateway, GatewayOptions, Output, Pki, USER, audit_verify,
    check_config, command_id_from_tsv, parse_header,
};
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Exit status of `kinvoke` when the command failed to run or was interrupted.
const EXIT_FAILED: i32 = 125;
/// Exit status of `kinvoke` when the command timed out.
const EXIT_TIMED_OUT: i32 = 124;
/// Exit status of `kinvoke` when the command was canceled.
const EXIT_CANCELED: i32 = 130;
/// Exit status of `kinvoke` when the gateway cannot be reached (TLS failures included).
const EXIT_UNAVAILABLE: i32 = 69;
/// Exit status of `kinvoke` when the gateway rejected the request.
const EXIT_REJECTED: i32 = 65;
/// Exit status of `kinvoke` for a usage or local error.
const EXIT_USAGE: i32 = 2;

/// Fully qualified name of the command service, as health and reflection know it.
const COMMAND_SERVICE: &str = "kinvoke.v1.CommandService";

/// Fully qualified name of the standard health service.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

fn gateway() -> Gateway {
    Gateway::start().expect("the gateway starts")
}

fn gateway_with(options: GatewayOptions) -> Gateway {
    Gateway::start_with(options).expect("the gateway starts")
}

/// `kinvoke invoke --cluster local --command COMMAND EXTRA...` as the test user.
fn invoke(gw: &Gateway, command: &str, extra: &[&str]) -> Output {
    gw.client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", command])
        .args(extra)
        .run()
        .unwrap()
}

/// `kinvoke -o json result --cluster local --command-id ID [--wait]`, parsed.
fn result_json(gw: &Gateway, id: &str, wait: bool) -> (Output, Value) {
    let mut client = gw.client().unwrap().args([
        "-o",
        "json",
        "result",
        "--cluster",
        CLUSTER,
        "--command-id",
        id,
    ]);
    if wait {
        client = client.arg("--wait");
    }
    let out = client.run().unwrap();
    let json = out.json().unwrap();
    (out, json)
}

/// `kinvoke result --cluster local --command-id ID --wait`, in the default format.
fn result_waited(gw: &Gateway, id: &str) -> Output {
    gw.client()
        .unwrap()
        .args(["result", "--cluster", CLUSTER, "--command-id", id, "--wait"])
        .run()
        .unwrap()
}

fn state(json: &Value) -> &str {
    json["provisioningState"].as_str().unwrap_or("(missing)")
}

fn reason(json: &Value) -> &str {
    json["reason"].as_str().unwrap_or("(missing)")
}

/// A shell command that prints `first`, waits until `go` exists, then prints `last`.
fn wait_for_go(first: &str, go: &Path, last: &str) -> String {
    format!(
        "echo {first}; while [ ! -e '{go}' ]; do sleep 0.05; done; echo {last}",
        go = go.display()
    )
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

#[test]
fn a_command_that_exits_zero_prints_the_header_and_its_output() {
    let gw = gateway();
    let out = invoke(&gw, "echo hello; echo world", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let lines = out.lines();
    let header = parse_header(lines[0])
        .unwrap_or_else(|| panic!("first line is not the result header:\n{out}"));
    assert_eq!(header.exit_code, 0, "{out}");
    assert!(header.started_at <= header.finished_at, "{out}");
    assert_eq!(&lines[1..], ["hello", "world"], "{out}");
}

#[test]
fn the_cli_exits_with_the_commands_exit_code() {
    let gw = gateway();
    let out = invoke(&gw, "echo about to fail; exit 3", &[]);
    assert_eq!(out.code, Some(3), "{out}");
    let header = parse_header(out.lines()[0])
        .unwrap_or_else(|| panic!("first line is not the result header:\n{out}"));
    assert_eq!(header.exit_code, 3, "{out}");
    assert_eq!(&out.lines()[1..], ["about to fail"], "{out}");
}

#[test]
fn stdout_and_stderr_are_combined_in_the_order_written() {
    let gw = gateway();
    let out = invoke(&gw, "echo out; echo err >&2; echo out2", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["out", "err", "out2"], "{out}");
}

#[test]
fn an_attached_directory_is_available_to_the_command_under_its_name() {
    let gw = gateway();
    let bundle = gw.scratch("bundle");
    fs::create_dir_all(bundle.join("sub")).unwrap();
    fs::write(bundle.join("sub/x.txt"), "nested content\n").unwrap();
    fs::write(bundle.join("top.txt"), "top\n").unwrap();

    let out = invoke(
        &gw,
        "cat bundle/sub/x.txt bundle/top.txt",
        &["--file", bundle.to_str().unwrap()],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["nested content", "top"], "{out}");
}

#[test]
fn attaching_the_current_directory_sends_its_contents_without_a_prefix() {
    let gw = gateway();
    let bundle = gw.scratch("bundle");
    fs::create_dir_all(bundle.join("sub")).unwrap();
    fs::write(bundle.join("sub/x.txt"), "from dot\n").unwrap();

    let out = gw
        .client()
        .unwrap()
        .current_dir(&bundle)
        .args(["-o", "json", "invoke", "--cluster", CLUSTER, "--file", "."])
        .args(["--command", "cat sub/x.txt && test ! -e bundle"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let json = out.json().unwrap();
    assert_eq!(json["logs"], "from dot\n", "{out}");
    let files = json["files"].as_array().expect("files is an array");
    let paths: Vec<_> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["sub/x.txt"], "{out}");
    assert_eq!(files[0]["size"], 9, "{out}");
}

#[test]
fn a_no_wait_command_is_collected_later_with_result_wait() {
    let gw = gateway();
    let started = gw
        .client()
        .unwrap()
        .args(["-o", "tsv", "invoke", "--cluster", CLUSTER, "--no-wait"])
        .args(["--command", "echo later"])
        .run()
        .unwrap();
    assert_eq!(started.code, Some(0), "{started}");
    let id = command_id_from_tsv(&started.stdout)
        .unwrap_or_else(|| panic!("no id in the tsv output:\n{started}"));

    let out = result_waited(&gw, &id);
    assert_eq!(out.code, Some(0), "{out}");
    let header = parse_header(out.lines()[0])
        .unwrap_or_else(|| panic!("first line is not the result header:\n{out}"));
    assert_eq!(header.exit_code, 0, "{out}");
    assert_eq!(&out.lines()[1..], ["later"], "{out}");
}

#[test]
fn logs_follow_streams_output_while_the_command_runs() {
    let gw = gateway();
    let go = gw.scratch("go");
    let id = gw
        .start_command(&wait_for_go("first", &go, "second"))
        .unwrap();

    let mut follower = gw.follow(CLUSTER, &id).unwrap();
    follower.wait_for_line("first").unwrap();
    // the command cannot end before `go` exists, so `first` arrived live
    let (_, running) = result_json(&gw, &id, false);
    assert_eq!(state(&running), "Running", "{running}");

    fs::write(&go, "").unwrap();
    let out = follower.wait().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "first\nsecond\n", "{out}");
}

#[test]
fn cancel_stops_a_running_command_and_records_who_canceled_it() {
    let gw = gateway();
    let started = gw
        .client()
        .unwrap()
        .args(["-o", "json", "invoke", "--cluster", CLUSTER, "--no-wait"])
        .args(["--command", "sleep 60"])
        .run()
        .unwrap();
    assert_eq!(started.code, Some(0), "{started}");
    let id = started.json().unwrap()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in the json output:\n{started}"))
        .to_owned();

    let canceled = gw
        .client()
        .unwrap()
        .args(["cancel", "--cluster", CLUSTER, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(canceled.code, Some(0), "{canceled}");

    let (out, json) = result_json(&gw, &id, false);
    assert_eq!(state(&json), "Canceled", "{out}");
    assert!(reason(&json).contains(USER), "{out}");
    assert_eq!(out.code, Some(EXIT_CANCELED), "{out}");

    let plain = gw
        .client()
        .unwrap()
        .args(["result", "--cluster", CLUSTER, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(plain.code, Some(EXIT_CANCELED), "{plain}");
    assert!(
        plain.lines()[0].starts_with("command canceled with reason: "),
        "{plain}"
    );
}

#[test]
fn a_command_that_outlives_its_timeout_is_stopped() {
    let gw = gateway();
    let out = invoke(&gw, "sleep 60", &["--timeout", "1s"]);
    assert_eq!(out.code, Some(EXIT_TIMED_OUT), "{out}");
    let first = out.lines().first().copied().unwrap_or_default();
    let reason_text = first
        .strip_prefix("command timed out with reason: ")
        .unwrap_or_else(|| panic!("first line is not the timeout line:\n{out}"));
    assert!(reason_text.contains("timed out"), "{out}");

    let listed = gw
        .client()
        .unwrap()
        .args(["-o", "json", "list"])
        .run()
        .unwrap();
    assert_eq!(listed.code, Some(0), "{listed}");
    let list = listed.json().unwrap();
    let records = list.as_array().expect("list -o json prints an array");
    assert_eq!(records.len(), 1, "{listed}");
    assert_eq!(state(&records[0]), "TimedOut", "{listed}");
    assert!(reason(&records[0]).contains("timed out"), "{listed}");
}

#[test]
fn output_head_percent_sets_how_much_of_the_cut_output_is_head() {
    // 6 + 5000 + 18 = 5024 bytes written, 1 KiB kept
    let command =
        "printf 'start\\n'; head -c 5000 /dev/zero | tr '\\0' a; printf '\\nfinal error line\\n'";
    // the marker is a line of its own: after the head's own newline, if there is a head
    let marker = "[kinvoke: 4000 bytes of output left out here (limits.max_output_bytes)]\n";
    for (percent, head_len) in [(0usize, 0usize), (25, 256), (100, 1024)] {
        let gw = Gateway::start_with(
            GatewayOptions::default()
                .limit("max_output_bytes", "1KiB")
                .limit("output_head_percent", &percent.to_string()),
        )
        .expect("the gateway starts");
        let out = invoke(&gw, command, &["-o", "json"]);
        let json = out.json().unwrap();
        assert_eq!(json["outputTruncated"], true, "{out}");
        let logs = json["logs"].as_str().unwrap();
        let (head, tail) = logs
            .split_once(marker)
            .unwrap_or_else(|| panic!("{percent}%: no marker: {out}"));
        let head = head.strip_suffix('\n').unwrap_or(head);
        assert_eq!(head.len(), head_len, "{percent}%: {out}");
        assert_eq!(tail.len(), 1024 - head_len, "{percent}%: {out}");
        if percent > 0 {
            assert!(head.starts_with("start\n"), "{percent}%: {out}");
        }
        if percent < 100 {
            assert!(tail.ends_with("final error line\n"), "{percent}%: {out}");
        }
    }
}

#[test]
fn output_beyond_the_limit_keeps_its_head_and_tail_and_every_reader_is_told() {
    let gw = Gateway::start_with(GatewayOptions::default().limit("max_output_bytes", "1KiB"))
        .expect("the gateway starts");
    // 6 + 5000 + 18 = 5024 bytes: the final error line is what matters
    let command =
        "printf 'start\\n'; head -c 5000 /dev/zero | tr '\\0' a; printf '\\nfinal error line\\n'";
    let out = invoke(&gw, command, &["-o", "json"]);
    assert_eq!(out.code, Some(0), "{out}");
    let json = out.json().unwrap();
    assert_eq!(state(&json), "Succeeded", "{out}");
    assert_eq!(json["outputTruncated"], true, "{out}");
    assert_eq!(json["outputSize"], 5024, "{out}");
    let logs = json["logs"].as_str().expect("logs is a string");
    // half the limit for the head, half for the tail, one marker line between
    let marker = "\n[kinvoke: 4000 bytes of output left out here (limits.max_output_bytes)]\n";
    let (head, tail) = logs
        .split_once(marker)
        .unwrap_or_else(|| panic!("no marker: {out}"));
    assert_eq!(head.len(), 512, "{out}");
    assert!(head.starts_with("start\naaa"), "{out}");
    assert_eq!(tail.len(), 512, "{out}");
    assert!(tail.ends_with("aaa\nfinal error line\n"), "{out}");
    let id = json["id"].as_str().unwrap();

    // every way of reading the result says it was cut, with the total size
    let notice = "kinvoke: output was cut: 5024 bytes were written";
    for args in [
        vec!["logs", "-n", CLUSTER, "--command-id", id],
        vec!["result", "-n", CLUSTER, "--command-id", id],
    ] {
        let read = gw.client().unwrap().args(&args).run().unwrap();
        assert_eq!(read.code, Some(0), "{read}");
        assert!(read.stdout.contains(marker), "{args:?}: {read}");
        assert!(
            read.stdout.ends_with("final error line\n"),
            "{args:?}: {read}"
        );
        assert!(read.stderr.contains(notice), "{args:?}: {read}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_path_that_leaves_the_work_directory_is_rejected() {
    let gw = gateway();
    let outside = gw.scratch("escape.txt");
    let mut client = gw.grpc_client().await.unwrap();
    let bad_paths = [
        "../escape.txt".to_owned(),
        "sub/../../escape.txt".to_owned(),
        outside.to_str().unwrap().to_owned(),
    ];
    for path in bad_paths {
        let request = InvokeCommandRequest {
            cluster: CLUSTER.to_owned(),
            command: "echo ran > ran.txt".to_owned(),
            files: vec![AttachedFile {
                path: path.clone(),
                content: b"escaped\n".to_vec(),
                mode: 0,
            }],
            timeout: None,
            no_wait: false,
        };
        let status = match client.invoke_command(request).await {
            Ok(response) => panic!("{path:?} was accepted: {response:?}"),
            Err(status) => status,
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{path:?}: {status:?}"
        );
        assert!(
            status.message().contains("files.path"),
            "{path:?}: {status:?}"
        );
    }

    let escaped: Vec<_> = all_files(gw.dir())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n == "escape.txt" || n == "ran.txt")
        })
        .collect();
    assert_eq!(escaped, Vec::<PathBuf>::new());
    assert!(!outside.exists());
    let listed = client
        .list_commands(ListCommandsRequest {
            cluster: String::new(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.commands.is_empty(), "{:?}", listed.commands);
}

/// Whether a host process runs `sleep ARG`.
fn sleeping(arg: &str) -> bool {
    let wanted = format!("sleep\0{arg}\0");
    fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == wanted.as_bytes())
    })
}

#[test]
fn a_command_interrupted_by_a_gateway_crash_is_marked_failed_after_restart() {
    let mut gw = gateway();
    // a sleep no other process has, to find the command's processes on the host
    let marker = format!("60.{}", std::process::id());
    let id = gw
        // "started" only once the sleep runs: the test looks for it on the host
        .start_command(&format!(
            "sleep {marker} & until [ \"$(cat /proc/$!/comm 2>/dev/null)\" = sleep ]; do :; done; echo \"started in $PWD\"; wait"
        ))
        .unwrap();
    let mut follower = gw.follow(CLUSTER, &id).unwrap();
    let started = follower
        .wait_for_line_where("the command's start", |l| l.starts_with("started in "))
        .unwrap();
    follower.kill().unwrap();
    assert!(sleeping(&marker), "the command runs");
    // the command's own directory (its work dir's parent), with its attached files
    let work = PathBuf::from(started.trim_end().trim_start_matches("started in "));
    let command_dir = work.parent().unwrap().to_owned();
    assert!(command_dir.exists(), "{}", command_dir.display());

    gw.kill().unwrap();
    // the sandbox's launcher sees the gateway gone and takes the command with it
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sleeping(&marker) {
        assert!(
            std::time::Instant::now() < deadline,
            "the command outlived the crashed gateway"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    gw.restart().unwrap();
    // what the killed process left is gone before the new one serves
    assert!(
        !command_dir.exists(),
        "the crashed command's directory is still there: {}",
        command_dir.display()
    );
    let verify = audit_verify(&[gw.audit_path()]).unwrap();
    assert_eq!(verify.code, Some(0), "{verify}");

    let out = gw
        .client()
        .unwrap()
        .args(["result", "--cluster", CLUSTER, "--command-id", &id])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_FAILED), "{out}");
    assert_eq!(
        out.lines()[0],
        "command failed with reason: gateway restarted before the command finished",
        "{out}"
    );
    let (out, json) = result_json(&gw, &id, false);
    assert_eq!(state(&json), "Failed", "{out}");
    assert_eq!(
        reason(&json),
        "gateway restarted before the command finished",
        "{out}"
    );
}

#[test]
fn a_client_that_disconnects_does_not_stop_its_command() {
    let gw = gateway();
    let go = gw.scratch("go");
    let mut waiting = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command"])
        .arg(wait_for_go("waiting", &go, "done"))
        .spawn()
        .unwrap();

    // each attempt is a full round trip to the gateway; the bound only stops a runaway loop
    let mut id = None;
    for _ in 0..1000 {
        let listed = gw
            .client()
            .unwrap()
            .args(["-o", "json", "list"])
            .run()
            .unwrap();
        assert_eq!(listed.code, Some(0), "{listed}");
        if let Some(record) = listed.json().unwrap().as_array().and_then(|a| a.first()) {
            id = record["id"].as_str().map(str::to_owned);
            break;
        }
    }
    let id = id.expect("the invoked command shows up in the list");

    waiting.kill().unwrap();
    fs::write(&go, "").unwrap();

    let out = result_waited(&gw, &id);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["waiting", "done"], "{out}");
    let (out, json) = result_json(&gw, &id, false);
    assert_eq!(state(&json), "Succeeded", "{out}");
    assert_eq!(json["exitCode"], 0, "{out}");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let gw = gateway();
    let rogue = Pki::new(&gw.scratch("rogue-pki"), "rogue CA").unwrap();
    let impostor = rogue.client_cert(USER).unwrap();
    let marker = gw.scratch("ran");

    let out = gw
        .client_as(&impostor)
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command"])
        .arg(format!("touch '{}'", marker.display()))
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");
    assert!(!marker.exists(), "the command ran:\n{out}");
    let listed = gw
        .client()
        .unwrap()
        .args(["-o", "json", "list"])
        .run()
        .unwrap();
    assert_eq!(listed.json().unwrap(), Value::Array(Vec::new()), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let gw = gateway();
    let marker = gw.scratch("ran");
    let out = gw
        .bare_client()
        .unwrap()
        .args(["--endpoint", &gw.endpoint()])
        .arg("--ca-cert")
        .arg(&gw.pki().ca_cert)
        .args(["invoke", "--cluster", CLUSTER, "--command"])
        .arg(format!("touch '{}'", marker.display()))
        .run()
        .unwrap();
    assert!(
        [EXIT_USAGE, EXIT_UNAVAILABLE, 77].contains(&out.code.unwrap_or(-1)),
        "expected a refusal (2, 69 or 77):\n{out}"
    );
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");

    // the CLI may refuse before dialling, so ask the gateway itself too
    let request = InvokeCommandRequest {
        cluster: CLUSTER.to_owned(),
        command: format!("touch '{}'", marker.display()),
        files: Vec::new(),
        timeout: None,
        no_wait: false,
    };
    if let Ok(mut anonymous) = gw.grpc_client_as(None).await {
        let status = match anonymous.invoke_command(request).await {
            Ok(response) => panic!("a caller without a certificate was served: {response:?}"),
            Err(status) => status,
        };
        assert!(
            matches!(
                status.code(),
                // the refused handshake surfaces as a closed connection
                tonic::Code::Unavailable
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::Unauthenticated
            ),
            "{status:?}"
        );
    }
    assert!(!marker.exists(), "the command ran:\n{out}");
    let listed = gw
        .client()
        .unwrap()
        .args(["-o", "json", "list"])
        .run()
        .unwrap();
    assert_eq!(listed.json().unwrap(), Value::Array(Vec::new()), "{listed}");
}

#[test]
fn sigterm_cancels_running_commands_after_the_shutdown_grace() {
    let mut gw = Gateway::start_with(GatewayOptions::default().shutdown_grace("1s"))
        .expect("the gateway starts");
    let id = gw.start_command("sleep 60").unwrap();

    let status = gw.terminate().unwrap();
    assert!(
        status.success(),
        "gateway exit: {status}\n{}",
        gw.stderr_log()
    );
    gw.restart().unwrap();

    let (out, json) = result_json(&gw, &id, false);
    assert_eq!(state(&json), "Canceled", "{out}");
    assert_eq!(
        reason(&json),
        "gateway shut down before the command finished",
        "{out}"
    );
    assert_eq!(out.code, Some(EXIT_CANCELED), "{out}");
}

#[test]
fn a_client_config_file_and_flags_after_the_subcommand_reach_the_gateway() {
    let gw = gateway();
    // global flag before the subcommand
    let out = gw
        .client_with_config()
        .unwrap()
        .args(["invoke", "-n", CLUSTER, "-c", "echo via config"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["via config"], "{out}");

    // global flags after the subcommand, and the profile named explicitly
    let out = gw
        .bare_client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", "echo after"])
        .arg("--config")
        .arg(gw.client_config())
        .args(["--profile", "test", "-o", "json"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let json = out.json().unwrap();
    assert_eq!(json["logs"], "after\n", "{out}");
    assert_eq!(json["principal"], USER, "{out}");
    assert_eq!(json["cluster"], CLUSTER, "{out}");
    assert_eq!(json["command"], "echo after", "{out}");
}

#[test]
fn connection_settings_can_come_from_the_environment() {
    let gw = gateway();
    let out = gw
        .bare_client()
        .unwrap()
        .env("KINVOKE_ENDPOINT", gw.endpoint())
        .env("KINVOKE_CA_CERT", &gw.pki().ca_cert)
        .env("KINVOKE_CLIENT_CERT", &gw.user_cert().cert)
        .env("KINVOKE_CLIENT_KEY", &gw.user_cert().key)
        .args(["invoke", "--cluster", CLUSTER, "--command", "echo from env"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["from env"], "{out}");
}

#[test]
fn an_unknown_cluster_is_a_rejected_request() {
    let gw = gateway();
    let out = gw
        .client()
        .unwrap()
        .args([
            "invoke",
            "--cluster",
            "no-such-cluster",
            "--command",
            "true",
        ])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_REJECTED), "{out}");
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out}");
}

#[test]
fn a_missing_attachment_is_a_usage_error() {
    let gw = gateway();
    let missing = gw.scratch("does-not-exist.yaml");
    let out = invoke(&gw, "true", &["--file", missing.to_str().unwrap()]);
    assert_eq!(out.code, Some(EXIT_USAGE), "{out}");
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");
}

/// `reflected_services!(v1, channel)`: the services a gateway lists through server
/// reflection `ListServices`, in the protocol version given (v1 and v1alpha have the same
/// shape in different generated modules).
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

        let version = stringify!($version);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap_or_else(|e| panic!("reflection {version} answers: {e}"))
            .into_inner();
        let response = responses
            .message()
            .await
            .unwrap_or_else(|e| panic!("reflection {version} streams a response: {e}"))
            .unwrap_or_else(|| panic!("reflection {version} sends one response"));
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("reflection {version} did not list services: {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_grpc_health_and_reflection() {
    let gw = gateway();
    let channel = gw.channel().await.unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", COMMAND_SERVICE] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|status| panic!("health check of {service:?}: {status:?}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "health of {service:?}"
        );
    }

    let v1 = reflected_services!(v1, channel.clone());
    for service in [COMMAND_SERVICE, HEALTH_SERVICE] {
        assert!(v1.iter().any(|s| s == service), "{service} missing: {v1:?}");
    }
    let v1alpha = reflected_services!(v1alpha, channel);
    for service in [COMMAND_SERVICE, HEALTH_SERVICE] {
        assert!(
            v1alpha.iter().any(|s| s == service),
            "{service} missing: {v1alpha:?}"
        );
    }
}

#[test]
fn check_config_accepts_a_valid_file_and_names_the_key_of_an_invalid_one() {
    // check-config reads the certificates but binds nothing, so no gateway runs here
    let dir = tempfile::tempdir().unwrap();
    Pki::new(&dir.path().join("pki"), "kinvoke test CA").unwrap();
    let valid = GatewayOptions::default().render();

    let out = check_config(dir.path(), "valid.toml", &valid).unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("config OK"), "{out}");
    assert!(
        out.stdout.contains(&format!("cluster \"{CLUSTER}\"")),
        "{out}"
    );

    let unknown_key = GatewayOptions::default()
        .extra_toml("[[cluster]]\nname = \"typo\"\nmod = \"argv\"")
        .render();
    let out = check_config(dir.path(), "unknown-key.toml", &unknown_key).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("`mod`"), "{out}");
    assert!(!out.stdout.contains("config OK"), "{out}");

    let hostname = valid.replacen("address = \"127.0.0.1:0\"", "address = \"localhost\"", 1);
    assert_ne!(
        hostname, valid,
        "the rendered config has no listener address"
    );
    let out = check_config(dir.path(), "hostname.toml", &hostname).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("listener[0].address"), "{out}");
    assert!(!out.stdout.contains("config OK"), "{out}");

    let missing_cert = valid.replacen("pki/server.crt", "pki/missing.crt", 1);
    assert_ne!(
        missing_cert, valid,
        "the rendered config has no server certificate"
    );
    let out = check_config(dir.path(), "missing-cert.toml", &missing_cert).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("missing.crt"), "{out}");
    assert!(!out.stdout.contains("config OK"), "{out}");
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn dev_mode_creates_its_certificates_once_and_serves_the_local_cluster() {
    let root = tempfile::tempdir().unwrap();
    let mut dev = DevGateway::start(root.path()).unwrap();
    let state_dir = dev.state_dir();
    let client_config = state_dir.join("client.toml").canonicalize().unwrap();
    assert!(
        dev.try_command().starts_with(&format!(
            "kinvoke --config {} invoke --cluster {CLUSTER} ",
            client_config.display()
        )),
        "{}",
        dev.banner()
    );
    for key in ["server.key", "client.key"] {
        assert_eq!(mode_of(&state_dir.join(key)), 0o600, "{key}");
    }

    let shout = "echo hi | tr a-z A-Z";
    let out = dev
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", shout])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["HI"], "{out}");

    // dev runs commands sandboxed like production: its keys and the simulated cluster's
    // admin kubeconfig are out of the command's reach
    assert!(
        dev.stderr_log().contains("commands run sandboxed"),
        "{}",
        dev.stderr_log()
    );
    let peek = format!(
        "cat {0}/client.key {0}/sandbox.kubeconfig {0}/gateway.toml && echo LEAKED",
        state_dir.canonicalize().unwrap().display()
    );
    let out = dev
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", &peek])
        .run()
        .unwrap();
    assert_ne!(out.code, Some(0), "{out}");
    assert!(!out.stdout.contains("LEAKED"), "{out}");
    assert!(!out.stdout.contains("PRIVATE KEY"), "{out}");

    let status = dev.terminate().unwrap();
    assert!(status.success(), "dev exit: {status}\n{}", dev.stderr_log());
    let ca = fs::read(state_dir.join("ca.crt")).unwrap();
    drop(dev);

    let dev = DevGateway::start(root.path()).unwrap();
    assert_eq!(fs::read(state_dir.join("ca.crt")).unwrap(), ca);
    let rewritten = fs::read_to_string(dev.client_config()).unwrap();
    assert!(
        rewritten.contains(&format!("endpoint = \"{}\"", dev.endpoint())),
        "{rewritten}"
    );
    for key in ["server.key", "client.key"] {
        assert_eq!(mode_of(&state_dir.join(key)), 0o600, "{key}");
    }
    let out = dev
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", shout])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["HI"], "{out}");
}

#[test]
fn too_many_concurrent_commands_are_refused_naming_the_limit() {
    let gw = gateway_with(GatewayOptions::default().limit("max_concurrent_commands", "1"));
    let go = gw.scratch("go");
    let id = gw
        .start_command(&wait_for_go("first", &go, "done"))
        .unwrap();

    let refused = invoke(&gw, "echo second", &[]);
    assert_eq!(refused.code, Some(EXIT_REJECTED), "{refused}");
    assert!(
        refused.stderr.contains("limits.max_concurrent_commands"),
        "{refused}"
    );

    fs::write(&go, "").unwrap();
    let (out, json) = result_json(&gw, &id, true);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(state(&json), "Succeeded", "{out}");

    let again = invoke(&gw, "echo third", &[]);
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(&again.lines()[1..], ["third"], "{again}");
}

#[test]
fn argv_mode_runs_only_allowed_programs() {
    let gw = gateway_with(GatewayOptions::default().extra_toml(
        "[[cluster]]\nname = \"strict\"\nmode = \"argv\"\nallowed_programs = [\"echo\"]\n",
    ));
    let strict = |command: &str| {
        gw.client()
            .unwrap()
            .args(["invoke", "--cluster", "strict", "--command", command])
            .run()
            .unwrap()
    };

    // no shell: the quotes group words, a quoted pipe is an argument of echo
    let out = strict("echo 'a  b' '|' x");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["a  b | x"], "{out}");

    // a bare one means a pipeline was meant, which argv mode does not run
    let out = strict("echo 'a  b' | x");
    assert_eq!(out.code, Some(EXIT_REJECTED), "{out}");
    assert_eq!(
        out.stderr.trim_end(),
        "kinvoke: INVALID_ARGUMENT: argv mode runs one program (echo) with its arguments; \"|\" is a shell operator; use a cluster in shell mode for pipelines",
        "{out}"
    );

    let out = strict("bash -c id");
    assert_eq!(out.code, Some(EXIT_REJECTED), "{out}");
    assert!(out.stderr.contains("not allowed"), "{out}");
}

#[test]
fn oversized_attachments_are_refused_naming_the_limit() {
    let gw = gateway_with(GatewayOptions::default().limit("max_total_file_bytes", "1KiB"));
    let big = gw.scratch("big.txt");
    fs::write(&big, vec![b'x'; 2000]).unwrap();
    let marker = gw.scratch("ran");

    let out = invoke(
        &gw,
        &format!("touch '{}'", marker.display()),
        &["--file", big.to_str().unwrap()],
    );
    assert_eq!(out.code, Some(EXIT_REJECTED), "{out}");
    assert!(out.stderr.contains("limits.max_total_file_bytes"), "{out}");
    assert!(!marker.exists(), "the command ran:\n{out}");
}

#[test]
fn a_command_line_longer_than_the_limit_is_refused() {
    let gw = gateway_with(GatewayOptions::default().limit("max_command_bytes", "64B"));
    let long = format!("echo {}", "a".repeat(95));
    assert_eq!(long.len(), 100);

    let out = invoke(&gw, &long, &[]);
    assert_eq!(out.code, Some(EXIT_REJECTED), "{out}");
    assert!(out.stderr.contains("limits.max_command_bytes"), "{out}");
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let gw = Gateway::start_with(GatewayOptions::default().json_logs()).unwrap();
    let out = invoke(&gw, "echo logged", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let log = gw.stderr_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("===== kinvoke-e2e"))
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("command finished")),
        "no command log:\n{log}"
    );
}

#[test]
fn the_spinner_shows_only_when_stderr_is_a_terminal() {
    let gw = gateway();
    let command = "sleep 0.5; echo done";
    // not a terminal (the harness captures stderr): nothing but the result
    let plain = invoke(&gw, command, &[]);
    assert_eq!(plain.code, Some(0), "{plain}");
    assert_eq!(plain.stderr, "", "{plain}");

    // a terminal: `script` runs the real client under a pseudo-terminal
    let kinvoke = kinvoke_tests::binary("kinvoke").unwrap();
    let line = [
        kinvoke.display().to_string(),
        "--config".into(),
        gw.client_config().display().to_string(),
        "invoke".into(),
        "--cluster".into(),
        CLUSTER.into(),
        "--command".into(),
        format!("'{command}'"),
    ]
    .join(" ");
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("HOME", gw.dir().join("home"))
        .env_remove("KINVOKE_CONFIG")
        .output()
        .expect("script runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("waiting for the command"),
        "no spinner on a terminal:\n{text}"
    );
    assert!(text.contains("done"), "{text}");
}

/// A client whose only settings come from its default config file under `config_home`
/// (`XDG_CONFIG_HOME`), with `HOME` pointed at a directory of the test's too.
fn client_at_home(config_home: &Path, home: &Path) -> Client {
    Client::new()
        .unwrap()
        .env("XDG_CONFIG_HOME", config_home)
        .env("HOME", home)
}

/// `kinvoke config set-profile NAME` with `endpoint` and the gateway's CA and user
/// certificate.
fn set_profile(
    config_home: &Path,
    home: &Path,
    gw: &Gateway,
    endpoint: &str,
    name: &str,
) -> Output {
    let cert = gw.user_cert();
    client_at_home(config_home, home)
        .args(["--endpoint", endpoint])
        .arg("--ca-cert")
        .arg(&gw.pki().ca_cert)
        .arg("--client-cert")
        .arg(&cert.cert)
        .arg("--client-key")
        .arg(&cert.key)
        .args(["config", "set-profile", name])
        .run()
        .unwrap()
}

#[test]
fn the_default_config_file_holds_profiles_that_config_adds_and_switches() {
    let gw = gateway();
    let root = tempfile::tempdir().unwrap();
    let (config_home, home) = (root.path().join("xdg"), root.path().join("home"));
    fs::create_dir_all(&home).unwrap();

    // no config anywhere yet: the error says how to add one
    let out = client_at_home(&config_home, &home)
        .args(["--profile", "prod", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("kinvoke config set-profile"), "{out}");

    let set = set_profile(&config_home, &home, &gw, &gw.endpoint(), "prod");
    assert_eq!(set.code, Some(0), "{set}");
    let file = config_home.join("kinvoke").join("config.toml");
    assert!(file.exists(), "{set}");
    // the first profile is the default: no flag, no KINVOKE_CONFIG
    let out = client_at_home(&config_home, &home)
        .args(["-o", "json", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.json().unwrap()["principal"], USER, "{out}");

    // a second profile that points nowhere, made the default
    let out = set_profile(&config_home, &home, &gw, "https://127.0.0.1:1", "broken");
    assert_eq!(out.code, Some(0), "{out}");
    let out = client_at_home(&config_home, &home)
        .args(["config", "use-profile", "broken"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let out = client_at_home(&config_home, &home)
        .args(["whoami"])
        .run()
        .unwrap();
    assert_eq!(
        out.code,
        Some(69),
        "the default is now the broken profile: {out}"
    );
    let out = client_at_home(&config_home, &home)
        .args(["--profile", "prod", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");

    let view = client_at_home(&config_home, &home)
        .args(["config", "view"])
        .run()
        .unwrap();
    assert_eq!(view.code, Some(0), "{view}");
    assert!(view.stdout.contains("# * broken"), "{view}");
    assert!(view.stdout.contains("#   prod"), "{view}");

    let out = client_at_home(&config_home, &home)
        .args(["config", "delete-profile", "broken"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let out = client_at_home(&config_home, &home)
        .args(["config", "use-profile", "prod"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let out = client_at_home(&config_home, &home)
        .args(["whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");

    // a token is not stored: refused, not dropped
    let out = client_at_home(&config_home, &home)
        .args(["--token", "t0ken", "config", "set-profile", "with-token"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("does not store a token"), "{out}");
    assert!(
        !fs::read_to_string(config_home.join("kinvoke/config.toml"))
            .unwrap()
            .contains("t0ken")
    );

    // without XDG_CONFIG_HOME, the file is ~/.config/kinvoke/config.toml
    let out = Client::new()
        .unwrap()
        .env("HOME", &home)
        .args([
            "--endpoint",
            "https://127.0.0.1:1",
            "config",
            "set-profile",
            "x",
        ])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(home.join(".config/kinvoke/config.toml").exists(), "{out}");
}

#[test]
fn dev_can_merge_its_profile_into_the_default_config_file() {
    let root = tempfile::tempdir().unwrap();
    let config_home = root.path().join("xdg");
    let home = root.path().join("home");
    let mut dev = DevGateway::start_merging_client_config(root.path(), &config_home).unwrap();
    assert!(
        dev.banner().contains("Merged profile \"dev\" into"),
        "{}",
        dev.banner()
    );
    assert!(
        dev.try_command()
            .starts_with(&format!("kinvoke invoke --cluster {CLUSTER} ")),
        "{}",
        dev.banner()
    );
    let out = client_at_home(&config_home, &home)
        .args(["invoke", "-n", CLUSTER, "-c", "echo hi | tr a-z A-Z"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["HI"], "{out}");
    dev.terminate().unwrap();
}

#[test]
fn completions_generate_for_each_shell_and_the_man_page_renders() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = Client::new()
            .unwrap()
            .args(["completion", shell])
            .run()
            .unwrap();
        assert_eq!(out.code, Some(0), "{shell}: {out}");
        assert!(out.stdout.contains("kinvoke"), "{shell}: {out}");
        assert!(out.stdout.contains("invoke"), "{shell}: {out}");
    }
    let man = Client::new().unwrap().args(["man"]).run().unwrap();
    assert_eq!(man.code, Some(0), "{man}");
    assert!(
        man.stdout.starts_with(".ie") || man.stdout.contains(".TH kinvoke"),
        "{man}"
    );
}

#[test]
fn version_prints_the_clients_and_the_gateways() {
    let gw = gateway();
    let out = gw.client().unwrap().args(["version"]).run().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        out.lines(),
        [format!("kinvoke {version}"), format!("gateway {version}")],
        "{out}"
    );
    let alone = Client::new().unwrap().args(["version"]).run().unwrap();
    assert_eq!(alone.code, Some(0), "{alone}");
    assert!(alone.stdout.contains("gateway unknown"), "{alone}");
}

#[test]
fn query_filters_the_json_object_like_azs() {
    let gw = gateway();
    let out = invoke(&gw, "echo hi", &["--query", "provisioningState"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "\"Succeeded\"\n", "{out}");
    let out = gw
        .client()
        .unwrap()
        .args([
            "list",
            "--query",
            "[?provisioningState=='Succeeded'].command",
        ])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.json().unwrap(), serde_json::json!(["echo hi"]), "{out}");
    let out = gw
        .client()
        .unwrap()
        .args(["list", "--query", "[?"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--query \"[?\""), "{out}");
}
