//! Listeners: bind, accept, then per connection and off the accept loop: believe a
//! PROXY header only from trusted proxies, refuse addresses outside the listener's
//! allowlist before any TLS work, complete the rustls handshake, and hand tonic a
//! connection that carries who and where the peer is.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::access::cidr::CidrSet;
use crate::access::proxy_protocol;
use crate::admission::{KeyedPermit, KeyedSlots};
use crate::audit::{Audit, AuditEvent, REFUSAL_LINES_BURST, REFUSAL_LINES_PER_SECOND, Throttle};
use crate::connection::{ConnInfo, ListenerAuth};

/// A listener that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("listener \"{listener}\": {what} {path}: {message}")]
    Pem {
        /// Listener name.
        listener: String,
        /// Which file (certificate, key, client CA).
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificates or key.
    #[error("listener \"{listener}\": TLS setup failed: {source}")]
    Tls {
        /// Listener name.
        listener: String,
        /// rustls' error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The address could not be bound.
    #[error("listener \"{listener}\": cannot listen on {address}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        address: SocketAddr,
        /// OS error.
        source: io::Error,
    },
}

/// A bound listener with its TLS settings.
pub struct BoundListener {
    name: Arc<str>,
    tcp: TcpListener,
    tls: TlsAcceptor,
    gate: Arc<Gate>,
    auth: ListenerAuth,
}

/// The pre-TLS checks of a listener.
#[derive(Debug)]
struct Gate {
    ranges: CidrSet,
    trusted_proxies: CidrSet,
}

impl Gate {
    fn permits(&self, ip: std::net::IpAddr) -> bool {
        self.ranges.is_empty() || self.ranges.contains(ip)
    }

    /// The caller's address, or why the connection is refused.
    async fn admit(&self, tcp: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, String> {
        // refuse before TLS so unlisted peers cost no crypto
        if self.trusted_proxies.contains(peer.ip()) {
            let header = proxy_protocol::starts_with_header(tcp)
                .await
                .map_err(|e| format!("read failed: {e}"))?;
            let source = if header {
                proxy_protocol::read_header(tcp)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(canonical_addr)
                    .unwrap_or(peer)
            } else {
                peer
            };
            if !self.permits(source.ip()) {
                return Err(format!(
                    "source {} (via trusted proxy {peer}) is not in authorized_ip_ranges",
                    source.ip()
                ));
            }
            return Ok(source);
        }
        if !self.permits(peer.ip()) {
            return Err(format!(
                "source {} is not in authorized_ip_ranges",
                peer.ip()
            ));
        }
        let header = proxy_protocol::starts_with_header(tcp)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if header {
            return Err(format!(
                "PROXY protocol header from {}, which is not in trusted_proxies",
                peer.ip()
            ));
        }
        Ok(peer)
    }
}

impl BoundListener {
    /// The bound address (with the real port when configured with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Listener name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Builds the rustls server config of a listener (client certificates required).
pub fn tls_config(listener: &ListenerConfig) -> Result<Arc<rustls::ServerConfig>, IngressError> {
    let pem_err = |what: &'static str, path: &Path, message: String| IngressError::Pem {
        listener: listener.name.clone(),
        what,
        path: path.display().to_string(),
        message,
    };
    let tls_err = |source: Box<dyn std::error::Error + Send + Sync>| IngressError::Tls {
        listener: listener.name.clone(),
        source,
    };
    let certs = read_certs(&listener.tls_cert)
        .map_err(|m| pem_err("certificate", &listener.tls_cert, m))?;
    let key = PrivateKeyDer::from_pem_file(&listener.tls_key)
        .map_err(|e| pem_err("private key", &listener.tls_key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(Box::new(e)))?;
    let builder = match &listener.client_ca {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certs(client_ca).map_err(|m| pem_err("client CA", client_ca, m))? {
                roots
                    .add(ca)
                    .map_err(|e| pem_err("client CA", client_ca, e.to_string()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            // token listeners ask for a certificate but let callers without one through
            // to the token check
            let verifier = if listener.auth.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| tls_err(Box::new(e)))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(Box::new(e)))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(certs)
}

/// Loads TLS settings and binds every listener.
pub async fn bind(listeners: &[ListenerConfig]) -> Result<Vec<BoundListener>, IngressError> {
    let mut bound = Vec::with_capacity(listeners.len());
    for l in listeners {
        let tls = TlsAcceptor::from(tls_config(l)?);
        let tcp = TcpListener::bind(l.address)
            .await
            .map_err(|source| IngressError::Bind {
                listener: l.name.clone(),
                address: l.address,
                source,
            })?;
        bound.push(BoundListener {
            name: l.name.as_str().into(),
            tcp,
            tls,
            gate: Arc::new(Gate {
                ranges: l.authorized_ip_ranges.clone(),
                trusted_proxies: l.trusted_proxies.clone(),
            }),
            auth: l.auth,
        });
    }
    Ok(bound)
}

/// How many connections the listeners keep open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From one source address (`limits.max_connections_per_source`).
    pub per_source: usize,
    /// All listeners together (`limits.max_connections`).
    pub total: usize,
    /// Longest a connection may take to send its PROXY header and finish the TLS
    /// handshake (`limits.handshake_timeout`).
    pub handshake_timeout: Duration,
}

/// The open connections, counted in total and per source address. A connection holds
/// its [`ConnectionSlot`] from accept (total) and from the moment its source is known
/// (per source) until it closes.
#[derive(Debug)]
struct ConnectionSlots {
    limits: ConnectionLimits,
    total: Arc<tokio::sync::Semaphore>,
    per_source: KeyedSlots<std::net::IpAddr>,
}

/// One connection's places in [`ConnectionSlots`]; given back on drop.
#[derive(Debug)]
struct ConnectionSlot {
    _total: tokio::sync::OwnedSemaphorePermit,
    source: Option<KeyedPermit<std::net::IpAddr>>,
}

impl ConnectionSlots {
    fn new(limits: ConnectionLimits) -> Self {
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(limits.total)),
            per_source: KeyedSlots::new(limits.per_source),
            limits,
        }
    }

    /// A place among all connections, or why there is none.
    fn accept(&self) -> Result<ConnectionSlot, String> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| {
            format!(
                "the gateway has {} connections open (limits.max_connections = {})",
                self.limits.total, self.limits.total
            )
        })?;
        Ok(ConnectionSlot {
            _total: total,
            source: None,
        })
    }

    /// Counts `slot`'s connection against its source address too, or says why it may
    /// not.
    fn admit_source(
        &self,
        slot: &mut ConnectionSlot,
        source: std::net::IpAddr,
    ) -> Result<(), String> {
        let permit = self.per_source.try_acquire(&source).ok_or_else(|| {
            format!(
                "source {source} has {} connections open (limits.max_connections_per_source = {})",
                self.per_source.held(&source),
                self.limits.per_source
            )
        })?;
        slot.source = Some(permit);
        Ok(())
    }
}

/// Accepts on every listener until `stop` fires; yields connections whose TLS handshake
/// succeeded. Handshakes run in their own tasks so a slow peer delays nobody else.
/// Connections over `limits` are closed at once and audited as `connection_refused`.
pub fn incoming(
    listeners: Vec<BoundListener>,
    limits: ConnectionLimits,
    stop: CancellationToken,
    audit: Audit,
) -> impl Stream<Item = Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let slots = Arc::new(ConnectionSlots::new(limits));
    // refused connections, capped per address in the audit log
    let refusals = Arc::new(Throttle::new(REFUSAL_LINES_PER_SECOND, REFUSAL_LINES_BURST));
    for listener in listeners {
        tokio::spawn(accept_loop(
            listener,
            slots.clone(),
            refusals.clone(),
            tx.clone(),
            stop.clone(),
            audit.clone(),
        ));
    }
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: BoundListener,
    slots: Arc<ConnectionSlots>,
    refusals: Arc<Throttle<std::net::IpAddr>>,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
    stop: CancellationToken,
    audit: Audit,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.tcp.accept() => accepted,
        };
        let (mut tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // e.g. EMFILE: back off briefly instead of spinning
                tracing::warn!(listener = %listener.name, %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // a dual-stack socket reports IPv4 callers as ::ffff:a.b.c.d; everything after
        // this point (rules, audit, whoami) sees the plain IPv4 address
        let peer = canonical_addr(peer);
        let mut slot = match slots.accept() {
            Ok(slot) => slot,
            Err(reason) => {
                audit.record_throttled(&refusals, &peer.ip(), |unrecorded_before| {
                    AuditEvent::ConnectionRefused {
                        listener: listener.name.to_string(),
                        peer: peer.to_string(),
                        reason,
                        unrecorded_before,
                    }
                });
                continue;
            }
        };
        let tls = listener.tls.clone();
        let handshake_timeout = slots.limits.handshake_timeout;
        let name = listener.name.clone();
        let gate = listener.gate.clone();
        let auth = listener.auth;
        let tx = tx.clone();
        let audit = audit.clone();
        let slots = slots.clone();
        let refusals = refusals.clone();
        tokio::spawn(async move {
            let handshake = async {
                let admitted = gate
                    .admit(&mut tcp, peer)
                    .await
                    .inspect_err(|_| crate::metrics::metrics().network_refused(&name))
                    .and_then(|source| slots.admit_source(&mut slot, source.ip()).map(|()| source));
                let source = match admitted {
                    Ok(source) => source,
                    Err(reason) => {
                        audit.record_throttled(&refusals, &peer.ip(), |unrecorded_before| {
                            AuditEvent::ConnectionRefused {
                                listener: name.to_string(),
                                peer: peer.to_string(),
                                reason,
                                unrecorded_before,
                            }
                        });
                        return None;
                    }
                };
                Some((source, tls.accept(tcp).await))
            };
            match tokio::time::timeout(handshake_timeout, handshake).await {
                Ok(None) => {}
                Ok(Some((source, Ok(stream)))) => {
                    let peer_certs = stream.get_ref().1.peer_certificates().map(|certs| {
                        Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect())
                    });
                    let info = ConnInfo {
                        listener: name,
                        peer,
                        source,
                        peer_certs,
                        auth,
                    };
                    let _ = tx
                        .send(Ok(Conn {
                            stream,
                            info,
                            _slot: slot,
                            first_bytes: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
                        }))
                        .await;
                }
                Ok(Some((source, Err(err)))) => {
                    crate::metrics::metrics().authn_failed("tls", "handshake_refused");
                    audit.record_throttled(&refusals, &peer.ip(), |unrecorded_before| {
                        AuditEvent::AuthenticationFailed {
                            listener: name.to_string(),
                            source: source.to_string(),
                            reason: format!("TLS handshake refused: {err}"),
                            unrecorded_before,
                        }
                    });
                }
                Err(_) => {
                    audit.record_throttled(&refusals, &peer.ip(), |unrecorded_before| {
                        AuditEvent::ConnectionRefused {
                            listener: name.to_string(),
                            peer: peer.to_string(),
                            reason: format!(
                                "no PROXY header and TLS handshake within {} (limits.handshake_timeout)",
                                humantime::format_duration(handshake_timeout)
                            ),
                            unrecorded_before,
                        }
                    });
                }
            }
        });
    }
}

/// A TLS connection handed to tonic, carrying [`ConnInfo`] into request extensions.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    /// Its place in the connection limits, held while it is open.
    _slot: ConnectionSlot,
    /// Until the client's first bytes after the TLS handshake (its HTTP/2 preface):
    /// when they must have arrived. A client that completes TLS and then says nothing
    /// is dropped rather than holding its place.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.first_bytes.is_some() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_bytes = None,
                Poll::Pending => {
                    if let Some(deadline) = self.first_bytes.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no HTTP/2 preface within limits.handshake_timeout after TLS",
                        )));
                    }
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The address with an IPv4-mapped IPv6 address turned back into IPv4.
fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::access::cidr::canonical(addr.ip()), addr.port())
}
/// One TLS gRPC listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name used in logs and audit.
    pub name: String,
    /// Socket address to bind.
    pub address: SocketAddr,
    /// Server certificate chain (PEM).
    pub tls_cert: std::path::PathBuf,
    /// Server private key (PEM).
    pub tls_key: std::path::PathBuf,
    /// CA bundle (PEM) that client certificates must chain to; set when certificates are accepted.
    pub client_ca: Option<std::path::PathBuf>,
    /// Inside the private network, or reachable from outside.
    pub exposure: Exposure,
    /// Peers allowed to connect; empty = not restricted.
    pub authorized_ip_ranges: CidrSet,
    /// Peers whose PROXY protocol header is believed.
    pub trusted_proxies: CidrSet,
    /// Credentials accepted.
    pub auth: ListenerAuth,
}

/// Where a listener can be reached from (like EKS endpoint access modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exposure {
    /// Inside the VNet/VPC only.
    #[default]
    Private,
    /// Reachable from outside; should carry `authorized_ip_ranges`.
    Public,
}
