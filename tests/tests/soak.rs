//! Soak: the real gateway binary under many principals at once, on loopback, for a
//! bounded number of operations: invocations that wait, ones that are followed to their
//! end, ones that are canceled, callers without rights and invalid requests, all mixed.
//! Afterwards every accepted command has exactly one final record and one accepted and
//! one finished audit event, the counts agree between client, store and audit, the
//! audit chain verifies, and the gateway's open file descriptors and resident memory
//! are back near where they were before.
//!
//! CI runs a short soak (`KINVOKE_SOAK_OPERATIONS`, default 400); HARDENING.md has the
//! command for a long one and its numbers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the counts is the failure report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinvoke_proto::v1 as pb;
use kinvoke_tests::{CLUSTER, ClientCert, Gateway, GatewayOptions, audit_verify};
use pb::command_service_client::CommandServiceClient;
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::Channel;

/// Principals with `Cluster Admin` on every cluster.
const RUNNERS: usize = 6;
/// Principals with no assignment.
const STRANGERS: usize = 2;

fn operations() -> usize {
    std::env::var("KINVOKE_SOAK_OPERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// `(open fds, resident bytes)` of a process.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    (fds, kib * 1024)
}

fn request(command: &str, no_wait: bool) -> pb::InvokeCommandRequest {
    pb::InvokeCommandRequest {
        cluster: CLUSTER.into(),
        command: command.into(),
        no_wait,
        ..Default::default()
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    /// Accepted command ids, by principal.
    accepted: BTreeMap<String, BTreeSet<String>>,
    /// Refusals by code.
    refused: BTreeMap<String, usize>,
}

async fn one_operation(
    n: usize,
    principal: &str,
    client: &mut CommandServiceClient<Channel>,
    tally: &Mutex<Tally>,
) {
    let accept = |id: String| async move {
        tally
            .lock()
            .await
            .accepted
            .entry(principal.to_owned())
            .or_default()
            .insert(id);
    };
    let refuse = |code: Code| async move {
        *tally
            .lock()
            .await
            .refused
            .entry(format!("{code:?}"))
            .or_default() += 1;
    };
    if principal.starts_with("stranger") {
        let status = client
            .invoke_command(request("echo never", false))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        return refuse(status.code()).await;
    }
    match n % 4 {
        // waits for its result
        0 => {
            let result = client
                .invoke_command(request(&format!("echo op {n}"), false))
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            assert_eq!(result.output, format!("op {n}\n").into_bytes());
            accept(result.id).await;
        }
        // followed to its end
        1 => {
            let started = client
                .invoke_command(request(
                    &format!("for i in 1 2 3; do echo {n}.$i; done"),
                    true,
                ))
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            accept(started.id.clone()).await;
            let mut stream = client
                .stream_command_output(pb::StreamCommandOutputRequest {
                    cluster: CLUSTER.into(),
                    command_id: started.id,
                })
                .await
                .unwrap()
                .into_inner();
            let mut finished = false;
            while let Some(event) = stream.message().await.unwrap() {
                finished |= matches!(event.event, Some(pb::output_event::Event::Finished(_)));
            }
            assert!(finished, "a followed stream ended without its result");
        }
        // canceled while it runs
        2 => {
            let started = client
                .invoke_command(request("exec sleep 60", true))
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            accept(started.id.clone()).await;
            let canceled = client
                .cancel_command(pb::CancelCommandRequest {
                    cluster: CLUSTER.into(),
                    command_id: started.id,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(canceled.state(), pb::CommandState::Canceled);
        }
        // invalid
        _ => {
            let mut bad = request("cat x", false);
            bad.files.push(pb::AttachedFile {
                path: "../../x".into(),
                content: b"x".to_vec(),
                mode: 0,
            });
            let status = client.invoke_command(bad).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            refuse(status.code()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_principals_at_once_leave_one_final_record_each_and_a_gateway_as_before() {
    let mut assignments = String::new();
    for i in 0..RUNNERS {
        assignments.push_str(&format!(
            "[[assignment]]\nname = \"soak-{i}\"\nprincipal = \"soak-{i}\"\nrole = \"Cluster Admin\"\nscope = \"clusters/*\"\n\n"
        ));
    }
    let mut gw = Gateway::start_with(
        GatewayOptions::default()
            .limit("max_concurrent_commands", "64")
            .limit("requests_per_second_per_principal", "100000")
            .limit("request_burst_per_principal", "100000")
            .extra_toml(&assignments),
    )
    .unwrap();
    let pid = gw.pid().unwrap();
    let principals: Vec<String> = (0..RUNNERS)
        .map(|i| format!("soak-{i}"))
        .chain((0..STRANGERS).map(|i| format!("stranger-{i}")))
        .collect();
    let certs: Vec<ClientCert> = principals
        .iter()
        .map(|p| gw.pki().client_cert(p).unwrap())
        .collect();

    // a first round, so what the gateway creates once is in the baseline
    {
        let mut warm = gw.grpc_client_as(Some(&certs[0])).await.unwrap();
        let tally = Mutex::new(Tally::default());
        for n in 0..4 {
            one_operation(n, &principals[0], &mut warm, &tally).await;
        }
    }
    let baseline = usage(pid);

    let total = operations();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for (principal, cert) in principals.iter().zip(&certs) {
        // two connections per principal, each running its share of the operations
        for lane in 0..2 {
            let mut client = gw.grpc_client_as(Some(cert)).await.unwrap();
            let principal = principal.clone();
            let tally = tally.clone();
            let share = total / (principals.len() * 2);
            workers.push(tokio::spawn(async move {
                for n in 0..share {
                    one_operation(n * 2 + lane, &principal, &mut client, &tally).await;
                }
            }));
        }
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();

    // every accepted command is final in the store, exactly once
    let tally = Arc::try_unwrap(tally).unwrap().into_inner();
    let accepted: usize = tally.accepted.values().map(BTreeSet::len).sum();
    for (principal, ids) in &tally.accepted {
        let cert = &certs[principals.iter().position(|p| p == principal).unwrap()];
        let mut client = gw.grpc_client_as(Some(cert)).await.unwrap();
        for id in ids {
            let record = client
                .get_command_result(pb::GetCommandResultRequest {
                    cluster: CLUSTER.into(),
                    command_id: id.clone(),
                    wait: true,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                matches!(
                    record.state(),
                    pb::CommandState::Succeeded | pb::CommandState::Canceled
                ),
                "{id}: {:?} ({})",
                record.state(),
                record.reason
            );
        }
        let mut stored = BTreeSet::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_commands(pb::ListCommandsRequest {
                    cluster: CLUSTER.into(),
                    page_size: 1000,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            stored.extend(page.commands.into_iter().map(|c| c.id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let expected: BTreeSet<String> = ids.clone();
        assert!(
            expected.is_subset(&stored),
            "{principal}: {} accepted, {} of them stored",
            expected.len(),
            expected.intersection(&stored).count()
        );
    }

    // connections and commands gone, the gateway is back near its baseline
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = usage(pid);
        if now.0 <= baseline.0 || Instant::now() >= deadline {
            break now;
        }
        tokio::task::yield_now().await;
    };

    let lines = gw.stop_and_read_audit().unwrap();
    let verify = audit_verify(&gw.audit_files().unwrap()).unwrap();
    assert_eq!(verify.code, Some(0), "{verify}");
    let mut per_command: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in &lines {
        let Some(id) = line.str_field("command_id") else {
            continue;
        };
        let entry = per_command.entry(id.to_owned()).or_default();
        match line.event() {
            "command_accepted" => entry.0 += 1,
            "command_finished" => entry.1 += 1,
            _ => {}
        }
    }
    let warm_up = 3; // the first round's accepted commands
    let audited_accepted = per_command.values().filter(|(a, _)| *a > 0).count();
    assert_eq!(
        audited_accepted,
        accepted + warm_up,
        "accepted: client vs audit"
    );
    for ids in tally.accepted.values() {
        for id in ids {
            assert_eq!(
                per_command.get(id),
                Some(&(1, 1)),
                "{id}: (accepted, finished) events"
            );
        }
    }
    let refused_audit = lines
        .iter()
        .filter(|l| {
            l.event() == "command_refused"
                || (l.event() == "authorization" && l.str_field("decision") == Some("deny"))
        })
        .count();
    let refused_client: usize = tally.refused.values().sum();
    // a refused invalid request is audited as command_refused, a denial as a deny
    assert!(
        refused_audit >= refused_client,
        "refusals: client {refused_client}, audit {refused_audit}"
    );

    eprintln!(
        "soak: {total} operations by {} principals in {elapsed:?}: {accepted} commands accepted, refusals {:?}; \
         gateway fds {} -> {}, resident memory {} KiB -> {} KiB",
        principals.len(),
        tally.refused,
        baseline.0,
        after.0,
        baseline.1 / 1024,
        after.1 / 1024,
    );
    assert!(
        after.0 <= baseline.0,
        "open file descriptors {} after the soak, {} before",
        after.0,
        baseline.0
    );
    // the allocator keeps some of what it was given; a leak grows with the operations
    assert!(
        after.1 <= baseline.1 + baseline.1 / 2 + 32 * 1024 * 1024,
        "resident memory {} KiB after the soak, {} KiB before",
        after.1 / 1024,
        baseline.1 / 1024
    );
}
