//! Clients of linkgate: rustls and reqwest clients that trust the test CA,
//! raw HTTP/1 over TLS or plain TCP, reading what comes back, and the
//! admin listener's metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::{Linkgate, Pki, CLICK, HANG_GUARD};

/// A rustls client config trusting only `pki`, offering `alpn`.
pub fn client_tls(pki: &Pki, alpn: &[&[u8]]) -> rustls::ClientConfig {
    client_tls_trusting(&pki.ca_der, alpn)
}

/// A client configuration trusting only `root`, offering `alpn`.
pub fn client_tls_trusting(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("add root");
    let mut config = rustls::ClientConfig::builder_with_provider(linkgate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A reqwest client trusting `pki` that resolves each of `hosts` to linkgate.
pub fn client(pki: &Pki, lg: &Linkgate, hosts: &[&str]) -> reqwest::Client {
    client_with(pki, lg, hosts, false)
}

/// Like [`client`], speaking HTTP/2 only (ALPN h2).
pub fn h2_client(pki: &Pki, lg: &Linkgate, hosts: &[&str]) -> reqwest::Client {
    client_with(pki, lg, hosts, true)
}

fn client_with(pki: &Pki, lg: &Linkgate, hosts: &[&str], h2: bool) -> reqwest::Client {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(pki, alpn))
        .tls_info(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HANG_GUARD);
    builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    for host in hosts {
        // reqwest resolves by name only; the URL's port picks the listener.
        builder = builder.resolve(host, lg.https);
    }
    builder.build().expect("client")
}

/// Sends raw bytes over TLS with SNI `sni` and returns everything read until the server closes.
pub async fn raw_tls(pki: &Pki, addr: SocketAddr, sni: &str, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sends raw bytes over plain TCP and returns everything read until the server closes.
pub async fn raw_plain(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tcp.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// True once the server has closed `s` (EOF or reset), within `within`.
pub async fn closed_by_server<S: tokio::io::AsyncRead + Unpin + ?Sized>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The status code at the start of a raw HTTP/1 response.
pub fn status_of(raw: &str) -> u16 {
    raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// True when the error chain contains a rustls alert `alert`, sent by the peer.
pub fn has_alert(err: &(dyn std::error::Error + 'static), alert: rustls::AlertDescription) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::AlertReceived(a)) = e.downcast_ref::<rustls::Error>() {
            if *a == alert {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if has_alert(inner, alert) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}

/// `GET <path>` for [`CLICK`] as raw HTTP/1.1, keep-alive.
pub fn http1_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {CLICK}\r\n\r\n")
}

/// One raw HTTP/1 response as [`read_response`] read it.
pub struct RawResponse {
    /// The head, up to and including the blank line.
    pub head: String,
    /// The `Content-Length` the head gave, if any.
    pub content_length: Option<usize>,
    /// That many bytes of body (none without a `Content-Length`).
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        status_of(&self.head)
    }

    /// Status and body, for a response that must say its length.
    pub fn status_and_body(self) -> (u16, Vec<u8>) {
        self.content_length.expect("content-length");
        (self.status(), self.body)
    }

    /// Head and body as text.
    pub fn text(&self) -> String {
        format!("{}{}", self.head, String::from_utf8_lossy(&self.body))
    }
}

/// Reads one HTTP/1 response (head, then a `Content-Length` body) from `s`,
/// never past its end, so the next response on the connection is left
/// unread; panics if the connection closes first or after [`HANG_GUARD`].
pub async fn read_response<S: tokio::io::AsyncRead + Unpin + ?Sized>(s: &mut S) -> RawResponse {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(HANG_GUARD, s.read(&mut b))
            .await
            .expect("response in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "connection closed in the response head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let content_length: Option<usize> = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse().expect("length"))
    });
    let mut body = vec![0u8; content_length.unwrap_or(0)];
    tokio::time::timeout(HANG_GUARD, s.read_exact(&mut body))
        .await
        .expect("body in time")
        .unwrap_or_else(|e| panic!("connection closed before a full response ({e}): {head}"));
    RawResponse {
        head,
        content_length,
        body,
    }
}

/// The value of the metric line starting with `line_start`, from the admin
/// listener at `admin`.
pub async fn metric(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let text = reqwest::Client::builder()
        .no_proxy()
        .timeout(HANG_GUARD)
        .build()
        .ok()?
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
