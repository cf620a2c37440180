//! Resources a gateway gives back: clients that go away mid-stream leave no task and no
//! file descriptor behind. A file of its own: file descriptors are counted for the whole
//! process, so no other test may run beside this one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the counts is the failure report"
)]

mod support;

use std::time::Duration;

use kinvoke_proto::v1 as pb;
use support::{ADMIN, TestGateway, cancel_request, started};

/// Open file descriptors of this process (the gateway runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A client on a connection of its own follows a command's output, reads the first
/// message and goes away, connection and all.
async fn follow_and_vanish(gw: &TestGateway, id: &str) {
    let mut client = gw.commands_as(ADMIN).await;
    let mut stream = client
        .stream_command_output(pb::StreamCommandOutputRequest {
            cluster: "local".into(),
            command_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}

/// (open fds, alive tasks) once the command has no followers and both are at most
/// `bound`, or as they are after 10 s.
async fn settled(gw: &TestGateway, id: &str, bound: (usize, usize)) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = (
            open_fds(),
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        );
        let quiet = gw.runner().followers(id) == Some(0);
        if (quiet && now.0 <= bound.0 && now.1 <= bound.1)
            || tokio::time::Instant::now() >= deadline
        {
            return now;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn clients_that_disconnect_mid_stream_leak_no_tasks_or_file_descriptors() {
    let gw = TestGateway::start("", "").await;
    let record = started(&gw, ADMIN, "echo start; exec sleep 240").await;
    // one round first, so lazily created state (pools, caches) is in the baseline
    follow_and_vanish(&gw, &record.id).await;
    let before = settled(&gw, &record.id, (usize::MAX, usize::MAX)).await;
    for _ in 0..50 {
        follow_and_vanish(&gw, &record.id).await;
    }
    let after = settled(&gw, &record.id, before).await;
    assert_eq!(
        after, before,
        "(open fds, alive tasks) after 50 clients left mid-stream, vs before"
    );
    assert_eq!(gw.runner().followers(&record.id), Some(0));
    gw.commands_as(ADMIN)
        .await
        .cancel_command(cancel_request(&record.id))
        .await
        .unwrap();
}
