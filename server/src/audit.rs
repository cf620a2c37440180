//! The one call site for security decisions: every refused connection, failed
//! authentication, authorization decision (allowed or denied) and command transition
//! goes through [`record`]. Today it is a structured `tracing` event on the
//! `kinvoke::audit` target; the tamper-evident log plugs in here.

use std::net::SocketAddr;

/// An auditable event. Fields never hold secrets (tokens, keys, file contents).
#[derive(Debug, Clone)]
pub enum AuditEvent<'a> {
    /// A connection refused before TLS.
    ConnectionRefused {
        /// Listener name.
        listener: &'a str,
        /// The TCP peer.
        peer: SocketAddr,
        /// Why (names the rule: the range list, or the untrusted PROXY header).
        reason: &'a str,
    },
    /// Credentials were missing or wrong.
    AuthenticationFailed {
        /// Listener name.
        listener: &'a str,
        /// Caller address.
        source: SocketAddr,
        /// Why (never the credential).
        reason: &'a str,
    },
    /// An authorization decision.
    Decision {
        /// Principal id.
        principal: &'a str,
        /// Auth method.
        auth_method: &'a str,
        /// Caller address.
        source: std::net::IpAddr,
        /// Action name.
        action: &'a str,
        /// Cluster.
        cluster: &'a str,
        /// Command id, when the decision is about one command.
        command_id: Option<&'a str>,
        /// Allowed or not.
        allowed: bool,
        /// The granting assignment, or the reason for a deny.
        detail: &'a str,
    },
}

/// Records an event.
pub fn record(event: &AuditEvent<'_>) {
    match event {
        AuditEvent::ConnectionRefused {
            listener,
            peer,
            reason,
        } => tracing::warn!(
            target: "kinvoke::audit",
            event = "connection_refused",
            listener,
            peer = %peer,
            reason,
        ),
        AuditEvent::AuthenticationFailed {
            listener,
            source,
            reason,
        } => tracing::warn!(
            target: "kinvoke::audit",
            event = "authentication_failed",
            listener,
            source = %source,
            reason,
        ),
        AuditEvent::Decision {
            principal,
            auth_method,
            source,
            action,
            cluster,
            command_id,
            allowed,
            detail,
        } => tracing::info!(
            target: "kinvoke::audit",
            event = "authorization",
            principal,
            auth_method,
            source = %source,
            action,
            cluster,
            command_id = command_id.unwrap_or_default(),
            decision = if *allowed { "allow" } else { "deny" },
            detail,
        ),
    }
}
