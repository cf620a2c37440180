//! A client that follows a command's output and never reads costs the gateway bounded
//! memory: the command's 256 MiB of output pass through while the stream is stuck, and
//! the gateway's resident memory grows by a small fraction of it. A file of its own:
//! memory is measured for the whole process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the sizes is the failure report"
)]

mod support;

use kinvoke_proto::v1 as pb;
use support::{ADMIN, TestGateway, invoke, result_request};

/// This process's resident set, in bytes (`VmRSS` of /proc/self/status).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kib * 1024
}

const OUTPUT: u64 = 256 * 1024 * 1024;

#[tokio::test]
async fn a_follower_that_never_reads_holds_bounded_memory() {
    let gw = TestGateway::start("", "").await;
    let mut client = gw.commands_as(ADMIN).await;
    // prints its directory, then waits on a FIFO there for its go, so the stuck
    // follower is in place before the output flows
    let record = client
        .invoke_command(invoke(
            "local",
            &format!("mkfifo go && pwd && read x < go && head -c {OUTPUT} /dev/zero"),
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let mut stuck = client
        .stream_command_output(pb::StreamCommandOutputRequest {
            cluster: "local".into(),
            command_id: record.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stuck.message().await.unwrap().unwrap();
    let Some(pb::output_event::Event::Chunk(chunk)) = first.event else {
        panic!("not a chunk: {first:?}");
    };
    let work = String::from_utf8(chunk.data).unwrap();
    let before = resident_bytes();
    // the go, written by this (root) process straight into the command's FIFO; from
    // here the follower is never read again
    let fifo = std::path::Path::new(work.trim_end()).join("go");
    tokio::task::spawn_blocking(move || std::fs::write(fifo, b"go\n"))
        .await
        .unwrap()
        .unwrap();
    let result = gw
        .commands_as(ADMIN)
        .await
        .get_command_result(result_request(&record.id, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        result.output_size,
        OUTPUT + work.len() as u64,
        "{:?}",
        result.reason
    );
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < OUTPUT / 4,
        "resident memory grew by {grown} bytes while {OUTPUT} bytes passed a stuck follower"
    );
    drop(stuck);
}
