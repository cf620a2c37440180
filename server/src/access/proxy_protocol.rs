//! PROXY protocol (v1 text, v2 binary) in front of TLS, for gateways behind a TCP load
//! balancer. The header is believed only from `trusted_proxies`; from anyone else a
//! header is a spoofing attempt and the connection is refused. Parsing is `ppp`'s; this
//! module only reads exactly the header's bytes so the TLS stream behind it is untouched.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec: 107).
const V1_MAX: usize = 107;
/// Largest v2 payload accepted (addresses plus TLVs); AWS NLB and HAProxy stay far below.
const V2_MAX_PAYLOAD: usize = 4096;

/// A PROXY header that could not be read or makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The peer closed or the read failed mid-header.
    #[error("connection ended inside the PROXY header: {0}")]
    Io(String),
    /// The header is malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Whether the first bytes on the connection start a PROXY header (v1 or v2).
/// Looks without consuming; a peer that sends fewer bytes is judged on what it sent.
pub async fn starts_with_header(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 5];
    let n = tcp.peek(&mut buf).await?;
    let seen = &buf[..n];
    Ok(n > 0 && (b"PROXY".starts_with(seen) || V2_SIGNATURE.starts_with(seen)))
}

/// Reads one PROXY header from `tcp` (a connection, or any byte source) and returns
/// the client address it carries; `None` for a `LOCAL` (v2) or `UNKNOWN` (v1) header,
/// which mean "use the proxy's own address". Reads exactly the header's bytes.
pub async fn read_header<R: AsyncRead + Unpin>(
    tcp: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let io = |e: std::io::Error| ProxyError::Io(e.to_string());
    let mut head = [0u8; 5];
    tcp.read_exact(&mut head).await.map_err(io)?;
    if &head == b"PROXY" {
        let mut line = head.to_vec();
        // byte by byte: reading further would eat the TLS ClientHello behind the header
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyError::Malformed(format!(
                    "v1 header longer than {V1_MAX} bytes"
                )));
            }
            line.push(tcp.read_u8().await.map_err(io)?);
        }
        let header = ppp::v1::Header::try_from(line.as_slice())
            .map_err(|e| ProxyError::Malformed(format!("v1: {e:?}")))?;
        return Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Unknown => None,
        });
    }
    if head[..] != V2_SIGNATURE[..5] {
        return Err(ProxyError::Malformed("no PROXY signature".to_owned()));
    }
    let mut rest = [0u8; 11];
    tcp.read_exact(&mut rest).await.map_err(io)?;
    let mut full = head.to_vec();
    full.extend_from_slice(&rest);
    if full[..12] != V2_SIGNATURE {
        return Err(ProxyError::Malformed("bad v2 signature".to_owned()));
    }
    let len = usize::from(u16::from_be_bytes([full[14], full[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyError::Malformed(format!(
            "v2 payload of {len} bytes exceeds {V2_MAX_PAYLOAD}"
        )));
    }
    let start = full.len();
    full.resize(start + len, 0);
    tcp.read_exact(&mut full[start..]).await.map_err(io)?;
    let header = ppp::v2::Header::try_from(full.as_slice())
        .map_err(|e| ProxyError::Malformed(format!("v2: {e:?}")))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Sends `bytes` then "TLS" over a real socket; returns what the reader parsed and
    /// the bytes left behind the header.
    async fn read(bytes: Vec<u8>) -> (Result<Option<SocketAddr>, ProxyError>, bool, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            s.write_all(b"TLS").await.unwrap();
            s.shutdown().await.unwrap();
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        writer.await.unwrap();
        let detected = starts_with_header(&tcp).await.unwrap();
        let parsed = read_header(&mut tcp).await;
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        (parsed, detected, rest)
    }

    #[tokio::test]
    async fn v1_tcp4_gives_the_client_address_and_leaves_tls_untouched() {
        let (parsed, detected, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n".to_vec()).await;
        assert!(detected);
        assert_eq!(parsed.unwrap(), Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (parsed, _, _) =
            read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n".to_vec()).await;
        assert_eq!(
            parsed.unwrap(),
            Some("[2001:db8::7]:51000".parse().unwrap())
        );
        let (parsed, _, rest) = read(b"PROXY UNKNOWN\r\n".to_vec()).await;
        assert_eq!(parsed.unwrap(), None);
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:4000".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let (parsed, detected, rest) = read(header).await;
        assert!(detected);
        assert_eq!(parsed.unwrap(), Some("198.51.100.9:4000".parse().unwrap()));
        assert_eq!(rest, b"TLS");

        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (parsed, _, rest) = read(local).await;
        assert_eq!(parsed.unwrap(), None);
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn malformed_headers_are_errors() {
        let (parsed, _, _) = read(b"PROXY TCP4 nonsense\r\n".to_vec()).await;
        assert!(
            matches!(parsed, Err(ProxyError::Malformed(_))),
            "{parsed:?}"
        );
        let (parsed, _, _) = read(vec![b'P'; 200]).await;
        assert!(parsed.is_err());
    }

    #[tokio::test]
    async fn a_tls_client_hello_is_not_a_header() {
        let (_, detected, _) = read(vec![0x16, 0x03, 0x01, 0x02, 0x00]).await;
        assert!(!detected);
    }
}
