//! One probe's request: connect (with verified TLS for https), GET the
//! tracked URL with the branded Host, and read the body within its own
//! bound, keeping its start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Outcome;

/// The roots to verify against: `ca_file`'s, else the public web roots.
pub(super) fn roots(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in crate::tls::load_certs(path).map_err(anyhow::Error::msg)? {
                roots.add(cert)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

pub(super) fn client_tls(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The leaf certificate an https answer came with (in its extensions).
#[derive(Clone)]
pub(super) struct PeerLeaf(pub(super) rustls_pki_types::CertificateDer<'static>);

/// TLS with SNI = host, verified; then GET the tracked URL, up to the response head.
pub(super) async fn https(
    host: &str,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
) -> Result<Head, Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        Outcome::fail(
            format!("cannot connect to {addr}: {e}"),
            "check that linkgate listens there and the firewall allows 443",
        )
    })?;
    let Ok(name) = rustls_pki_types::ServerName::try_from(host.to_owned()) else {
        return Err(Outcome::fail(
            format!("{host} is not a valid name"),
            "fix the host name in the config",
        ));
    };
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| tls_failure(host, &e))?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| PeerLeaf(leaf.clone().into_owned()));
    let mut head = fetch(stream, host, url).await?;
    if let Some(leaf) = leaf {
        head.extensions_mut().insert(leaf);
    }
    Ok(head)
}

/// Plain http: GET the tracked URL, up to the response head.
pub(super) async fn plain(host: &str, addr: SocketAddr, url: &str) -> Result<Head, Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        Outcome::fail(
            format!("cannot connect to {addr}: {e}"),
            "links in emails sent before the switch are plain http: keep the http listener reachable on port 80",
        )
    })?;
    fetch(tcp, host, url).await
}

/// Turns a TLS error into "Your connection is not private" with its cause
/// ([`crate::tls::failure`]) and the fix for a host linkgate serves.
fn tls_failure(host: &str, e: &std::io::Error) -> Outcome {
    use crate::tls::failure::Failure;
    let failure = Failure::of(e);
    let fix = match failure {
        Failure::Expired => "renew the certificate; linkgate reloads it without a restart",
        Failure::NotValidYet => "check the clocks, or wait until it is valid",
        Failure::WrongName => {
            "get a certificate that names this host; a wildcard covers exactly one label (*.example.com does not \
             cover a.b.example.com)"
        }
        Failure::UnknownIssuer => {
            "serve the full chain (fullchain.pem, leaf first, then intermediates) from a public CA"
        }
        Failure::BadSignature => "serve the certificate the trusted CA issued, with its chain",
        Failure::CaAsEndEntity => "issue a leaf certificate for this host from a CA and serve that (with its chain)",
        Failure::UnrecognisedName => "add this host as a [[host]] in linkgate's config",
        Failure::Other(_) => "check the certificate and the TLS settings",
        Failure::Handshake(_) => "check that the address is linkgate's https listener",
    };
    Outcome::fail(format!("Your connection is not private: {}", failure.cause(host)), fix)
}

/// The response head of one GET; its body is still to be read.
pub(super) type Head = http::Response<hyper::body::Incoming>;

/// How much of a body is kept to look for a provider's error page.
pub(super) const BODY_KEPT: usize = 64 * 1024;
/// A body still going after this much is reported as one that does not end
/// (a tracked link's answer is a redirect or a small page).
pub(super) const BODY_READ_AT_MOST: usize = 16 << 20;

/// What one GET got: its status and the start of its body.
pub(super) struct Answer {
    pub(super) status: u16,
    /// The first [`BODY_KEPT`] bytes, decoded lossily. Searched for a
    /// provider's error page, never printed.
    pub(super) body: String,
    /// Why the body is incomplete, when it did not end.
    pub(super) unfinished: Option<String>,
}

async fn fetch<IO>(io: IO, host: &str, url: &str) -> Result<Head, Outcome>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: &dyn std::fmt::Display| {
        Outcome::fail(
            format!("the request failed: {e}"),
            "check that linkgate answers on this address",
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(url)
        .header(http::header::HOST, host)
        .header(
            http::header::USER_AGENT,
            concat!("linkgate-doctor/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| failed(&e))?;
    sender.send_request(req).await.map_err(|e| failed(&e))
}

/// Reads the body of `head` for at most `limit` (its own bound, after the
/// head's) and keeps its start.
pub(super) async fn read_body(head: Head, limit: Duration) -> Answer {
    let status = head.status().as_u16();
    let mut body = head.into_body();
    let mut kept = Vec::new();
    let mut received = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let data = match frame.map(http_body::Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(e) => return Some(format!("the body broke off after {received} bytes: {e}")),
            };
            received += data.len();
            // The start is enough to recognise a provider's page; the rest
            // is read (not kept) only to see that the body ends.
            let room = BODY_KEPT - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if received > BODY_READ_AT_MOST {
                return Some(format!("the body did not end after {} MiB", BODY_READ_AT_MOST >> 20));
            }
        }
        None
    };
    let unfinished = tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Some(format!(
            "the body did not end within {limit:?} ({received} bytes arrived)"
        ))
    });
    Answer {
        status,
        body: String::from_utf8_lossy(&kept).into_owned(),
        unfinished,
    }
}
