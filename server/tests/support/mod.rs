//! An in-process gateway for tests: `Gateway::open(..).serve(..)` on 127.0.0.1:0 in the
//! test's own runtime, with typed gRPC clients that present certificates of a test CA.
//! Its commands run in the same sandbox as production (the launcher is the built
//! `kinvoke-gateway`, since this test's own executable is the test harness).

#![allow(
    dead_code,
    reason = "each test file uses the part of the harness it needs"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kinvoke_gateway::config::Config;
use kinvoke_gateway::pki::CertificateAuthority;
use kinvoke_gateway::{Gateway, GatewayError};
use kinvoke_proto::v1 as pb;
use pb::access_service_client::AccessServiceClient;
use pb::command_service_client::CommandServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The principal every test gateway makes `Cluster Admin` on every cluster.
pub const ADMIN: &str = "admin";

/// A gateway serving in this process.
pub struct TestGateway {
    dir: tempfile::TempDir,
    runner: std::sync::Arc<kinvoke_gateway::runner::Runner>,
    ca: CertificateAuthority,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), GatewayError>>>,
}

impl TestGateway {
    /// Starts a gateway whose config is the harness's listener, a shell cluster `local`,
    /// an assignment making [`ADMIN`] `Cluster Admin` everywhere, and `extra` (TOML
    /// appended as is: more clusters, assignments, `[limits]` come first, see below).
    /// `limits` is the body of the `[limits]` table.
    pub async fn start(limits: &str, extra: &str) -> Self {
        Self::start_with_listener("", limits, extra).await
    }

    /// [`TestGateway::start`] with `listener` (TOML keys) added to the listener's table,
    /// e.g. its `authorized_ip_ranges`.
    pub async fn start_with_listener(listener: &str, limits: &str, extra: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = CertificateAuthority::new("kinvoke in-process test CA").expect("a CA");
        let server = ca
            .server_cert(&["localhost", "127.0.0.1"])
            .expect("a server cert");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("writing a test file");
        };
        write("server.crt", &server.cert_pem);
        write("server.key", &server.key_pem);
        write("ca.crt", &ca.cert_pem());
        let text = format!(
            "state_dir = \"state\"\nshutdown_grace = \"1s\"\n\n[limits]\n{limits}\n\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"server.crt\", key = \"server.key\", client_ca = \"ca.crt\" }}\n{listener}\n\n\
             [[cluster]]\nname = \"local\"\nmode = \"shell\"\n\n\
             [[assignment]]\nname = \"test-admin\"\nprincipal = \"{ADMIN}\"\nrole = \"Cluster Admin\"\nscope = \"clusters/*\"\n\n\
             {extra}\n"
        );
        let config = Config::parse(&text, dir.path()).expect("the test config is valid");
        let listeners = kinvoke_gateway::ingress::bind(&config.listeners)
            .await
            .expect("the listener binds");
        let addr = listeners[0].local_addr().expect("a bound address");
        let gateway = Gateway::open_with_launcher(config, Some(launcher()))
            .await
            .expect("the gateway opens");
        let runner = gateway.runner();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listeners, async move {
            let _ = stopped.await;
        }));
        Self {
            dir,
            runner,
            ca,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A channel presenting a certificate whose common name is `name`.
    pub async fn channel_as(&self, name: &str) -> Channel {
        self.channel_from(None, name)
            .await
            .expect("the gateway accepts the connection")
    }

    /// A channel from the local address `source` (a loopback address such as
    /// 127.0.0.3, to test address rules), or the error the connection ended with.
    pub async fn channel_from(
        &self,
        source: Option<std::net::IpAddr>,
        name: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let cert = self.ca.client_cert(name, None).expect("a client cert");
        self.connect(source, &cert).await
    }

    /// The test CA that signs the gateway's certificate and its callers'.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// A channel presenting `cert` (PEM certificate and key), or the error the
    /// connection ended with.
    pub async fn channel_with_cert(
        &self,
        cert: &kinvoke_gateway::pki::CertifiedKey,
    ) -> Result<Channel, tonic::transport::Error> {
        self.connect(None, cert).await
    }

    async fn connect(
        &self,
        source: Option<std::net::IpAddr>,
        cert: &kinvoke_gateway::pki::CertifiedKey,
    ) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("a valid endpoint")
            .local_address(source)
            .tls_config(tls)
            .expect("a valid TLS config")
            .connect()
            .await
    }

    /// `CommandService` as `name`.
    pub async fn commands_as(&self, name: &str) -> CommandServiceClient<Channel> {
        CommandServiceClient::new(self.channel_as(name).await)
    }

    /// `AccessService` as `name`.
    pub async fn access_as(&self, name: &str) -> AccessServiceClient<Channel> {
        AccessServiceClient::new(self.channel_as(name).await)
    }

    /// The audit log's lines so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("state").join("audit.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The gateway's runner, to watch its commands from the inside.
    pub fn runner(&self) -> &kinvoke_gateway::runner::Runner {
        &self.runner
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gateway's runner, shared (for a task of the test's own).
    pub fn runner_arc(&self) -> std::sync::Arc<kinvoke_gateway::runner::Runner> {
        self.runner.clone()
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The audit log once `done` holds for it: events are written in batches, so a
    /// test waits for the one it expects (for at most ten seconds, then fails showing
    /// what the log holds).
    pub async fn audit_until(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.audit();
            if done(&events) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the audit log never showed {what}: {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The first audit event named `event`, once the log shows one.
    pub async fn audit_event(&self, event: &str) -> serde_json::Value {
        self.audit_until(event, |events| events.iter().any(|e| e["event"] == event))
            .await
            .into_iter()
            .find(|e| e["event"] == event)
            .expect("audit_until saw it")
    }

    /// Stops serving (running commands get the configured grace) and waits for it; the
    /// state directory stays until the harness is dropped.
    pub async fn stop(&mut self) -> Result<(), GatewayError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("the gateway task does not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The built `kinvoke-gateway`, which the sandbox starts as its launcher.
pub fn launcher() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_kinvoke-gateway")).to_owned()
}

/// An `InvokeCommandRequest` on `cluster`.
pub fn invoke(cluster: &str, command: &str, no_wait: bool) -> pb::InvokeCommandRequest {
    pb::InvokeCommandRequest {
        cluster: cluster.into(),
        command: command.into(),
        files: Vec::new(),
        timeout: None,
        no_wait,
    }
}

/// A `GetCommandResultRequest` for a command on `local`.
pub fn result_request(id: &str, wait: bool) -> pb::GetCommandResultRequest {
    pb::GetCommandResultRequest {
        cluster: "local".into(),
        command_id: id.into(),
        wait,
    }
}

/// A `CancelCommandRequest` for a command on `local`.
pub fn cancel_request(id: &str) -> pb::CancelCommandRequest {
    pb::CancelCommandRequest {
        cluster: "local".into(),
        command_id: id.into(),
    }
}

/// Starts `command` on cluster `local` as `who` without waiting for it; its record.
pub async fn started(gw: &TestGateway, who: &str, command: &str) -> pb::CommandResult {
    gw.commands_as(who)
        .await
        .invoke_command(invoke("local", command, true))
        .await
        .expect("the command starts")
        .into_inner()
        .result
        .expect("a record")
}

/// Runs `request` as [`ADMIN`] to its end; its result.
pub async fn run(gw: &TestGateway, request: pb::InvokeCommandRequest) -> pb::CommandResult {
    gw.commands_as(ADMIN)
        .await
        .invoke_command(request)
        .await
        .expect("the command runs")
        .into_inner()
        .result
        .expect("a result")
}

/// Panics unless the gateway still runs a command for [`ADMIN`].
pub async fn still_serves(gw: &TestGateway) {
    let result = run(gw, invoke("local", "echo up", false)).await;
    assert_eq!(result.output, b"up\n", "the gateway no longer serves");
}

/// Sends and receives messages as the bytes they are, so a test can send what no
/// well-behaved client would.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct Raw;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut out);
        Ok(Some(out))
    }
}
