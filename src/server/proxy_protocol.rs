//! Reading the PROXY protocol header (v1 text or v2 binary) that an L4 load
//! balancer puts in front of a connection, so the real client address is
//! known. Parsing is done by the `ppp` crate; this module only reads exactly
//! the header's bytes off the socket (never more, so the TLS ClientHello
//! behind it is left untouched).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature that starts a v2 header.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// A v1 header is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 header we accept (addresses plus TLVs such as AWS's VPC endpoint id).
const V2_MAX: usize = 16 + 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed or failed before a PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Reads one PROXY header from `io`. Returns the client address it carries,
/// or `None` for a header that carries none (v1 `UNKNOWN`, v2 `LOCAL` such
/// as a load balancer's health check): the peer address then stands.
pub async fn read_header<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; 16];
    io.read_exact(&mut buf[..5]).await?;
    if &buf[..5] == b"PROXY" {
        // v1: read up to and including "\r\n", one byte at a time so nothing past it is consumed.
        buf.truncate(5);
        loop {
            let byte = io.read_u8().await?;
            buf.push(byte);
            if buf.ends_with(b"\r\n") {
                break;
            }
            if buf.len() >= V1_MAX {
                return Err(ProxyHeaderError::Malformed("v1 header longer than 107 bytes".into()));
            }
        }
        let header = ppp::v1::Header::try_from(&buf[..]).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
        return Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            ppp::v1::Addresses::Unknown => None,
        });
    }
    if buf[..5] != V2_SIGNATURE[..5] {
        return Err(ProxyHeaderError::Missing);
    }
    io.read_exact(&mut buf[5..16]).await?;
    if buf[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_MAX {
        return Err(ProxyHeaderError::Malformed(format!(
            "v2 header of {len} bytes is too long"
        )));
    }
    buf.resize(16 + len, 0);
    io.read_exact(&mut buf[16..]).await?;
    let header = ppp::v2::Header::try_from(&buf[..]).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
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
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let mut io = bytes;
        let result = read_header(&mut io).await.map_err(|e| e.to_string());
        (result, io.to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6_leave_the_rest_unread() {
        let (r, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n\x16\x03\x01").await;
        assert_eq!(r, Ok(Some("203.0.113.7:56324".parse().expect("addr"))));
        assert_eq!(rest, b"\x16\x03\x01");
        let (r, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n").await;
        assert_eq!(r, Ok(Some("[2001:db8::1]:4000".parse().expect("addr"))));
        let (r, rest) = parse(b"PROXY UNKNOWN\r\nGET").await;
        assert_eq!(r, Ok(None));
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:40000".parse::<SocketAddr>().expect("addr"),
                "10.0.0.1:443".parse::<SocketAddr>().expect("addr"),
            ),
        )
        .build()
        .expect("header");
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r, Ok(Some("198.51.100.9:40000".parse().expect("addr"))));
        assert_eq!(rest, b"\x16\x03\x01");

        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .expect("header");
        assert_eq!(parse(&local).await.0, Ok(None));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        assert!(parse(b"\x16\x03\x01\x02\x00").await.0.is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n").await.0.is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4\r\n").await.0.is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443 and then a lot more junk than fits into a v1 header line at all, surely\r\n").await.0.is_err());
        assert!(parse(b"PROX").await.0.is_err());
    }
}
