//! What the gateway knows about one caller's connection, shared by the listener that
//! accepts it (`ingress`) and the checks that identify the caller (`authn`): a leaf, so
//! neither imports the other.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// What the service knows about a connection's peer.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Listener name.
    pub listener: Arc<str>,
    /// The TCP peer (a load balancer, when PROXY protocol is in use).
    pub peer: SocketAddr,
    /// The caller's address: the PROXY header's from a trusted proxy, else the peer.
    pub source: SocketAddr,
    /// Verified client certificate chain, leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Credentials this listener accepts.
    pub auth: ListenerAuth,
}

/// Which credentials a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerAuth {
    /// Client certificates identify callers.
    pub mtls: bool,
    /// Bearer tokens (OIDC or static) identify callers.
    pub tokens: bool,
    /// A verified client certificate is required even when a token identifies the caller.
    pub require_client_cert: bool,
}

impl ListenerAuth {
    /// How to present what this listener accepts, for refusal messages.
    pub fn accepted(self) -> &'static str {
        match (self.mtls, self.tokens) {
            (true, true) => "a client certificate or a bearer token",
            (false, true) => "a bearer token (--token, --token-file or KINVOKE_TOKEN)",
            _ => "a client certificate",
        }
    }
}

/// The gRPC method of a request (`/package.Service/Method`), put in the request's
/// extensions by the transport layer so the services can name it in audit events.
#[derive(Debug, Clone)]
pub struct RpcMethod(pub Arc<str>);
