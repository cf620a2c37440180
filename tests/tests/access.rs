//! End-to-end tests of access control: the real `kinvoke` CLI against the real
//! `kinvoke-gateway` binary, one gateway per test. They follow a call's path: the
//! listener's address gate (with PROXY protocol from a relay standing in for a load
//! balancer), authentication (client certificates, OIDC tokens, static tokens),
//! authorization (roles, assignments, cluster gates) and command ownership.
//!
//! Clients pick their source address among the loopback addresses with
//! `--source-address 127.0.0.N`, so one host plays callers from several addresses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report, helpers included"
)]

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey};
use kinvoke_tests::{
    AuditRecord, CLUSTER, Client, ClientCert, Gateway, GatewayOptions, Output, Pki, TcpRelay,
    TestIssuer, USER, WebhookReceiver, check_config, gateway_cli_with_input, proxy_v1_header,
    unix_now, unsigned_token,
};
use serde_json::{Value, json};

/// Exit status of `kinvoke` when the gateway cannot be reached (refused connections and
/// TLS failures included).
const EXIT_UNAVAILABLE: i32 = 69;
/// Exit status of `kinvoke` when the gateway rejected the request (not found, invalid,
/// failed precondition).
const EXIT_REJECTED: i32 = 65;
/// Exit status of `kinvoke` when the caller is not authenticated or not allowed.
const EXIT_DENIED: i32 = 77;

/// Issuer URL of the test OIDC issuer (a CI system, say).
const OIDC_ISSUER: &str = "https://token.ci.example";
/// Audience the gateway accepts in OIDC tokens.
const OIDC_AUDIENCE: &str = "kinvoke";
/// Subject of the CI job's tokens on the main branch.
const CI_SUBJECT: &str = "repo:org/app:ref:refs/heads/main";

fn gateway_with(options: GatewayOptions) -> Gateway {
    Gateway::start_with(options).expect("the gateway starts")
}

/// `client` runs `invoke --cluster CLUSTER --command COMMAND`.
fn invoke_with(client: Client, cluster: &str, command: &str) -> Output {
    client
        .args(["invoke", "--cluster", cluster, "--command", command])
        .run()
        .unwrap()
}

/// `client` runs `-o json whoami`; the output must be a success.
fn whoami(client: Client) -> Value {
    let out = client.args(["-o", "json", "whoami"]).run().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    out.json().unwrap()
}

/// `client` runs `-o json list`; the output must be a success.
fn listed(client: Client) -> Vec<Value> {
    let out = client.args(["-o", "json", "list"]).run().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    out.json()
        .unwrap()
        .as_array()
        .unwrap_or_else(|| panic!("list -o json prints an array:\n{out}"))
        .clone()
}

/// The ids of listed commands.
fn ids(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["id"].as_str().expect("every record has an id"))
        .collect()
}

/// A shell command that creates `marker`: proof that a command ran.
fn touch(marker: &Path) -> String {
    format!("touch '{}'", marker.display())
}

/// Asserts a refusal: exit `code`, and one stderr line `kinvoke: ...` containing every
/// one of `needles`.
fn assert_refused(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "{out}");
    assert!(out.stderr.starts_with("kinvoke: "), "{out}");
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out}");
    for needle in needles {
        assert!(out.stderr.contains(needle), "expected {needle:?}:\n{out}");
    }
}

/// The IP of an audit event's `peer` field (`IP:PORT`), IPv4-mapped addresses shown as
/// IPv4.
fn peer_ip(event: &AuditRecord) -> IpAddr {
    let peer: SocketAddr = event
        .get("peer")
        .unwrap_or_else(|| panic!("no peer field: {event}"))
        .parse()
        .unwrap_or_else(|_| panic!("the peer field is not IP:PORT: {event}"));
    peer.ip().to_canonical()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// the listener's address gate

#[test]
fn the_same_client_is_served_from_an_authorized_address_and_refused_from_another() {
    let gw = gateway_with(
        GatewayOptions::default().listener_toml(r#"authorized_ip_ranges = ["127.0.0.2/32"]"#),
    );
    let from = |source: &str| gw.client().unwrap().args(["--source-address", source]);

    let out = invoke_with(from("127.0.0.2"), CLUSTER, "echo ok");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["ok"], "{out}");

    let marker = gw.scratch("ran");
    let refused = invoke_with(from("127.0.0.3"), CLUSTER, &touch(&marker));
    assert_refused(&refused, EXIT_UNAVAILABLE, &[]);
    assert!(!marker.exists(), "the command ran:\n{refused}");

    let records = listed(from("127.0.0.2"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["command"], "echo ok", "{records:?}");

    let refusals = gw.audit_events_named("connection_refused");
    assert!(
        refusals.iter().any(|e| peer_ip(e) == ip("127.0.0.3")
            && e.get("listener") == Some("main")
            && e.get("reason")
                .is_some_and(|r| r.contains("127.0.0.3") && r.contains("authorized_ip_ranges"))),
        "no refusal of 127.0.0.3 in the audit log:\n{}",
        gw.stderr_log()
    );
    assert!(
        refusals.iter().all(|e| peer_ip(e) != ip("127.0.0.2")),
        "127.0.0.2 was refused:\n{}",
        gw.stderr_log()
    );

    let me = whoami(from("127.0.0.2"));
    assert_eq!(me["sourceAddress"], "127.0.0.2", "{me}");
    assert_eq!(me["listener"], "main", "{me}");
}

/// Whether this host has a dual-stack IPv6 socket that accepts IPv4 peers, as a
/// `[::]:0` gateway listener would.
fn dual_stack_available() -> Result<(), String> {
    let listener = TcpListener::bind("[::]:0").map_err(|e| format!("cannot bind [::]:0: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let _client = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("[::]:{port} does not accept IPv4 connections: {e}"))?;
    let (_, peer) = listener.accept().map_err(|e| e.to_string())?;
    match peer.ip() {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Ok(()),
        other => Err(format!("an IPv4 peer showed up as {other}")),
    }
}

/// A gateway on a dual-stack `[::]:0` listener that admits only 127.0.0.2, or `None`
/// (with a note on stderr) when the host has no dual-stack IPv6.
fn dual_stack_gateway() -> Option<Gateway> {
    if let Err(why) = dual_stack_available() {
        eprintln!("SKIPPED: this host has no dual-stack IPv6 ({why}); the test needs one");
        return None;
    }
    Some(gateway_with(
        GatewayOptions::default()
            .listener_address("[::]:0")
            .listener_toml(r#"authorized_ip_ranges = ["127.0.0.2/32"]"#),
    ))
}

#[test]
fn ipv4_mapped_peers_of_a_dual_stack_listener_are_matched_against_ipv4_ranges() {
    let Some(gw) = dual_stack_gateway() else {
        return;
    };
    assert!(gw.addr().is_ipv6(), "listening on {}", gw.addr());
    let from = |source: &str| gw.client().unwrap().args(["--source-address", source]);

    let marker = gw.scratch("ran");
    let refused = invoke_with(from("127.0.0.3"), CLUSTER, &touch(&marker));
    assert_refused(&refused, EXIT_UNAVAILABLE, &[]);
    assert!(!marker.exists(), "the command ran:\n{refused}");
    assert!(
        gw.audit_events_named("connection_refused")
            .iter()
            .any(|e| peer_ip(e) == ip("127.0.0.3")),
        "no refusal of 127.0.0.3 in the audit log:\n{}",
        gw.stderr_log()
    );

    let out = invoke_with(from("127.0.0.2"), CLUSTER, "echo ok");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["ok"], "{out}");
    assert_eq!(listed(from("127.0.0.2")).len(), 1);
}

#[test]
fn a_dual_stack_listener_shows_ipv4_callers_by_their_ipv4_address() {
    let Some(gw) = dual_stack_gateway() else {
        return;
    };
    let from = |source: &str| gw.client().unwrap().args(["--source-address", source]);

    let me = whoami(from("127.0.0.2"));
    assert_eq!(me["sourceAddress"], "127.0.0.2", "{me}");

    let out = invoke_with(from("127.0.0.2"), CLUSTER, "true");
    assert_eq!(out.code, Some(0), "{out}");
    let decisions = gw.audit_events_named("authorization");
    assert!(!decisions.is_empty(), "{}", gw.stderr_log());
    for decision in decisions {
        assert_eq!(decision.get("source"), Some("127.0.0.2"), "{decision}");
    }
}

// ---------------------------------------------------------------------------------------
// PROXY protocol

/// A public listener behind a load balancer on 127.0.0.1 that admits callers from
/// 203.0.113.0/24, plus a cluster `branch` reserved for 198.51.100.0/24.
fn gateway_behind_a_proxy(trusted_proxies: &str, ranges: &str) -> Gateway {
    gateway_with(
        GatewayOptions::default()
            .listener_toml("exposure = \"public\"")
            .listener_toml(&format!("trusted_proxies = {trusted_proxies}"))
            .listener_toml(&format!("authorized_ip_ranges = {ranges}"))
            .extra_toml(
                "[[cluster]]\nname = \"branch\"\nauthorized_ip_ranges = [\"198.51.100.0/24\"]\n",
            ),
    )
}

/// A relay to `gw` that announces `caller` in a PROXY v1 header.
fn v1_relay(gw: &Gateway, caller: &str) -> TcpRelay {
    let header = proxy_v1_header(caller.parse().unwrap(), gw.addr());
    TcpRelay::start(gw.addr(), header).unwrap()
}

/// Checks a gateway behind `relay` sees the caller as `caller_ip`: in whoami, in the
/// audit log, and in the cluster ranges it applies.
fn assert_caller_seen_through(gw: &Gateway, relay: &TcpRelay, caller_ip: &str) {
    let via = || {
        gw.client_at(&relay.endpoint(), Some(gw.user_cert()))
            .unwrap()
    };

    let me = whoami(via());
    assert_eq!(me["sourceAddress"], caller_ip, "{me}");
    let branch = me["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "branch")
        .unwrap_or_else(|| panic!("no branch cluster in {me}"));
    assert_eq!(branch["actions"], json!([]), "{me}");
    assert!(
        branch["restriction"]
            .as_str()
            .is_some_and(|r| r.contains(caller_ip)),
        "{me}"
    );

    let out = invoke_with(via(), CLUSTER, "echo through the proxy");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["through the proxy"], "{out}");
    assert!(
        gw.audit_events_named("authorization")
            .iter()
            .any(|e| e.get("source") == Some(caller_ip)
                && e.get("action") == Some("runcommand/action")
                && e.get("decision") == Some("allow")),
        "no allowed command from {caller_ip} in the audit log:\n{}",
        gw.stderr_log()
    );

    // the cluster's own ranges are checked against the same address
    let marker = gw.scratch("ran-on-branch");
    let refused = invoke_with(via(), "branch", &touch(&marker));
    assert_refused(
        &refused,
        EXIT_DENIED,
        &["PERMISSION_DENIED", "authorized IP ranges", caller_ip],
    );
    assert!(!marker.exists(), "the command ran:\n{refused}");
}

#[test]
fn a_proxy_v1_header_from_a_trusted_proxy_gives_the_callers_address() {
    let gw = gateway_behind_a_proxy(r#"["127.0.0.1"]"#, r#"["203.0.113.0/24"]"#);
    let relay = v1_relay(&gw, "203.0.113.7:40000");
    assert_caller_seen_through(&gw, &relay, "203.0.113.7");

    // straight from the proxy's address, without a header, the caller is the proxy
    // itself, which the listener's ranges do not admit
    let direct = invoke_with(gw.client().unwrap(), CLUSTER, "true");
    assert_refused(&direct, EXIT_UNAVAILABLE, &[]);
    assert!(
        gw.audit_events_named("connection_refused").iter().any(|e| e
            .get("reason")
            .is_some_and(|r| r.contains("127.0.0.1") && r.contains("authorized_ip_ranges"))),
        "{}",
        gw.stderr_log()
    );
}

#[test]
fn a_proxy_v2_header_from_a_trusted_proxy_gives_the_callers_address() {
    let gw = gateway_behind_a_proxy(r#"["127.0.0.1"]"#, r#"["203.0.113.0/24"]"#);
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "203.0.113.8:40001".parse::<SocketAddr>().unwrap(),
            gw.addr(),
        ),
    )
    .build()
    .unwrap();
    let relay = TcpRelay::start(gw.addr(), header).unwrap();
    assert_caller_seen_through(&gw, &relay, "203.0.113.8");
}

#[test]
fn a_proxy_header_from_an_untrusted_peer_is_refused() {
    // the relay's address is neither a trusted proxy nor an authorized caller
    let gw = gateway_behind_a_proxy(r#"["127.0.0.9"]"#, r#"["203.0.113.0/24"]"#);
    let relay = v1_relay(&gw, "203.0.113.7:40000");
    let marker = gw.scratch("ran");
    let out = invoke_with(
        gw.client_at(&relay.endpoint(), Some(gw.user_cert()))
            .unwrap(),
        CLUSTER,
        &touch(&marker),
    );
    assert_refused(&out, EXIT_UNAVAILABLE, &[]);
    assert!(!marker.exists(), "the command ran:\n{out}");
    let refusals = gw.audit_events_named("connection_refused");
    assert!(
        refusals.iter().any(|e| peer_ip(e) == ip("127.0.0.1")),
        "no refusal of the relay in the audit log:\n{}",
        gw.stderr_log()
    );
    drop(relay);

    // the relay's address is an authorized caller, but not a trusted proxy: its header
    // is a spoofing attempt
    let gw = gateway_behind_a_proxy(r#"["127.0.0.9"]"#, r#"["203.0.113.0/24", "127.0.0.1/32"]"#);
    let relay = v1_relay(&gw, "203.0.113.7:40000");
    let marker = gw.scratch("ran");
    let out = invoke_with(
        gw.client_at(&relay.endpoint(), Some(gw.user_cert()))
            .unwrap(),
        CLUSTER,
        &touch(&marker),
    );
    assert_refused(&out, EXIT_UNAVAILABLE, &[]);
    assert!(!marker.exists(), "the command ran:\n{out}");
    assert!(
        gw.audit_events_named("connection_refused")
            .iter()
            .any(|e| peer_ip(e) == ip("127.0.0.1")
                && e.get("reason")
                    .is_some_and(|r| r.contains("not in trusted_proxies"))),
        "no refused PROXY header in the audit log:\n{}",
        gw.stderr_log()
    );
    // the same peer without a header is served as itself
    let me = whoami(gw.client().unwrap());
    assert_eq!(me["sourceAddress"], "127.0.0.1", "{me}");
}

// ---------------------------------------------------------------------------------------
// OIDC tokens

/// A gateway whose listener takes certificates or tokens, trusting [`OIDC_ISSUER`]'s
/// keys, where CI jobs of `org/app` on `main` may run commands on `local`. The test user
/// stays `Cluster Admin`, to look at everything afterwards.
fn oidc_gateway(issuer: &TestIssuer) -> Gateway {
    gateway_with(
        GatewayOptions::default()
            .file("oidc/jwks.json", issuer.jwks())
            .listener_toml(r#"authentication = ["mtls", "token"]"#)
            .extra_toml(&format!(
                r#"
[[authn.oidc]]
name = "ci"
issuer = "{OIDC_ISSUER}"
audiences = ["{OIDC_AUDIENCE}"]
jwks_file = "oidc/jwks.json"
principal_prefix = "ci:"

[[assignment]]
name = "ci-main"
role = "Command Invoker"
scope = "clusters/local"
claims = {{ repository = "org/app", ref = "refs/heads/main" }}
"#
            )),
    )
}

/// Claims of a CI job of `org/app` on `git_ref`, valid for ten minutes.
fn ci_claims(git_ref: &str) -> Value {
    let now = unix_now().unwrap();
    json!({
        "iss": OIDC_ISSUER,
        "aud": OIDC_AUDIENCE,
        "sub": format!("repo:org/app:ref:{git_ref}"),
        "repository": "org/app",
        "ref": git_ref,
        "iat": now,
        "exp": now + 600,
    })
}

#[test]
fn an_oidc_token_identifies_a_ci_job_without_a_client_certificate() {
    let issuer = TestIssuer::new().unwrap();
    let gw = oidc_gateway(&issuer);
    let rs256 = issuer
        .sign(
            Algorithm::RS256,
            TestIssuer::RSA_KID,
            &ci_claims("refs/heads/main"),
        )
        .unwrap();

    let out = gw
        .token_client(&rs256)
        .unwrap()
        .args(["-o", "json", "invoke", "--cluster", CLUSTER])
        .args(["--command", "echo from ci"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let result = out.json().unwrap();
    assert_eq!(result["logs"], "from ci\n", "{out}");
    assert_eq!(result["principal"], format!("ci:{CI_SUBJECT}"), "{out}");

    let me = whoami(gw.token_client(&rs256).unwrap());
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");
    assert_eq!(me["authMethod"], "oidc", "{me}");
    assert_eq!(me["issuer"], "ci", "{me}");
    assert_eq!(me["groups"], json!([]), "{me}");
    assert_eq!(
        me["clusters"],
        json!([{
            "cluster": CLUSTER,
            "actions": ["runcommand/action", "commandResults/read"],
            "runCommandEnabled": true,
        }]),
        "{me}"
    );

    // an ES256 token from a file works the same
    let es256 = issuer
        .sign(
            Algorithm::ES256,
            TestIssuer::EC_KID,
            &ci_claims("refs/heads/main"),
        )
        .unwrap();
    let token_file = gw.scratch("token");
    fs::write(&token_file, format!("{es256}\n")).unwrap();
    let out = invoke_with(
        gw.anonymous_client()
            .unwrap()
            .arg("--token-file")
            .arg(&token_file),
        CLUSTER,
        "echo from a token file",
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["from a token file"], "{out}");

    let granted = gw.audit_events_named("authorization");
    assert!(
        granted
            .iter()
            .any(|e| e.get("principal") == Some(&format!("ci:{CI_SUBJECT}"))
                && e.get("auth_method") == Some("oidc")
                && e.get("decision") == Some("allow")
                && e.get("detail").is_some_and(|d| d.contains("ci-main"))),
        "no allowed CI command in the audit log:\n{}",
        gw.stderr_log()
    );
    let log = gw.stderr_log();
    for token in [&rs256, &es256] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token leaked into the log");
    }
}

#[test]
fn bad_oidc_tokens_are_refused_with_the_reason() {
    let issuer = TestIssuer::new().unwrap();
    let gw = oidc_gateway(&issuer);
    let now = unix_now().unwrap();
    let main = ci_claims("refs/heads/main");
    let rs256 = |claims: &Value| {
        issuer
            .sign(Algorithm::RS256, TestIssuer::RSA_KID, claims)
            .unwrap()
    };
    let with = |key: &str, value: Value| {
        let mut claims = main.clone();
        claims[key] = value;
        claims
    };

    let mut expired = with("exp", json!(now - 3600));
    expired["iat"] = json!(now - 7200);
    // a token for another branch with the payload of one for main: the signature
    // covers the claims, so this must not verify
    let forged = {
        let dev = rs256(&ci_claims("refs/heads/dev"));
        let good = rs256(&main);
        let parts: Vec<&str> = dev.split('.').collect();
        let good_payload = good.split('.').nth(1).unwrap();
        format!("{}.{good_payload}.{}", parts[0], parts[2])
    };
    // HS256 signed with the issuer's published public key as the HMAC secret
    let confused = {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(TestIssuer::RSA_KID.to_owned());
        let secret = EncodingKey::from_secret(issuer.rsa_public_jwk().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &main, &secret).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", rs256(&expired), "token expired at "),
        (
            "wrong audience",
            rs256(&with("aud", json!("someone-else"))),
            "token audience \"someone-else\" is not accepted",
        ),
        (
            "wrong issuer",
            rs256(&with("iss", json!("https://evil.example"))),
            "token issuer \"https://evil.example\" is not accepted by this gateway",
        ),
        (
            "unknown key id",
            issuer.sign(Algorithm::RS256, "rsa-9", &main).unwrap(),
            "no key with id \"rsa-9\" in the keys of issuer \"ci\"",
        ),
        (
            "alg none",
            unsigned_token(&json!({"alg": "none", "typ": "JWT"}), &main).unwrap(),
            "token algorithm none is not accepted (accepted: RS256, ES256)",
        ),
        (
            "HS256 key confusion",
            confused,
            "token algorithm HS256 is not accepted",
        ),
        ("forged claims", forged, "token signature does not verify"),
        (
            "nbf in the future",
            rs256(&with("nbf", json!(now + 3600))),
            "token is not valid before ",
        ),
        (
            "no kid",
            issuer.sign(Algorithm::RS256, "", &main).unwrap(),
            "no key with id \"(none)\" in the keys of issuer \"ci\"",
        ),
    ];

    let marker = gw.scratch("ran");
    for (name, token, message) in &cases {
        let out = invoke_with(gw.token_client(token).unwrap(), CLUSTER, &touch(&marker));
        assert_refused(&out, EXIT_DENIED, &["UNAUTHENTICATED: ", message]);
        let signature = token.rsplit('.').next().unwrap();
        if !signature.is_empty() {
            assert!(
                !out.stderr.contains(signature),
                "{name}: token echoed:\n{out}"
            );
        }
        assert!(
            gw.audit_events_named("authentication_failed")
                .iter()
                .any(|e| e.get("reason").is_some_and(|r| r.contains(message))),
            "{name}: no failed authentication in the audit log:\n{}",
            gw.stderr_log()
        );
    }
    assert!(!marker.exists(), "a command ran");
    assert_eq!(listed(gw.client().unwrap()), Vec::<Value>::new());
    let log = gw.stderr_log();
    for (name, token, _) in &cases {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            signature.is_empty() || !log.contains(signature),
            "{name}: the token leaked into the log"
        );
    }
}

#[test]
fn a_one_megabyte_token_is_refused_by_its_size_audited_and_the_gateway_stays_up() {
    let issuer = TestIssuer::new().unwrap();
    let gw = oidc_gateway(&issuer);
    let marker = gw.scratch("ran");
    // a file: an environment variable cannot hold 1 MB (Linux's MAX_ARG_STRLEN)
    let file = gw.scratch("big-token");
    std::fs::write(&file, "a".repeat(1_000_000)).unwrap();
    let big = gw
        .anonymous_client()
        .unwrap()
        .arg("--token-file")
        .arg(&file);
    let out = invoke_with(big, CLUSTER, &touch(&marker));
    let reason = "bearer token is 1000000 bytes, over the 16384 bytes this gateway reads";
    assert_refused(&out, EXIT_DENIED, &["UNAUTHENTICATED: ", reason]);
    assert!(!marker.exists(), "a command ran");
    assert!(
        gw.audit_events_named("authentication_failed")
            .iter()
            .any(|e| e.get("reason") == Some(reason)),
        "no failed authentication in the audit log:\n{}",
        gw.stderr_log()
    );
    // the gateway still serves a caller with a good token
    let good = issuer
        .sign(
            Algorithm::RS256,
            TestIssuer::RSA_KID,
            &ci_claims("refs/heads/main"),
        )
        .unwrap();
    whoami(gw.token_client(&good).unwrap());
}

/// A token issuer and a gateway that trusts it.
fn oidc_setup() -> (TestIssuer, Gateway) {
    let issuer = TestIssuer::new().unwrap();
    let gw = oidc_gateway(&issuer);
    (issuer, gw)
}

/// An RS256 token of a CI job on `refs/heads/main`.
fn main_branch_token(issuer: &TestIssuer) -> String {
    issuer
        .sign(
            Algorithm::RS256,
            TestIssuer::RSA_KID,
            &ci_claims("refs/heads/main"),
        )
        .unwrap()
}

#[test]
fn a_github_actions_job_fetches_its_own_token_with_no_glue() {
    let (issuer, gw) = oidc_setup();
    let token = main_branch_token(&issuer);
    // GitHub's token endpoint as documented: GET the request URL with `&audience=`,
    // the request token as a bearer, answer {"value": "<JWT>"}
    let endpoint = WebhookReceiver::answering(json!({ "value": token }).to_string()).unwrap();
    let in_job = |client: Client| {
        client
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("http://{}/_apis/token?api-version=2.0", endpoint.addr()),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "job-request-token")
            .args(["--token-source", "github-actions"])
    };
    let me = whoami(in_job(gw.anonymous_client().unwrap()));
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");
    assert_eq!(me["authMethod"], "oidc", "{me}");
    let request = endpoint
        .next_request(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(
        request.path, "/_apis/token?api-version=2.0&audience=kinvoke",
        "{request:?}"
    );
    assert_eq!(
        request.header("authorization"),
        Some("Bearer job-request-token")
    );

    // a command runs with it too
    let out = in_job(gw.anonymous_client().unwrap())
        .args([
            "invoke",
            "--cluster",
            CLUSTER,
            "--command",
            "echo from actions",
        ])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");

    // a job without `permissions: id-token: write` has no request URL
    let out = gw
        .anonymous_client()
        .unwrap()
        .args(["--token-source", "github-actions", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains(
            "this job has no `id-token: write` permission: ACTIONS_ID_TOKEN_REQUEST_URL is not set"
        ),
        "{out}"
    );
}

#[test]
fn an_azure_pipelines_job_fetches_its_token_for_its_service_connection() {
    let (issuer, gw) = oidc_setup();
    let token = main_branch_token(&issuer);
    // the pipeline's OIDC endpoint: POST ?api-version=7.1&serviceConnectionId=ID with
    // the job's access token, answer {"oidcToken": "<JWT>"}
    let endpoint = WebhookReceiver::answering(json!({ "oidcToken": token }).to_string()).unwrap();
    let me = whoami(
        gw.anonymous_client()
            .unwrap()
            .env(
                "SYSTEM_OIDCREQUESTURI",
                format!(
                    "http://{}/project/_apis/distributedtask/hubs/build/plans/p/jobs/j/oidctoken",
                    endpoint.addr()
                ),
            )
            .env("SYSTEM_ACCESSTOKEN", "job-access-token")
            .args(["--token-source", "azure-pipelines:3f0e-service-connection"]),
    );
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");
    let request = endpoint
        .next_request(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(request.method, "POST");
    assert!(
        request
            .path
            .ends_with("/oidctoken?api-version=7.1&serviceConnectionId=3f0e-service-connection"),
        "{request:?}"
    );
    assert_eq!(
        request.header("authorization"),
        Some("Bearer job-access-token")
    );
    // without the access token mapped into the step
    let out = gw
        .anonymous_client()
        .unwrap()
        .env("SYSTEM_OIDCREQUESTURI", "https://dev.azure.example/x")
        .args(["--token-source", "azure-pipelines:x", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("SYSTEM_ACCESSTOKEN is not set; map it into the step's env"),
        "{out}"
    );
}

#[test]
fn env_and_file_token_sources_and_a_profile_that_names_one() {
    let (issuer, gw) = oidc_setup();
    let token = main_branch_token(&issuer);
    let me = whoami(
        gw.anonymous_client()
            .unwrap()
            .env("CI_JOB_JWT_KINVOKE", &token)
            .args(["--token-source", "gitlab:CI_JOB_JWT_KINVOKE"]),
    );
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");

    // a projected service-account token file, named in a profile
    let file = gw.scratch("projected-token");
    std::fs::write(&file, &token).unwrap();
    let config = gw.scratch("client.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.ci]\nendpoint = \"{}\"\nca_cert = \"{}\"\ntoken_source = \"file:{}\"\n",
            gw.endpoint(),
            gw.pki().ca_cert.display(),
            file.display()
        ),
    )
    .unwrap();
    let me = whoami(Client::new().unwrap().arg("--config").arg(&config));
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");

    // a flag wins over the environment: a job's KINVOKE_TOKEN does not stop one
    // command from naming its own source
    let me = whoami(
        gw.token_client("not-a-valid-token")
            .unwrap()
            .env("CI_JOB_JWT_KINVOKE", &token)
            .args(["--token-source", "gitlab:CI_JOB_JWT_KINVOKE"]),
    );
    assert_eq!(me["principal"], format!("ci:{CI_SUBJECT}"), "{me}");
    // two flags at once are a usage error naming both
    let out = gw
        .anonymous_client()
        .unwrap()
        .args(["--token", &token, "--token-source", "env:X", "whoami"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("--token/KINVOKE_TOKEN and --token-source/KINVOKE_TOKEN_SOURCE are all set"),
        "{out}"
    );
}

#[test]
fn a_valid_token_of_another_branch_authenticates_but_may_not_run_commands() {
    let issuer = TestIssuer::new().unwrap();
    let gw = oidc_gateway(&issuer);
    let dev = issuer
        .sign(
            Algorithm::RS256,
            TestIssuer::RSA_KID,
            &ci_claims("refs/heads/dev"),
        )
        .unwrap();
    let principal = "ci:repo:org/app:ref:refs/heads/dev";

    let marker = gw.scratch("ran");
    let out = invoke_with(gw.token_client(&dev).unwrap(), CLUSTER, &touch(&marker));
    assert_refused(
        &out,
        EXIT_DENIED,
        &[&format!(
            "PERMISSION_DENIED: principal {principal} lacks runcommand/action on clusters/{CLUSTER}"
        )],
    );
    assert!(!marker.exists(), "the command ran:\n{out}");

    let me = whoami(gw.token_client(&dev).unwrap());
    assert_eq!(me["principal"], principal, "{me}");
    assert_eq!(me["clusters"], json!([]), "{me}");
    assert!(
        gw.audit_events_named("authorization")
            .iter()
            .any(|e| e.get("principal") == Some(principal)
                && e.get("decision") == Some("deny")
                && e.get("detail").is_some_and(|d| d.contains("lacks"))),
        "no denial in the audit log:\n{}",
        gw.stderr_log()
    );
}

// ---------------------------------------------------------------------------------------
// static tokens

#[test]
fn a_static_token_is_accepted_by_its_hash_and_a_wrong_one_is_not() {
    let token = "kinvoke-e2e-static-token-5f0c2a";
    let hashed = gateway_cli_with_input(["hash-token"], &format!("{token}\n")).unwrap();
    assert_eq!(hashed.code, Some(0), "{hashed}");
    let hash = hashed.stdout.trim();
    assert_eq!(
        hash,
        kinvoke_gateway::authn::static_token::hash_token(token),
        "{hashed}"
    );
    assert!(!hashed.stdout.contains(token), "{hashed}");

    let gw = gateway_with(
        GatewayOptions::default()
            .listener_toml(r#"authentication = ["mtls", "token"]"#)
            .extra_toml(&format!(
                r#"
[[authn.static_token]]
principal = "deploy-bot"
sha256 = "{hash}"
groups = ["deployers"]

[[assignment]]
role = "Command Invoker"
scope = "clusters/local"
group = "deployers"
"#
            )),
    );

    let out = invoke_with(gw.token_client(token).unwrap(), CLUSTER, "echo deployed");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["deployed"], "{out}");
    let me = whoami(gw.token_client(token).unwrap());
    assert_eq!(me["principal"], "deploy-bot", "{me}");
    assert_eq!(me["authMethod"], "token", "{me}");
    assert_eq!(me["groups"], json!(["deployers"]), "{me}");
    assert!(me.get("issuer").is_none(), "{me}");

    let marker = gw.scratch("ran");
    let wrong = invoke_with(
        gw.token_client("kinvoke-e2e-static-token-5f0c2b").unwrap(),
        CLUSTER,
        &touch(&marker),
    );
    assert_refused(
        &wrong,
        EXIT_DENIED,
        &["UNAUTHENTICATED: bearer token is not valid"],
    );
    assert!(!marker.exists(), "the command ran:\n{wrong}");
    assert!(
        !gw.stderr_log().contains(token),
        "the token leaked into the log"
    );
}

#[test]
fn a_listener_for_certificates_only_refuses_bearer_tokens() {
    let token = "kinvoke-e2e-static-token-5f0c2a";
    let static_token = format!(
        "[[authn.static_token]]\nprincipal = \"deploy-bot\"\nsha256 = \"{}\"\n",
        kinvoke_gateway::authn::static_token::hash_token(token)
    );

    // the default listener: certificates only, and required
    let gw = gateway_with(GatewayOptions::default().extra_toml(&static_token));
    let both = invoke_with(
        gw.client().unwrap().env("KINVOKE_TOKEN", token),
        CLUSTER,
        "true",
    );
    assert_refused(
        &both,
        EXIT_DENIED,
        &["UNAUTHENTICATED: ", "does not accept bearer tokens"],
    );
    // without a certificate the TLS handshake already fails
    let token_only = invoke_with(gw.token_client(token).unwrap(), CLUSTER, "true");
    assert_refused(&token_only, EXIT_UNAVAILABLE, &[]);

    // certificates only, but not required at the TLS level
    let gw = gateway_with(
        GatewayOptions::default()
            .listener_toml(r#"authentication = ["mtls"]"#)
            .listener_toml("require_client_cert = false")
            .extra_toml(&static_token),
    );
    let token_only = invoke_with(gw.token_client(token).unwrap(), CLUSTER, "true");
    assert_refused(
        &token_only,
        EXIT_DENIED,
        &["UNAUTHENTICATED: ", "does not accept bearer tokens"],
    );
    assert_eq!(listed(gw.client().unwrap()), Vec::<Value>::new());
}

// ---------------------------------------------------------------------------------------
// client certificates

#[test]
fn an_mtls_rule_maps_a_certificate_to_a_principal_and_groups() {
    let gw = gateway_with(
        GatewayOptions::default()
            .without_admin_assignment()
            .extra_toml(
                r#"
[[authn.mtls_rule]]
identity = "test-*"
principal = "team:{identity}"
groups = ["sre"]

[[assignment]]
role = "Command Invoker"
scope = "clusters/local"
group = "sre"
"#,
            ),
    );

    let me = whoami(gw.client().unwrap());
    assert_eq!(me["principal"], format!("team:{USER}"), "{me}");
    assert_eq!(me["groups"], json!(["sre"]), "{me}");
    assert_eq!(me["authMethod"], "mtls", "{me}");

    let out = gw
        .client()
        .unwrap()
        .args(["-o", "json", "invoke", "--cluster", CLUSTER])
        .args(["--command", "echo as sre"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.json().unwrap()["principal"], format!("team:{USER}"));

    // a certificate the rule does not match keeps its own name and gets no group
    let outsider = gw.pki().client_cert("outsider").unwrap();
    let me = whoami(gw.client_as(&outsider).unwrap());
    assert_eq!(me["principal"], "outsider", "{me}");
    assert_eq!(me["groups"], json!([]), "{me}");
    let refused = invoke_with(gw.client_as(&outsider).unwrap(), CLUSTER, "true");
    assert_refused(
        &refused,
        EXIT_DENIED,
        &["PERMISSION_DENIED: principal outsider lacks runcommand/action"],
    );
}

// ---------------------------------------------------------------------------------------
// command ownership

/// Callers of the ownership test: alice and bob may run commands, carol audits.
struct Team {
    alice: ClientCert,
    bob: ClientCert,
    carol: ClientCert,
}

fn ownership_gateway() -> (Gateway, Team) {
    let gw = gateway_with(
        GatewayOptions::default()
            .without_admin_assignment()
            .extra_toml(
                r#"
[[assignment]]
principal = "alice"
role = "Command Invoker"
scope = "clusters/local"

[[assignment]]
principal = "bob"
role = "Command Invoker"
scope = "clusters/local"

[[assignment]]
principal = "carol"
role = "Command Auditor"
scope = "clusters/local"
"#,
            ),
    );
    let team = Team {
        alice: gw.pki().client_cert("alice").unwrap(),
        bob: gw.pki().client_cert("bob").unwrap(),
        carol: gw.pki().client_cert("carol").unwrap(),
    };
    (gw, team)
}

/// `cert` runs `kinvoke VERB --cluster local --command-id ID EXTRA...`.
fn on_command(gw: &Gateway, cert: &ClientCert, verb: &str, id: &str, extra: &[&str]) -> Output {
    gw.client_as(cert)
        .unwrap()
        .args([verb, "--cluster", CLUSTER, "--command-id", id])
        .args(extra)
        .run()
        .unwrap()
}

#[test]
fn another_callers_command_is_not_found_unless_one_may_read_all_results() {
    let (gw, team) = ownership_gateway();
    let started = gw
        .client_as(&team.alice)
        .unwrap()
        .args(["-o", "json", "invoke", "--cluster", CLUSTER])
        .args(["--command", "echo from alice; exit 3"])
        .run()
        .unwrap();
    assert_eq!(started.code, Some(3), "{started}");
    let id = started.json().unwrap()["id"].as_str().unwrap().to_owned();

    // bob may run commands, but alice's is not his: it does not exist for him
    let not_found = format!("NOT_FOUND: command \"{id}\" was not found on cluster \"{CLUSTER}\"");
    for (verb, extra) in [
        ("result", &[][..]),
        ("result", &["--wait"][..]),
        ("logs", &[][..]),
        ("logs", &["--follow"][..]),
        ("cancel", &[][..]),
    ] {
        let out = on_command(&gw, &team.bob, verb, &id, extra);
        assert_refused(&out, EXIT_REJECTED, &[&not_found]);
    }
    // the same answer as for an id that does not exist at all
    let unknown = "0123456789abcdef0123456789abcdef";
    let out = on_command(&gw, &team.bob, "result", unknown, &[]);
    assert_refused(
        &out,
        EXIT_REJECTED,
        &[&not_found.replace(id.as_str(), unknown)],
    );

    let out = invoke_with(gw.client_as(&team.bob).unwrap(), CLUSTER, "echo from bob");
    assert_eq!(out.code, Some(0), "{out}");
    let bobs = listed(gw.client_as(&team.bob).unwrap());
    assert_eq!(bobs.len(), 1, "{bobs:?}");
    assert_eq!(bobs[0]["principal"], "bob", "{bobs:?}");
    let bob_id = bobs[0]["id"].as_str().unwrap().to_owned();

    // carol audits: she reads everyone's results but cancels nothing
    let out = on_command(&gw, &team.carol, "result", &id, &["-o", "json"]);
    assert_eq!(out.code, Some(3), "{out}");
    let result = out.json().unwrap();
    assert_eq!(result["principal"], "alice", "{out}");
    assert_eq!(result["logs"], "from alice\n", "{out}");
    let out = on_command(&gw, &team.carol, "logs", &id, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "from alice\n", "{out}");
    let out = on_command(&gw, &team.carol, "cancel", &id, &[]);
    assert_refused(&out, EXIT_DENIED, &["PERMISSION_DENIED: "]);
    let mut all = ids(&listed(gw.client_as(&team.carol).unwrap()))
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    all.sort();
    let mut expected = vec![id.clone(), bob_id];
    expected.sort();
    assert_eq!(all, expected);
    let refused = invoke_with(gw.client_as(&team.carol).unwrap(), CLUSTER, "true");
    assert_refused(
        &refused,
        EXIT_DENIED,
        &["PERMISSION_DENIED: principal carol lacks runcommand/action"],
    );

    // alice sees her own command, and only hers
    let out = on_command(&gw, &team.alice, "result", &id, &[]);
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(&out.lines()[1..], ["from alice"], "{out}");
    assert_eq!(
        ids(&listed(gw.client_as(&team.alice).unwrap())),
        [id.as_str()]
    );

    // bob's refusals were recorded, naming the command
    assert!(
        gw.audit_events_named("authorization")
            .iter()
            .any(|e| e.get("principal") == Some("bob")
                && e.get("command_id") == Some(id.as_str())
                && e.get("decision") == Some("deny")),
        "no denial of bob in the audit log:\n{}",
        gw.stderr_log()
    );
}

// ---------------------------------------------------------------------------------------
// cluster gates

#[test]
fn a_cluster_with_run_command_disabled_refuses_commands_even_to_an_admin() {
    let gw = gateway_with(
        GatewayOptions::default()
            .extra_toml("[[cluster]]\nname = \"frozen\"\ndisable_run_command = true\n"),
    );
    let marker = gw.scratch("ran");
    let out = invoke_with(gw.client().unwrap(), "frozen", &touch(&marker));
    assert_refused(
        &out,
        EXIT_REJECTED,
        &["FAILED_PRECONDITION: run command is disabled on cluster \"frozen\""],
    );
    assert!(!marker.exists(), "the command ran:\n{out}");

    let out = gw
        .client()
        .unwrap()
        .args(["-o", "json", "clusters"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    let clusters = out.json().unwrap();
    let find = |name: &str| {
        clusters
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cluster"] == name)
            .unwrap_or_else(|| panic!("no cluster {name} in {clusters}"))
            .clone()
    };
    let frozen = find("frozen");
    assert_eq!(frozen["runCommandEnabled"], false, "{frozen}");
    assert!(
        !frozen["actions"]
            .as_array()
            .unwrap()
            .contains(&json!("runcommand/action")),
        "{frozen}"
    );
    assert_eq!(find(CLUSTER)["runCommandEnabled"], true, "{clusters}");

    let out = invoke_with(gw.client().unwrap(), CLUSTER, "echo still fine");
    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn a_cluster_with_its_own_ranges_refuses_callers_outside_them() {
    let gw =
        gateway_with(GatewayOptions::default().extra_toml(
            "[[cluster]]\nname = \"office\"\nauthorized_ip_ranges = [\"127.0.0.2/32\"]\n",
        ));
    let from = |source: &str| gw.client().unwrap().args(["--source-address", source]);

    let marker = gw.scratch("ran");
    let out = invoke_with(from("127.0.0.3"), "office", &touch(&marker));
    assert_refused(
        &out,
        EXIT_DENIED,
        &[
            "PERMISSION_DENIED: ",
            "127.0.0.3",
            "authorized IP ranges",
            "\"office\"",
        ],
    );
    assert!(!marker.exists(), "the command ran:\n{out}");

    // the listener itself admits everyone
    let out = invoke_with(from("127.0.0.3"), CLUSTER, "echo local is open");
    assert_eq!(out.code, Some(0), "{out}");

    let out = invoke_with(from("127.0.0.2"), "office", "echo from the office");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(&out.lines()[1..], ["from the office"], "{out}");
}

// ---------------------------------------------------------------------------------------
// deny by default

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_assignment_an_authenticated_caller_may_do_nothing() {
    let token = "kinvoke-e2e-static-token-5f0c2a";
    let gw = gateway_with(
        GatewayOptions::default()
            .without_admin_assignment()
            .listener_toml(r#"authentication = ["mtls", "token"]"#)
            .extra_toml(&format!(
                "[[authn.static_token]]\nprincipal = \"deploy-bot\"\nsha256 = \"{}\"\n",
                kinvoke_gateway::authn::static_token::hash_token(token)
            )),
    );
    let marker = gw.scratch("ran");

    let out = invoke_with(gw.client().unwrap(), CLUSTER, &touch(&marker));
    assert_refused(
        &out,
        EXIT_DENIED,
        &[&format!(
            "PERMISSION_DENIED: principal {USER} lacks runcommand/action on clusters/{CLUSTER}"
        )],
    );
    let denied = gw.audit_events_named("authorization");
    assert!(
        denied.iter().any(|e| e.get("principal") == Some(USER)
            && e.get("action") == Some("runcommand/action")
            && e.get("decision") == Some("deny")),
        "no denial in the audit log:\n{}",
        gw.stderr_log()
    );

    let me = whoami(gw.client().unwrap());
    assert_eq!(me["principal"], USER, "{me}");
    assert_eq!(me["clusters"], json!([]), "{me}");
    let text = gw.client().unwrap().arg("whoami").run().unwrap();
    assert_eq!(text.code, Some(0), "{text}");
    assert!(text.stdout.contains("clusters:   none"), "{text}");
    assert_eq!(listed(gw.client().unwrap()), Vec::<Value>::new());

    // once authenticated, an unknown cluster is named as such
    let out = invoke_with(gw.client().unwrap(), "no-such-cluster", "true");
    assert_refused(
        &out,
        EXIT_REJECTED,
        &["NOT_FOUND: cluster \"no-such-cluster\" is not configured"],
    );

    // a stranger learns nothing about clusters: authentication comes first
    for cluster in [CLUSTER, "no-such-cluster"] {
        let out = invoke_with(
            gw.token_client("not-the-token").unwrap(),
            cluster,
            &touch(&marker),
        );
        assert_refused(
            &out,
            EXIT_DENIED,
            &["UNAUTHENTICATED: bearer token is not valid"],
        );
        assert!(!out.stderr.contains("not configured"), "{out}");
    }
    // and so does one with no credentials at all (the CLI insists on some, so ask the
    // gateway directly)
    let mut anonymous = gw.grpc_client_as(None).await.unwrap();
    for cluster in [CLUSTER, "no-such-cluster"] {
        let status = anonymous
            .invoke_command(kinvoke_proto::v1::InvokeCommandRequest {
                cluster: cluster.to_owned(),
                command: touch(&marker),
                files: Vec::new(),
                timeout: None,
                no_wait: false,
            })
            .await
            .expect_err("a caller without credentials was served");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("no credentials"), "{status:?}");
    }
    assert!(!marker.exists(), "a command ran");
}

// ---------------------------------------------------------------------------------------
// whoami

#[test]
fn whoami_shows_identity_source_listener_and_effective_actions() {
    let gw = gateway_with(
        GatewayOptions::default()
            .without_admin_assignment()
            .extra_toml(
                r#"
[[cluster]]
name = "audit-only"

[[cluster]]
name = "reports"

[[cluster]]
name = "hidden"

[[authn.mtls_rule]]
identity = "test-user"
groups = ["sre", "oncall"]

[[role]]
name = "Result Reader"
actions = ["commandResults/read"]

[[assignment]]
principal = "test-user"
role = "Command Invoker"
scope = "clusters/local"

[[assignment]]
group = "oncall"
role = "Command Auditor"
scope = "clusters/audit-only"

[[assignment]]
group = "sre"
role = "Result Reader"
scope = "clusters/reports"
"#,
            ),
    );
    let clusters = json!([
        {
            "cluster": CLUSTER,
            "actions": ["runcommand/action", "commandResults/read"],
            "runCommandEnabled": true,
        },
        {
            "cluster": "audit-only",
            "actions": ["commandResults/read", "commandResults/readAll"],
            "runCommandEnabled": true,
        },
        {
            "cluster": "reports",
            "actions": ["commandResults/read"],
            "runCommandEnabled": true,
        },
    ]);

    let me = whoami(gw.client().unwrap());
    assert_eq!(
        me,
        json!({
            "principal": USER,
            "groups": ["sre", "oncall"],
            "authMethod": "mtls",
            "sourceAddress": "127.0.0.1",
            "listener": "main",
            "clusters": clusters,
        })
    );

    let out = gw
        .client()
        .unwrap()
        .args(["-o", "json", "clusters"])
        .run()
        .unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.json().unwrap(), clusters, "{out}");

    let text = gw.client().unwrap().arg("whoami").run().unwrap();
    assert_eq!(text.code, Some(0), "{text}");
    for line in [
        format!("principal:  {USER}"),
        "groups:     sre, oncall".to_owned(),
        "auth:       mtls".to_owned(),
        "source:     127.0.0.1 (listener main)".to_owned(),
    ] {
        assert!(text.lines().contains(&line.as_str()), "{line:?}:\n{text}");
    }
    assert!(!text.stdout.contains("hidden"), "{text}");
}

// ---------------------------------------------------------------------------------------
// check-config

#[test]
fn check_config_warns_about_a_public_listener_open_to_every_address() {
    // check-config reads the certificates but binds nothing, so no gateway runs here
    let dir = tempfile::tempdir().unwrap();
    Pki::new(&dir.path().join("pki"), "kinvoke test CA").unwrap();

    let open = GatewayOptions::default()
        .listener_toml("exposure = \"public\"")
        .render();
    let out = check_config(dir.path(), "open.toml", &open).unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("config OK"), "{out}");
    let warning = out
        .lines()
        .into_iter()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("no warning:\n{out}"));
    assert!(warning.contains("open to every address"), "{out}");
    assert!(warning.contains("\"main\""), "{out}");

    let restricted = GatewayOptions::default()
        .listener_toml("exposure = \"public\"")
        .listener_toml(r#"authorized_ip_ranges = ["203.0.113.0/24"]"#)
        .render();
    let out = check_config(dir.path(), "restricted.toml", &restricted).unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(!out.stdout.contains("open to every address"), "{out}");
}

#[test]
fn check_config_rejects_a_private_listener_that_admits_public_addresses() {
    let dir = tempfile::tempdir().unwrap();
    Pki::new(&dir.path().join("pki"), "kinvoke test CA").unwrap();

    let everyone = GatewayOptions::default()
        .listener_toml(r#"authorized_ip_ranges = ["0.0.0.0/0"]"#)
        .render();
    let out = check_config(dir.path(), "everyone.toml", &everyone).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("listener[0].authorized_ip_ranges"),
        "{out}"
    );
    assert!(out.stderr.contains("public"), "{out}");
    assert!(!out.stdout.contains("config OK"), "{out}");

    // loopback and RFC 1918 ranges are private
    let private = GatewayOptions::default()
        .listener_toml(r#"authorized_ip_ranges = ["127.0.0.0/8", "10.0.0.0/8"]"#)
        .render();
    let out = check_config(dir.path(), "private.toml", &private).unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("config OK"), "{out}");
}
