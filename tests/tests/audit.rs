//! End-to-end tests of the audit file: the real `kinvoke` CLI against the real
//! `kinvoke-gateway` binary, one gateway per test, and `kinvoke-gateway audit verify` on
//! the files it wrote. They check the hash chain of a real run (and that tampering with
//! it is caught), its continuation over restarts and rotations, that commands are refused
//! when the file cannot be written, that no secret reaches the file or the log, and that
//! a command's acceptance is on disk before it runs.
//!
//! Most events are written with the next batch, so a test reads the file after stopping
//! the gateway with SIGTERM, which flushes it and writes `gateway_stopped` durably; only
//! `command_accepted` is promised to be on disk while the gateway runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;
use std::path::{Path, PathBuf};

use kinvoke_gateway::audit::chain::{GENESIS, line_hash};
use kinvoke_tests::{
    AuditLine, CLUSTER, Client, Gateway, GatewayOptions, Output, PROCESS_TIMEOUT, USER,
    VerifiedChain, audit_verify, read_audit_file, read_audit_file_so_far,
};
use serde_json::{Value, json};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Exit status of `kinvoke` when the gateway is unreachable or unavailable.
const EXIT_UNAVAILABLE: i32 = 69;
/// Exit status of `kinvoke` when the gateway rejected the request (not found, invalid).
const EXIT_REJECTED: i32 = 65;
/// Exit status of `kinvoke` when the caller is not authenticated or not allowed.
const EXIT_DENIED: i32 = 77;
/// Exit status of `kinvoke` when the command was canceled.
const EXIT_CANCELED: i32 = 130;

/// Fully qualified name of the command service, as the health service knows it.
const COMMAND_SERVICE: &str = "kinvoke.v1.CommandService";

/// The keys every audit line starts with, in this order.
const CHAIN_KEYS: [&str; 4] = ["seq", "time", "prev", "event"];

fn gateway_with(options: GatewayOptions) -> Gateway {
    Gateway::start_with(options).expect("the gateway starts")
}

fn gateway() -> Gateway {
    gateway_with(GatewayOptions::default())
}

/// `client` runs `-o json invoke --cluster local --command COMMAND EXTRA...`; returns
/// the output and the parsed result.
fn invoke_json(client: Client, command: &str, extra: &[&str]) -> (Output, Value) {
    let out = client
        .args(["-o", "json", "invoke", "--cluster", CLUSTER, "--command"])
        .arg(command)
        .args(extra)
        .run()
        .unwrap();
    let json = out.json().unwrap();
    (out, json)
}

/// The command id of a `-o json` result.
fn id_of(json: &Value) -> String {
    json["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in the result: {json}"))
        .to_owned()
}

/// The output (`logs`) of a `-o json` result.
fn logs_of(json: &Value) -> String {
    json["logs"]
        .as_str()
        .unwrap_or_else(|| panic!("no logs in the result: {json}"))
        .to_owned()
}

/// All lines, for failure messages.
fn show(lines: &[AuditLine]) -> String {
    lines
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Index of the first line that is `event` about command `id`.
fn position_of(lines: &[AuditLine], event: &str, id: &str) -> usize {
    lines
        .iter()
        .position(|l| l.event() == event && l.str_field("command_id") == Some(id))
        .unwrap_or_else(|| panic!("no {event} for {id}:\n{}", show(lines)))
}

/// Runs `audit verify FILES`, which must succeed, and returns what it reported.
fn verified(files: &[PathBuf]) -> VerifiedChain {
    let out = audit_verify(files).unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    VerifiedChain::parse(&out.stdout).unwrap_or_else(|| panic!("not an `ok: ...` report:\n{out}"))
}

/// Runs `audit verify FILES`, which must fail on `line` of `file` with a message
/// containing `message`.
fn verify_fails_at(files: &[PathBuf], file: &Path, line: usize, message: &str) {
    let out = audit_verify(files).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    let expected = format!("{}: line {line}: ", file.display());
    assert!(
        out.stdout.starts_with(&expected),
        "expected {expected:?}:\n{out}"
    );
    assert!(out.stdout.contains(message), "expected {message:?}:\n{out}");
}

/// Whether `s` is an RFC 3339 UTC time as the gateway writes it:
/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
fn is_rfc3339_utc(s: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd";
    let Some(rest) = s.get(SHAPE.len()..) else {
        return false;
    };
    let shaped = s.bytes().zip(SHAPE).all(|(c, &want)| match want {
        b'd' => c.is_ascii_digit(),
        other => c == other,
    });
    let fraction = rest.strip_suffix('Z').map(|f| {
        f.is_empty()
            || f.strip_prefix('.')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    });
    shaped && fraction == Some(true)
}

/// Asserts the chain fields of every line of one fresh file: `seq` 1, 2, ...; each
/// `prev` the SHA-256 of the line before (64 zeros for the first); the chain keys first;
/// an RFC 3339 time. Computed here, independently of the verifier.
fn assert_chained_from_genesis(lines: &[AuditLine]) {
    assert!(!lines.is_empty(), "the audit file is empty");
    let mut prev = GENESIS.to_owned();
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line.keys()[..4], CHAIN_KEYS, "{line}");
        assert_eq!(line.seq(), index as u64 + 1, "{line}");
        assert_eq!(line.str_field("prev"), Some(prev.as_str()), "{line}");
        let time = line.str_field("time").unwrap_or_default();
        assert!(
            is_rfc3339_utc(time),
            "time {time:?} is not RFC 3339: {line}"
        );
        prev = line_hash(line.text.as_bytes());
    }
}

#[test]
fn a_real_runs_chain_verifies_and_records_each_step_of_a_command() {
    let mut gw = gateway();

    let (ok, ok_json) = invoke_json(gw.client().unwrap(), "echo hello; echo world", &[]);
    assert_eq!(ok.code, Some(0), "{ok}");
    let ok_id = id_of(&ok_json);
    let ok_output = logs_of(&ok_json);
    assert_eq!(ok_output, "hello\nworld\n", "{ok}");

    let (three, three_json) = invoke_json(gw.client().unwrap(), "echo about to fail; exit 3", &[]);
    assert_eq!(three.code, Some(3), "{three}");
    let three_id = id_of(&three_json);

    let unknown = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", "nowhere", "--command", "true"])
        .run()
        .unwrap();
    assert_eq!(unknown.code, Some(EXIT_REJECTED), "{unknown}");

    let read = gw
        .client()
        .unwrap()
        .args(["result", "--cluster", CLUSTER, "--command-id", &ok_id])
        .run()
        .unwrap();
    assert_eq!(read.code, Some(0), "{read}");

    let sleeper = gw.start_command("sleep 60").unwrap();
    let canceled = gw
        .client()
        .unwrap()
        .args(["cancel", "--cluster", CLUSTER, "--command-id", &sleeper])
        .run()
        .unwrap();
    assert_eq!(canceled.code, Some(0), "{canceled}");
    let ended = gw
        .client()
        .unwrap()
        .args(["result", "--cluster", CLUSTER, "--command-id", &sleeper])
        .arg("--wait")
        .run()
        .unwrap();
    assert_eq!(ended.code, Some(EXIT_CANCELED), "{ended}");

    let lines = gw.stop_and_read_audit().unwrap();
    let all = show(&lines);

    // the verifier agrees with the file, and with a chain computed here
    let report = verified(&[gw.audit_path()]);
    let last = lines.last().unwrap();
    assert_eq!(report.events, lines.len(), "{all}");
    assert_eq!(report.head_seq, last.seq(), "{all}");
    assert_eq!(report.head_sha256, line_hash(last.text.as_bytes()), "{all}");
    assert_chained_from_genesis(&lines);

    // the run is framed by the gateway's start (with its exact config) and its stop
    let started = &lines[0];
    assert_eq!(started.event(), "gateway_started", "{all}");
    let config = fs::read(gw.config()).unwrap();
    assert_eq!(
        started.str_field("config_sha256"),
        Some(line_hash(&config).as_str()),
        "{started}"
    );
    assert!(
        started.str_field("version").is_some_and(|v| !v.is_empty()),
        "{started}"
    );
    assert_eq!(last.event(), "gateway_stopped", "{all}");
    assert!(
        last.str_field("reason").is_some_and(|r| !r.is_empty()),
        "{last}"
    );

    // one command, step by step
    let accepted = position_of(&lines, "command_accepted", &ok_id);
    let running = position_of(&lines, "command_started", &ok_id);
    let finished = position_of(&lines, "command_finished", &ok_id);
    let allowed = lines[..accepted]
        .iter()
        .rposition(|l| {
            l.event() == "authorization"
                && l.str_field("action") == Some("runcommand/action")
                && l.str_field("cluster") == Some(CLUSTER)
                && l.str_field("principal") == Some(USER)
        })
        .unwrap_or_else(|| panic!("no authorization before command_accepted:\n{all}"));
    assert!(accepted < running && running < finished, "{all}");
    let allowed = &lines[allowed];
    assert_eq!(allowed.str_field("decision"), Some("allow"), "{allowed}");
    assert_eq!(allowed.str_field("auth_method"), Some("mtls"), "{allowed}");

    let accepted = &lines[accepted].value;
    assert_eq!(accepted["cluster"], CLUSTER, "{accepted}");
    assert_eq!(accepted["principal"], USER, "{accepted}");
    assert_eq!(accepted["command"], "echo hello; echo world", "{accepted}");
    assert_eq!(accepted["files"], json!([]), "{accepted}");
    assert!(accepted["timeout_ms"].as_u64().is_some(), "{accepted}");
    assert!(
        accepted["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1")),
        "{accepted}"
    );
    let finished = &lines[finished].value;
    assert_eq!(finished["cluster"], CLUSTER, "{finished}");
    assert_eq!(finished["state"], "Succeeded", "{finished}");
    assert_eq!(finished["exit_code"], 0, "{finished}");
    assert_eq!(finished["output_bytes"], ok_output.len(), "{finished}");
    assert_eq!(
        finished["output_sha256"],
        line_hash(ok_output.as_bytes()),
        "{finished}"
    );
    assert!(finished["duration_ms"].as_u64().is_some(), "{finished}");

    // the other calls
    let three = &lines[position_of(&lines, "command_finished", &three_id)].value;
    assert_eq!(three["exit_code"], 3, "{three}");
    assert_eq!(three["state"], "Succeeded", "{three}");
    assert!(
        lines.iter().any(|l| l.event() == "authorization"
            && l.str_field("cluster") == Some("nowhere")
            && l.str_field("decision") == Some("deny")),
        "no denial for the unknown cluster:\n{all}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.event() == "command_accepted" && l.str_field("cluster") == Some("nowhere")),
        "{all}"
    );
    let read = &lines[position_of(&lines, "result_read", &ok_id)];
    assert_eq!(read.str_field("principal"), Some(USER), "{read}");
    let cancel = position_of(&lines, "command_cancel_requested", &sleeper);
    assert_eq!(lines[cancel].str_field("principal"), Some(USER), "{all}");
    let sleeper_finished = position_of(&lines, "command_finished", &sleeper);
    assert!(cancel < sleeper_finished, "{all}");
    assert_eq!(
        lines[sleeper_finished].str_field("state"),
        Some("Canceled"),
        "{all}"
    );
}

#[test]
fn the_output_digest_covers_output_beyond_the_cap() {
    let mut gw = gateway_with(GatewayOptions::default().limit("max_output_bytes", "1KiB"));
    let (out, json) = invoke_json(
        gw.client().unwrap(),
        "head -c 5000 /dev/zero | tr '\\0' a",
        &[],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(json["outputTruncated"], true, "{out}");
    let id = id_of(&json);

    let lines = gw.stop_and_read_audit().unwrap();
    let finished = &lines[position_of(&lines, "command_finished", &id)].value;
    assert_eq!(finished["output_bytes"], 5000, "{finished}");
    assert_eq!(
        finished["output_sha256"],
        line_hash(&[b'a'; 5000]),
        "{finished}"
    );
}

#[test]
fn tampering_with_a_real_file_is_caught_at_the_first_broken_line() {
    let mut gw = gateway();
    for n in 0..3 {
        let (out, _) = invoke_json(gw.client().unwrap(), &format!("echo run {n}"), &[]);
        assert_eq!(out.code, Some(0), "{out}");
    }
    let lines = gw.stop_and_read_audit().unwrap();
    assert!(
        lines.len() >= 8,
        "too short to tamper with:\n{}",
        show(&lines)
    );
    let original: Vec<String> = lines.iter().map(|l| l.text.clone()).collect();
    let head = verified(&[gw.audit_path()]);
    // a middle line, by index; its line number is index + 1 and its seq too
    let middle = original.len() / 2;
    let copy = gw.scratch("tampered.jsonl");
    let files = [copy.clone()];
    let write = |lines: &[String]| fs::write(&copy, lines.join("\n") + "\n").unwrap();

    // (a) one field of a middle line edited: the next line's prev no longer matches
    let mut edited = original.clone();
    let time_at = edited[middle].find("\"time\":\"").unwrap() + "\"time\":\"".len();
    let digit = if edited[middle].as_bytes()[time_at] == b'1' {
        "2"
    } else {
        "1"
    };
    edited[middle].replace_range(time_at..=time_at, digit);
    assert_ne!(edited[middle], original[middle]);
    write(&edited);
    verify_fails_at(
        &files,
        &copy,
        middle + 2,
        "prev hash does not match the line before it",
    );

    // (b) a middle line deleted: the next seq is one too far
    let mut deleted = original.clone();
    deleted.remove(middle);
    write(&deleted);
    verify_fails_at(
        &files,
        &copy,
        middle + 1,
        &format!(
            "sequence number {} where {} was expected: a line is missing or out of order",
            middle + 2,
            middle + 1
        ),
    );

    // (c) two lines swapped: the first of them is out of order
    let mut swapped = original.clone();
    swapped.swap(middle, middle + 1);
    write(&swapped);
    verify_fails_at(
        &files,
        &copy,
        middle + 1,
        &format!(
            "sequence number {} where {} was expected",
            middle + 2,
            middle + 1
        ),
    );

    // (d) the tail cut inside the last line
    let mut text = original.join("\n") + "\n";
    text.truncate(text.len() - 10);
    fs::write(&copy, text).unwrap();
    verify_fails_at(
        &files,
        &copy,
        original.len(),
        "the file ends inside this line (truncated tail)",
    );

    // the untouched copy still verifies, to the same head
    write(&original);
    assert_eq!(verified(&files), head);

    // an edit of the very last line has no successor to break: only the head changes,
    // which is why the head is worth keeping elsewhere
    let mut last_edited = original.clone();
    let last = last_edited.len() - 1;
    last_edited[last] = last_edited[last].replace("\"gateway_stopped\"", "\"gateway_stoppeD\"");
    assert_ne!(last_edited[last], original[last]);
    write(&last_edited);
    let moved = verified(&files);
    assert_eq!(moved.events, head.events);
    assert_ne!(moved.head_sha256, head.head_sha256);
}

#[test]
fn a_restarted_gateway_continues_the_chain() {
    let mut gw = gateway();
    let (first, _) = invoke_json(gw.client().unwrap(), "echo first run", &[]);
    assert_eq!(first.code, Some(0), "{first}");
    gw.restart().unwrap();
    let (second, _) = invoke_json(gw.client().unwrap(), "echo second run", &[]);
    assert_eq!(second.code, Some(0), "{second}");

    let lines = gw.stop_and_read_audit().unwrap();
    let all = show(&lines);
    assert_chained_from_genesis(&lines);
    let report = verified(&[gw.audit_path()]);
    assert_eq!(report.events, lines.len(), "{all}");
    assert_eq!(report.head_seq, lines.len() as u64, "{all}");

    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.event() == "gateway_started")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2, "{all}");
    assert_eq!(starts[0], 0, "{all}");
    // the second run links to the first run's last word
    let restart = starts[1];
    assert_eq!(lines[restart - 1].event(), "gateway_stopped", "{all}");
    assert_eq!(
        lines[restart].str_field("prev"),
        Some(line_hash(lines[restart - 1].text.as_bytes()).as_str()),
        "{all}"
    );
    let stops = lines
        .iter()
        .filter(|l| l.event() == "gateway_stopped")
        .count();
    assert_eq!(stops, 2, "{all}");
    assert_eq!(lines.last().unwrap().event(), "gateway_stopped", "{all}");
}

#[test]
fn rotated_files_verify_together_oldest_first() {
    let mut gw = gateway_with(GatewayOptions::default().audit("max_file_bytes", "4KiB"));
    // about 1 KiB of events per command: enough for several rotations
    for n in 0..16 {
        let (out, _) = invoke_json(gw.client().unwrap(), &format!("echo rotation {n}"), &[]);
        assert_eq!(out.code, Some(0), "{out}");
    }
    gw.terminate().unwrap();

    let files = gw.audit_files().unwrap();
    let current = gw.audit_path();
    assert_eq!(files.last(), Some(&current));
    let rotated = &files[..files.len() - 1];
    assert!(
        rotated.len() >= 2,
        "expected at least two rotated files: {files:?}"
    );

    // each rotated file is named after its last seq and is at least max_file_bytes
    // long; together the files hold seq 1, 2, ... without a gap
    let mut all = Vec::new();
    for file in &files {
        let lines = read_audit_file(file).unwrap();
        if file != &current {
            let name = file.file_name().unwrap().to_str().unwrap();
            let last = lines.last().unwrap_or_else(|| panic!("{name} is empty"));
            assert_eq!(name, format!("audit.{}.jsonl", last.seq()), "{last}");
            let size = fs::metadata(file).unwrap().len();
            assert!(size >= 4096, "{name} rotated at {size} bytes");
        }
        all.extend(lines);
    }
    let seqs: Vec<u64> = all.iter().map(AuditLine::seq).collect();
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(seqs, expected);

    let report = verified(&files);
    let last = all.last().unwrap();
    assert_eq!(report.events, all.len());
    assert_eq!(report.head_seq, last.seq());
    assert_eq!(report.head_sha256, line_hash(last.text.as_bytes()));

    // the current file alone does not start the chain: refused, unless the older
    // files were deleted on purpose (--partial), when its first line anchors it
    let alone = audit_verify(std::slice::from_ref(&current)).unwrap();
    assert_eq!(alone.code, Some(1), "{alone}");
    assert!(
        alone.stdout.contains("its oldest events are missing"),
        "{alone}"
    );
    let partial = kinvoke_tests::gateway_cli([
        "audit".as_ref(),
        "verify".as_ref(),
        "--partial".as_ref(),
        current.as_os_str(),
    ])
    .unwrap();
    assert_eq!(partial.code, Some(0), "{partial}");
    let partial = VerifiedChain::parse(&partial.stdout).unwrap();
    assert_eq!(partial.head_seq, last.seq());

    // newest first, the second file does not continue the first
    let reversed: Vec<PathBuf> = files.iter().rev().cloned().collect();
    verify_fails_at(
        &reversed,
        &reversed[1],
        1,
        "a line is missing or out of order",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_refuses_commands() {
    // writes to /dev/full fail with ENOSPC, even for root: a full disk
    let gw = gateway_with(GatewayOptions::default().audit("path", "/dev/full"));
    let marker = gw.scratch("ran");

    let out = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command"])
        .arg(format!("touch '{}'", marker.display()))
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_UNAVAILABLE), "{out}");
    assert_eq!(
        out.stderr.trim_end(),
        "kinvoke: UNAVAILABLE: audit log unavailable",
        "{out}"
    );
    assert!(!marker.exists(), "the command ran:\n{out}");
    let started: Vec<_> = gw
        .audit_events()
        .into_iter()
        .filter(|e| e.event() == "command_started")
        .collect();
    assert!(started.is_empty(), "{started:?}");
    let listed = gw
        .client()
        .unwrap()
        .args(["-o", "json", "list"])
        .run()
        .unwrap();
    assert_eq!(listed.code, Some(0), "{listed}");
    assert_eq!(listed.json().unwrap(), json!([]), "{listed}");

    let mut health = HealthClient::new(gw.channel().await.unwrap());
    for service in ["", COMMAND_SERVICE] {
        let request = || HealthCheckRequest {
            service: service.to_owned(),
        };
        // the health service follows the log's state: wait for it to say so
        let mut watch = health
            .watch(request())
            .await
            .unwrap_or_else(|status| panic!("health watch of {service:?}: {status:?}"))
            .into_inner();
        let not_serving = tokio::time::timeout(PROCESS_TIMEOUT, async {
            while let Some(response) = watch.message().await.unwrap() {
                if response.status() == ServingStatus::NotServing {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or_else(|_| panic!("{service:?} still serving after {PROCESS_TIMEOUT:?}"));
        assert!(not_serving, "the health watch of {service:?} ended");

        let checked = health
            .check(request())
            .await
            .unwrap_or_else(|status| panic!("health check of {service:?}: {status:?}"))
            .into_inner();
        assert_eq!(
            checked.status(),
            ServingStatus::NotServing,
            "health of {service:?}"
        );
    }
}

/// The heads the gateway logged on target `kinvoke::audit::head`, oldest first, as
/// `SEQ:SHA256`.
fn logged_heads(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("kinvoke::audit::head") || l.contains("audit log head"))
        .filter_map(|l| {
            let seq = l.split("seq=").nth(1)?.split(' ').next()?;
            let hash = l.split("sha256=").nth(1)?.get(..64)?;
            Some(format!("{seq}:{hash}"))
        })
        .collect()
}

#[test]
fn an_audit_file_replaced_under_the_gateway_fails_closed_and_a_logged_head_finds_removed_lines() {
    let mut gw = gateway();
    let (first, _) = invoke_json(gw.client().unwrap(), "echo before", &[]);
    assert_eq!(first.code, Some(0), "{first}");
    // the result can come back before the batch holding `command_finished` is written;
    // copying the file before then would leave out a line the gateway did write (which
    // the logged head would rightly report as removed)
    gw.await_audit_line("command_finished in the file", PROCESS_TIMEOUT, |l| {
        l.event() == "command_finished"
    })
    .unwrap();
    // another process on the host puts a copy in the file's place
    let path = gw.audit_path();
    let copy = path.with_extension("copy");
    fs::copy(&path, &copy).unwrap();
    fs::rename(&copy, &path).unwrap();
    let before = fs::read(&path).unwrap();

    let marker = gw.scratch("ran");
    let out = gw
        .client()
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command"])
        .arg(format!("touch '{}'", marker.display()))
        .run()
        .unwrap();
    assert_eq!(out.code, Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stderr.contains("audit log unavailable"), "{out}");
    assert!(!marker.exists(), "a command ran without its audit record");
    let log = gw.stderr_log();
    assert!(
        log.contains("audit log tampered with") && log.contains("was replaced by another file"),
        "{log}"
    );
    gw.terminate().unwrap();
    // nothing more went into the file in the old one's place
    assert_eq!(fs::read(&path).unwrap(), before);

    // the heads logged per batch anchor the chain: the file verifies through the last
    // one written, and with its last line removed it verifies alone but not through it
    let heads = logged_heads(&gw.stderr_log());
    let last = heads
        .last()
        .unwrap_or_else(|| panic!("no head logged:\n{log}"));
    let anchored = |files: &[PathBuf], head: &str| {
        let mut args = vec!["audit".into(), "verify".into(), format!("--head={head}")];
        args.extend(files.iter().map(|f| f.display().to_string()));
        kinvoke_tests::gateway_cli(args).unwrap()
    };
    let ok = anchored(std::slice::from_ref(&path), last);
    assert_eq!(ok.code, Some(0), "{ok}");
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    verified(std::slice::from_ref(&path));
    let cut = anchored(std::slice::from_ref(&path), last);
    assert_eq!(cut.code, Some(1), "{cut}");
    assert!(
        cut.stdout.contains("lines were removed from its end"),
        "{cut}"
    );
}

#[test]
fn secrets_never_reach_the_audit_file_or_the_log() {
    let token = "kinvoke-e2e-audit-token-3b9e17d2";
    let bad_token = "kinvoke-e2e-audit-bad-token-a04c55e1";
    let file_secret = "kinvoke-e2e-file-secret-61f0b7c3";
    // printed by the command but never written in its command line
    let output_secret = "kinvoke-e2e-output-secret-c92d4e18";
    let mut gw = gateway_with(
        GatewayOptions::default()
            .listener_toml(r#"authentication = ["mtls", "token"]"#)
            .extra_toml(&format!(
                r#"
[[authn.static_token]]
principal = "ci"
sha256 = "{}"

[[assignment]]
name = "ci-invoker"
principal = "ci"
role = "Command Invoker"
scope = "clusters/local"
"#,
                kinvoke_gateway::authn::static_token::hash_token(token)
            )),
    );
    let attached = gw.scratch("secret.txt");
    let content = format!("{file_secret}\n");
    fs::write(&attached, &content).unwrap();

    let (out, json) = invoke_json(
        gw.token_client(token).unwrap(),
        "cat secret.txt; printf '%s%s\\n' kinvoke-e2e-output- secret-c92d4e18",
        &["--file", attached.to_str().unwrap()],
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        logs_of(&json),
        format!("{file_secret}\n{output_secret}\n"),
        "{out}"
    );
    let id = id_of(&json);

    let refused = gw
        .token_client(bad_token)
        .unwrap()
        .args(["invoke", "--cluster", CLUSTER, "--command", "true"])
        .run()
        .unwrap();
    assert_eq!(refused.code, Some(EXIT_DENIED), "{refused}");

    let lines = gw.stop_and_read_audit().unwrap();
    let all = show(&lines);
    let file_text = fs::read_to_string(gw.audit_path()).unwrap();
    let log = gw.stderr_log();
    for secret in [token, bad_token, file_secret, output_secret] {
        assert!(
            !file_text.contains(secret),
            "{secret:?} is in the audit file:\n{file_text}"
        );
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }

    // the events are there, with the attachment as a digest
    let accepted = &lines[position_of(&lines, "command_accepted", &id)].value;
    assert_eq!(accepted["principal"], "ci", "{accepted}");
    assert_eq!(
        accepted["files"],
        json!([{
            "path": "secret.txt",
            "size": content.len(),
            "sha256": line_hash(content.as_bytes()),
        }]),
        "{accepted}"
    );
    let finished = &lines[position_of(&lines, "command_finished", &id)].value;
    assert_eq!(
        finished["output_sha256"],
        line_hash(format!("{file_secret}\n{output_secret}\n").as_bytes()),
        "{finished}"
    );
    assert!(
        lines.iter().any(|l| l.event() == "authentication_failed"),
        "the bad token left no trace:\n{all}"
    );
    assert!(
        gw.audit_events()
            .iter()
            .any(|e| e.event() == "authentication_failed"),
        "the bad token left no trace in the log:\n{log}"
    );
}

#[test]
fn an_accepted_command_is_on_disk_before_its_result_is_returned() {
    let gw = gateway();
    let (out, json) = invoke_json(gw.client().unwrap(), "echo durable", &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let id = id_of(&json);

    // the gateway still runs: only what it has written so far is there
    assert!(gw.is_running());
    let lines = read_audit_file_so_far(&gw.audit_path()).unwrap();
    let accepted = lines
        .iter()
        .find(|l| l.event() == "command_accepted" && l.str_field("command_id") == Some(id.as_str()))
        .unwrap_or_else(|| panic!("no command_accepted for {id} on disk:\n{}", show(&lines)));
    assert_eq!(
        accepted.str_field("command"),
        Some("echo durable"),
        "{accepted}"
    );
}

#[test]
fn rfc3339_times_are_told_apart() {
    for good in ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123456789Z"] {
        assert!(is_rfc3339_utc(good), "{good}");
    }
    for bad in [
        "2026-01-02 03:04:05Z",
        "2026-01-02T03:04:05",
        "2026-01-02T03:04:05.Z",
        "2026-01-02T03:04:05+00:00",
        "",
    ] {
        assert!(!is_rfc3339_utc(bad), "{bad}");
    }
}
