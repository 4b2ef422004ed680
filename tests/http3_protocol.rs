//! HTTP/3 requests a client gets wrong, against the real binary, as an
//! operator sees them: what the client got, what the upstream received,
//! the access line and the metrics, and where HTTP/2 has the same case,
//! that it is treated the same. Malformed heads (those h3 refuses itself
//! and those it would let through), a body shorter than its
//! Content-Length, and an answer cut because the client granted no more
//! flow-control credit. (Connection errors and unidirectional streams:
//! tests/http3_connection.rs.)

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::process::{has, wait_line, Process};
use common::quic::{frame, get_head, qpack_int, raw_headers, raw_request, H3Client, H3Conn};
use common::*;

/// RFC 9114 §8.1: a malformed message.
const H3_MESSAGE_ERROR: u64 = 0x10e;

/// linkgate as a child process with JSON logs, HTTP/3 on, an admin
/// listener, `limits` added; and its fixture (the stand-in, the PKI).
async fn binary(limits: &str) -> (Fixture, Process) {
    let fixture = Setup::new()
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n")
        .host(CLICK)
        .admin()
        .limits(limits)
        .extra("[log]\nformat = \"json\"\n")
        .write()
        .await;
    let lg = Process::start(&fixture.config);
    (fixture, lg)
}

/// The next access line.
fn access(lg: &Process) -> serde_json::Value {
    wait_line(&lg.lines, |v| v["target"] == "linkgate::access")
}

/// A HEADERS frame of `fields` (as [`raw_headers`] writes them) and one
/// field line more whose name is `huffman_name`, taken as Huffman-coded
/// bytes, with `value`.
fn with_huffman_name(fields: &[(&str, &str)], huffman_name: &[u8], value: &str) -> Vec<u8> {
    let mut block = vec![0x00, 0x00];
    for (name, value) in fields {
        qpack_int(&mut block, 0x20, 3, name.len());
        block.extend_from_slice(name.as_bytes());
        qpack_int(&mut block, 0x00, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    // 001 N H length(3): a literal name, Huffman-coded.
    qpack_int(&mut block, 0x28, 3, huffman_name.len());
    block.extend_from_slice(huffman_name);
    qpack_int(&mut block, 0x00, 7, value.len());
    block.extend_from_slice(value.as_bytes());
    frame(0x01, &block)
}

/// The requests counted for [`CLICK`] in `class` (`4xx`).
async fn counted(lg: &Process, class: &str) -> Option<f64> {
    metric(
        lg.admin,
        &format!("linkgate_requests_total{{host=\"{CLICK}\",class=\"{class}\"}}"),
    )
    .await
}

/// Heads HTTP/2 refuses as malformed (h2 resets the stream): those h3
/// refuses too (an uppercase name, a `:path` that is no path, no `:path`)
/// and those it would take (`:path` twice, the last winning; a
/// pseudo-header field after a regular one). Each is reset with
/// H3_MESSAGE_ERROR, never forwarded, logged as a 400 with its reason
/// and counted as a 4xx; the connection goes on serving.
#[tokio::test]
async fn malformed_heads_are_reset_logged_and_counted_and_never_forwarded() {
    let (fixture, lg) = binary("").await;
    let client = H3Client::new(&fixture.pki, false);
    let quic = client
        .handshake(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("handshake");
    let mut h3 = H3Conn::over(quic.clone()).await;
    let good = get_head(CLICK, "/ls/click?upn=x");
    let with = |extra: (&'static str, &'static str)| [good.clone(), vec![extra]].concat();
    let (h3_refuses, late) = (
        "malformed HTTP/3 request (field names or pseudo-header fields)",
        "a pseudo-header field after a regular field",
    );
    // `:path` and `:method` Huffman-coded, then padded with one or two
    // bytes more (RFC 7541 §5.2 forbids it; h3 decodes them as the names
    // they pad): found by an outside review, the second value reached the
    // upstream (`GET /SECOND`, a GET turned into `DELETE`).
    let padded_path = [&[0xb9, 0x58, 0xd3, 0x3f][..], &[0xff]].concat();
    let padded_method = [&[0xb9, 0x49, 0x53, 0x39, 0xe4][..], &[0xff, 0xff]].concat();
    let not_canonical = "an unknown or non-canonically coded pseudo-header field";
    let cases = [
        (
            "an uppercase field name",
            raw_headers(&with(("X-Upper", "1"))),
            h3_refuses,
        ),
        (
            "a :path with a space",
            raw_headers(&get_head(CLICK, "/a b")),
            h3_refuses,
        ),
        ("no :path", raw_headers(&good[..3]), h3_refuses),
        (
            "two :path fields",
            raw_headers(&with((":path", "/second"))),
            "a pseudo-header field given twice",
        ),
        (
            "a pseudo-header field after a regular one",
            raw_headers(&[&good[..2], &[("x-a", "1")], &good[2..]].concat()),
            late,
        ),
        (
            "a second :path, its Huffman-coded name padded",
            with_huffman_name(&good, &padded_path, "/SECOND"),
            not_canonical,
        ),
        (
            "a second :method, its Huffman-coded name padded",
            with_huffman_name(&good, &padded_method, "DELETE"),
            not_canonical,
        ),
    ];
    for (what, head, reason) in &cases {
        let answer = raw_request(&quic, head).await;
        assert_eq!(answer, Err(H3_MESSAGE_ERROR), "{what}: reset as malformed");
        let line = access(&lg);
        assert_eq!(line["status"], 400, "{what}: {line}");
        assert!(has(&line["refused"], reason), "{what}: {line}");
        for (field, value) in [
            ("method", "-"),
            ("path", "-"),
            ("host", CLICK),
            ("protocol", "HTTP/3.0"),
        ] {
            assert_eq!(line[field], value, "{what}: {line}");
        }
    }
    assert!(
        fixture.up.received().is_empty(),
        "forwarded: {:?}",
        fixture.up.received()
    );
    assert_eq!(counted(&lg, "4xx").await, Some(cases.len() as f64));
    // The same head, well-formed, on the same connection.
    let answer = raw_request(&quic, &raw_headers(&good)).await;
    assert!(
        answer.is_ok_and(|a| !a.is_empty()),
        "a well-formed raw head is answered"
    );
    let answer = h3.get(&format!("https://{CLICK}/after")).await.expect("answer");
    assert_eq!(answer.status, 200);
    let targets: Vec<_> = fixture.up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/ls/click?upn=x", "/after"]);
}

/// A body shorter than its Content-Length, over HTTP/3 and over HTTP/2:
/// refused (a 400; HTTP/2's codec may reset the stream first), never
/// forwarded, logged as a 400 with a client-side reason and counted as a
/// 4xx, not as an upstream error (the fault is the client's).
#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_the_clients_fault_as_over_http2() {
    let (fixture, lg) = binary("").await;
    let short = || {
        http::Request::post(format!("https://{CLICK}/echo"))
            .header("content-length", "10")
            .body(())
            .expect("request")
    };
    let client = H3Client::new(&fixture.pki, false);
    let mut h3 = client
        .connect(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("handshake");
    let answer = h3
        .send_request(short(), Some(Bytes::from_static(b"hello")))
        .await
        .expect("answer");
    assert_eq!(answer.status, 400, "HTTP/3: {}", String::from_utf8_lossy(&answer.body));
    let over_h3 = access(&lg);

    // h2 resets the stream (PROTOCOL_ERROR) as it reads the data that ends
    // the body short; hyper may or may not get the 400 out before that.
    let mut h2 = h2_connection(&fixture.pki, lg.https).await;
    let (resp, mut body) = h2.send_request(short(), false).expect("send");
    body.send_data(Bytes::from_static(b"hello"), true).expect("data");
    match tokio::time::timeout(HANG_GUARD, resp).await.expect("answered or reset") {
        Ok(resp) => assert_eq!(resp.status(), 400, "HTTP/2"),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "HTTP/2: {e}"),
    }
    let over_h2 = access(&lg);

    for (protocol, line) in [("HTTP/3.0", &over_h3), ("HTTP/2.0", &over_h2)] {
        assert_eq!(line["protocol"], protocol, "{line}");
        assert_eq!(line["status"], 400, "{line}");
        assert!(has(&line["refused"], "body"), "a client-side reason: {line}");
    }
    assert!(fixture.up.received().is_empty(), "{:?}", fixture.up.received());
    assert_eq!(counted(&lg, "4xx").await, Some(2.0));
    assert_eq!(
        upstream_errors(&lg).await,
        Vec::<String>::new(),
        "counted as the upstream's failure"
    );
}

/// A body that breaks off after its first bytes went upstream (HTTP/1.1:
/// the client ends its side of the connection midway) is the client's
/// failure as well: 400 in the log, a 4xx in the metrics, no upstream
/// error, nothing recorded upstream (the exchange was aborted).
#[tokio::test]
async fn a_body_that_breaks_off_midway_is_not_an_upstream_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (fixture, lg) = binary("").await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&fixture.pki, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(lg.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let head = format!("POST /echo HTTP/1.1\r\nHost: {CLICK}\r\nContent-Length: 10\r\n\r\nhello");
    tls.write_all(head.as_bytes()).await.expect("request");
    tls.shutdown().await.expect("end of the client's side");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut answer)).await;
    let line = access(&lg);
    assert_eq!(line["status"], 400, "{line}");
    assert!(has(&line["refused"], "broke off"), "{line}");
    assert!(fixture.up.received().is_empty(), "{:?}", fixture.up.received());
    assert_eq!(counted(&lg, "4xx").await, Some(1.0));
    assert_eq!(upstream_errors(&lg).await, Vec::<String>::new());
}

/// The upstream error series that are not 0.
async fn upstream_errors(lg: &Process) -> Vec<String> {
    let metrics = reqwest::get(format!("http://{}/metrics", lg.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    metrics
        .lines()
        .filter(|l| l.starts_with("linkgate_upstream_errors_total") && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect()
}

/// An HTTP/2 client connection to `addr`, driven in the background.
async fn h2_connection(pki: &Pki, addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    h2_connection_with(pki, addr, h2::client::Builder::new()).await
}

async fn h2_connection_with(
    pki: &Pki,
    addr: std::net::SocketAddr,
    builder: h2::client::Builder,
) -> h2::client::SendRequest<Bytes> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"h2"])));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (send, conn) = builder.handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("ready")
}

/// The client's flow-control window for the answer below.
const WINDOW: u32 = 50_000;

/// A client that stops granting flow-control credit (it never reads) is
/// cut after `idle_timeout` without progress, and the access line says
/// `cut="client"` as it does for HTTP/2 in the same case; over HTTP/3 its
/// `bytes` are what QUIC took within the client's window (all of it but
/// the frame heads and the response's HEADERS), not what was handed out.
/// (Two workers: the log is awaited blocking one while the clients, whose
/// connections must stay alive, are driven on the other.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_for_want_of_credit_logs_what_the_client_could_receive() {
    let (fixture, lg) = binary("idle_timeout = \"2s\"\n").await;
    let target = "/big?n=300000";
    let client = H3Client::with_stream_window(&fixture.pki, WINDOW);
    let quic = client
        .handshake(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("handshake");
    let (mut send, _unread) = quic.open_bi().await.expect("stream");
    send.write_all(&raw_headers(&get_head(CLICK, target)))
        .await
        .expect("head");
    send.finish().expect("finish");
    let line = access(&lg);
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["cut"], "client", "{line}");
    let bytes = line["bytes"].as_u64().expect("bytes");
    assert!(
        (u64::from(WINDOW) - 1024..=u64::from(WINDOW)).contains(&bytes),
        "{bytes} bytes logged for a window of {WINDOW}: {line}"
    );

    // HTTP/2, the same answer to a client that grants the same window and never reads it.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(WINDOW);
    let mut h2 = h2_connection_with(&fixture.pki, lg.https, builder).await;
    let req = http::Request::get(format!("https://{CLICK}{target}"))
        .body(())
        .expect("request");
    let (_resp, _body) = h2.send_request(req, true).expect("send");
    let line = access(&lg);
    assert_eq!(line["protocol"], "HTTP/2.0", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["cut"], "client", "{line}");
}
