//! The network side: a fresh CA and server certificate, the rustls (ring) config, the accept
//! loop, one hyper connection per TLS stream (HTTP/1.1 or HTTP/2), and the response body
//! type that lets a watch stream without buffering.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::RecordedRequest;
use crate::auth::TokenIdentity;
use crate::store::Store;

/// Why the simulated cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificate generation failed.
    #[error("cannot generate the simulated cluster's certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the generated certificate or the protocol versions.
    #[error("cannot build the simulated cluster's TLS config: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding or inspecting the listener failed.
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[from] std::io::Error),
    /// The system random source failed, so no secret token can be made.
    #[error("cannot generate the admin token: the system random source failed: {0}")]
    Random(String),
    /// The dedicated runtime of `SimCluster::spawn` could not be built or did not report.
    #[error("cannot run the simulated cluster's thread: {0}")]
    Thread(String),
}

/// The CA and the TLS config made for one simulated cluster.
pub(crate) struct Pki {
    pub ca_pem: String,
    pub tls: Arc<rustls::ServerConfig>,
}

/// A fresh CA, and a server certificate it signs for 127.0.0.1 and localhost.
pub(crate) fn make_pki() -> Result<Pki, StartError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut ca_dn = DistinguishedName::new();
    ca_dn.push(DnType::CommonName, "kinvoke-simcluster CA (test double)");
    ca_params.distinguished_name = ca_dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver (kinvoke-simcluster)");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    // never the process-wide default provider: the gateway's tests may install another
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        tls: Arc::new(config),
    })
}

/// State shared by every connection of one simulated cluster.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub tokens: Vec<TokenIdentity>,
    pub denied: Mutex<Vec<String>>,
    pub requests: Mutex<std::collections::VecDeque<RecordedRequest>>,
    /// the most requests kept; the oldest are dropped first
    pub max_recorded_requests: usize,
    pub shutdown: watch::Receiver<bool>,
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent
/// (single inserts/removes), so a panic elsewhere must not wedge the simulation.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A response body: either complete, or fed chunk by chunk from a channel (watches).
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Accepts connections until shutdown is signalled.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut shutdown = shared.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "simcluster: accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(tcp, peer, acceptor, shared).await;
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let mut shutdown = shared.shutdown.clone();
    if *shutdown.borrow() {
        return;
    }
    // a client that connects and never speaks must not outlive the server
    tokio::select! {
        () = serve_tls(tcp, peer, acceptor, shared) => {}
        _ = shutdown.changed() => {}
    }
}

async fn serve_tls(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    // a plain-HTTP client gets Go's answer instead of a TLS alert it cannot read
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] != 0x16 => {
            let _ = tcp
                .write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                .await;
            let _ = tcp.shutdown().await;
            return;
        }
        Ok(_) => {}
        Err(_) => return,
    }
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "simcluster: TLS handshake failed");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { crate::handler::handle(shared, req).await }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%peer, error = %e, "simcluster: connection ended with an error");
    }
}
