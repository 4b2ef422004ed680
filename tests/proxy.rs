//! The core proxy, driven end to end: real TLS clients in front, a recording
//! stand-in for sendgrid.net behind, linkgate in between.

mod common;

use common::*;
use http::Version;

#[tokio::test]
async fn forwards_with_branded_host_and_forwarded_headers() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/wf/open?upn=abc"))
        .header("user-agent", "Mail/1.0")
        .header("cookie", "session=1")
        .header("accept-encoding", "gzip")
        .header("x-forwarded-for", "198.51.100.9")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "stand-in");
    assert_eq!(resp.text().await.expect("body"), "ok");

    let got = up.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.target, "/wf/open?upn=abc");
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(
        r.header("host"),
        Some(CLICK),
        "Host must be the branded name, not sendgrid.net"
    );
    assert_eq!(r.header("x-forwarded-host"), Some(CLICK));
    assert_eq!(r.header("x-forwarded-proto"), Some("https"));
    // The client is not a trusted proxy: its X-Forwarded-For claim is replaced, not extended.
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(r.header("user-agent"), Some("Mail/1.0"));
    assert_eq!(r.header("cookie"), Some("session=1"));
    assert_eq!(r.header("accept-encoding"), Some("gzip"));
    lg.stop().await;
}

#[tokio::test]
async fn long_query_is_forwarded_byte_exact() {
    let (_dir, pki, up, lg) = serve_click("").await;
    // A SendGrid-like click token: kilobytes of URL-safe and percent-encoded bytes that must not be touched.
    // (The client library would itself re-encode `'`, so it is left out here; the raw case below has the rest.)
    let alphabet = b"AbZz09-_.~%2F%3d+;=:@!$()*,";
    let token: String = (0..6000).map(|i| alphabet[i % alphabet.len()] as char).collect();
    let path = format!("/ls/click?upn={token}&x=%41%2f%2F//..%2e/");
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, &path))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let got = &up.received()[0].target;
    assert!(
        *got == path,
        "target changed on the way:\n sent {path:.200}...\n got  {got:.200}..."
    );

    // Dot segments and odd encodings in the path are not normalised either (raw socket: no client cleanup).
    let raw_path = "/a/../b/%2e%2E/./c%20d?q=%zz&q=1&'quoted'";
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!("GET {raw_path} HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("raw request");
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(up.received()[1].target, raw_path);
    lg.stop().await;
}

#[tokio::test]
async fn methods_and_bodies_are_forwarded() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let c = client(&pki, &lg, &[CLICK]);
    // RFC 8058 one-click unsubscribe is a POST.
    let resp = c
        .post(lg.url(CLICK, "/echo?upn=u1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "List-Unsubscribe=One-Click");
    let resp = c.head(lg.url(CLICK, "/wf/open")).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    let resp = c.delete(lg.url(CLICK, "/x")).send().await.expect("delete");
    assert_eq!(resp.status(), 200);

    let got = up.received();
    let methods: Vec<_> = got.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["POST", "HEAD", "DELETE"]);
    assert_eq!(&got[0].body[..], b"List-Unsubscribe=One-Click");
    assert_eq!(got[0].header("content-type"), Some("application/x-www-form-urlencoded"));
    lg.stop().await;
}

#[tokio::test]
async fn redirects_pass_back_untouched() {
    let (_dir, pki, _up, lg) = serve_click("").await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/redirect"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "https://www.example.com/landing?utm=1");
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; Path=/"]);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(&resp.bytes().await.expect("body")[..], b"\x1f\x8b not really gzip");
    lg.stop().await;
}

#[tokio::test]
async fn sni_picks_the_certificate_of_each_host() {
    let Served {
        dir: _dir,
        pki,
        up,
        lg,
        leaves,
        ..
    } = Setup::new()
        .cert("a", &["url1.example.test"])
        .cert("b", &["url2.example.test"])
        .host_on("url1.example.test", "a")
        .host_on("URL2.Example.Test.", "b")
        .start()
        .await;
    let (a, b) = (&leaves["a"], &leaves["b"]);
    let c = client(&pki, &lg, &["url1.example.test", "url2.example.test"]);
    for (host, leaf) in [("url1.example.test", a), ("url2.example.test", b)] {
        let resp = c.get(lg.url(host, "/")).send().await.expect("request");
        assert_eq!(resp.status(), 200);
        let info = resp.extensions().get::<reqwest::tls::TlsInfo>().expect("tls info");
        assert_eq!(
            info.peer_certificate(),
            Some(leaf.der.as_ref()),
            "{host} got the wrong certificate"
        );
    }
    let hosts: Vec<_> = up
        .received()
        .iter()
        .map(|r| r.header("host").map(str::to_owned))
        .collect();
    assert_eq!(
        hosts,
        [Some("url1.example.test".into()), Some("url2.example.test".into())]
    );
    lg.stop().await;
}

#[tokio::test]
async fn one_wildcard_certificate_serves_several_hosts() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .cert("wild", &["*.links.test"])
        .host_on("url1.links.test", "wild")
        .host_on("url2.links.test", "wild")
        .start()
        .await;
    let c = client(&pki, &lg, &["url1.links.test", "url2.links.test"]);
    for host in ["url1.links.test", "url2.links.test"] {
        assert_eq!(c.get(lg.url(host, "/")).send().await.expect("request").status(), 200);
    }
    assert_eq!(up.received().len(), 2);
    lg.stop().await;
}

#[tokio::test]
async fn unknown_or_missing_sni_is_refused_at_the_handshake() {
    let (_dir, pki, up, lg) = serve_click("").await;
    // A name we do not serve: refused with unrecognized_name, nothing forwarded.
    let err = client(&pki, &lg, &["other.example.test"])
        .get(lg.url("other.example.test", "/"))
        .send()
        .await
        .expect_err("must be refused");
    assert!(
        has_alert(&err, rustls::AlertDescription::UnrecognisedName),
        "expected an unrecognized_name alert, got {err:?}"
    );

    // No SNI at all (a client connecting by IP address).
    let mut config = client_tls(&pki, &[b"http/1.1"]);
    config.enable_sni = false;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(lg.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let err = connector.connect(name, tcp).await.expect_err("must be refused");
    assert!(has_alert(&err, rustls::AlertDescription::UnrecognisedName), "{err:?}");

    assert!(up.received().is_empty(), "nothing may be forwarded");
    lg.stop().await;
}

#[tokio::test]
async fn openssl_s_client_sees_the_right_certificate_and_refusals() {
    let Ok(version) = std::process::Command::new("openssl").arg("version").output() else {
        eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
        return;
    };
    assert!(version.status.success());
    let (dir, pki, _up, lg) = serve_click("").await;
    let ca = pki.write_ca(dir.path());
    let port = lg.https.port();
    let s_client = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .arg("s_client")
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run openssl")
        })
        .await
        .expect("join")
    };
    let ok = s_client(vec![
        "-connect".into(),
        format!("127.0.0.1:{port}"),
        "-servername".into(),
        CLICK.into(),
        "-CAfile".into(),
        ca.display().to_string(),
        "-verify_return_error".into(),
        "-verify_hostname".into(),
        CLICK.into(),
    ])
    .await;
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains(&format!("CN = {CLICK}")) || out.contains(&format!("CN={CLICK}")),
        "{out}"
    );

    for args in [
        vec!["-servername".to_string(), "nope.example.test".to_string()],
        vec!["-noservername".to_string()],
    ] {
        let mut all = vec!["-connect".to_string(), format!("127.0.0.1:{port}")];
        all.extend(args);
        let refused = s_client(all).await;
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(err.contains("unrecognized name"), "{err}");
    }
    lg.stop().await;
}

#[tokio::test]
async fn host_that_differs_from_sni_gets_421_and_nothing_is_forwarded() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .cert("a", &["url1.example.test"])
        .cert("b", &["url2.example.test"])
        .host_on("url1.example.test", "a")
        .host_on("url2.example.test", "b")
        .start()
        .await;
    // SNI url1, Host url2 (both configured): still misdirected.
    let resp = client(&pki, &lg, &["url1.example.test"])
        .get(lg.url("url1.example.test", "/"))
        .header("host", "url2.example.test")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 421);
    // Absolute-form naming another host.
    let raw = raw_tls(
        &pki,
        lg.https,
        "url1.example.test",
        b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("raw");
    assert_eq!(status_of(&raw), 421, "{raw}");
    // Absolute-form disagreeing with Host: ambiguous, refused.
    let raw = raw_tls(
        &pki,
        lg.https,
        "url1.example.test",
        b"GET http://evil.example/steal HTTP/1.1\r\nHost: url1.example.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("raw");
    assert_eq!(status_of(&raw), 400, "{raw}");
    // CONNECT: never a tunnel.
    let raw = raw_tls(
        &pki,
        lg.https,
        "url1.example.test",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await
    .expect("raw");
    assert!((400..500).contains(&status_of(&raw)), "{raw}");
    assert!(
        up.received().is_empty(),
        "nothing may be forwarded: {:?}",
        up.received()
    );

    // Absolute-form naming the connection's own host is fine, and reaches the upstream in origin-form.
    let raw = raw_tls(
        &pki,
        lg.https,
        "url1.example.test",
        b"GET https://URL1.example.test:443/ok?x=1 HTTP/1.1\r\nHost: url1.example.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("raw");
    assert_eq!(status_of(&raw), 200, "{raw}");
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, "/ok?x=1");
    assert_eq!(got[0].header("host"), Some("url1.example.test"));
    lg.stop().await;
}

#[tokio::test]
async fn http2_clients_are_served() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let c = h2_client(&pki, &lg, &[CLICK]);
    let resp = c.get(lg.url(CLICK, "/wf/open?upn=h2")).send().await.expect("request");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "ok");
    let resp = c
        .post(lg.url(CLICK, "/echo"))
        .body("h2 body")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.text().await.expect("body"), "h2 body");
    let got = up.received();
    assert_eq!(got[0].target, "/wf/open?upn=h2");
    assert_eq!(got[0].header("host"), Some(CLICK));
    assert_eq!(got[0].version, Version::HTTP_11, "upstream is spoken to in HTTP/1.1");
    assert_eq!(&got[1].body[..], b"h2 body");
    lg.stop().await;
}

#[tokio::test]
async fn plain_http_listener_forwards_configured_hosts_only() {
    let (_dir, _pki, up, lg) = serve_click("").await;
    let c = reqwest::Client::builder().no_proxy().build().expect("client");
    let http = lg.http.expect("http listener");
    let resp = c
        .get(format!("http://{http}/ls/click?upn=old-email"))
        .header("host", CLICK)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let resp = c
        .get(format!("http://{http}/"))
        .header("host", "not-ours.example")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 421);
    let raw = raw_plain(http, b"GET / HTTP/1.0\r\n\r\n").await.expect("raw");
    assert_eq!(status_of(&raw), 400, "HTTP/1.0 without Host: {raw}");

    let got = up.received();
    assert_eq!(got.len(), 1, "only the configured host is forwarded");
    assert_eq!(got[0].target, "/ls/click?upn=old-email");
    assert_eq!(got[0].header("host"), Some(CLICK));
    assert_eq!(got[0].header("x-forwarded-proto"), Some("http"));
    lg.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!(
            "GET /hop HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close, X-Private\r\nX-Private: secret\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\
             X-Normal: kept\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("raw");
    assert_eq!(status_of(&raw), 200, "{raw}");
    let head = raw.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.contains("x-kept: yes"), "{head}");
    assert!(!head.contains("x-hop"), "listed in upstream's Connection: {head}");
    assert!(!head.contains("keep-alive: timeout"), "{head}");

    let got = up.received();
    let r = &got[0];
    for name in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(r.header(name).is_none(), "{name} reached the upstream");
    }
    assert!(r.header("connection").is_none_or(|v| !v.contains("private")));
    assert_eq!(r.header("x-normal"), Some("kept"));
    lg.stop().await;
}

#[tokio::test]
async fn responses_stream_before_the_upstream_finishes() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let mut resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/stream"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    // The upstream holds back the rest until released: if linkgate buffered, this would hang.
    let first = tokio::time::timeout(HANG_GUARD, resp.chunk())
        .await
        .expect("first chunk arrives while the upstream is still sending")
        .expect("chunk")
        .expect("some data");
    assert_eq!(&first[..], b"first-chunk\n");
    up.release.notify_one();
    let rest = resp.bytes().await.expect("rest");
    assert_eq!(&rest[..], b"rest\n");
    lg.stop().await;
}

#[tokio::test]
async fn large_upload_and_download_arrive_intact() {
    let (_dir, pki, up, lg) = serve_click("[limits]\nmax_request_body = \"64MiB\"\n").await;
    let c = client(&pki, &lg, &[CLICK]);
    let n = 24 * 1024 * 1024 + 7;
    let body = bytes::Bytes::from(pattern(n));
    let resp = c
        .post(lg.url(CLICK, "/echo"))
        .body(body.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let echoed = resp.bytes().await.expect("echo");
    assert_eq!(echoed.len(), n);
    assert!(echoed == body, "uploaded bytes changed on the way");
    assert!(up.received()[0].body == body);

    let resp = c
        .get(lg.url(CLICK, &format!("/big?n={n}")))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.content_length(), Some(n as u64));
    let got = resp.bytes().await.expect("download body");
    assert!(got[..] == pattern(n)[..], "downloaded bytes changed on the way");
    lg.stop().await;
}

#[tokio::test]
async fn https_upstream_is_verified_by_its_own_name_with_its_own_ca() {
    let upstream_pki = Pki::new();
    let setup = |extra: String| {
        Setup::new().host(CLICK).upstream(move |up| {
            format!(
                "[upstream]\nurl = \"https://sendgrid.net\"\nconnect_to = \"{}\"\n{extra}",
                up.addr
            )
        })
    };
    let up = StandIn::tls(&upstream_pki.leaf(&["sendgrid.net"])).await;
    let fixture = setup(String::new()).standin(up).write().await;
    let ca = upstream_pki.write_ca(fixture.dir.path());
    let with_ca = setup(format!("ca_file = \"{}\"\n", ca.display())).text(&fixture.up);
    let Fixture { dir, pki, up, .. } = fixture;
    let lg = Linkgate::start(dir.path(), &with_ca).await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/ls/click?upn=tls"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].header("host"),
        Some(CLICK),
        "SNI says sendgrid.net, Host says the branded name"
    );
    lg.stop().await;

    // Without the upstream's CA (public roots only) the upstream certificate is not trusted: 502.
    let lg = Linkgate::start(dir.path(), &setup(String::new()).text(&up)).await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/ls/click?upn=tls"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(up.received().len(), 1, "no request reaches an unverified upstream");
    lg.stop().await;
}

#[tokio::test]
async fn upstream_refused_is_502_and_silent_upstream_is_504() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let Served { dir: _dir, pki, lg, .. } = Setup::new()
        .host(CLICK)
        .upstream(move |_| format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{closed}\"\n"))
        .start()
        .await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.text().await.expect("body"), "upstream unavailable\n");
    lg.stop().await;

    let (_dir, pki, up, lg) = serve_click("").await; // response_timeout = 2s, /slow answers after 5s
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/slow"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.text().await.expect("body"), "upstream timed out\n");
    assert_eq!(up.received().len(), 1);
    lg.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_then_closed_when_idle() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .upstream(|up| format!("{}pool_idle_timeout = \"1s\"\n", plain_upstream(up)))
        .start()
        .await;
    let c = client(&pki, &lg, &[CLICK]);
    // A pixel, a large body, a redirect, an empty body: each read to its end.
    for path in ["/wf/open", "/big?n=300000", "/redirect", "/echo", "/wf/open"] {
        let resp = c.get(lg.url(CLICK, path)).send().await.expect("request");
        assert!(
            resp.status().is_success() || resp.status() == 302,
            "{path}: {}",
            resp.status()
        );
        resp.bytes().await.expect("body");
    }
    let conns: Vec<usize> = up.received().iter().map(|r| r.conn).collect();
    assert_eq!(
        conns,
        [1, 1, 1, 1, 1],
        "one upstream connection for one client's requests"
    );
    assert_eq!(up.open_connections(), 1);
    // Idle past pool_idle_timeout, linkgate closes it; the next request opens another.
    wait_for("linkgate to close the idle upstream connection", async || {
        up.open_connections() == 0
    })
    .await;
    let resp = c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("body"), "ok");
    assert_eq!(up.received().last().map(|r| r.conn), Some(2));
    lg.stop().await;
}

/// After a burst, the upstream connections it opened and no longer needs are
/// closed within seconds (halved every `PURGE_EVERY`), long before
/// `pool_idle_timeout`; one stays open for the next request.
#[tokio::test]
async fn upstream_connections_left_over_from_a_burst_are_closed_within_seconds() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .upstream(|up| format!("{}pool_idle_timeout = \"90s\"\n", plain_upstream(up)))
        .start()
        .await;
    // One HTTP/2 connection, so one worker and one pool: 8 requests held open
    // at the same time take 8 upstream connections.
    let c = h2_client(&pki, &lg, &[CLICK]);
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut resp = c.get(lg.url(CLICK, "/stream")).send().await.expect("request");
        assert_eq!(resp.status(), 200);
        // Once the first chunk is here, the stand-in waits for the release.
        let first = resp.chunk().await.expect("first chunk");
        assert_eq!(first.as_deref(), Some(&b"first-chunk\n"[..]));
        held.push(resp);
    }
    assert_eq!(up.open_connections(), 8);
    up.release.notify_waiters();
    for resp in held {
        assert_eq!(resp.text().await.expect("body"), "rest\n");
    }
    wait_for("linkgate to close the connections the burst left over", async || {
        up.open_connections() == 1
    })
    .await;
    // The one kept is used for the next request, not a new one.
    let before = up.received().len();
    let resp = c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("body"), "ok");
    let conns: Vec<usize> = up.received().iter().map(|r| r.conn).collect();
    assert_eq!(conns.len(), before + 1);
    assert!(
        conns[..before].contains(&conns[before]),
        "a new connection was opened: {conns:?}"
    );
    assert_eq!(up.open_connections(), 1);
    lg.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let up = StandIn::plain_closing_idle_after(std::time::Duration::from_millis(200)).await;
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new().host(CLICK).standin(up).start().await;
    let c = client(&pki, &lg, &[CLICK]);
    for round in 1..=3 {
        let resp = c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request");
        assert_eq!(resp.status(), 200, "round {round}");
        assert_eq!(resp.text().await.expect("body"), "ok");
        assert_eq!(up.received().last().map(|r| r.conn), Some(round));
        wait_for("the stand-in to close its idle connection", async || {
            up.open_connections() == 0
        })
        .await;
    }
    lg.stop().await;
}

#[tokio::test]
async fn a_download_the_client_abandons_does_not_spoil_later_requests() {
    let (_dir, pki, up, lg) = serve_click("").await;
    let c = client(&pki, &lg, &[CLICK]);
    let mut resp = c.get(lg.url(CLICK, "/big?n=20000000")).send().await.expect("request");
    assert!(resp.chunk().await.expect("first chunk").is_some());
    drop(resp);
    drop(c);
    let c = client(&pki, &lg, &[CLICK]);
    for _ in 0..5 {
        let resp = c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "ok");
    }
    assert_eq!(up.received().len(), 6);
    lg.stop().await;
}

/// Without `connect_to`, the upstream's name is resolved and its addresses
/// tried in turn (where `localhost` also resolves to ::1, that one is
/// refused and 127.0.0.1, where the stand-in listens, answers).
#[tokio::test]
async fn upstream_named_by_dns_is_dialled_at_an_address_that_answers() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .upstream(|up| format!("[upstream]\nurl = \"http://localhost:{}\"\n", up.addr.port()))
        .start()
        .await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/wf/open"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "ok");
    assert_eq!(up.received()[0].header("host"), Some(CLICK));
    lg.stop().await;
}
