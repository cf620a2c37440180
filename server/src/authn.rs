//! Who the caller is. For now the only credential is the client certificate the listener
//! verified against its client CA; its identity is the first URI SAN, else the first DNS
//! SAN, else the subject common name.

use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ingress::ConnInfo;

/// How a principal proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate verified during the TLS handshake.
    Mtls,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mtls => "mtls",
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable identity, e.g. `alice` or `spiffe://corp/ci`.
    pub id: String,
    /// Certificate subject, for logs.
    pub subject: String,
    /// How they authenticated.
    pub auth_method: AuthMethod,
    /// Address the gateway saw.
    pub source: IpAddr,
    /// Listener the call came in on.
    pub listener: String,
}

/// Why a caller could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// The connection carries no verified client certificate.
    #[error("a client certificate signed by the gateway's client CA is required")]
    NoClientCertificate,
    /// The certificate names nobody.
    #[error("the client certificate has no URI SAN, DNS SAN or common name to identify the caller")]
    NoIdentity,
    /// The certificate could not be parsed.
    #[error("the client certificate cannot be parsed")]
    Unparsable,
}

/// Identifies the caller of a connection.
pub fn authenticate(conn: &ConnInfo) -> Result<Principal, AuthnError> {
    let cert = conn
        .peer_certs
        .as_ref()
        .and_then(|certs| certs.first())
        .ok_or(AuthnError::NoClientCertificate)?;
    let (id, subject) = identity_of(cert)?;
    Ok(Principal {
        id,
        subject,
        auth_method: AuthMethod::Mtls,
        source: conn.remote.ip(),
        listener: conn.listener.to_string(),
    })
}

/// The identity and subject of a certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<(String, String), AuthnError> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).map_err(|_| AuthnError::Unparsable)?;
    let subject = cert.subject().to_string();
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    let id = uri
        .or_else(dns)
        .or_else(cn)
        .filter(|id| !id.is_empty())
        .ok_or(AuthnError::NoIdentity)?;
    Ok((id, subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn uri_san_wins_over_common_name() {
        let ca = CertificateAuthority::new("ca").unwrap();
        let cert = ca
            .client_cert("alice", Some("spiffe://corp/alice"))
            .unwrap();
        let (id, subject) = identity_of(&der(&cert.cert_pem)).unwrap();
        assert_eq!(id, "spiffe://corp/alice");
        assert_eq!(subject, "CN=alice");
    }

    #[test]
    fn common_name_is_the_fallback() {
        let ca = CertificateAuthority::new("ca").unwrap();
        let cert = ca.client_cert("ci-bot", None).unwrap();
        assert_eq!(identity_of(&der(&cert.cert_pem)).unwrap().0, "ci-bot");
    }

    #[test]
    fn garbage_is_unparsable() {
        assert_eq!(
            identity_of(&CertificateDer::from(vec![1, 2, 3])).unwrap_err(),
            AuthnError::Unparsable
        );
    }
}
