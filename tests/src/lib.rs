//! Support for kinvoke's end-to-end tests: real binaries, real TLS, real processes.
//!
//! Layout: [`binary`] finds the built `kinvoke-gateway` and `kinvoke` executables;
//! [`Pki`] writes a throw-away CA with a server certificate and client certificates;
//! [`Gateway`] runs the real gateway binary on `127.0.0.1:0` in its own temporary
//! directory and waits for its readiness line; [`Client`] runs the real `kinvoke` CLI to
//! completion ([`Client::run`]) or in the background ([`Client::spawn`]); [`gateway_cli`]
//! runs a short-lived gateway subcommand such as `check-config`; [`DevGateway`] runs
//! `kinvoke-gateway dev` and waits until its client config is written; [`Proc`] is the
//! child-process wrapper under all of them. Every wait ends on an event (a line, an exit,
//! a closed pipe) and is bounded only as a guard against hangs; nothing here sleeps.
//!
//! For the access-control tests: [`AuditRecord`] parses the gateway's `kinvoke::audit`
//! log events; [`TcpRelay`] stands in for a load balancer that sends a PROXY protocol
//! header ([`proxy_v1_header`]); [`TestIssuer`] signs OIDC tokens and publishes their
//! JWKS; [`gateway_cli_with_input`] feeds a subcommand's stdin (`hash-token`).
//!
//! For the audit-file tests: [`GatewayOptions::audit`] sets `[audit]` keys;
//! [`Gateway::audit_files`] lists the chain's files oldest first; [`read_audit_file`]
//! reads one into [`AuditLine`]s (their exact text, for hashing, and their JSON);
//! [`audit_verify`] runs `kinvoke-gateway audit verify` and [`VerifiedChain`] parses its
//! success line.
//!
//! For the break-glass tests: [`WebhookReceiver`] is a tiny HTTP server that hears the
//! gateway's announcements ([`WebhookRequest`]); [`closed_loopback_port`] makes a webhook
//! URL that refuses connections; [`Gateway::await_audit_event`] waits for events the
//! gateway logs on its own time (a grant's expiry, a failed notification).
//!
//! For the relay tests: [`kube_tools`] finds the pinned kubectl and helm (or says why the
//! test is skipped) and [`kube_tools_path`] makes a command `PATH` for them;
//! [`GatewayOptions::kube_cluster`] adds a cluster whose commands reach an API server
//! through the relay; [`RelayKubeconfig`] reads the kubeconfig a command printed and
//! [`https_get`] knocks on the relay with its token from outside the gateway;
//! [`Background::wait_for_line_where`] waits for a line the test knows only in part.
//!
//! Dropping a [`Gateway`] stops its process and deletes its directory; dropping a
//! [`DevGateway`], [`Proc`] or [`Background`] stops (or kills) and reaps the process.
//!
//! One file per role: `process` (binaries, child processes), `pki`, `gateway` (the
//! gateway processes, their options and the CLI clients), `output` (what the CLI
//! prints), `audit`, `proxy` (the PROXY-protocol load balancer stand-in), `webhook`,
//! `kube` (kubectl, helm, the relay) and `oidc` (a test token issuer).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use kinvoke_gateway::pki::CertificateAuthority;
use kinvoke_proto::v1::command_service_client::CommandServiceClient;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Cluster name of the `local` shell-mode cluster every test gateway has.
pub const CLUSTER: &str = "local";

/// Common name (and so principal id) of the default client certificate.
pub const USER: &str = "test-user";

/// Guard against a gateway that never becomes ready (it may be waiting on a slow disk).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Guard against a client or gateway process that never ends.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a gateway stopped by [`Drop`] may take to shut down before it is killed.
const DROP_TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two reads of the gateway's stderr log in [`Gateway::await_audit_event`]:
/// short, so the wait ends soon after the event, and not zero, so it does not spin.
const LOG_POLL_PACING: Duration = Duration::from_millis(50);

/// Readiness line prefix the gateway prints on stdout for each listener.
const SERVING_ON: &str = "serving on https://";
/// What the gateway prints before its admin listener's address.
const ADMIN_SERVING_ON: &str = "admin listener serving on http://";

mod audit;
mod gateway;
mod kube;
mod oidc;
mod output;
mod pki;
mod process;
mod proxy;
mod webhook;

pub use audit::*;
pub use gateway::*;
pub use kube::*;
pub use oidc::*;
pub use output::*;
pub use pki::*;
pub use process::*;
pub use proxy::*;
pub use webhook::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_line_is_parsed() {
        let h = parse_header(
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+00:00 with exitcode=3",
        )
        .unwrap();
        assert_eq!(h.started_at, "2025-01-02 03:04:05+00:00");
        assert_eq!(h.finished_at, "2025-01-02 03:04:06+00:00");
        assert_eq!(h.exit_code, 3);
    }

    #[test]
    fn a_header_with_another_time_format_is_rejected() {
        for line in [
            "command started at 2025-01-02T03:04:05Z, finished at 2025-01-02 03:04:06+00:00 with exitcode=0",
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+02:00 with exitcode=0",
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+00:00 with exitcode=x",
            "started at 2025-01-02 03:04:05+00:00",
        ] {
            assert_eq!(parse_header(line), None, "{line}");
        }
    }

    #[test]
    fn the_id_is_the_first_tsv_field() {
        assert_eq!(
            command_id_from_tsv("abc\tlocal\tRunning\n").as_deref(),
            Some("abc")
        );
        assert_eq!(command_id_from_tsv("a\tb\nc\td\n"), None);
        assert_eq!(command_id_from_tsv(""), None);
    }

    #[test]
    fn options_render_limits_before_the_tables() {
        let text = GatewayOptions::default()
            .limit("max_output_bytes", "1KiB")
            .limit("max_files", "3")
            .render();
        let limits = text.find("[limits]").unwrap();
        let listener = text.find("[[listener]]").unwrap();
        let output = text.find("max_output_bytes = \"1KiB\"").unwrap();
        assert!(limits < output && output < listener, "{text}");
        assert!(text.contains("max_files = 3\n"), "{text}");
        assert!(text.contains("kill_grace = \"1s\"\n"), "{text}");
    }

    #[test]
    fn extra_toml_is_rendered_after_the_local_cluster_and_parses() {
        let text = GatewayOptions::default()
            .extra_toml(
                "[[cluster]]\nname = \"strict\"\nmode = \"argv\"\nallowed_programs = [\"echo\"]\n",
            )
            .render();
        let local = text.find("name = \"local\"").unwrap();
        let strict = text.find("name = \"strict\"").unwrap();
        assert!(local < strict, "{text}");
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        let strict = config.cluster("strict").unwrap();
        assert_eq!(strict.exec.mode, kinvoke_gateway::config::ExecMode::Argv);
        assert!(strict.exec.allowed_programs.contains("echo"));
    }

    #[test]
    fn an_audit_line_is_parsed_into_plain_fields() {
        let line = "2026-11-28T13:44:01.287401Z  INFO kinvoke::audit: {\"event\":\"connection_refused\",\
                    \"listener\":\"dev\",\"peer\":\"127.0.0.3:52143\",\"reason\":\"say \\\"no\\\" to 127.0.0.3\",\
                    \"exit_code\":3,\"command_id\":\"\"} event=\"connection_refused\"";
        let record = AuditRecord::parse(line).unwrap();
        assert_eq!(record.level, "INFO");
        assert_eq!(record.event(), "connection_refused");
        assert_eq!(record.get("listener"), Some("dev"));
        assert_eq!(record.get("peer"), Some("127.0.0.3:52143"));
        assert_eq!(record.get("reason"), Some("say \"no\" to 127.0.0.3"));
        assert_eq!(record.get("exit_code"), Some("3"));
        assert_eq!(record.get("command_id"), Some(""));
        assert_eq!(record.get("missing"), None);
        assert!(
            AuditRecord::parse("2026-11-28T13:44:01Z  INFO kinvoke_gateway: gateway stopped")
                .is_none()
        );
    }

    #[test]
    fn the_audit_table_is_rendered_after_the_limits_and_parses() {
        let text = GatewayOptions::default()
            .audit("max_file_bytes", "4KiB")
            .audit("fsync", "always")
            .audit("tracing", "false")
            .render();
        let limits = text.find("[limits]").unwrap();
        let audit = text.find("[audit]").unwrap();
        let listener = text.find("[[listener]]").unwrap();
        assert!(limits < audit && audit < listener, "{text}");
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        assert_eq!(config.audit.max_file_bytes, 4096);
        assert_eq!(
            config.audit.fsync,
            kinvoke_gateway::audit::FsyncPolicy::Always
        );
        assert!(!config.audit.tracing);
        assert_eq!(config.audit.path, Path::new("/tmp/gw/state/audit.jsonl"));
        assert!(!GatewayOptions::default().render().contains("[audit]"));
    }

    #[test]
    fn rotated_audit_files_are_named_by_their_last_seq() {
        assert_eq!(rotated_audit_seq("audit.120.jsonl"), Some(120));
        assert_eq!(rotated_audit_seq("audit.jsonl"), None);
        assert_eq!(rotated_audit_seq("audit.broken-3"), None);
        assert_eq!(rotated_audit_seq("audit.x.jsonl"), None);
    }

    #[test]
    fn an_audit_file_is_read_line_by_line_and_a_torn_tail_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(
            &path,
            "{\"seq\":1,\"event\":\"a\"}\n{\"seq\":2,\"event\":\"b\"}\n{\"seq\":3,",
        )
        .unwrap();
        let so_far = read_audit_file_so_far(&path).unwrap();
        assert_eq!(so_far.len(), 2);
        assert_eq!((so_far[1].number, so_far[1].seq()), (2, 2));
        assert_eq!(so_far[1].event(), "b");
        assert_eq!(so_far[0].keys(), ["seq", "event"]);
        assert_eq!(so_far[0].text, "{\"seq\":1,\"event\":\"a\"}");
        let err = read_audit_file(&path).unwrap_err().to_string();
        assert!(err.contains("ends inside line 3"), "{err}");
        fs::write(&path, "{\"seq\":1}\nnot json\n").unwrap();
        assert!(read_audit_file_so_far(&path).is_err());
    }

    #[test]
    fn a_verify_report_is_parsed() {
        let hash = "ab".repeat(32);
        let parsed =
            VerifiedChain::parse(&format!("ok: 12 events, head seq 40 sha256 {hash}\n")).unwrap();
        assert_eq!(
            parsed,
            VerifiedChain {
                events: 12,
                head_seq: 40,
                head_sha256: hash.clone()
            }
        );
        assert_eq!(VerifiedChain::parse("audit.jsonl: line 3: truncated"), None);
        assert_eq!(
            VerifiedChain::parse("ok: 1 events, head seq 1 sha256 xyz"),
            None
        );
    }

    #[test]
    fn the_webhook_receiver_hands_over_each_request_and_refuses_oversized_ones() {
        let receiver = WebhookReceiver::start().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // plain http to loopback; the gateway's own client settings (ring, no default provider)
        let client =
            kinvoke_gateway::outbound_https::client(None, Duration::from_secs(10), false).unwrap();
        let statuses: Vec<u16> = runtime.block_on(async {
            let mut out = Vec::new();
            for body in [
                "{\"event\":\"x\"}".to_owned(),
                "y".repeat(webhook::MAX_WEBHOOK_BODY + 1),
            ] {
                let answer = client
                    .post(receiver.url())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                out.push(answer.status().as_u16());
            }
            out
        });
        assert_eq!(statuses, [200, 413]);
        let first = receiver.next_request(Duration::from_secs(10)).unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str()),
            ("POST", "/hook")
        );
        assert_eq!(first.header("Content-Type"), Some("application/json"));
        assert_eq!(first.json().unwrap()["event"], "x");
        assert!(receiver.received_so_far().is_empty());
    }

    #[test]
    fn a_proxy_v1_header_names_both_ends() {
        let header = proxy_v1_header(
            "203.0.113.7:40000".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
        );
        assert_eq!(header, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n");
        let header = proxy_v1_header(
            "[2001:db8::7]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(header, b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n");
    }

    #[test]
    fn a_listener_address_and_files_are_rendered() {
        let options = GatewayOptions::default()
            .listener_address("[::]:0")
            .file("oidc/jwks.json", "{}");
        let text = options.render();
        assert!(text.contains("address = \"[::]:0\"\n"), "{text}");
        assert_eq!(
            options.files,
            [(PathBuf::from("oidc/jwks.json"), b"{}".to_vec())]
        );
        assert!(
            GatewayOptions::default()
                .render()
                .contains("address = \"127.0.0.1:0\"\n")
        );
    }

    #[test]
    fn a_readiness_line_yields_its_address() {
        let addr =
            serving_addr("kinvoke-gateway: listener \"main\" serving on https://127.0.0.1:4443\n")
                .unwrap()
                .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4443)));
        assert!(serving_addr("Development gateway ready").is_none());
        assert!(
            serving_addr("serving on https://localhost:1")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn a_relay_kubeconfig_yields_its_server_ca_and_token() {
        let ca = base64::engine::general_purpose::STANDARD.encode("-----BEGIN CERTIFICATE-----\n");
        let text = format!(
            "command started at ...\n# written by kinvoke\nclusters:\n- name: kube\n  cluster:\n    \
             server: https://127.0.0.1:4321\n    certificate-authority-data: {ca}\nusers:\n\
             - name: kinvoke\n  user:\n    token: 00ff\n"
        );
        let parsed = RelayKubeconfig::parse(&text).unwrap();
        assert_eq!(parsed.server, "https://127.0.0.1:4321");
        assert_eq!(parsed.ca_pem, "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(parsed.token, "00ff");
        assert!(!format!("{parsed:?}").contains("00ff"));
        let err = RelayKubeconfig::parse("server: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate-authority-data"), "{err}");
    }

    #[test]
    fn missing_kube_tools_skip_the_test_but_fail_it_under_ci() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kubectl"), "").unwrap();
        assert_eq!(kube_tools_in(dir.path(), false).unwrap(), None);
        let err = kube_tools_in(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("helm not found"), "{err}");
        assert!(err.contains("scripts/fetch-kube-tools"), "{err}");
        fs::write(dir.path().join("helm"), "").unwrap();
        assert_eq!(
            kube_tools_in(dir.path(), true).unwrap().as_deref(),
            Some(dir.path())
        );
    }

    #[test]
    fn a_kube_cluster_renders_its_table_and_kubeconfig_file() {
        let options = GatewayOptions::default().kube_cluster(
            "kube",
            "apiVersion: v1\n",
            "/opt/tools:/usr/bin:/bin",
        );
        let text = options.render();
        assert_eq!(
            options.files,
            [(
                PathBuf::from("kube.kubeconfig"),
                b"apiVersion: v1\n".to_vec()
            )]
        );
        assert!(
            text.contains("kubeconfig = \"kube.kubeconfig\"\n"),
            "{text}"
        );
        assert!(
            text.contains("path = \"/opt/tools:/usr/bin:/bin\"\n"),
            "{text}"
        );
        assert_eq!(
            kube_tools_path(Path::new("/t/bin")),
            "/t/bin:/usr/local/bin:/usr/bin:/bin"
        );
    }

    #[test]
    fn rendered_options_are_a_config_the_gateway_accepts() {
        let text = GatewayOptions::default()
            .limit("max_output_bytes", "1KiB")
            .shutdown_grace("1s")
            .render();
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        assert_eq!(config.limits.max_output_bytes, 1024);
        assert_eq!(config.shutdown_grace, Duration::from_secs(1));
        assert_eq!(config.state_dir, Path::new("/tmp/gw/state"));
        assert_eq!(config.clusters[0].name.as_str(), CLUSTER);
    }
}
