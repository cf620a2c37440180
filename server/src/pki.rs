//! Certificate factory for `kinvoke-gateway dev` and the tests: a CA, server
//! certificates for host names and IPs, and client certificates for a principal.
//! Not for production PKI: operators bring their own certificates.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, PEM encoded.
pub struct CertifiedKey {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM); never print it.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// A certificate authority that can sign server and client certificates.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl CertificateAuthority {
    /// A fresh self-signed CA with this common name.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            key_pem,
        })
    }

    /// The CA certificate and key.
    pub fn certified_key(&self) -> CertifiedKey {
        CertifiedKey {
            cert_pem: self.issuer.pem(),
            key_pem: self.key_pem.clone(),
        }
    }

    /// The CA certificate (PEM), for trust stores.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for these DNS names and IP addresses.
    pub fn server_cert(&self, names: &[&str]) -> Result<CertifiedKey, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(names.first().copied().unwrap_or("kinvoke-gateway"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose common name (and URI SAN, if given) name the caller.
    pub fn client_cert(
        &self,
        common_name: &str,
        uri: Option<&str>,
    ) -> Result<CertifiedKey, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// [`CertificateAuthority::client_cert`] valid only between two dates, each given as
    /// (year, month, day) in UTC: for certificates that have expired or are not valid
    /// yet.
    pub fn client_cert_valid(
        &self,
        common_name: &str,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Result<CertifiedKey, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertifiedKey, rcgen::Error> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}
