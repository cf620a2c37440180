//! The gateway's admission limits in-process: per-principal request rate and running
//! commands, the global in-flight cap and the connection limits. Each refusal is
//! `RESOURCE_EXHAUSTED` naming its limit, with a retry hint where waiting helps; each is
//! audited; other callers are not affected; the gateway stays up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the status is the failure report"
)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use kinvoke_proto::v1 as pb;
use support::{ADMIN, TestGateway, cancel_request, invoke};
use tonic::Code;
use tonic_types::StatusExt;

/// A second principal with the same role as [`ADMIN`].
const BOB: &str = "bob";

const BOB_ADMIN: &str = r#"
[[assignment]]
name = "bob-admin"
principal = "bob"
role = "Cluster Admin"
scope = "clusters/*"
"#;

/// The retry hint a status carries, if any.
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
}

fn assert_exhausted(status: &tonic::Status, limit: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(limit), "{status:?}");
}

#[tokio::test]
async fn a_principal_over_its_request_rate_is_told_when_to_retry_and_others_are_served() {
    let gw = TestGateway::start(
        "requests_per_second_per_principal = 1\nrequest_burst_per_principal = 3",
        BOB_ADMIN,
    )
    .await;
    let mut admin = gw.access_as(ADMIN).await;
    for _ in 0..3 {
        admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
    }
    let refused = admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_exhausted(&refused, "limits.requests_per_second_per_principal = 1");
    let wait = retry_after(&refused).expect("a RetryInfo detail");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // commands count against the same bucket
    let command = gw
        .commands_as(ADMIN)
        .await
        .invoke_command(invoke("local", "true", false))
        .await
        .unwrap_err();
    assert_exhausted(&command, "requests_per_second_per_principal");

    gw.access_as(BOB)
        .await
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    // after the hinted wait the principal is served again
    tokio::time::sleep(wait).await;
    admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap();

    let events = gw
        .audit_until("the refusals", |events| {
            events
                .iter()
                .filter(|e| e["event"] == "request_refused")
                .count()
                >= 2
        })
        .await;
    let refusals: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "request_refused")
        .collect();
    assert_eq!(refusals[0]["principal"], ADMIN, "{}", refusals[0]);
    assert_eq!(
        refusals[0]["method"], "/kinvoke.v1.AccessService/WhoAmI",
        "{}",
        refusals[0]
    );
    assert_eq!(
        refusals[1]["method"], "/kinvoke.v1.CommandService/InvokeCommand",
        "{}",
        refusals[1]
    );
}

#[tokio::test]
async fn a_principal_runs_at_most_its_share_of_commands_at_once() {
    let gw = TestGateway::start("max_commands_per_principal = 1", BOB_ADMIN).await;
    let mut admin = gw.commands_as(ADMIN).await;
    let first = admin
        .invoke_command(invoke("local", "exec sleep 60", true))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let refused = admin
        .invoke_command(invoke("local", "echo second", false))
        .await
        .unwrap_err();
    assert_exhausted(&refused, "limits.max_commands_per_principal = 1");
    assert!(retry_after(&refused).is_some(), "{refused:?}");

    // another principal still runs commands
    let bobs = gw
        .commands_as(BOB)
        .await
        .invoke_command(invoke("local", "echo bob", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(bobs.output, b"bob\n");

    // the place is given back when the command ends (a cancel answers once it has)
    admin
        .cancel_command(cancel_request(&first.id))
        .await
        .unwrap();
    let again = admin
        .invoke_command(invoke("local", "echo again", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(again.output, b"again\n");
    gw.audit_until("the refusal", |events| {
        events.iter().any(|e| {
            e["event"] == "command_refused"
                && e["principal"] == ADMIN
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("max_commands_per_principal"))
        })
    })
    .await;
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_are_refused_at_once_and_health_still_answers() {
    let gw = TestGateway::start("max_in_flight_requests = 1", BOB_ADMIN).await;
    // an invoke that waits holds the one place until its command ends
    let mut waiting = gw.commands_as(ADMIN).await;
    let held = tokio::spawn(async move {
        waiting
            .invoke_command(invoke("local", "exec sleep 60", false))
            .await
    });
    let events = gw
        .audit_until("the waiting command", |events| {
            events.iter().any(|e| e["event"] == "command_started")
        })
        .await;
    let id = events
        .iter()
        .find(|e| e["event"] == "command_started")
        .and_then(|e| e["command_id"].as_str())
        .unwrap()
        .to_owned();

    let refused = gw
        .access_as(BOB)
        .await
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_exhausted(&refused, "limits.max_in_flight_requests = 1");
    assert!(retry_after(&refused).is_some(), "{refused:?}");

    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel_as(BOB).await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // the place is given back when the waiting invoke answers (no request can reach
    // the gateway to cancel it: the runner does)
    gw.runner()
        .cancel("local", &id, "test over".to_owned())
        .await
        .unwrap();
    let answered = held.await.unwrap().unwrap().into_inner().result.unwrap();
    assert_eq!(answered.state(), pb::CommandState::Canceled);
    gw.access_as(BOB)
        .await
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    gw.audit_until("the refusal", |events| {
        events.iter().any(|e| {
            e["event"] == "request_refused"
                && e["method"] == "/kinvoke.v1.AccessService/WhoAmI"
                && e["code"] == "ResourceExhausted"
        })
    })
    .await;
}

#[tokio::test]
async fn connections_over_the_per_source_limit_are_closed_and_other_sources_connect() {
    let gw = TestGateway::start("max_connections_per_source = 2", "").await;
    let first = gw.channel_as(ADMIN).await;
    let second = gw.channel_as(ADMIN).await;
    let third = gw.channel_from(None, ADMIN).await;
    assert!(
        third.is_err(),
        "a third connection from 127.0.0.1 was accepted"
    );
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let elsewhere = gw.channel_from(Some(other), ADMIN).await.unwrap();
    pb::access_service_client::AccessServiceClient::new(elsewhere)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    // the open connections still serve
    pb::access_service_client::AccessServiceClient::new(first.clone())
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    gw.audit_until("the refusal", |events| {
        events.iter().any(|e| {
            e["event"] == "connection_refused"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("limits.max_connections_per_source = 2"))
        })
    })
    .await;

    // a closed connection gives its place back
    drop(first);
    drop(second);
    assert_reconnects(&gw).await;
}

#[tokio::test]
async fn connections_over_the_gateway_wide_limit_are_closed_whatever_their_source() {
    let gw = TestGateway::start("max_connections = 2\nmax_connections_per_source = 64", "").await;
    let first = gw.channel_as(ADMIN).await;
    let from_elsewhere: IpAddr = "127.0.0.2".parse().unwrap();
    let second = gw.channel_from(Some(from_elsewhere), ADMIN).await.unwrap();
    // a third, from yet another address, finds every place taken
    let third = gw
        .channel_from(Some("127.0.0.3".parse().unwrap()), ADMIN)
        .await;
    assert!(
        third.is_err(),
        "a third connection was accepted over max_connections = 2"
    );
    gw.audit_until("the refusal", |events| {
        events.iter().any(|e| {
            e["event"] == "connection_refused"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("limits.max_connections = 2"))
        })
    })
    .await;
    // the open ones still serve
    for channel in [first.clone(), second.clone()] {
        pb::access_service_client::AccessServiceClient::new(channel)
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap();
    }
    drop(first);
    drop(second);
    assert_reconnects(&gw).await;
}

/// A connection succeeds again once closed ones have given their places back (the
/// gateway notices a close on its own time, so this tries a few hundred times).
async fn assert_reconnects(gw: &TestGateway) {
    for _ in 0..500 {
        if gw.channel_from(None, ADMIN).await.is_ok() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("no place given back after the connections closed");
}
