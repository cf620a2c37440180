//! The gateway in-process: the guard's decisions and a command's life through the typed
//! gRPC client, with no CLI in between (the CLI's own behaviour is tested end to end in
//! `tests/`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the status is the failure report"
)]

mod support;

use std::time::Duration;

use kinvoke_proto::v1 as pb;
use support::{ADMIN, TestGateway, cancel_request, invoke, result_request, started};
use tonic::Code;

/// Clusters and callers for the guard's cases: `frozen` refuses every command, `office`
/// admits only 10.0.0.0/8; `ivan` may invoke on `local`, `audrey` may read every result
/// there, `stranger` holds nothing.
const POLICY: &str = r#"
[[cluster]]
name = "frozen"
disable_run_command = true

[[cluster]]
name = "office"
authorized_ip_ranges = ["10.0.0.0/8"]

[[assignment]]
principal = "ivan"
role = "Command Invoker"
scope = "clusters/local"

[[assignment]]
principal = "audrey"
role = "Command Auditor"
scope = "clusters/local"
"#;

#[tokio::test]
async fn the_guard_refuses_with_the_code_of_each_reason_and_audits_it() {
    let gw = TestGateway::start("", POLICY).await;
    let cases = [
        (ADMIN, "", Code::InvalidArgument, "cluster is required"),
        (
            ADMIN,
            "nowhere",
            Code::NotFound,
            "cluster \"nowhere\" is not configured",
        ),
        (
            ADMIN,
            "frozen",
            Code::FailedPrecondition,
            "run command is disabled",
        ),
        (
            ADMIN,
            "office",
            Code::PermissionDenied,
            "127.0.0.1 is not in the authorized IP ranges",
        ),
        (
            "stranger",
            "local",
            Code::PermissionDenied,
            "principal stranger lacks runcommand/action on clusters/local",
        ),
        (
            "audrey",
            "local",
            Code::PermissionDenied,
            "principal audrey lacks runcommand/action",
        ),
    ];
    for (who, cluster, code, message) in cases {
        let status = gw
            .commands_as(who)
            .await
            .invoke_command(invoke(cluster, "echo must-not-run", false))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{who} on {cluster:?}: {status:?}");
        assert!(
            status.message().contains(message),
            "{who} on {cluster:?}: {status:?}"
        );
    }
    let is_denial =
        |e: &serde_json::Value| e["event"] == "authorization" && e["decision"] == "deny";
    gw.audit_until("a denial per refused call", |events| {
        events.iter().filter(|e| is_denial(e)).count() == cases.len()
    })
    .await;
    assert!(
        gw.audit().iter().all(|e| e["event"] != "command_accepted"),
        "a refused command was accepted"
    );
}

#[tokio::test]
async fn another_callers_command_is_not_found_unless_one_may_read_all_and_never_cancelable() {
    let gw = TestGateway::start("", POLICY).await;
    let record = started(&gw, "ivan", "echo ready; sleep 30").await;
    let get = |cluster: &str| pb::GetCommandResultRequest {
        cluster: cluster.into(),
        command_id: record.id.clone(),
        wait: false,
    };
    let cancel = cancel_request(&record.id);

    let status = gw
        .commands_as("stranger")
        .await
        .get_command_result(get("local"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let mut auditor = gw.commands_as("audrey").await;
    let seen = auditor
        .get_command_result(get("local"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.principal, "ivan");
    let status = auditor.cancel_command(cancel.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("may read but not cancel"),
        "{status:?}"
    );

    // the owner may
    let canceled = gw
        .commands_as("ivan")
        .await
        .cancel_command(cancel)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.id, record.id);
}

#[tokio::test]
async fn a_command_runs_to_its_end_and_its_result_is_kept() {
    let gw = TestGateway::start("", "").await;
    let mut client = gw.commands_as(ADMIN).await;
    let result = client
        .invoke_command(invoke("local", "echo out; echo err >&2; exit 3", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.state(), pb::CommandState::Succeeded);
    assert_eq!(result.exit_code, Some(3));
    assert_eq!(result.output, b"out\nerr\n");
    assert_eq!(result.principal, ADMIN);

    let kept = client
        .get_command_result(result_request(&result.id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.output, result.output);
    let ours = |e: &serde_json::Value, event: &str| {
        e["command_id"] == result.id.as_str() && e["event"] == event
    };
    gw.audit_until("the command accepted, started and finished", |events| {
        ["command_accepted", "command_started", "command_finished"]
            .iter()
            .all(|event| events.iter().any(|e| ours(e, event)))
    })
    .await;
}

#[tokio::test]
async fn a_followed_command_streams_its_output_then_its_result() {
    let gw = TestGateway::start("", "").await;
    let record = started(&gw, ADMIN, "echo one; echo two").await;
    let mut stream = gw
        .commands_as(ADMIN)
        .await
        .stream_command_output(pb::StreamCommandOutputRequest {
            cluster: "local".into(),
            command_id: record.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut output = Vec::new();
    let mut finished = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(pb::output_event::Event::Chunk(chunk)) => output.extend(chunk.data),
            Some(pb::output_event::Event::Finished(result)) => finished = Some(result),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(output, b"one\ntwo\n");
    assert_eq!(finished.unwrap().state(), pb::CommandState::Succeeded);
}

#[tokio::test]
async fn cancel_and_timeout_end_a_command_with_their_state_and_reason() {
    let gw = TestGateway::start("", "").await;
    let mut client = gw.commands_as(ADMIN).await;
    let record = started(&gw, ADMIN, "sleep 30").await;
    assert_eq!(record.state(), pb::CommandState::Running);
    client
        .cancel_command(cancel_request(&record.id))
        .await
        .unwrap();
    let canceled = client
        .get_command_result(result_request(&record.id, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.state(), pb::CommandState::Canceled);
    assert!(canceled.reason.contains("canceled"), "{}", canceled.reason);

    let mut request = invoke("local", "sleep 30", false);
    request.timeout = Some(prost_types::Duration::try_from(Duration::from_millis(300)).unwrap());
    let timed_out = client
        .invoke_command(request)
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(timed_out.state(), pb::CommandState::TimedOut);
    assert!(
        timed_out.reason.contains("timed out after 300ms"),
        "{}",
        timed_out.reason
    );
}

#[tokio::test]
async fn a_full_gateway_refuses_naming_the_limit_and_frees_the_slot_when_one_ends() {
    let gw = TestGateway::start("max_concurrent_commands = 1", "").await;
    let mut client = gw.commands_as(ADMIN).await;
    let first = started(&gw, ADMIN, "sleep 30").await;
    let status = client
        .invoke_command(invoke("local", "echo second", false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("limits.max_concurrent_commands = 1"),
        "{status:?}"
    );
    client
        .cancel_command(cancel_request(&first.id))
        .await
        .unwrap();
    client
        .get_command_result(result_request(&first.id, true))
        .await
        .unwrap();
    let second = client
        .invoke_command(invoke("local", "echo second", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(second.output, b"second\n");
}

#[tokio::test]
async fn shutdown_cancels_what_outlives_the_grace_and_records_why() {
    let mut gw = TestGateway::start("", "").await;
    let record = started(&gw, ADMIN, "sleep 30").await;
    let state = gw.state_dir();
    gw.stop().await.unwrap();
    // reopen the store the way the next start would, and read the record
    let (store, _) = kinvoke_gateway::store::Store::open(&state.join("kinvoke.db")).unwrap();
    let id = kinvoke_gateway::command::CommandId::parse(&record.id).unwrap();
    let kept = store.get(&id).await.unwrap().unwrap();
    assert_eq!(kept.state, kinvoke_gateway::command::CommandState::Canceled);
    assert_eq!(kept.reason, kinvoke_gateway::runner::SHUTDOWN_REASON);
}

#[tokio::test]
async fn a_host_that_cannot_sandbox_stops_the_gateway_unless_each_cluster_opts_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        let text = format!(
            "state_dir = \"state\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"s.crt\", key = \"s.key\", client_ca = \"ca.crt\" }}\n\
             [[cluster]]\nname = \"local\"\n{extra}"
        );
        kinvoke_gateway::config::Config::parse(&text, dir.path()).unwrap()
    };
    // a launcher that cannot run stands for a kernel without Landlock or user namespaces
    let cannot = Some(std::path::PathBuf::from("/nonexistent/kinvoke-gateway"));
    let refused = kinvoke_gateway::Gateway::open_with_launcher(config(""), cannot.clone()).await;
    let Err(err) = refused else {
        panic!("the gateway opened without a sandbox");
    };
    let message = err.to_string();
    assert!(
        message.contains("cannot sandbox commands on this host"),
        "{message}"
    );
    assert!(message.contains("sandbox = \"off\""), "{message}");

    // a cluster that says so explicitly runs unsandboxed (and check-config warns)
    let off = config("sandbox = \"off\"\n");
    assert!(
        off.warnings
            .iter()
            .any(|w| w.contains("WITHOUT the sandbox"))
    );
    let opened = kinvoke_gateway::Gateway::open_with_launcher(off, cannot).await;
    assert!(opened.is_ok(), "{:?}", opened.err().map(|e| e.to_string()));
}

#[tokio::test]
async fn the_listener_refuses_an_address_outside_its_ranges_before_tls_and_audits_it() {
    let gw =
        TestGateway::start_with_listener("authorized_ip_ranges = [\"127.0.0.2/32\"]", "", "").await;
    let allowed = gw
        .channel_from(Some("127.0.0.2".parse().unwrap()), ADMIN)
        .await
        .expect("127.0.0.2 is in the listener's ranges");
    let result = pb::command_service_client::CommandServiceClient::new(allowed)
        .invoke_command(invoke("local", "echo in", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.output, b"in\n");

    let refused = gw
        .channel_from(Some("127.0.0.3".parse().unwrap()), ADMIN)
        .await;
    assert!(refused.is_err(), "127.0.0.3 got a connection");
    let refusal = gw.audit_event("connection_refused").await;
    assert!(
        refusal["peer"].as_str().unwrap().starts_with("127.0.0.3:"),
        "{refusal}"
    );
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("authorized_ip_ranges"),
        "{refusal}"
    );
    // and nothing about it reached authentication
    assert!(
        gw.audit()
            .iter()
            .all(|e| e["event"] != "authentication_failed")
    );
}

#[tokio::test]
async fn every_refused_command_is_audited_with_its_code_and_reason() {
    let gw = TestGateway::start(
        "max_command_bytes = \"64B\"\nmax_concurrent_commands = 1",
        "",
    )
    .await;
    let mut client = gw.commands_as(ADMIN).await;
    let mut traversing = invoke("local", "cat x", false);
    traversing.files.push(pb::AttachedFile {
        path: "../../etc/cron.d/x".into(),
        content: b"* * * * * root id".to_vec(),
        mode: 0,
    });
    let too_long = invoke("local", &"x".repeat(65), false);
    let first = started(&gw, ADMIN, "sleep 30").await;
    let cases = [
        (traversing, Code::InvalidArgument, "files.path"),
        (
            too_long,
            Code::ResourceExhausted,
            "limits.max_command_bytes",
        ),
        (
            invoke("local", "echo second", false),
            Code::ResourceExhausted,
            "limits.max_concurrent_commands",
        ),
    ];
    for (request, code, message) in cases {
        let status = client.invoke_command(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    let events = gw
        .audit_until("a refusal per refused command", |events| {
            events
                .iter()
                .filter(|e| e["event"] == "command_refused")
                .count()
                == 3
        })
        .await;
    let refusals: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["event"] == "command_refused")
        .map(|e| {
            assert_eq!(e["principal"], ADMIN, "{e}");
            assert_eq!(e["cluster"], "local", "{e}");
            (
                e["code"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(refusals[0].0, "InvalidArgument");
    assert!(refusals[0].1.contains("files.path"), "{refusals:?}");
    assert_eq!(refusals[1].0, "ResourceExhausted");
    assert!(
        refusals[2].1.contains("max_concurrent_commands"),
        "{refusals:?}"
    );
    // the file's content never reaches the audit log
    assert!(events.iter().all(|e| !e.to_string().contains("root id")));
    client
        .cancel_command(cancel_request(&first.id))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_request_over_the_transport_limit_names_the_file_limit_and_is_audited() {
    let gw = TestGateway::start("max_total_file_bytes = \"1MiB\"", "").await;
    let mut client = gw.commands_as(ADMIN).await;
    let marker = gw.state_dir().join("ran");
    let mut request = invoke("local", &format!("touch {}", marker.display()), false);
    // one attachment a little over what a request within the limits can need
    let max = kinvoke_gateway::command::Limits {
        max_total_file_bytes: 1024 * 1024,
        ..Default::default()
    }
    .max_request_bytes();
    request.files.push(pb::AttachedFile {
        path: "big".into(),
        content: vec![b'x'; max + 1],
        mode: 0,
    });
    let status = client.invoke_command(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("limits.max_total_file_bytes = 1048576 bytes"),
        "{status:?}"
    );
    assert!(
        status.message().contains(&format!("at most {max} bytes")),
        "{status:?}"
    );
    let refusal = gw.audit_event("request_refused").await;
    assert_eq!(refusal["code"], "ResourceExhausted", "{refusal}");
    assert_eq!(refusal["listener"], "main", "{refusal}");
    assert!(
        refusal["source"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{refusal}"
    );
    assert_eq!(
        refusal["method"], "/kinvoke.v1.CommandService/InvokeCommand",
        "{refusal}"
    );
    // the gateway is still up and the same connection still serves
    let ok = client
        .invoke_command(invoke("local", "echo fine", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(ok.exit_code, Some(0));
    assert!(!marker.exists(), "the refused command ran");
}

#[tokio::test]
async fn bad_client_certificates_are_refused_with_the_reason_and_audited() {
    let gw = TestGateway::start("", "").await;
    let stranger_ca =
        kinvoke_gateway::pki::CertificateAuthority::new("not the gateway's CA").unwrap();
    let cases = [
        (
            "expired",
            gw.ca()
                .client_cert_valid(ADMIN, (2020, 1, 1), (2021, 1, 1))
                .unwrap(),
            "TLS handshake refused",
            "certificate expired",
        ),
        (
            "not yet valid",
            gw.ca()
                .client_cert_valid(ADMIN, (2090, 1, 1), (2091, 1, 1))
                .unwrap(),
            "TLS handshake refused",
            "certificate not valid yet",
        ),
        (
            "untrusted CA",
            stranger_ca.client_cert(ADMIN, None).unwrap(),
            "TLS handshake refused",
            "UnknownIssuer",
        ),
        (
            "control characters in the name",
            gw.ca().client_cert("admin\u{1b}[2J\nforged", None).unwrap(),
            "client certificate name identifying the caller holds control or text-direction characters",
            "",
        ),
    ];
    for (name, cert, reason, detail) in &cases {
        // with TLS 1.3 the client may finish its handshake before the server refuses
        // the certificate: the refusal then shows on the first call
        let refused = match gw.channel_with_cert(cert).await {
            Err(_) => None,
            Ok(channel) => Some(
                pb::access_service_client::AccessServiceClient::new(channel)
                    .who_am_i(pb::WhoAmIRequest {})
                    .await
                    .expect_err(name),
            ),
        };
        if !detail.is_empty() {
            assert!(
                refused.as_ref().is_none_or(|s| s.code() != Code::Ok),
                "{name}: {refused:?}"
            );
        } else {
            let status = refused.unwrap_or_else(|| panic!("{name}: no TLS refusal expected"));
            assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
            assert!(status.message().contains(reason), "{name}: {status:?}");
        }
        gw.audit_until(name, |events| {
            events.iter().any(|e| {
                e["event"] == "authentication_failed"
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(reason) && r.contains(detail))
            })
        })
        .await;
    }
    // the gateway still serves a good certificate
    gw.access_as(ADMIN)
        .await
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
}

/// Makes files immutable (`chattr +i`: even root's writes fail with EPERM, as on a
/// read-only or failing disk) until dropped.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(files: &[std::path::PathBuf], on: bool) {
        for file in files {
            let flag = if on { "+i" } else { "-i" };
            let status = std::process::Command::new("chattr")
                .arg(flag)
                .arg(file)
                .status()
                .expect("chattr runs (e2fsprogs)");
            assert!(status.success(), "chattr {flag} {}", file.display());
        }
    }

    fn new(files: Vec<std::path::PathBuf>) -> Self {
        Self::set(&files, true);
        Self(files)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        Self::set(&self.0, false);
    }
}

async fn serving_status(
    gw: &TestGateway,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel_as(ADMIN).await);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "kinvoke.v1.CommandService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(response) = watch.message().await.unwrap() {
        if response.status() == want {
            return;
        }
    }
    panic!("the health watch ended before {want:?}");
}

#[tokio::test]
async fn a_store_that_cannot_be_written_refuses_commands_and_recovers_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let gw = TestGateway::start("", "").await;
    let db = gw.state_dir().join("kinvoke.db");
    let running = started(&gw, ADMIN, "exec sleep 60").await;

    let fault = Immutable::new(vec![db.clone(), db.with_extension("db-wal")]);
    let mut client = gw.commands_as(ADMIN).await;
    let first = client
        .invoke_command(invoke("local", "echo during", false))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    assert!(
        first.message().contains("result store cannot be written"),
        "{first:?}"
    );
    serving_status(&gw, ServingStatus::NotServing).await;
    let second = client
        .invoke_command(invoke("local", "echo during", false))
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::Unavailable, "{second:?}");
    // a command that ends meanwhile keeps its result until the store takes it
    let runner = gw.runner_arc();
    let id = running.id.clone();
    let canceled = tokio::spawn(async move {
        runner
            .cancel("local", &id, "canceled during the fault".into())
            .await
    });

    drop(fault);
    serving_status(&gw, ServingStatus::Serving).await;
    let after = client
        .invoke_command(invoke("local", "echo after", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(after.output, b"after\n");
    let record = canceled.await.unwrap().unwrap();
    assert_eq!(
        record.state,
        kinvoke_gateway::command::CommandState::Canceled
    );
    let kept = client
        .get_command_result(result_request(&running.id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.state(), pb::CommandState::Canceled);
    let events = gw
        .audit_until("the refusals", |events| {
            events
                .iter()
                .filter(|e| e["event"] == "command_refused" && e["code"] == "Unavailable")
                .count()
                == 2
        })
        .await;
    assert!(!events.is_empty());
}

#[tokio::test]
async fn a_follower_ends_when_its_client_goes_away_even_while_the_command_is_silent() {
    let gw = TestGateway::start("", "").await;
    let record = started(&gw, ADMIN, "echo start; exec sleep 240").await;
    let mut client = gw.commands_as(ADMIN).await;
    for _ in 0..20 {
        let mut stream = client
            .stream_command_output(pb::StreamCommandOutputRequest {
                cluster: "local".into(),
                command_id: record.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        // the kept "start" arrives; then the client goes away while the command is silent
        assert!(stream.message().await.unwrap().is_some());
        drop(stream);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let followers = gw.runner().followers(&record.id);
        if followers == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "abandoned followers are still held: {followers:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .cancel_command(cancel_request(&record.id))
        .await
        .unwrap();
}
