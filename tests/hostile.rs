//! Malformed and hostile requests, sent as raw bytes over TLS and over the
//! plain listener. Each case asserts what the client sees (a 4xx or a closed
//! connection: never a 5xx, never a hang) and what the stand-in upstream
//! received (nothing, or exactly the well-formed requests listed).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a refused connection may stay open before the case counts as a hang.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// What a case must produce.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A 4xx (or no answer at all), the connection closed, nothing forwarded.
    Refused,
    /// Every answer 200, the upstream received exactly these targets, each once.
    Forwarded(&'static [&'static str]),
    /// Framed by Transfer-Encoding alone (RFC 9112 §6.1): exactly this one
    /// request forwarded, with an empty body, then the connection closed, so
    /// nothing after it is ever read as a request.
    OneThenClosed(&'static str),
}

/// Writes `bytes`, then reads until the server closes or [`CLOSE_WITHIN`] passes.
/// Returns what was read and whether the server closed the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) -> (String, bool) {
    // The server may close while we are still writing (it refused the head); that is fine.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(CLOSE_WITHIN, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

async fn over_tls(pki: &Pki, addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    exchange(tls, bytes).await
}

async fn over_plain(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    exchange(tcp, bytes).await
}

/// Every status line in a raw HTTP/1 response stream.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.")
        .filter_map(|(i, _)| raw[i..].split(' ').nth(1)?.parse().ok())
        .collect()
}

/// Runs `cases` over both listeners and returns one line per failed expectation.
async fn run_cases(pki: &Pki, up: &StandIn, lg: &Linkgate, cases: &[(&str, String, Expect)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, bytes, expect) in cases {
        for listener in ["tls", "plain"] {
            let before = up.received().len();
            let (raw, closed) = match listener {
                "tls" => over_tls(pki, lg.https, bytes.as_bytes()).await,
                _ => over_plain(lg.http.expect("http"), bytes.as_bytes()).await,
            };
            let got: Vec<_> = up.received()[before..].iter().map(|r| r.target.clone()).collect();
            let codes = statuses(&raw);
            let ok = match expect {
                Expect::Refused => {
                    closed && got.is_empty() && codes.iter().all(|c| (400..500).contains(c)) && codes.len() <= 1
                }
                Expect::OneThenClosed(target) => {
                    let body_empty = up.received()[before..].iter().all(|r| r.body.is_empty());
                    closed && got == [*target] && codes == [200] && body_empty
                }
                Expect::Forwarded(targets) => {
                    got == *targets && codes.len() == targets.len() && codes.iter().all(|c| *c == 200)
                }
            };
            if !ok {
                let first = raw.lines().next().unwrap_or("<no answer>");
                failures.push(format!(
                    "{name} over {listener}: expected {expect:?}; answers {codes:?} (first line {first:?}), \
                     closed: {closed}, upstream received {got:?}"
                ));
            }
        }
    }
    failures
}

fn head(lines: &[&str]) -> String {
    let mut s = lines.join("\r\n");
    s.push_str("\r\n\r\n");
    s
}

#[tokio::test]
async fn ambiguous_framing_and_malformed_heads_are_refused_over_both_listeners() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let host = format!("Host: {CLICK}");
    let h = host.as_str();
    let many_headers: Vec<String> = (0..200).map(|i| format!("X-H{i}: {i}")).collect();
    let mut too_many = vec!["GET /too-many HTTP/1.1", h];
    too_many.extend(many_headers.iter().map(String::as_str));
    let huge = format!("X-Big: {}", "a".repeat(20_000));
    use Expect::*;
    let cases: Vec<(&str, String, Expect)> = vec![
        // Sanity: the harness sees well-formed requests arrive.
        (
            "well-formed pipelined pair",
            format!(
                "{}{}",
                head(&["GET /one HTTP/1.1", h]),
                head(&["GET /two HTTP/1.1", h, "Connection: close"])
            ),
            Forwarded(&["/one", "/two"]),
        ),
        (
            "chunked body, odd casing of chunked",
            format!(
                "{}4\r\nabcd\r\n0\r\n\r\n",
                head(&[
                    "POST /echo HTTP/1.1",
                    h,
                    "Transfer-Encoding: ChUnKeD",
                    "Connection: close"
                ])
            ),
            Forwarded(&["/echo"]),
        ),
        (
            "bare LF between headers (two well-formed headers)",
            format!("GET /lf HTTP/1.1\r\n{h}\r\nX-A: a\nX-B: b\r\nConnection: close\r\n\r\n"),
            Forwarded(&["/lf"]),
        ),
        // Request smuggling: framing the upstream could read differently.
        (
            "Content-Length with Transfer-Encoding, smuggled request in the body",
            format!(
                "{}0\r\n\r\nGET /smuggled HTTP/1.1\r\n{h}\r\n\r\n",
                head(&[
                    "POST /cl-te HTTP/1.1",
                    h,
                    "Content-Length: 37",
                    "Transfer-Encoding: chunked"
                ])
            ),
            OneThenClosed("/cl-te"),
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "{}0\r\n\r\n",
                head(&[
                    "POST /te-cl HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked",
                    "Content-Length: 5"
                ])
            ),
            OneThenClosed("/te-cl"),
        ),
        (
            "two differing Content-Lengths",
            format!(
                "{}abcde",
                head(&["POST /cl-cl HTTP/1.1", h, "Content-Length: 4", "Content-Length: 5"])
            ),
            Refused,
        ),
        (
            "Content-Length list",
            format!("{}abcd", head(&["POST /cl-list HTTP/1.1", h, "Content-Length: 4, 5"])),
            Refused,
        ),
        (
            "negative Content-Length",
            format!("{}abcd", head(&["POST /cl-neg HTTP/1.1", h, "Content-Length: -4"])),
            Refused,
        ),
        (
            "chunked hidden behind obs-fold",
            format!(
                "{}0\r\n\r\n",
                head(&["POST /fold HTTP/1.1", h, "Transfer-Encoding: identity", " chunked"])
            ),
            Refused,
        ),
        (
            "chunked as a second coding",
            format!(
                "{}0\r\n\r\n",
                head(&["POST /gzip-chunked HTTP/1.1", h, "Transfer-Encoding: gzip, chunked"])
            ),
            Refused,
        ),
        (
            "chunked followed by another coding",
            format!(
                "{}0\r\n\r\n",
                head(&["POST /chunked-id HTTP/1.1", h, "Transfer-Encoding: chunked, identity"])
            ),
            Refused,
        ),
        (
            "two Transfer-Encoding headers",
            format!(
                "{}0\r\n\r\n",
                head(&[
                    "POST /te-te HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: chunked"
                ])
            ),
            Refused,
        ),
        (
            "unknown transfer coding",
            format!(
                "{}0\r\n\r\n",
                head(&["POST /xchunked HTTP/1.1", h, "Transfer-Encoding: xchunked"])
            ),
            Refused,
        ),
        (
            "space before the colon of Transfer-Encoding",
            format!(
                "{}0\r\n\r\n",
                head(&["POST /te-space HTTP/1.1", h, "Transfer-Encoding : chunked"])
            ),
            Refused,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "{}4\r\nabcd\r\n0\r\n\r\n",
                head(&["POST /te-10 HTTP/1.0", h, "Transfer-Encoding: chunked"])
            ),
            Refused,
        ),
        (
            "malformed chunk size",
            format!(
                "{}zz\r\nabcd\r\n0\r\n\r\n",
                head(&["POST /bad-chunk HTTP/1.1", h, "Transfer-Encoding: chunked"])
            ),
            Refused,
        ),
        (
            "overflowing chunk size",
            format!(
                "{}fffffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
                head(&["POST /huge-chunk HTTP/1.1", h, "Transfer-Encoding: chunked"])
            ),
            Refused,
        ),
        (
            "chunk size with a bare LF",
            format!(
                "{}4\nabcd\r\n0\r\n\r\n",
                head(&["POST /lf-chunk HTTP/1.1", h, "Transfer-Encoding: chunked"])
            ),
            Refused,
        ),
        // Header injection.
        (
            "CR inside a header value",
            format!("GET /cr HTTP/1.1\r\n{h}\r\nX-A: a\rb\r\n\r\n"),
            Refused,
        ),
        (
            "NUL inside a header value",
            format!("GET /nul HTTP/1.1\r\n{h}\r\nX-A: a\0b\r\n\r\n"),
            Refused,
        ),
        (
            "header name with a space",
            head(&["GET /name-space HTTP/1.1", h, "X Bad: 1"]),
            Refused,
        ),
        (
            "header without a colon",
            head(&["GET /no-colon HTTP/1.1", h, "X-Bad"]),
            Refused,
        ),
        (
            "control character in the target",
            head(&["GET /a\x01b HTTP/1.1", h]),
            Refused,
        ),
        ("space in the target", head(&["GET /a b HTTP/1.1", h]), Refused),
        // Size caps.
        (
            "request head over the cap",
            head(&["GET /huge HTTP/1.1", h, &huge]),
            Refused,
        ),
        ("too many headers", head(&too_many), Refused),
        // Versions and forms.
        ("HTTP/1.0 without Host", head(&["GET /no-host HTTP/1.0"]), Refused),
        ("HTTP/1.1 without Host", head(&["GET /no-host HTTP/1.1"]), Refused),
        ("HTTP/0.9", "GET /nine\r\n".to_owned(), Refused),
        ("unknown version", head(&["GET /v HTTP/3.0", h]), Refused),
        (
            "absolute-form naming another host",
            head(&["GET http://evil.example/x HTTP/1.1", "Host: evil.example"]),
            Refused,
        ),
        (
            "authority-form GET",
            head(&[&format!("GET {CLICK}:443 HTTP/1.1"), h]),
            Refused,
        ),
        (
            "CONNECT",
            head(&[&format!("CONNECT {CLICK}:443 HTTP/1.1"), &format!("Host: {CLICK}:443")]),
            Refused,
        ),
        ("asterisk-form OPTIONS", head(&["OPTIONS * HTTP/1.1", h]), Refused),
        // Protocol upgrades are refused, not passed through.
        (
            "websocket upgrade",
            head(&[
                "GET /ws HTTP/1.1",
                h,
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ]),
            Refused,
        ),
        (
            "h2c upgrade",
            head(&[
                "GET /h2c HTTP/1.1",
                h,
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            ]),
            Refused,
        ),
        (
            "HTTP/2 preface on an HTTP/1 connection",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(),
            Refused,
        ),
        // Pipelining behind a malformed first request: the second is never read.
        (
            "pipelined pair, first with duplicate Content-Length",
            format!(
                "{}{}",
                head(&["GET /first HTTP/1.1", h, "Content-Length: 0", "Content-Length: 1"]),
                head(&["GET /second HTTP/1.1", h])
            ),
            Refused,
        ),
        (
            "pipelined pair, first an upgrade",
            format!(
                "{}{}",
                head(&["GET /first HTTP/1.1", h, "Connection: Upgrade", "Upgrade: websocket"]),
                head(&["GET /second HTTP/1.1", h])
            ),
            Refused,
        ),
        (
            "pipelined pair, first with both framings",
            format!(
                "{}0\r\n\r\n{}",
                head(&[
                    "POST /first HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Transfer-Encoding: chunked"
                ]),
                head(&["GET /second HTTP/1.1", h])
            ),
            OneThenClosed("/first"),
        ),
    ];
    let failures = run_cases(&pki, &up, &lg, &cases).await;
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The forwarded chunked body arrived decoded and intact.
    let echoed = up
        .received()
        .into_iter()
        .find(|r| r.target == "/echo")
        .expect("echo forwarded");
    assert_eq!(&echoed.body[..], b"abcd");
    lg.stop().await;
}

// ---------------------------------------------------------------- HTTP/2, frame by frame

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, new names, no Huffman.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn get_request(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", CLICK),
        (":path", path),
    ])
}

type H2Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn h2_connect(pki: &Pki, addr: SocketAddr) -> H2Conn {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"h2"])));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(PREFACE).await.expect("preface");
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.expect("settings");
    tls
}

/// What the server said on an HTTP/2 connection until it closed it.
#[derive(Debug, Default)]
struct H2Outcome {
    /// The error code of the server's GOAWAY, if it sent one.
    goaway: Option<u32>,
    /// HEADERS frames (responses) received.
    responses: usize,
    /// The server closed the connection within [`CLOSE_WITHIN`].
    closed: bool,
}

/// One frame received from the server.
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Takes the first complete frame off `buf`, if there is one.
fn take_frame(buf: &mut Vec<u8>) -> Option<Frame> {
    let len = (usize::from(*buf.first()?) << 16) | (usize::from(*buf.get(1)?) << 8) | usize::from(*buf.get(2)?);
    if buf.len() < 9 + len {
        return None;
    }
    let frame = Frame {
        kind: buf[3],
        stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
        payload: buf[9..9 + len].to_vec(),
    };
    buf.drain(..9 + len);
    Some(frame)
}

/// Reads frames until the server closes the connection (or [`CLOSE_WITHIN`] passes).
async fn h2_outcome(mut r: impl AsyncRead + Unpin) -> H2Outcome {
    let mut out = H2Outcome::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    loop {
        while let Some(f) = take_frame(&mut buf) {
            match f.kind {
                GOAWAY if f.payload.len() >= 8 => {
                    out.goaway = Some(u32::from_be_bytes([
                        f.payload[4],
                        f.payload[5],
                        f.payload[6],
                        f.payload[7],
                    ]));
                }
                HEADERS => out.responses += 1,
                _ => {}
            }
        }
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                return out;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return out,
        }
    }
}

/// A well-behaved HTTP/2 client, to show others are unaffected.
async fn others_are_served(pki: &Pki, lg: &Linkgate) {
    let resp = h2_client(pki, lg, &[CLICK])
        .get(lg.url(CLICK, "/bystander"))
        .send()
        .await
        .expect("a bystander's request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn http2_authority_and_host_disagreeing_is_refused() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let mut c = h2_connect(&pki, lg.https).await;
    let block = hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", CLICK),
        (":path", "/disagree"),
        ("host", "evil.example"),
    ]);
    c.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await
        .expect("headers");
    // And one well-formed request on the same connection, to show the harness works.
    c.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &get_request("/agree")))
        .await
        .expect("headers");
    let (r, w) = tokio::io::split(c);
    let outcome = tokio::time::timeout(Duration::from_secs(2), async {
        // Wait for both responses, then stop reading.
        let mut seen = 0;
        let mut r = r;
        let mut buf = vec![0u8; 65536];
        let mut pending = Vec::new();
        let mut statuses = Vec::new();
        while seen < 2 {
            let n = r.read(&mut buf).await.expect("read");
            assert!(n > 0, "server closed early");
            pending.extend_from_slice(&buf[..n]);
            while let Some(f) = take_frame(&mut pending) {
                if f.kind == HEADERS {
                    seen += 1;
                    // The first field of a hyper response is `:status`, indexed (0x88 = 200) or a
                    // literal with indexed name 8 (0x08 or 0x48) followed by the 3-digit code.
                    let p = &f.payload;
                    let status = match p.first() {
                        Some(0x88) => 200,
                        Some(0x8c) => 400,
                        Some(_) if p.len() >= 5 => std::str::from_utf8(&p[2..5])
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                        _ => 0,
                    };
                    statuses.push((f.stream, status));
                }
            }
        }
        statuses
    })
    .await
    .expect("both answered");
    drop(w);
    statuses_sorted(outcome, &[(1, 400), (3, 200)]);
    let got: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(got, ["/agree"]);
    lg.stop().await;
}

fn statuses_sorted(mut got: Vec<(u32, u16)>, want: &[(u32, u16)]) {
    got.sort_unstable();
    assert_eq!(got, want);
}

#[tokio::test]
async fn http2_rapid_reset_closes_the_connection_and_others_are_served() {
    let (_dir, pki, _up, lg) = serve_click("").await;
    let c = h2_connect(&pki, lg.https).await;
    let (r, mut w) = tokio::io::split(c);
    let reader = tokio::spawn(h2_outcome(r));
    let mut burst = Vec::new();
    for i in 0..20_000u32 {
        let stream = 2 * i + 1;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &get_request("/reset")));
        burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        if burst.len() > 64 * 1024 {
            if w.write_all(&burst).await.is_err() {
                break;
            }
            burst.clear();
        }
    }
    let _ = w.write_all(&burst).await;
    let outcome = reader.await.expect("reader");
    assert!(
        outcome.closed,
        "the server must close a rapid-reset connection: {outcome:?}"
    );
    assert!(
        outcome.goaway.is_some_and(|code| code != 0),
        "GOAWAY with an error code: {outcome:?}"
    );
    others_are_served(&pki, &lg).await;
    lg.stop().await;
}

#[tokio::test]
async fn http2_continuation_without_end_closes_the_connection() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let c = h2_connect(&pki, lg.https).await;
    let (r, mut w) = tokio::io::split(c);
    let reader = tokio::spawn(h2_outcome(r));
    let mut block = get_request("/continuation");
    block.extend(hpack(&[("x-pad", "p")]));
    let _ = w.write_all(&frame(HEADERS, END_STREAM, 1, &block)).await;
    let filler = hpack(&[("x-filler", &"f".repeat(4000))]);
    for _ in 0..2_000 {
        if w.write_all(&frame(CONTINUATION, 0, 1, &filler)).await.is_err() {
            break;
        }
    }
    let outcome = reader.await.expect("reader");
    assert!(
        outcome.closed,
        "endless CONTINUATION must close the connection: {outcome:?}"
    );
    assert_eq!(outcome.responses, 0);
    assert!(up.received().is_empty());
    others_are_served(&pki, &lg).await;
    lg.stop().await;
}

#[tokio::test]
async fn http2_settings_flood_closes_the_connection() {
    // The flood stalls the server's writes (the acknowledgements are never
    // read); a connection that cannot write for idle_timeout is closed.
    let (_dir, pki, _up, lg) = serve_click("[limits]\nidle_timeout = \"2s\"\n").await;
    let c = h2_connect(&pki, lg.https).await;
    let (r, mut w) = tokio::io::split(c);
    // Never read: the acknowledgements pile up on the server's side.
    let one = frame(SETTINGS, 0, 0, &[0x00, 0x03, 0x00, 0x00, 0x00, 0x64]);
    let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 10_000).collect();
    let flood = tokio::spawn(async move {
        for _ in 0..400 {
            if w.write_all(&burst).await.is_err() {
                return;
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(15), flood).await;
    let outcome = h2_outcome(r).await;
    assert!(
        outcome.closed,
        "a SETTINGS flood must close the connection: {outcome:?}"
    );
    others_are_served(&pki, &lg).await;
    lg.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_idle_timeout() {
    let (_dir, pki, _up, lg) = serve_click("[limits]\nidle_timeout = \"2s\"\n").await;
    const SIZE: usize = 64 << 20;
    let request = format!("GET /big?n={SIZE} HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n");
    for listener in ["tls", "plain"] {
        let mut stream = open(&lg, &pki, listener).await;
        stream.write_all(request.as_bytes()).await.expect("request");
        // Read nothing for longer than idle_timeout: the response stalls in the socket buffers.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let ended = tokio::time::timeout(HANG_GUARD, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{listener}: the connection ends");
        assert!(
            total < SIZE / 2,
            "{listener}: a stalled reader was cut, not served 64 MiB ({total} bytes arrived)"
        );
    }
    lg.stop().await;
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// Opens a connection to `listener` ("tls" or "plain") of `lg`.
async fn open(lg: &Linkgate, pki: &Pki, listener: &str) -> Box<dyn AsyncReadWrite> {
    let addr = if listener == "tls" {
        lg.https
    } else {
        lg.http.expect("http")
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    if listener == "tls" {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
        let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
        Box::new(connector.connect(name, tcp).await.expect("handshake"))
    } else {
        Box::new(tcp)
    }
}

/// A keep-alive connection to `listener` on which `GET /first` has been served.
async fn after_one_request(lg: &Linkgate, pki: &Pki, listener: &str) -> Box<dyn AsyncReadWrite> {
    let mut s = open(lg, pki, listener).await;
    s.write_all(http1_get("/first").as_bytes()).await.expect("write");
    assert_eq!(status_of(&read_response(&mut s).await.text()), 200, "{listener}");
    s
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_request() {
    // Parking happens after min(1 s, header_read_timeout / 2) = 0.5 s without a request.
    let (_dir, pki, up, lg) = serve_click("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"4s\"\n").await;
    for listener in ["tls", "plain"] {
        let mut s = after_one_request(&lg, &pki, listener).await;

        // Idle well past header_read_timeout: the parked connection stays open
        // (bounded by idle_timeout), and its next request is served.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Its head arrives in two parts, the first of which wakes the connection.
        let second = http1_get("/second");
        let (head, rest) = second.split_at(20);
        s.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.write_all(rest.as_bytes()).await.expect("write");
        assert_eq!(status_of(&read_response(&mut s).await.text()), 200, "{listener}");

        // A head that started before the connection parked is handed on whole.
        s.write_all(http1_get("/third").as_bytes()).await.expect("write");
        assert_eq!(status_of(&read_response(&mut s).await.text()), 200, "{listener}");
        let fourth = http1_get("/fourth");
        let (head, rest) = fourth.split_at(25);
        s.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.write_all(rest.as_bytes()).await.expect("write");
        let response = read_response(&mut s).await.text();
        assert_eq!(status_of(&response), 200, "{listener}: {response}");
        assert!(response.ends_with("\r\n\r\nok"), "{listener}: {response}");

        // Still open after 3 s idle; closed by idle_timeout (4 s).
        assert!(
            !closed_by_server(&mut s, Duration::from_secs(3)).await,
            "{listener}: closed before idle_timeout"
        );
        assert!(
            closed_by_server(&mut s, Duration::from_secs(3)).await,
            "{listener}: still open after idle_timeout"
        );
    }
    let seen: Vec<_> = up
        .received()
        .into_iter()
        .map(|r| (r.target.clone(), r.header("host").map(str::to_owned)))
        .collect();
    let host = Some(CLICK.to_owned());
    let once = [
        ("/first".to_owned(), host.clone()),
        ("/second".to_owned(), host.clone()),
        ("/third".to_owned(), host.clone()),
        ("/fourth".to_owned(), host.clone()),
    ];
    assert_eq!(
        seen,
        [once.clone(), once].concat(),
        "each request forwarded once, whole"
    );
    lg.stop().await;
}

#[tokio::test]
async fn a_head_left_unfinished_is_still_cut_by_header_read_timeout() {
    let (_dir, pki, up, lg) = serve_click("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"60s\"\n").await;
    for listener in ["tls", "plain"] {
        let mut s = after_one_request(&lg, &pki, listener).await;
        // The start of a head, then nothing: parking hands it to a new hyper
        // connection, whose head timer still runs out.
        s.write_all(b"GET /never HTTP/1.1\r\nHost: ").await.expect("write");
        let started = tokio::time::Instant::now();
        assert!(
            closed_by_server(&mut s, Duration::from_secs(5)).await,
            "{listener}: an unfinished head kept the connection open"
        );
        eprintln!("{listener}: closed after {:?}", started.elapsed());
        // And a connection that goes quiet mid-head after parking is cut too.
        let mut s = after_one_request(&lg, &pki, listener).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.write_all(b"GET /never HTTP/1.1\r\n").await.expect("write");
        assert!(
            closed_by_server(&mut s, Duration::from_secs(5)).await,
            "{listener}: an unfinished head on a parked connection kept it open"
        );
    }
    let seen: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(seen, ["/first"; 4], "nothing unfinished is forwarded");
    lg.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_once_when_the_server_drains() {
    // The default grace period (30 s) is longer than HANG_GUARD: stop() only
    // returns in time if the parked connection is closed when draining starts.
    let (_dir, pki, up, lg) = serve_click("").await;
    let mut s = after_one_request(&lg, &pki, "tls").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = tokio::time::Instant::now();
    lg.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain waited {:?} for a parked connection",
        started.elapsed()
    );
    assert!(
        closed_by_server(&mut s, Duration::from_secs(1)).await,
        "the client sees the close"
    );
    assert_eq!(up.received().len(), 1);
}
