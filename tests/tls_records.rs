//! The TLS layer under HTTP, seen by real TLS clients: records that arrive a
//! few bytes at a time, key updates in the middle of a connection, and
//! close_notify at the end.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A socket that sends at most `step` bytes per write and lets the other
/// side run in between, so the server sees TLS records (the ClientHello
/// included) arrive in pieces.
struct Dribble {
    tcp: TcpStream,
    step: usize,
    yielded: bool,
}

impl AsyncRead for Dribble {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dribble {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = data.len().min(self.step);
        let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &data[..n]));
        self.yielded = false;
        Poll::Ready(written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(pki: &Pki, io: IO) -> TlsStream<IO> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    connector.connect(name, io).await.expect("handshake")
}

#[tokio::test]
async fn records_arriving_a_few_bytes_at_a_time_are_served_whole() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    // 7 bytes per segment: the ClientHello, the client's Finished and every
    // request record are cut at odd places.
    let mut tls = connect(
        &pki,
        Dribble {
            tcp,
            step: 7,
            yielded: false,
        },
    )
    .await;
    let body = pattern(40_000);
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    tls.write_all(&body).await.expect("body");
    tls.flush().await.expect("flush");
    let (status, echoed) = read_response(&mut tls).await.status_and_body();
    assert_eq!(status, 200);
    assert!(echoed == body, "the echoed body differs from the one sent");
    // The same connection then carries a large answer back.
    tls.write_all(format!("GET /big?n=300000 HTTP/1.1\r\nHost: {CLICK}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    tls.flush().await.expect("flush");
    let (status, big) = read_response(&mut tls).await.status_and_body();
    assert_eq!(status, 200);
    assert!(big == pattern(300_000), "the 300 kB answer arrived altered");
    let seen = up.received();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].body.as_ref(),
        body.as_slice(),
        "the upstream got a different body"
    );
    lg.stop().await;
}

#[tokio::test]
async fn a_key_update_from_the_client_is_answered_and_the_connection_goes_on() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    let mut tls = connect(&pki, tcp).await;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let request = format!("GET /big?n=50000 HTTP/1.1\r\nHost: {CLICK}\r\n\r\n");
    for round in 0..3 {
        // Asks the server to update its keys as well: the answers after this
        // only decrypt if the server did.
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
        tls.write_all(request.as_bytes()).await.expect("request");
        let (status, body) = read_response(&mut tls).await.status_and_body();
        assert_eq!(status, 200, "round {round}");
        assert!(body == pattern(50_000), "round {round}: the answer arrived altered");
    }
    assert_eq!(up.received().len(), 3);
    lg.stop().await;
}

#[tokio::test]
async fn the_server_ends_a_connection_with_close_notify() {
    let (_dir, pki, _up, lg) = serve_click("").await;
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    let mut tls = connect(&pki, tcp).await;
    tls.write_all(format!("GET /wf/open HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut all = Vec::new();
    // rustls reports a close without close_notify as an UnexpectedEof error.
    tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut all))
        .await
        .expect("closed in time")
        .expect("closed with close_notify");
    assert_eq!(status_of(&String::from_utf8_lossy(&all)), 200);
    lg.stop().await;
}

#[tokio::test]
async fn close_notify_from_the_client_ends_its_keep_alive_connection() {
    let (_dir, pki, _up, lg) = serve_click("").await;
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    let mut tls = connect(&pki, tcp).await;
    tls.write_all(format!("GET /wf/open HTTP/1.1\r\nHost: {CLICK}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    assert_eq!(read_response(&mut tls).await.status_and_body().0, 200);
    // close_notify only (the socket stays open for reading): the server
    // answers with its own and closes.
    tls.get_mut().1.send_close_notify();
    tls.flush().await.expect("flush");
    let mut rest = Vec::new();
    tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("closed with close_notify");
    assert!(rest.is_empty(), "unexpected bytes after close_notify: {rest:?}");
    lg.stop().await;
}

#[tokio::test]
async fn a_handshake_that_cannot_succeed_is_answered_with_the_alert_that_says_why() {
    let (_dir, pki, up, lg) = serve_click("").await;
    // TLS 1.2 with RSA key exchange signatures only, against an ECDSA certificate.
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256],
        ..(*linkgate::tls::provider()).clone()
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let err = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect_err("no suite in common");
    assert!(
        has_alert(&err, rustls::AlertDescription::HandshakeFailure),
        "expected a handshake_failure alert, got {err:?}"
    );
    // The server goes on serving.
    let c = client(&pki, &lg, &[CLICK]);
    assert_eq!(
        c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request").status(),
        200
    );
    assert_eq!(up.received().len(), 1);
    lg.stop().await;
}
