//! HTTP/3 (`listen.http3`): a quinn/h3 client on loopback against the real
//! server in-process. What the upstream received for a request over QUIC,
//! the SNI refusal in the handshake, 421, Alt-Svc over HTTP/1.1, HTTP/2 and
//! HTTP/3, a certificate reload seen over QUIC, drain, and 0-RTT refused.
//! (The binary, its access log and bad settings: tests/http3_operations.rs;
//! the connection cap and Retry: tests/http3_limits.rs.)

mod common;

use bytes::Buf;
use common::quic::{H3Client, H3Conn};
use common::*;

/// `[listen]` with HTTP/3 on a loopback UDP port of its own.
fn listen_http3(extra: &str) -> String {
    format!("[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n{extra}")
}

async fn serve_http3(extra_listen: &str, extra: &str) -> Served {
    Setup::new()
        .listen(&listen_http3(extra_listen))
        .host(CLICK)
        .host("open.example.test")
        .extra(extra)
        .start()
        .await
}

fn h3_addr(lg: &Linkgate) -> std::net::SocketAddr {
    lg.http3.expect("http3 socket")
}

#[tokio::test]
async fn a_request_over_http3_is_forwarded_with_the_branded_host_and_the_query_byte_exact() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "").await;
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    // Reserved characters, a percent-encoding in lower case and an empty
    // parameter: what the provider signed must reach it as sent.
    let target = "/ls/click?upn=u001.a%2fB%2Bc-3D&x=&y=1;z=%7E";
    let req = http::Request::get(format!("https://{CLICK}{target}"))
        .header("user-agent", "Mail/1.0")
        .header("x-forwarded-for", "198.51.100.9")
        .body(())
        .expect("request");
    let answer = conn.send_request(req, None).await.expect("answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"ok");
    assert_eq!(answer.header("x-upstream"), Some("stand-in"));

    let got = up.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.target, target);
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.header("host"), Some(CLICK), "Host is the branded name");
    assert_eq!(r.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        r.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "the client's claim is replaced"
    );
    assert_eq!(r.header("user-agent"), Some("Mail/1.0"));

    // A body goes up whole, and the answer streams back.
    let post = http::Request::post(format!("https://{CLICK}/echo"))
        .header("content-length", "11")
        .body(())
        .expect("request");
    let echoed = conn
        .send_request(post, Some(bytes::Bytes::from_static(b"unsubscribe")))
        .await
        .expect("answer");
    assert_eq!((echoed.status, echoed.body.as_slice()), (200, &b"unsubscribe"[..]));
    // A body longer than its Content-Length is malformed: refused before
    // the upstream sees it (which would otherwise get a length the body does not have).
    let lying = http::Request::post(format!("https://{CLICK}/echo"))
        .header("content-length", "3")
        .body(())
        .expect("request");
    let refused = conn
        .send_request(lying, Some(bytes::Bytes::from_static(b"unsubscribe")))
        .await
        .expect("answer");
    assert_eq!(refused.status, 400, "{:?}", String::from_utf8_lossy(&refused.body));
    assert_eq!(up.received().len(), 2, "the lying request never went upstream");
    let big = conn
        .get(&format!("https://{CLICK}/big?n=300000"))
        .await
        .expect("answer");
    assert_eq!(big.body, pattern(300_000));
    lg.stop().await;
}

#[tokio::test]
async fn an_unknown_or_missing_sni_is_refused_in_the_quic_handshake() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "").await;
    let client = H3Client::new(&pki, false);
    for sni in ["unknown.example.test", "127.0.0.1"] {
        // An IP address as the name: rustls sends no SNI at all.
        let err = client.handshake(h3_addr(&lg), sni).await.expect_err("refused");
        assert!(
            matches!(err, quinn::ConnectionError::ConnectionClosed(_)),
            "{sni}: the server closed the handshake (not the client's own check): {err:?}"
        );
    }
    let mut conn = client
        .connect(h3_addr(&lg), CLICK)
        .await
        .expect("a served name still works");
    assert_eq!(
        conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    assert_eq!(up.received().len(), 1);
    lg.stop().await;
}

#[tokio::test]
async fn an_authority_other_than_the_sni_host_is_421_and_never_forwarded() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "").await;
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    // Served too, but not the name this connection's certificate was chosen for.
    let answer = conn.get("https://open.example.test/wf/open").await.expect("answer");
    assert_eq!(answer.status, 421);
    assert!(up.received().is_empty(), "{:?}", up.received());
    lg.stop().await;
}

#[tokio::test]
async fn alt_svc_names_the_advertised_port_over_every_https_protocol() {
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = serve_http3("http3_advertise_port = 8443\n", "").await;
    let expected = "h3=\":8443\"; ma=86400";
    for c in [client(&pki, &lg, &[CLICK]), h2_client(&pki, &lg, &[CLICK])] {
        let resp = c.get(lg.url(CLICK, "/")).send().await.expect("request");
        let version = resp.version();
        assert_eq!(
            resp.headers().get("alt-svc").and_then(|v| v.to_str().ok()),
            Some(expected),
            "{version:?}"
        );
        // linkgate's own refusals too (421 or 400, for a Host that is not
        // the SNI's): every https answer.
        let refused = c
            .get(lg.url(CLICK, "/"))
            .header("host", "open.example.test")
            .send()
            .await
            .expect("request");
        assert!(refused.status().is_client_error(), "{version:?}: {}", refused.status());
        assert_eq!(
            refused.headers().get("alt-svc").and_then(|v| v.to_str().ok()),
            Some(expected)
        );
    }
    let client3 = H3Client::new(&pki, false);
    let mut conn = client3.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    let answer = conn.get(&format!("https://{CLICK}/")).await.expect("answer");
    assert_eq!(answer.header("alt-svc"), Some(expected));
    // Not on the plain-http listener.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/", lg.http.expect("http")))
        .header("host", CLICK)
        .send()
        .await
        .expect("request");
    assert!(plain.headers().get("alt-svc").is_none(), "{:?}", plain.headers());
    lg.stop().await;
}

#[tokio::test]
async fn alt_svc_defaults_to_the_bound_port_and_is_absent_without_http3() {
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = serve_http3("", "").await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/"))
        .send()
        .await
        .expect("request");
    let port = h3_addr(&lg).port();
    assert_eq!(
        resp.headers().get("alt-svc").and_then(|v| v.to_str().ok()),
        Some(format!("h3=\":{port}\"; ma=86400").as_str())
    );
    lg.stop().await;

    let (_dir, pki, _up, lg) = serve_click("").await;
    for c in [client(&pki, &lg, &[CLICK]), h2_client(&pki, &lg, &[CLICK])] {
        let resp = c.get(lg.url(CLICK, "/")).send().await.expect("request");
        assert!(resp.headers().get("alt-svc").is_none(), "{:?}", resp.headers());
    }
    lg.stop().await;
}

#[tokio::test]
async fn a_reload_changes_the_certificate_served_over_quic() {
    let Served {
        dir,
        pki,
        up: _up,
        lg,
        leaves,
        ..
    } = serve_http3("", "").await;
    let client = H3Client::new(&pki, false);
    let before = client.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    assert_eq!(before.peer_leaf(), leaves["click"].der);
    let renewed = pki.write_leaf(dir.path(), "click", &[CLICK]);
    assert_ne!(renewed.der, leaves["click"].der);
    lg.live.reload().await.expect("reload");
    // A client without the first one's session ticket: a resumed session
    // would carry the certificate it was first given.
    let fresh = H3Client::new(&pki, false);
    let mut after = fresh.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    assert_eq!(
        after.peer_leaf(),
        renewed.der,
        "the new certificate, on the same endpoint"
    );
    assert_eq!(
        after.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    lg.stop().await;
}

#[tokio::test]
async fn on_shutdown_a_request_in_flight_completes_and_new_ones_are_refused() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"15s\"\n").await;
    let addr = h3_addr(&lg);
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(addr, CLICK).await.expect("handshake");
    let mut stream = conn
        .send
        .send_request(
            http::Request::get(format!("https://{CLICK}/stream"))
                .body(())
                .expect("request"),
        )
        .await
        .expect("sent");
    stream.finish().await.expect("finish");
    let resp = stream.recv_response().await.expect("head");
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while !body.ends_with(b"first-chunk\n") {
        let mut chunk = stream.recv_data().await.expect("data").expect("more");
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }

    let stopping = tokio::spawn(lg.stop());
    // GOAWAY reaches the client: new requests on this connection are refused...
    wait_for("GOAWAY", async || {
        match conn
            .send
            .send_request(
                http::Request::get(format!("https://{CLICK}/after"))
                    .body(())
                    .expect("r"),
            )
            .await
        {
            Err(_) => true,
            // Sent before GOAWAY arrived: the server still answers it.
            Ok(mut s) => {
                let _ = s.finish().await;
                false
            }
        }
    })
    .await;
    // ...and so are new connections.
    let refused = client.connect(addr, CLICK).await;
    assert!(refused.is_err(), "a new connection while draining is refused");

    // The request in flight gets its whole answer.
    up.release.notify_one();
    while let Some(mut chunk) = stream.recv_data().await.expect("data") {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    assert_eq!(body, b"first-chunk\nrest\n");
    drop(stream);
    drop(conn);
    tokio::time::timeout(HANG_GUARD, stopping)
        .await
        .expect("the server stops once its connections are done")
        .expect("stop");
    assert_eq!(
        up.received().iter().filter(|r| r.target == "/stream").count(),
        1,
        "the request in flight went upstream once"
    );
}

#[tokio::test]
async fn zero_rtt_is_refused_even_with_a_resumption_ticket() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "").await;
    let addr = h3_addr(&lg);
    let client = H3Client::new(&pki, true);
    let mut first = client.connect(addr, CLICK).await.expect("handshake");
    assert_eq!(
        first.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    wait_for("a session ticket", async || client.tickets.received() > 0).await;
    assert_eq!(client.tickets.early_data_allowed(), 0, "no ticket allows early data");
    drop(first);

    // The client holds a ticket and asks for 0-RTT: the ticket allows no early data.
    let connecting = client.endpoint.connect(addr, CLICK).expect("connect");
    let connecting = match connecting.into_0rtt() {
        Ok((conn, _accepted)) => panic!("0-RTT was offered to {:?}", conn.remote_address()),
        Err(connecting) => connecting,
    };
    let quic = tokio::time::timeout(HANG_GUARD, connecting)
        .await
        .expect("handshake ends")
        .expect("a full (1-RTT) handshake still succeeds");
    let mut conn = H3Conn::over(quic).await;
    assert_eq!(
        conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    assert_eq!(up.received().len(), 2, "each request reached the upstream once");
    lg.stop().await;
}

#[tokio::test]
async fn malformed_framing_fields_are_400_and_never_forwarded_over_http3() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve_http3("", "").await;
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(h3_addr(&lg), CLICK).await.expect("handshake");
    // Each would frame the body differently at an HTTP/1.1 upstream than
    // the client framed it here (RFC 9114 §4.2, §4.1.2); HTTP/2 refuses
    // them in the h2 codec.
    let cases: [&[(&str, &str)]; 9] = [
        &[("content-length", "5"), ("content-length", "6")],
        &[("content-length", "5, 5")],
        &[("content-length", "5 ")],
        &[("content-length", "-1")],
        &[("content-length", "5"), ("transfer-encoding", "chunked")],
        &[("transfer-encoding", "chunked")],
        &[("connection", "close")],
        &[("keep-alive", "timeout=5")],
        &[("te", "gzip")],
    ];
    for fields in cases {
        let mut req = http::Request::post(format!("https://{CLICK}/ls/click?upn=x"));
        for (name, value) in fields {
            req = req.header(*name, *value);
        }
        let req = req.body(()).expect("request");
        let answer = conn
            .send_request(req, Some(bytes::Bytes::from_static(b"hello")))
            .await
            .expect("answer");
        assert_eq!(
            answer.status,
            400,
            "{fields:?}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert!(up.received().is_empty(), "forwarded: {:?}", up.received());
    // A well-formed one still goes through on the same connection.
    let req = http::Request::post(format!("https://{CLICK}/ls/click?upn=x"))
        .header("content-length", "5")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let answer = conn
        .send_request(req, Some(bytes::Bytes::from_static(b"hello")))
        .await
        .expect("answer");
    assert_eq!(answer.status, 200);
    let received = up.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(&received[0].body[..], b"hello");
    lg.stop().await;
}
