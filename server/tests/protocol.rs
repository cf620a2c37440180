//! Protocol-level abuse in-process: a TLS handshake that stalls, PROXY header garbage
//! from a trusted proxy, malformed HTTP/2 frames, and 10,000 streams at once on one
//! connection. Each ends the offending connection or request (refusals audited where a
//! refusal is the gateway's), and the gateway keeps serving.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the status is the failure report"
)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use kinvoke_proto::v1 as pb;
use rustls_pki_types::pem::PemObject;
use support::{ADMIN, RawCodec, TestGateway, invoke, still_serves};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes the connection (or it fails), within `limit`.
async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_the_handshake_timeout_and_audited() {
    let gw = TestGateway::start("handshake_timeout = \"200ms\"", "").await;
    // nothing at all, then half a ClientHello
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    let mut partial = TcpStream::connect(gw.addr()).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
    assert!(closed_within(&mut partial, Duration::from_secs(10)).await);
    gw.audit_until("two timed-out handshakes", |events| {
        events
            .iter()
            .filter(|e| {
                e["event"] == "connection_refused"
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("within 200ms (limits.handshake_timeout)"))
            })
            .count()
            == 2
    })
    .await;
    still_serves(&gw).await;
}

#[tokio::test]
async fn proxy_header_garbage_from_a_trusted_proxy_is_refused_and_audited() {
    let gw = TestGateway::start_with_listener("trusted_proxies = [\"127.0.0.1/32\"]", "", "").await;
    let garbage: [&[u8]; 3] = [
        b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n",
        b"PROXY \xff\xfe\r\n",
        // a v2 signature with a length running past what follows
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
    ];
    for bytes in garbage {
        let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        assert!(
            closed_within(&mut tcp, Duration::from_secs(15)).await,
            "{bytes:?} left the connection open"
        );
    }
    gw.audit_until("a refusal per header", |events| {
        events
            .iter()
            .filter(|e| e["event"] == "connection_refused")
            .count()
            >= 3
    })
    .await;
    still_serves(&gw).await;
}

/// A TLS connection that speaks h2 (ALPN) with a client certificate of [`ADMIN`].
async fn h2_connection(gw: &TestGateway) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(gw.ca().cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = gw.ca().client_cert(ADMIN, None).unwrap();
    let chain =
        vec![rustls_pki_types::CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_http2_frames_end_their_connection_only() {
    let gw = TestGateway::start("", "").await;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let frames: [(&str, Vec<u8>); 4] = [
        ("no preface", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            // a frame whose length runs past any allowed size
            "oversized frame header",
            [
                PREFACE,
                &[0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
            ]
            .concat(),
        ),
        (
            // HEADERS on stream 0
            "headers on stream 0",
            [
                PREFACE,
                &[0, 0, 0, 4, 0, 0, 0, 0, 0],
                &[0, 0, 1, 1, 4, 0, 0, 0, 0, 0x82],
            ]
            .concat(),
        ),
        (
            // a SETTINGS frame of a length that is not a multiple of 6
            "bad settings",
            [PREFACE, &[0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]].concat(),
        ),
    ];
    for (name, bytes) in frames {
        let mut tls = h2_connection(&gw).await;
        tls.write_all(&bytes).await.unwrap();
        tls.flush().await.unwrap();
        assert!(
            closed_within(&mut tls, Duration::from_secs(15)).await,
            "{name}: the connection stayed open"
        );
    }
    still_serves(&gw).await;
}

#[tokio::test]
async fn ten_thousand_streams_at_once_on_one_connection_are_all_answered() {
    // a rate that does not refuse them: the point is the transport's own bounds
    // (concurrent streams per connection, requests in flight)
    let gw = TestGateway::start(
        "requests_per_second_per_principal = 100000\nrequest_burst_per_principal = 100000",
        "",
    )
    .await;
    let record = gw
        .commands_as(ADMIN)
        .await
        .invoke_command(invoke("local", "echo done", false))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let client = gw.commands_as(ADMIN).await;
    let streams: Vec<_> = (0..10_000)
        .map(|_| {
            let mut client = client.clone();
            let id = record.id.clone();
            tokio::spawn(async move {
                let response = client
                    .stream_command_output(pb::StreamCommandOutputRequest {
                        cluster: "local".into(),
                        command_id: id,
                    })
                    .await;
                match response {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while stream.message().await.unwrap().is_some() {}
                        Ok(())
                    }
                    Err(status) => Err(status.code()),
                }
            })
        })
        .collect();
    let (mut served, mut limited) = (0, 0);
    for stream in streams {
        match stream.await.unwrap() {
            Ok(()) => served += 1,
            // over the in-flight cap: refused at once, never queued without bound
            Err(tonic::Code::ResourceExhausted) => limited += 1,
            Err(other) => panic!("a stream ended with {other:?}"),
        }
    }
    assert_eq!(served + limited, 10_000);
    assert!(served >= 1024, "{served} served");
    still_serves(&gw).await;
}

#[tokio::test]
async fn a_client_that_finishes_tls_and_never_speaks_http2_is_closed() {
    let gw = TestGateway::start("handshake_timeout = \"200ms\"", "").await;
    let mut silent = h2_connection(&gw).await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "a connection with no HTTP/2 preface stayed open"
    );
    still_serves(&gw).await;
}

#[tokio::test]
async fn a_request_that_never_finishes_gives_its_place_back_after_the_read_timeout() {
    let gw = TestGateway::start(
        "max_in_flight_requests = 1\nrequest_read_timeout = \"300ms\"",
        "",
    )
    .await;
    // headers sent, the message never: a stream of requests that never yields
    let mut grpc = tonic::client::Grpc::new(gw.channel_as(ADMIN).await);
    grpc.ready().await.unwrap();
    let status = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::pending::<Vec<u8>>()),
            http::uri::PathAndQuery::from_static("/kinvoke.v1.CommandService/InvokeCommand"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("limits.request_read_timeout"),
        "{status:?}"
    );
    // audited, though the caller was never identified
    let refusal = gw.audit_event("request_refused").await;
    assert_eq!(refusal["code"], "DeadlineExceeded", "{refusal}");
    // its place is free again
    still_serves(&gw).await;
}

#[tokio::test]
async fn the_small_services_refuse_large_messages() {
    let gw = TestGateway::start("", "").await;
    let mut grpc = tonic::client::Grpc::new(gw.channel_as(ADMIN).await);
    grpc.ready().await.unwrap();
    // a health check request of 1 MiB (a real one is a few bytes)
    let mut message = vec![0x0a, 0x80, 0x80, 0x40];
    message.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    let status = grpc
        .unary(
            tonic::Request::new(message),
            http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("reads small messages only"),
        "{status:?}"
    );
    still_serves(&gw).await;
}

#[tokio::test]
async fn refusals_before_authentication_cannot_flood_the_audit_log() {
    let gw = TestGateway::start("", "").await;
    let mut grpc = tonic::client::Grpc::new(gw.channel_as(ADMIN).await);
    // a message that does not parse (a string field holding invalid UTF-8), 200 times
    let undecodable = vec![0x0a, 0x02, 0xff, 0xfe];
    for _ in 0..200 {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(undecodable.clone()),
                http::uri::PathAndQuery::from_static("/kinvoke.v1.CommandService/InvokeCommand"),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
    still_serves(&gw).await;
    let events = gw
        .audit_until("the capped refusals", |events| {
            events
                .iter()
                .filter(|e| e["event"] == "request_refused")
                .count()
                >= 50
        })
        .await;
    let lines = events
        .iter()
        .filter(|e| e["event"] == "request_refused")
        .count();
    assert!((50..100).contains(&lines), "{lines} lines for 200 refusals");
}
