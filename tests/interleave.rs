//! Two parties misbehaving together: clients that pipeline, stall, cut
//! bodies short or grant no HTTP/2 window, against an upstream that answers
//! early, closes reused connections, answers `101` ([`common::origin`]).
//! Each case asserts what the upstream received (exactly the requests the
//! clients sent, each once, byte for byte, nothing smuggled) and what each
//! client received (its own answers), and that upstream connections return
//! to their baseline. The last test runs seeded random sequences of the
//! same moves; set `LINKGATE_INTERLEAVINGS` (count) and
//! `LINKGATE_INTERLEAVE_SEED` to run more or to replay one.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::origin::Origin;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// linkgate serving [`CLICK`] in front of a fresh [`Origin`], with `extra`
/// (more sections) and `upstream` (more `[upstream]` keys).
async fn setup(upstream: &str, extra: &str) -> (tempfile::TempDir, Pki, Origin, Linkgate) {
    let origin = Origin::start().await;
    let section = origin.upstream_section(upstream);
    let Served { dir, pki, lg, .. } = Setup::new()
        .host(CLICK)
        .upstream(move |_| section.clone())
        .extra(extra)
        .start()
        .await;
    (dir, pki, origin, lg)
}

// ---------------------------------------------------------------- raw HTTP/1 client

/// One response as a raw client read it.
#[derive(Debug)]
struct Answer {
    status: u16,
    close: bool,
    body: Vec<u8>,
}

fn connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(pki, &[b"http/1.1"])))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A raw HTTP/1 client, on the plain listener or over TLS.
struct Raw {
    s: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            s: Box::new(TcpStream::connect(addr).await.expect("connect")),
            buf: Vec::new(),
        }
    }

    /// A TCP connection whose receive buffer is `rcvbuf` bytes: a small
    /// window keeps the server's send buffer small too, so what the kernel
    /// holds for a client that does not read is about known.
    async fn tcp_small(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(addr).await.expect("connect")
    }

    /// Over TLS to the https listener, SNI [`CLICK`], ALPN http/1.1.
    async fn tls_with(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Self {
        Self::tls_over(connector, TcpStream::connect(addr).await.expect("connect")).await
    }

    async fn tls_over(connector: &tokio_rustls::TlsConnector, tcp: TcpStream) -> Self {
        let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
        let tls = connector.connect(name, tcp).await.expect("handshake");
        Self {
            s: Box::new(tls),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).await.is_ok()
    }

    async fn more(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match tokio::time::timeout(within, self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next response (Content-Length framed), or `None` if the
    /// connection closed or nothing came within `within`.
    async fn answer(&mut self, within: Duration) -> Option<Answer> {
        let deadline = tokio::time::Instant::now() + within;
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.more(deadline - tokio::time::Instant::now()).await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        let status = status_of(&head);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let close = head.lines().any(|l| l.trim() == "connection: close");
        while self.buf.len() < end + len {
            if !self.more(deadline - tokio::time::Instant::now()).await {
                return None;
            }
        }
        let body = self.buf[end..end + len].to_vec();
        self.buf.drain(..end + len);
        Some(Answer { status, close, body })
    }

    /// True once the server has closed the connection (within `within`),
    /// false if it is still open; bytes read meanwhile are kept.
    async fn closed(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }
}

/// A request line that must never reach the upstream: it hides in a body.
fn smuggled(tag: &str) -> Vec<u8> {
    format!("GET /SMUGGLED-{tag} HTTP/1.1\r\nHost: {CLICK}\r\n\r\n").into_bytes()
}

fn assert_nothing_smuggled(origin: &Origin) {
    let got: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    assert!(
        got.iter().all(|t| !t.contains("SMUGGLED")),
        "the upstream received a request that was never sent as one: {got:?}"
    );
}

// ---------------------------------------------------------------- finding 1: parking resumed a connection that had to close

#[tokio::test]
async fn a_body_the_upstream_did_not_wait_for_is_never_read_as_a_request() {
    let (_dir, _pki, origin, lg) = setup("", "").await;
    let mut c = Raw::connect(lg.http.expect("http")).await;
    // Content-Length 1010, 10 bytes now; the upstream answers at once
    // without reading the body and closes 1.5 s later.
    let mut head =
        format!("POST /early?close=1500 HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: 1010\r\n\r\n").into_bytes();
    head.extend_from_slice(b"0123456789");
    c.send(&head).await;
    let first = c.answer(HANG_GUARD).await.expect("the early answer");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"early"[..]));
    // Past parking (1 s quiet) and the upstream's close.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The other 1000 bytes of the body, starting like a request.
    let mut rest = smuggled("from-body");
    rest.resize(1000, b'x');
    c.send(&rest).await;
    let after = c.answer(Duration::from_secs(2)).await;
    assert!(after.is_none(), "a body's bytes were answered as a request: {after:?}");
    assert_nothing_smuggled(&origin);
    let targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/early?close=1500"]);
}

/// A client that announced `Connection: close` and goes on sending a body
/// the upstream answered without reading: linkgate lingers before its
/// close, reading and discarding the rest, so the client's sending ends
/// without a reset (a reset would throw away any of the answer the client
/// has not read yet) and the close is a clean one. (A last request the
/// client sent whole is closed at once, without lingering.)
#[tokio::test]
async fn a_closing_client_still_sending_a_body_nobody_waited_for_is_not_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, _pki, origin, lg) = setup("", "").await;
    let mut c = tokio::net::TcpStream::connect(lg.http.expect("http"))
        .await
        .expect("connect");
    let head = format!(
        "POST /early HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\nContent-Length: 1000000\r\n\r\n0123456789"
    );
    c.write_all(head.as_bytes()).await.expect("send");
    // The upstream answers at once, before the body.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.ends_with(b"early") {
        let n = tokio::time::timeout(HANG_GUARD, c.read(&mut chunk))
            .await
            .expect("the early answer")
            .expect("read");
        assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 200") && text.contains("connection: close"),
        "{text}"
    );
    // The client goes on with its body (896 KiB, under the 1 MiB cap), then closes its side.
    let body = vec![b'x'; 64 * 1024];
    for i in 0..14 {
        let sent = tokio::time::timeout(HANG_GUARD, c.write_all(&body))
            .await
            .expect("not stalled");
        assert!(
            sent.is_ok(),
            "chunk {i}: {sent:?}: linkgate closed into the client's data"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown().await.expect("shutdown");
    let end = tokio::time::timeout(HANG_GUARD, c.read(&mut chunk))
        .await
        .expect("closed");
    assert!(matches!(end, Ok(0)), "a clean close, not a reset: {end:?}");
    let targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/early"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_pipelined_behind_a_large_answer_ends_the_connection() {
    // 124 clients asking for up to 7.7 MB each at once: on a loaded machine
    // the stand-in took longer than 3 s to start some answers (504s that
    // said nothing about smuggling). The timeout is not what is tested here.
    let (_dir, pki, origin, lg) = setup("response_timeout = \"20s\"\n", "").await;
    // The refusal's answer must wait behind the large one, in linkgate's
    // buffers, while the client is not reading: that needs an answer about
    // as large as what the socket buffers hold, which depends on the
    // kernel. So many sizes at once, over TLS and plain http.
    let mut clients = Vec::new();
    // Large sizes with ordinary sockets; small ones (every 2 KiB up to 160
    // KiB) with a 4 KiB receive buffer, which keeps the kernel's share small.
    let sizes = (0..48u64)
        .map(|step| (false, 256 * 1024 + step * 160 * 1024))
        .chain((0..76u64).map(|step| (true, 8 * 1024 + step * 2 * 1024)));
    for (step, (small, n)) in sizes.enumerate() {
        let tls = step % 2 == 0;
        let connector = connector(&pki);
        let (https, http) = (lg.https, lg.http.expect("http"));
        clients.push(tokio::spawn(async move {
            let mut c = match (tls, small) {
                (true, false) => Raw::tls_with(&connector, https).await,
                (false, false) => Raw::connect(http).await,
                (true, true) => Raw::tls_over(&connector, Raw::tcp_small(https, 4096).await).await,
                (false, true) => Raw {
                    s: Box::new(Raw::tcp_small(http, 4096).await),
                    buf: Vec::new(),
                },
            };
            let big = format!("/big?n={n}&tls={tls}&small={small}");
            // The large answer, then a request for a host this connection
            // does not serve (421, close), then another.
            let mut pipeline = http1_get(&big).into_bytes();
            pipeline.extend_from_slice(b"GET /refused HTTP/1.1\r\nHost: other.example.test\r\n\r\n");
            pipeline.extend_from_slice(&smuggled(&format!("pipelined-{step}")));
            c.send(&pipeline).await;
            // Not reading for longer than the parking delay.
            tokio::time::sleep(Duration::from_millis(1600)).await;
            let answer = c.answer(HANG_GUARD).await.expect("the large answer");
            assert_eq!((answer.status, answer.body.len()), (200, n as usize));
            let refused = c.answer(HANG_GUARD).await.expect("the refusal");
            assert_eq!(refused.status, 421);
            assert!(refused.close, "a refusal says Connection: close");
            assert!(
                c.closed(Duration::from_secs(3)).await,
                "{big}: the connection stays open after a refusal"
            );
            assert!(c.buf.is_empty(), "{big}: something was answered after the refusal");
            big
        }));
    }
    for c in clients {
        let big = c.await.expect("client");
        let got = origin.requests().into_iter().filter(|r| r.target == big).count();
        assert_eq!(got, 1, "{big}");
    }
    assert_nothing_smuggled(&origin);
}

// ---------------------------------------------------------------- finding 2: pool poisoning

/// An HTTP/2 client connection made with the `h2` library.
async fn h2_conn(pki: &Pki, lg: &Linkgate, builder: h2::client::Builder) -> h2::client::SendRequest<Bytes> {
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(pki, &[b"h2"])));
    let tcp = TcpStream::connect(lg.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (send, conn) = builder.handshake(tls).await.expect("h2 handshake");
    // Drives the connection: answers PINGs and SETTINGS, as a live client does.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A well-behaved HTTP/2 connection, ready for a request.
async fn h2_ready(pki: &Pki, lg: &Linkgate) -> h2::client::SendRequest<Bytes> {
    h2_conn(pki, lg, h2::client::Builder::new())
        .await
        .ready()
        .await
        .expect("ready")
}

fn h2_request(method: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("https://{CLICK}{path}"))
        .body(())
        .expect("request")
}

async fn h2_body(resp: http::Response<h2::RecvStream>) -> Result<Vec<u8>, h2::Error> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[tokio::test]
async fn an_upstream_that_answers_before_the_body_does_not_spoil_the_next_request() {
    let (_dir, pki, origin, lg) = setup("", "").await;
    let mut h2c = h2_ready(&pki, &lg).await;
    // One client: 100 of 100,000 bytes, answered early, then the client stalls.
    let mut post = h2_request("POST", "/early?close=20000");
    post.headers_mut()
        .insert("content-length", http::HeaderValue::from_static("100000"));
    let (resp, mut body) = h2c.send_request(post, false).expect("send");
    body.send_data(Bytes::from(vec![b'a'; 100]), false).expect("data");
    let resp = tokio::time::timeout(HANG_GUARD, resp)
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(h2_body(resp).await.expect("body"), b"early");
    // Someone else's request on the same worker (another stream of the same
    // connection, so surely the same worker's pool) is served at once, not
    // after response_timeout (3 s) on the connection the first one left midway.
    let mut other = h2c.clone().ready().await.expect("ready");
    let (resp, _) = other.send_request(h2_request("GET", "/after"), true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(2), resp)
        .await
        .expect("the next request waited on a connection midway through another's body")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let reqs = origin.requests();
    let early = reqs.iter().find(|r| r.target.starts_with("/early")).expect("early");
    let after = reqs.iter().find(|r| r.target == "/after").expect("after");
    assert_ne!(early.conn, after.conn, "a connection midway through a body was reused");
    drop(body);
}

// ---------------------------------------------------------------- finding 3: HTTP/2 flow control pinned upstream connections

const STALL_LIMITS: &str = "[limits]\nidle_timeout = \"2s\"\nupstream_per_connection = 4\n";

#[tokio::test]
async fn streams_that_grant_no_window_hold_few_upstream_connections_and_are_cut() {
    // pool_idle_timeout 1 s: the bystander's idle upstream connection closes too.
    let (_dir, pki, origin, lg) = setup("pool_idle_timeout = \"1s\"\n", STALL_LIMITS).await;
    let mut attackers = Vec::new();
    for _ in 0..2 {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(0);
        let send = h2_conn(&pki, &lg, b).await;
        let mut streams = Vec::new();
        for i in 0..10 {
            let mut s = send.clone().ready().await.expect("ready");
            let (resp, _) = s
                .send_request(h2_request("GET", &format!("/big?n=300000&i={i}")), true)
                .expect("send");
            streams.push(tokio::spawn(async move {
                match resp.await {
                    Ok(r) => h2_body(r).await.map(|b| b.len()),
                    Err(e) => Err(e),
                }
            }));
        }
        attackers.push((send, streams));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        origin.open_connections() <= 8,
        "two connections granting no window hold {} upstream connections (4 each allowed)",
        origin.open_connections()
    );
    // Others are served meanwhile.
    let bystander = h2_client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/bystander"))
        .send()
        .await;
    assert_eq!(bystander.expect("bystander").status(), 200);
    // Each stalled stream is cut after idle_timeout (2 s) without progress;
    // those waiting for a turn get one, stall, and are cut in their turn or
    // time out waiting (response_timeout, 3 s).
    for (_send, streams) in attackers {
        for s in streams {
            let outcome = tokio::time::timeout(HANG_GUARD, s)
                .await
                .expect("stream ends")
                .expect("task");
            assert!(
                outcome.is_err(),
                "a stream that granted no window completed: {outcome:?}"
            );
        }
    }
    wait_for("upstream connections back to none", async || {
        origin.open_connections() == 0
    })
    .await;
    assert!(origin.requests().len() <= 20);
}

#[tokio::test]
async fn small_answers_free_their_upstream_connection_before_the_client_reads_them() {
    let (_dir, pki, origin, lg) = setup("", STALL_LIMITS).await;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(0);
    let send = h2_conn(&pki, &lg, b).await;
    let mut held = Vec::new();
    for i in 0..12 {
        let mut s = send.clone().ready().await.expect("ready");
        let (resp, _) = s
            .send_request(h2_request("GET", &format!("/pixel?i={i}")), true)
            .expect("send");
        held.push(resp);
    }
    // All twelve reach the upstream although the client reads none of them
    // and may hold only 4 upstream connections: each small answer is read
    // whole and its connection returned, and reused, at once.
    wait_for("all twelve requests upstream", async || origin.requests().len() == 12).await;
    assert!(
        origin.accepted() <= 4,
        "{} upstream connections for twelve small answers nobody read",
        origin.accepted()
    );
    drop(held);
}

// ---------------------------------------------------------------- findings 5, 6, 7, 8: what is forwarded and what is answered

#[tokio::test]
async fn untrusted_client_address_claims_are_dropped() {
    let (_dir, _pki, origin, lg) = setup("", "").await;
    let mut c = Raw::connect(lg.http.expect("http")).await;
    c.send(
        format!(
            "GET /claims HTTP/1.1\r\nHost: {CLICK}\r\nForwarded: for=198.51.100.9\r\nX-Real-IP: 198.51.100.9\r\n\
             True-Client-IP: 198.51.100.9\r\nCF-Connecting-IP: 198.51.100.9\r\nX-Client-IP: 198.51.100.9\r\n\
             X-Forwarded-For: 198.51.100.9\r\nX_Forwarded_For: 198.51.100.9\r\nX_Real_IP: 198.51.100.9\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.answer(HANG_GUARD).await.expect("answer").status, 200);
    let req = origin.requests().pop().expect("forwarded");
    for name in [
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        // Spelled with underscores, as CGI-style backends read them.
        "x_forwarded_for",
        "x_real_ip",
    ] {
        assert_eq!(req.header(name), None, "{name} passed through from an untrusted client");
    }
    assert_eq!(req.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn http2_cookie_fields_reach_the_upstream_as_one_header() {
    let (_dir, pki, origin, lg) = setup("", "").await;
    let mut h2c = h2_ready(&pki, &lg).await;
    let mut req = h2_request("GET", "/cookies");
    req.headers_mut()
        .append("cookie", http::HeaderValue::from_static("a=1"));
    req.headers_mut()
        .append("cookie", http::HeaderValue::from_static("b=2"));
    req.headers_mut()
        .append("cookie", http::HeaderValue::from_static("c=3"));
    let (resp, _) = h2c.send_request(req, true).expect("send");
    assert_eq!(resp.await.expect("answer").status(), 200);
    let got = origin.requests().pop().expect("forwarded");
    assert_eq!(got.headers_named("cookie"), ["a=1; b=2; c=3"]);
}

#[tokio::test]
async fn an_upstream_101_is_answered_502_and_never_tunnelled() {
    let (_dir, _pki, _origin, lg) = setup("", "").await;
    let mut c = Raw::connect(lg.http.expect("http")).await;
    c.send(http1_get("/101").as_bytes()).await;
    let a = c.answer(HANG_GUARD).await.expect("answer");
    assert_eq!(a.status, 502);
    let metrics = lg.live.metrics.encode();
    assert!(
        metrics.contains("linkgate_upstream_errors_total{kind=\"upgrade\"} 1"),
        "{metrics}"
    );
}

/// Sends 2.5 MB of body as fast as the server's window allows.
async fn feed(mut body: h2::SendStream<Bytes>) {
    for _ in 0..40 {
        body.reserve_capacity(64 * 1024);
        match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => {
                if body.send_data(Bytes::from(vec![b'b'; n]), false).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

#[tokio::test]
async fn an_http2_answer_before_the_body_ends_arrives_whole() {
    let (_dir, pki, origin, lg) = setup("", "").await;
    let h2c = h2_conn(&pki, &lg, h2::client::Builder::new()).await;
    // Declared over max_request_body (1 MiB): 413 before any body is read.
    let mut s = h2c.clone().ready().await.expect("ready");
    let mut post = h2_request("POST", "/upload");
    post.headers_mut()
        .insert("content-length", http::HeaderValue::from_static("2000000"));
    let (resp, mut body) = s.send_request(post, false).expect("send");
    let _ = body.send_data(Bytes::from(vec![b'a'; 1000]), false);
    let resp = tokio::time::timeout(HANG_GUARD, resp)
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(resp.status(), 413);
    let text = h2_body(resp).await.expect("the whole 413 body, not a stream error");
    assert_eq!(text, b"request body too large\n");
    // Streamed past the cap without a declared length: 413 too.
    let mut s = h2c.clone().ready().await.expect("ready");
    let (resp, body) = s.send_request(h2_request("POST", "/upload"), false).expect("send");
    let feeder = tokio::spawn(feed(body));
    let resp = tokio::time::timeout(HANG_GUARD, resp)
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(resp.status(), 413);
    assert_eq!(
        h2_body(resp).await.expect("the whole 413 body"),
        b"request body too large\n"
    );
    feeder.abort();
    assert!(origin
        .requests()
        .iter()
        .all(|r| r.target != "/upload" || r.body.len() < 2_000_000));
}

// ---------------------------------------------------------------- finding 9: the upstream's keep-alive close race

#[tokio::test]
async fn a_reused_connection_the_upstream_closes_under_a_click_is_retried_once() {
    let (_dir, _pki, origin, lg) = setup("", "").await;
    origin.drop_reused(true);
    let mut c = Raw::connect(lg.http.expect("http")).await;
    for i in 0..20 {
        c.send(http1_get(&format!("/click?i={i}")).as_bytes()).await;
        let a = c.answer(HANG_GUARD).await.expect("answer");
        assert_eq!(a.status, 200, "click {i}: {:?}", String::from_utf8_lossy(&a.body));
        assert_eq!(
            a.body,
            format!("ok /click?i={i} 0").into_bytes(),
            "click {i} got another's answer"
        );
    }
    let metrics = lg.live.metrics.encode();
    assert!(metrics.contains("linkgate_upstream_retries_total 19"), "{metrics}");
    // Each click was seen at most twice upstream (once lost, once answered).
    for i in 0..20 {
        let n = origin
            .requests()
            .iter()
            .filter(|r| r.target == format!("/click?i={i}"))
            .count();
        assert!((1..=2).contains(&n), "click {i} reached the upstream {n} times");
    }
    // A POST is never sent twice: the lost one is answered 502.
    let mut post = format!("POST /form HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: 3\r\n\r\n").into_bytes();
    post.extend_from_slice(b"a=1");
    c.send(&post).await;
    assert_eq!(c.answer(HANG_GUARD).await.expect("answer").status, 502);
    assert_eq!(origin.requests().iter().filter(|r| r.target == "/form").count(), 1);
}

// ---------------------------------------------------------------- the class: seeded random interleavings

/// A small deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One message a random client sends, and what it must get back.
#[derive(Debug, Clone)]
enum Move {
    /// A GET: answered `ok <target> 0`.
    Get(String),
    /// A POST with a whole body that looks like a request: answered `ok <target> <len>`.
    Post(String, usize),
    /// A chunked POST whose chunks look like requests.
    Chunked(String),
    /// A POST the upstream answers before its body (`declared` bytes, `sent` now, the rest later).
    Early(String, usize, usize),
    /// A request for a host this listener does not serve: 421, then close.
    Refused(String),
    /// A large answer.
    Big(String, usize),
    /// HTTP/2: a large answer the client resets after its first bytes.
    Cancel(String),
}

fn bytes_of(m: &Move, tag: &str) -> (Vec<u8>, Vec<u8>) {
    match m {
        Move::Get(t) | Move::Big(t, _) => (http1_get(t).into_bytes(), Vec::new()),
        Move::Post(t, len) => {
            let mut body = smuggled(tag);
            body.resize(*len, b'p');
            let mut out = format!("POST {t} HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: {len}\r\n\r\n").into_bytes();
            out.extend_from_slice(&body);
            (out, Vec::new())
        }
        Move::Chunked(t) => {
            let chunk = smuggled(tag);
            let mut out =
                format!("POST {t} HTTP/1.1\r\nHost: {CLICK}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(&chunk);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
            (out, Vec::new())
        }
        Move::Early(t, declared, sent) => {
            let mut body = smuggled(tag);
            body.resize(*declared, b'e');
            let mut out =
                format!("POST {t} HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: {declared}\r\n\r\n").into_bytes();
            out.extend_from_slice(&body[..*sent]);
            (out, body[*sent..].to_vec())
        }
        Move::Refused(t) => (
            format!("GET {t} HTTP/1.1\r\nHost: other.example.test\r\n\r\n").into_bytes(),
            Vec::new(),
        ),
        Move::Cancel(t) => (http1_get(t).into_bytes(), Vec::new()),
    }
}

fn target_of(m: &Move) -> &str {
    match m {
        Move::Get(t)
        | Move::Post(t, _)
        | Move::Chunked(t)
        | Move::Early(t, _, _)
        | Move::Refused(t)
        | Move::Big(t, _)
        | Move::Cancel(t) => t,
    }
}

/// Where the random clients connect: the https listener (over TLS) or the plain one.
#[derive(Clone)]
struct Target {
    tls: tokio_rustls::TlsConnector,
    /// Offers `h2` only.
    h2: tokio_rustls::TlsConnector,
    https: SocketAddr,
    http: SocketAddr,
}

/// Runs one random client connection; returns the moves it made and a
/// description of any broken invariant on the client's side.
async fn random_client(to: Target, case: u64, rng: &mut Rng) -> (Vec<Move>, Result<(), String>) {
    let n = 1 + rng.below(4) as usize;
    let moves: Vec<Move> = (0..n)
        .map(|i| {
            let t = format!("/c{case}m{i}");
            match rng.below(10) {
                0..=2 => Move::Get(t),
                3 => Move::Post(t, 40 + rng.below(3000) as usize),
                4 => Move::Chunked(t),
                5 | 6 => {
                    let declared = 200 + rng.below(2000) as usize;
                    // At least a byte: linkgate, like nginx, forwards a
                    // request with a body once its first bytes are in (a
                    // client that sends none until answered gets 408).
                    let sent = 1 + rng.below(declared as u64 / 2) as usize;
                    // An upstream that answers before the body says it will close
                    // (one that does not cannot be told from a keep-alive race).
                    Move::Early(
                        format!("/early?close={}&announce&c={case}m{i}", rng.below(1200)),
                        declared,
                        sent,
                    )
                }
                7 => Move::Refused(t),
                _ => Move::Big(format!("/big?n={}&c={case}m{i}", 1 + rng.below(400_000)), 0),
            }
        })
        .map(|m| match m {
            Move::Big(t, _) => {
                let n = t
                    .split("n=")
                    .nth(1)
                    .and_then(|v| v.split('&').next()?.parse().ok())
                    .unwrap_or(0);
                Move::Big(t, n)
            }
            m => m,
        })
        .collect();
    let pipelined = rng.below(2) == 0;
    let mut c = if rng.below(2) == 0 {
        Raw::tls_with(&to.tls, to.https).await
    } else {
        Raw::connect(to.http).await
    };
    let mut outcome = Ok(());
    let mut pauses = Vec::new();
    for _ in &moves {
        // Around the parking delay (1 s), within header_read_timeout (2 s),
        // which bounds the keep-alive wait of a connection hyper keeps.
        pauses.push(Duration::from_millis([0, 0, 400, 1200, 1700][rng.below(5) as usize]));
    }
    let mut pending = Vec::new();
    for (i, m) in moves.iter().enumerate() {
        let (now, later) = bytes_of(m, &format!("c{case}m{i}"));
        if !c.send(&now).await {
            break;
        }
        if !later.is_empty() {
            pending.push((i, later));
        }
        if !pipelined || !pending.is_empty() {
            tokio::time::sleep(pauses[i]).await;
            for (_, rest) in pending.drain(..) {
                let _ = c.send(&rest).await;
            }
            if !pipelined {
                match expect_answer(&mut c, m).await {
                    Ok(()) => {}
                    // hyper may close after a body it did not read to its end.
                    Err(e) if e == "closed" && moves[..i].iter().any(|m| matches!(m, Move::Early(..))) => break,
                    Err(e) => {
                        outcome = Err(format!("move {i}: {e}"));
                        break;
                    }
                }
                if matches!(m, Move::Refused(_)) {
                    break;
                }
            }
        }
    }
    if pipelined && outcome.is_ok() {
        tokio::time::sleep(pauses[0]).await;
        for (i, m) in moves.iter().enumerate() {
            match expect_answer(&mut c, m).await {
                Ok(()) => {}
                // After an early answer hyper may close; what follows is then unanswered.
                Err(e) if e == "closed" && i > 0 => break,
                Err(e) => {
                    outcome = Err(format!("move {i} (pipelined): {e}"));
                    break;
                }
            }
            if matches!(m, Move::Refused(_) | Move::Early(..)) {
                break;
            }
        }
    }
    (moves, outcome)
}

async fn expect_answer(c: &mut Raw, m: &Move) -> Result<(), String> {
    let Some(a) = c.answer(Duration::from_secs(8)).await else {
        return Err("closed".into());
    };
    judge(m, a.status, &a.body)
}

/// Whether `status` and `body` are the answer to `m`, and not another's.
fn judge(m: &Move, status: u16, body: &[u8]) -> Result<(), String> {
    let want: (u16, Option<Vec<u8>>) = match m {
        Move::Get(t) => (200, Some(format!("ok {t} 0").into_bytes())),
        Move::Post(t, len) => (200, Some(format!("ok {t} {len}").into_bytes())),
        Move::Chunked(_) => (200, None),
        Move::Early(..) => (200, Some(b"early".to_vec())),
        Move::Refused(_) => (421, None),
        Move::Big(_, n) => (200, Some(pattern(*n))),
        // Reset after its first bytes, which are those of the pattern.
        Move::Cancel(_) => (200, None),
    };
    if status != want.0 {
        return Err(format!("status {status} instead of {}", want.0));
    }
    let own = match (&want.1, m) {
        (Some(want), _) => want == body,
        // The chunked body's length depends on its tag; its target is enough.
        (None, Move::Chunked(t)) => body.starts_with(format!("ok {t} ").as_bytes()),
        (None, Move::Cancel(_)) => pattern(body.len()) == body,
        (None, _) => true,
    };
    if !own {
        return Err(format!(
            "someone else's answer: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
    }
    Ok(())
}

/// Runs one random HTTP/2 client connection: its moves run as concurrent
/// streams, each starting after a random delay, some stalling their reads
/// (no window granted), some resetting their answer midway. Returns the
/// moves and a description of any broken invariant on the client's side.
async fn random_h2_client(to: Target, case: u64, rng: &mut Rng) -> (Vec<Move>, Result<(), String>) {
    let n = 1 + rng.below(6) as usize;
    let moves: Vec<Move> = (0..n)
        .map(|i| {
            let t = format!("/c{case}m{i}");
            match rng.below(10) {
                0..=2 => Move::Get(t),
                3 | 4 => Move::Post(t, 40 + rng.below(3000) as usize),
                5 => {
                    let declared = 200 + rng.below(2000) as usize;
                    // At least a byte: linkgate, like nginx, forwards a
                    // request with a body once its first bytes are in (a
                    // client that sends none until answered gets 408).
                    let sent = 1 + rng.below(declared as u64 / 2) as usize;
                    Move::Early(
                        format!("/early?close={}&announce&c={case}m{i}", rng.below(1200)),
                        declared,
                        sent,
                    )
                }
                6 => Move::Refused(t),
                7 => Move::Cancel(format!("/big?n={}&c={case}m{i}", 200_000 + rng.below(400_000))),
                _ => {
                    let n = 1 + rng.below(400_000) as usize;
                    Move::Big(format!("/big?n={n}&c={case}m{i}"), n)
                }
            }
        })
        .collect();
    let plan: Vec<(Duration, Duration)> = moves
        .iter()
        .map(|_| {
            let start = Duration::from_millis(rng.below(300));
            // How long the stream waits mid-body: before granting window
            // for its answer, or before sending the rest of its body.
            let stall = Duration::from_millis([0, 0, 400, 1200, 1700][rng.below(5) as usize]);
            (start, stall)
        })
        .collect();
    let connected = async {
        let tcp = TcpStream::connect(to.https).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
        let tls = to.h2.connect(name, tcp).await.map_err(|e| e.to_string())?;
        h2::client::handshake(tls).await.map_err(|e| e.to_string())
    };
    let (send, conn) = match connected.await {
        Ok(c) => c,
        Err(e) => return (moves, Err(format!("connect: {e}"))),
    };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let streams: Vec<_> = moves
        .iter()
        .cloned()
        .enumerate()
        .zip(plan)
        .map(|((i, m), (start, stall))| {
            let send = send.clone();
            let tag = format!("c{case}m{i}");
            tokio::spawn(async move {
                tokio::time::sleep(start).await;
                tokio::time::timeout(Duration::from_secs(15), h2_move(send, &m, &tag, stall))
                    .await
                    .unwrap_or_else(|_| Err("no answer within 15 s".into()))
                    .map_err(|e| format!("move {i}: {e}"))
            })
        })
        .collect();
    let mut outcome = Ok(());
    for s in streams {
        if let Err(e) = s.await.expect("stream task") {
            outcome = outcome.and(Err(e));
        }
    }
    drop(send);
    driver.abort();
    (moves, outcome)
}

/// One stream of [`random_h2_client`].
async fn h2_move(send: h2::client::SendRequest<Bytes>, m: &Move, tag: &str, stall: Duration) -> Result<(), String> {
    let mut send = send.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let authority = if matches!(m, Move::Refused(_)) {
        "other.example.test"
    } else {
        CLICK
    };
    let (method, body, declared) = match m {
        Move::Post(_, len) => {
            let mut b = smuggled(tag);
            b.resize(*len, b'p');
            ("POST", b, *len)
        }
        Move::Early(_, declared, _) => {
            let mut b = smuggled(tag);
            b.resize(*declared, b'e');
            ("POST", b, *declared)
        }
        _ => ("GET", Vec::new(), 0),
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://{authority}{}", target_of(m)))
        .body(())
        .expect("request");
    if method == "POST" {
        req.headers_mut().insert("content-length", declared.into());
    }
    let (resp, mut tx) = send
        .send_request(req, method == "GET")
        .map_err(|e| format!("send: {e}"))?;
    let mut rest_later = None;
    match m {
        Move::Post(..) => {
            // Half now, the rest after the stall.
            let half = body.len() / 2;
            let _ = tx.send_data(Bytes::copy_from_slice(&body[..half]), false);
            tokio::time::sleep(stall).await;
            let _ = tx.send_data(Bytes::copy_from_slice(&body[half..]), true);
        }
        Move::Early(_, _, sent) => {
            let _ = tx.send_data(Bytes::copy_from_slice(&body[..*sent]), false);
            rest_later = Some(Bytes::copy_from_slice(&body[*sent..]));
        }
        _ => {}
    }
    let resp = resp.await.map_err(|e| format!("answer: {e}"))?;
    if let Some(rest) = rest_later {
        // The upstream has answered; the rest of the body may be refused.
        tokio::time::sleep(stall).await;
        let _ = tx.send_data(rest, true);
    }
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut first = true;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("body after {} bytes: {e}", got.len()))?;
        got.extend_from_slice(&chunk);
        if matches!(m, Move::Cancel(_)) {
            // Dropping the stream resets it (RST_STREAM CANCEL).
            return judge(m, status, &got);
        }
        if first && matches!(m, Move::Big(..)) {
            // No window for the rest of this answer for a while.
            tokio::time::sleep(stall).await;
        }
        first = false;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    judge(m, status, &got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_interleavings_keep_every_request_whole_and_every_answer_its_own() {
    let cases: u64 = std::env::var("LINKGATE_INTERLEAVINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(160);
    let seed: u64 = std::env::var("LINKGATE_INTERLEAVE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("interleavings: {cases} cases, LINKGATE_INTERLEAVE_SEED={seed}");
    let (_dir, pki, origin, lg) = setup(
        "pool_idle_timeout = \"1s\"\n",
        "[limits]\nheader_read_timeout = \"2s\"\nidle_timeout = \"10s\"\n",
    )
    .await;
    let to = Target {
        tls: connector(&pki),
        h2: tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(&pki, &[b"h2"]))),
        https: lg.https,
        http: lg.http.expect("http"),
    };
    let mut failures = Vec::new();
    let mut sent: Vec<(u64, Vec<Move>, bool)> = Vec::new();
    for batch in (0..cases).collect::<Vec<_>>().chunks(16) {
        let mut tasks = Vec::new();
        for &case in batch {
            let mut rng = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let to = to.clone();
            tasks.push(tokio::spawn(async move {
                // A third of the clients speak HTTP/2: their moves are
                // concurrent streams, not ordered.
                let ordered = rng.below(3) != 0;
                let (moves, outcome) = if ordered {
                    random_client(to, case, &mut rng).await
                } else {
                    random_h2_client(to, case, &mut rng).await
                };
                (case, moves, outcome, ordered)
            }));
        }
        for t in tasks {
            let (case, moves, outcome, ordered) = t.await.expect("client task");
            if let Err(e) = outcome {
                let proto = if ordered { "HTTP/1" } else { "HTTP/2" };
                failures.push(format!("case {case} ({proto}): {e}; moves {moves:?}"));
            }
            sent.push((case, moves, ordered));
        }
    }
    // What the upstream received: only what was sent as requests, each at
    // most once, whole, in order per client connection.
    let received = origin.requests();
    for r in &received {
        if r.target.contains("SMUGGLED") {
            failures.push(format!("smuggled: {}", r.target));
        }
    }
    for (case, moves, ordered) in &sent {
        let mut last_seen = None;
        for (i, m) in moves.iter().enumerate() {
            let t = target_of(m);
            let hits: Vec<_> = received.iter().enumerate().filter(|(_, r)| r.target == t).collect();
            if hits.len() > 1 {
                failures.push(format!("case {case}: {t} reached the upstream {} times", hits.len()));
            }
            if matches!(m, Move::Refused(_)) && !hits.is_empty() {
                failures.push(format!("case {case}: the refused {t} was forwarded"));
            }
            if let Some((at, r)) = hits.first() {
                if *ordered && last_seen.is_some_and(|prev| prev > *at) {
                    failures.push(format!(
                        "case {case}: move {i} reached the upstream before an earlier one"
                    ));
                }
                last_seen = Some(*at);
                let want_body = match m {
                    Move::Post(_, len) => {
                        let mut b = smuggled(&format!("c{case}m{i}"));
                        b.resize(*len, b'p');
                        Some(b)
                    }
                    Move::Chunked(_) => Some(smuggled(&format!("c{case}m{i}"))),
                    Move::Get(_) | Move::Big(..) | Move::Cancel(_) => Some(Vec::new()),
                    _ => None,
                };
                if want_body.is_some_and(|b| b != r.body) {
                    failures.push(format!("case {case}: {t} reached the upstream with another body"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "LINKGATE_INTERLEAVE_SEED={seed}: {} broken invariants:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Everything returns to its baseline once the clients are gone.
    wait_for("client connections closed", async || {
        lg.live.metrics.encode().contains("linkgate_open_connections 0")
    })
    .await;
    wait_for("upstream connections back to none", async || {
        origin.open_connections() == 0
    })
    .await;
}
