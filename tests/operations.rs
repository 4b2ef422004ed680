//! Running in production: reload, limits, PROXY protocol, admin endpoints.
//! (Signals, drain and the access log are driven through the real binary in
//! tests/binary.rs.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn served_cert(c: &reqwest::Client, lg: &Linkgate) -> Option<Vec<u8>> {
    let resp = c.get(lg.url(CLICK, "/")).send().await.ok()?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>()?;
    info.peer_certificate().map(<[u8]>::to_vec)
}

/// A client loop that keeps making requests on fresh connections and counts failures.
fn load_loop(
    pki: &Pki,
    lg: &Linkgate,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let url = lg.url(CLICK, "/wf/open");
    let pki_ca = pki.ca_der.clone();
    let https = lg.https;
    let task = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            // A new client (new connection, new handshake) every few requests.
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki_ca.clone()).expect("root");
            let mut tls = rustls::ClientConfig::builder_with_provider(linkgate::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let c = reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .resolve(CLICK, https)
                .no_proxy()
                .build()
                .expect("client");
            for _ in 0..3 {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => o.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("load loop: status {}", r.status());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("load loop: {e:?}");
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
    });
    (stop, ok, failed, task)
}

/// Kubernetes Secret volume layout: `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`.
fn k8s_secret(dir: &std::path::Path, version: &str, leaf: &Leaf) {
    let v = dir.join(version);
    std::fs::create_dir_all(&v).expect("mkdir");
    std::fs::write(v.join("tls.crt"), &leaf.cert_pem).expect("write");
    std::fs::write(v.join("tls.key"), &leaf.key_pem).expect("write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for f in ["tls.crt", "tls.key"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).expect("symlink");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_swapped_under_load_are_picked_up_without_a_failed_request() {
    let setup = |cert: &str, key: &str| {
        Setup::new()
            .admin()
            .host_section(&format!(
                "[[host]]\nname = \"{CLICK}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"
            ))
            .watching()
    };
    let fixture = setup("secret/tls.crt", "secret/tls.key").write().await;
    let pki = &fixture.pki;
    let secret = fixture.dir.path().join("secret");
    std::fs::create_dir(&secret).expect("mkdir");
    let first = pki.leaf(&[CLICK]);
    k8s_secret(&secret, "..v1", &first);
    let live_dir = fixture.dir.path().join("live");
    std::fs::create_dir(&live_dir).expect("mkdir");
    let second = pki.leaf(&[CLICK]);
    let Served { dir, pki, up, lg, .. } = fixture.start().await;
    let probe = client(&pki, &lg, &[CLICK]);
    assert_eq!(served_cert(&probe, &lg).await.as_deref(), Some(first.der.as_ref()));

    let (stop, ok, failed, task) = load_loop(&pki, &lg);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. Kubernetes swaps the ..data symlink.
    k8s_secret(&secret, "..v2", &second);
    wait_for("the swapped certificate", async || {
        served_cert(&client(&pki, &lg, &[CLICK]), &lg).await.as_deref() == Some(second.der.as_ref())
    })
    .await;

    // 2. certbot-style: point the config at new files written elsewhere and renamed into place.
    let third = pki.leaf(&[CLICK]);
    std::fs::write(live_dir.join("cert.pem.new"), &third.cert_pem).expect("write");
    std::fs::write(live_dir.join("key.pem.new"), &third.key_pem).expect("write");
    std::fs::rename(live_dir.join("key.pem.new"), live_dir.join("privkey.pem")).expect("rename");
    std::fs::rename(live_dir.join("cert.pem.new"), live_dir.join("fullchain.pem")).expect("rename");
    let toml2 = setup("live/fullchain.pem", "live/privkey.pem").text(&up);
    let tmp = dir.path().join("linkgate.toml.new");
    std::fs::write(&tmp, toml2).expect("write");
    std::fs::rename(&tmp, dir.path().join("linkgate.toml")).expect("rename config");
    wait_for("the renamed certificate", async || {
        served_cert(&client(&pki, &lg, &[CLICK]), &lg).await.as_deref() == Some(third.der.as_ref())
    })
    .await;

    // 3. A broken replacement (key of another certificate): the running one stays, the failure is counted.
    let failures_before = metric(
        lg.admin.expect("admin listener"),
        "linkgate_config_reloads_total{result=\"failure\"}",
    )
    .await
    .unwrap_or(0.0);
    let fourth = pki.leaf(&[CLICK]);
    std::fs::write(live_dir.join("fullchain.pem"), &fourth.cert_pem).expect("write");
    wait_for("the failed reload to be counted", async || {
        metric(
            lg.admin.expect("admin listener"),
            "linkgate_config_reloads_total{result=\"failure\"}",
        )
        .await
        .unwrap_or(0.0)
            > failures_before
    })
    .await;
    // (A fresh client: a resumed session would report the certificate of its first handshake.)
    assert_eq!(
        served_cert(&client(&pki, &lg, &[CLICK]), &lg).await.as_deref(),
        Some(third.der.as_ref()),
        "the old certificate keeps serving"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load loop");
    assert!(ok.load(Ordering::Relaxed) > 10, "the load loop made requests");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during the reloads"
    );
    lg.stop().await;
}

#[tokio::test]
async fn reload_adds_and_removes_hosts_and_resumption_survives() {
    let Served { dir, pki, up, lg, .. } = Setup::new()
        .cert("a", &["url1.example.test"])
        .cert("b", &["url2.example.test"])
        .host_on("url1.example.test", "a")
        .start()
        .await;
    let hosts = ["url1.example.test", "url2.example.test"];
    assert!(client(&pki, &lg, &hosts)
        .get(lg.url(hosts[1], "/"))
        .send()
        .await
        .is_err());

    // A TLS 1.3 session from before the reload.
    let config = Arc::new(client_tls(&pki, &[b"http/1.1"]));
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = rustls_pki_types::ServerName::try_from(hosts[0]).expect("name");
    let mut first = connector
        .connect(
            name.clone(),
            tokio::net::TcpStream::connect(lg.https).await.expect("tcp"),
        )
        .await
        .expect("handshake");
    first
        .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", hosts[0]).as_bytes())
        .await
        .expect("write");
    let mut sink = Vec::new();
    first.read_to_end(&mut sink).await.expect("read");

    std::fs::write(
        dir.path().join("linkgate.toml"),
        Setup::new().host_on("url2.example.test", "b").text(&up),
    )
    .expect("write");
    lg.live.reload().await.expect("reload");
    let c = client(&pki, &lg, &hosts);
    assert_eq!(
        c.get(lg.url(hosts[1], "/")).send().await.expect("new host").status(),
        200
    );
    assert!(
        c.get(lg.url(hosts[0], "/")).send().await.is_err(),
        "removed host is refused"
    );

    // Bring host 1 back and resume the old session: the ticket key survived two reloads.
    std::fs::write(
        dir.path().join("linkgate.toml"),
        Setup::new()
            .host_on("url1.example.test", "a")
            .host_on("url2.example.test", "b")
            .text(&up),
    )
    .expect("write");
    lg.live.reload().await.expect("reload");
    let again = connector
        .connect(name, tokio::net::TcpStream::connect(lg.https).await.expect("tcp"))
        .await
        .expect("handshake");
    assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));

    // A bad file on reload: refused, and the running configuration stays.
    std::fs::write(dir.path().join("linkgate.toml"), "[listen]\nhttps = 1\n").expect("write");
    let err = lg.live.reload().await.expect_err("bad config refused");
    assert!(err.contains("linkgate.toml"), "{err}");
    assert_eq!(
        c.get(lg.url(hosts[1], "/"))
            .send()
            .await
            .expect("still served")
            .status(),
        200
    );
    lg.stop().await;
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused_without_forwarding() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .admin()
        .limits("max_header_bytes = 16384\nmax_request_body = \"1KiB\"\n")
        .start()
        .await;
    let c = client(&pki, &lg, &[CLICK]);
    let resp = c
        .get(lg.url(CLICK, "/"))
        .header("x-big", "a".repeat(20_000))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 431);
    let resp = c
        .post(lg.url(CLICK, "/echo"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 413, "declared Content-Length above the cap");
    assert!(up.received().is_empty(), "nothing forwarded: {:?}", up.received().len());
    // Chunked (no Content-Length) and over the cap: 413, the upstream never gets a complete request.
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!(
            "POST /echo HTTP/1.1\r\nHost: {CLICK}\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
            "y".repeat(2048)
        )
        .as_bytes(),
    )
    .await
    .expect("raw");
    assert_eq!(status_of(&raw), 413, "{raw}");
    assert!(
        up.received().iter().all(|r| r.body.len() < 2048),
        "no complete oversized body reached the upstream"
    );
    // Within the caps all is well.
    let resp = c
        .post(lg.url(CLICK, "/echo"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    lg.stop().await;
}

#[tokio::test]
async fn slowloris_connections_are_cut_while_others_are_served() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .admin()
        .limits("header_read_timeout = \"1s\"\n")
        .start()
        .await;
    let http = lg.http.expect("http");
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: click.example.test\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    let started = tokio::time::Instant::now();
    // Trickle one header line each every 200 ms while normal requests go through.
    let c = client(&pki, &lg, &[CLICK]);
    let mut closed = 0;
    for round in 0..15 {
        assert_eq!(
            c.get(lg.url(CLICK, "/")).send().await.expect("normal request").status(),
            200
        );
        for s in &mut slow {
            if s.write_all(format!("X-Slow-{round}: 1\r\n").as_bytes()).await.is_err() {
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in &mut slow {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(n)) => {
                // hyper answers 408 before closing.
                if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408") {
                    closed += 1;
                }
            }
            Err(_) => {}
        }
    }
    assert_eq!(closed, 50, "every trickling connection was cut");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        up.received().iter().all(|r| r.header("x-slow-0").is_none()),
        "no trickled request was forwarded"
    );
    lg.stop().await;
}

#[tokio::test]
async fn connections_above_the_cap_wait_and_existing_ones_are_unharmed() {
    // a and b are both connected before either sends its request, so both
    // are in their pre-request phase at once: the handshake budgets allow it.
    let limits = "max_connections = 2\nmax_handshakes = 2\nhandshakes_per_address = 2\nconnections_per_address = 2\n";
    let Served {
        dir: _dir,
        pki: _pki,
        up: _up,
        lg,
        ..
    } = Setup::new().host(CLICK).admin().limits(limits).start().await;
    let http = lg.http.expect("http");
    let request = format!("GET /ok HTTP/1.1\r\nHost: {CLICK}\r\n\r\n");
    let mut a = tokio::net::TcpStream::connect(http).await.expect("a");
    let mut b = tokio::net::TcpStream::connect(http).await.expect("b");
    let mut buf = vec![0u8; 1024];
    for s in [&mut a, &mut b] {
        s.write_all(request.as_bytes()).await.expect("write");
        let n = s.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // A third connection is accepted by the kernel but not served while two are open.
    let mut third = tokio::net::TcpStream::connect(http).await.expect("third");
    third.write_all(request.as_bytes()).await.expect("write");
    assert!(
        tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf))
            .await
            .is_err(),
        "third was served above the cap"
    );
    // The existing connections keep working.
    a.write_all(request.as_bytes()).await.expect("write");
    let n = a.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Closing one lets the waiting connection in.
    drop(b);
    let n = tokio::time::timeout(HANG_GUARD, third.read(&mut buf))
        .await
        .expect("served after a slot freed")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    lg.stop().await;
}

#[tokio::test]
async fn upstream_connect_timeout_is_502() {
    // A listener that never accepts, its backlog filled: further connects hang in SYN.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let blackhole = socket.listen(1).expect("listen");
    let addr = blackhole.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let Served { dir: _dir, pki, lg, .. } = Setup::new()
        .host(CLICK)
        .upstream(move |_| {
            format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{addr}\"\nconnect_timeout = \"500ms\"\nresponse_timeout = \"10s\"\n")
        })
        .start()
        .await;
    let started = tokio::time::Instant::now();
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/"))
        .send()
        .await
        .expect("request");
    if started.elapsed() < Duration::from_millis(400) {
        // Some kernels answer a full backlog with RST: still a connect failure, still 502.
        eprintln!("note: connect failed fast instead of timing out");
    }
    assert_eq!(resp.status(), 502);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connect timeout, not the response timeout"
    );
    lg.stop().await;
}

/// [`CLICK`] behind a load balancer that sends the PROXY header, trusted from `trusted`.
fn behind_proxy_protocol(trusted: &str) -> Setup {
    Setup::new().host(CLICK).listen(&format!(
        "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]\n"
    ))
}

/// Connects, sends `header`, then speaks TLS and one request; returns the response or the error.
async fn via_proxy_header(
    pki: &Pki,
    addr: std::net::SocketAddr,
    header: &[u8],
    extra: &str,
) -> std::io::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(header).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
    let name = rustls_pki_types::ServerName::try_from(CLICK).map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(format!("GET /ok HTTP/1.1\r\nHost: {CLICK}\r\n{extra}Connection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn proxy_protocol_sets_the_client_address_only_from_trusted_peers() {
    let Served { dir, pki, up, lg, .. } = behind_proxy_protocol("127.0.0.0/8").admin().start().await;

    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n";
    let resp = via_proxy_header(&pki, lg.https, v1, "X-Forwarded-For: 6.6.6.6\r\n")
        .await
        .expect("v1");
    assert_eq!(status_of(&resp), 200, "{resp}");
    let v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:40000".parse::<std::net::SocketAddr>().expect("addr"),
            "[2001:db8::1]:443".parse::<std::net::SocketAddr>().expect("addr"),
        ),
    )
    .build()
    .expect("v2 header");
    let resp = via_proxy_header(&pki, lg.https, &v2, "").await.expect("v2");
    assert_eq!(status_of(&resp), 200, "{resp}");
    // Plain listener too.
    let mut tcp = tokio::net::TcpStream::connect(lg.http.expect("http"))
        .await
        .expect("connect");
    tcp.write_all(b"PROXY TCP4 198.51.100.20 10.0.0.1 1111 80\r\nGET /plain HTTP/1.1\r\nHost: click.example.test\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    assert_eq!(status_of(&out), 200, "{out}");

    let got = up.received();
    let xff: Vec<_> = got
        .iter()
        .map(|r| r.header("x-forwarded-for").map(str::to_owned))
        .collect();
    assert_eq!(
        xff,
        [
            Some("203.0.113.7".into()),
            Some("2001:db8::7".into()),
            Some("198.51.100.20".into())
        ],
        "the PROXY header's address, and the client's own X-Forwarded-For replaced"
    );

    // Without a header, or with garbage: dropped, nothing forwarded.
    let before = up.received().len();
    assert!(via_proxy_header(&pki, lg.https, b"", "").await.is_err());
    assert!(via_proxy_header(&pki, lg.https, b"PROXY NONSENSE\r\n", "")
        .await
        .is_err());
    assert_eq!(up.received().len(), before);
    // Counted, so that a balancer that sends no header is seen on /metrics.
    let refused = |reason: &str| format!("linkgate_connections_refused_total{{reason=\"{reason}\"}}");
    let admin = lg.admin.expect("admin");
    assert_eq!(metric(admin, &refused("proxy_header")).await, Some(2.0));
    lg.stop().await;

    // From a peer that is not a trusted proxy the connection is dropped, header or not, and counted.
    let lg = Linkgate::start(dir.path(), &behind_proxy_protocol("10.0.0.0/8").admin().text(&up)).await;
    assert!(via_proxy_header(&pki, lg.https, v1, "").await.is_err());
    assert_eq!(up.received().len(), before);
    let admin = lg.admin.expect("admin");
    assert_eq!(metric(admin, &refused("untrusted_proxy")).await, Some(1.0));
    assert_eq!(metric(admin, &refused("proxy_header")).await, Some(0.0));
    lg.stop().await;
}

#[tokio::test]
async fn forwarded_headers_are_kept_only_from_trusted_proxies() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n")
        .start()
        .await;
    client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/"))
        .header("x-forwarded-for", "203.0.113.50")
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .expect("request");
    let r = &up.received()[0];
    assert_eq!(
        r.header("x-forwarded-for"),
        Some("203.0.113.50, 127.0.0.1"),
        "trusted: appended"
    );
    assert_eq!(r.header("x-forwarded-proto"), Some("http"), "trusted: kept");
    lg.stop().await;
}

#[tokio::test]
async fn admin_endpoints_and_metrics_after_known_traffic() {
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = Setup::new().host(CLICK).admin().limits("").start().await;
    let c = client(&pki, &lg, &[CLICK]);
    for path in ["/a", "/b", "/redirect"] {
        c.get(lg.url(CLICK, path)).send().await.expect("request");
    }
    let _ = client(&pki, &lg, &["nope.example.test"])
        .get(lg.url("nope.example.test", "/"))
        .send()
        .await;
    let resp = reqwest::Client::new()
        .get(lg.http_url("127.0.0.1", "/"))
        .header("host", "evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 421);

    assert_eq!(
        reqwest::get(lg.admin_url("/healthz")).await.expect("healthz").status(),
        200
    );
    assert_eq!(
        reqwest::get(lg.admin_url("/readyz")).await.expect("readyz").status(),
        200
    );
    let text = reqwest::get(lg.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "linkgate_requests_total{host=\"click.example.test\",class=\"2xx\"} 2",
        "linkgate_requests_total{host=\"click.example.test\",class=\"3xx\"} 1",
        "linkgate_requests_total{host=\"other\",class=\"4xx\"} 1",
        "linkgate_tls_handshakes_total{result=\"unknown_sni\"} 1",
        "linkgate_build_info{version=",
        "linkgate_request_duration_seconds_count 4",
        "linkgate_upstream_duration_seconds_count 3",
        "linkgate_certificate_expiry_timestamp_seconds{host=\"click.example.test\"}",
        "linkgate_open_connections",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let ok = metric(
        lg.admin.expect("admin listener"),
        "linkgate_tls_handshakes_total{result=\"ok\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(ok >= 1.0, "{text}");
    assert!(!text.contains("evil.example"), "host labels take only configured names");
    lg.stop().await;
}

// ---------------------------------------------------------------- half-written configs (issue #24, item 7)

const THREE: [&str; 3] = ["url1.example.test", "url2.example.test", "url3.example.test"];

/// Serving `hosts`, each with its own certificate (files named by [`stem_of`]).
fn serving(hosts: &[&str]) -> Setup {
    hosts.iter().fold(Setup::new(), |setup, h| setup.host(h))
}

/// The config text for `up` serving `hosts` (certificates written by [`three_hosts`]).
fn hosts_config(up: &StandIn, hosts: &[&str]) -> String {
    serving(hosts).text(up)
}

/// linkgate with the file watcher, serving the three hosts of [`THREE`].
async fn three_hosts() -> Served {
    serving(&THREE).watching().start().await
}

/// One TLS handshake with SNI `host`: `Err(true)` when linkgate refused the
/// name (`unrecognized_name`), `Err(false)` on any other failure.
async fn handshake(tls: &Arc<rustls::ClientConfig>, https: std::net::SocketAddr, host: &str) -> Result<(), bool> {
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).expect("name");
    let tcp = tokio::net::TcpStream::connect(https).await.map_err(|_| false)?;
    match tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await {
        Ok(_) => Ok(()),
        Err(e) => Err(has_alert(&e, rustls::AlertDescription::UnrecognisedName)),
    }
}

/// Handshakes with every host of [`THREE`], round after round, until the
/// returned flag is set; the task returns every failure seen and the number
/// of rounds.
fn keep_handshaking(pki: &Pki, lg: &Linkgate) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(Vec<String>, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (s, https) = (stop.clone(), lg.https);
    let tls = Arc::new(client_tls(pki, &[b"http/1.1"]));
    let task = tokio::spawn(async move {
        let (mut failures, mut rounds) = (Vec::new(), 0);
        while !s.load(Ordering::Relaxed) {
            rounds += 1;
            for h in THREE {
                match handshake(&tls, https, h).await {
                    Ok(()) => {}
                    Err(true) => failures.push(format!("round {rounds}: {h} refused (unrecognized_name)")),
                    Err(false) => failures.push(format!("round {rounds}: {h} failed")),
                }
            }
        }
        (failures, rounds)
    });
    (stop, task)
}

/// Stops [`keep_handshaking`] after one more round and asserts that no
/// handshake failed.
async fn no_handshake_failed(stop: Arc<AtomicBool>, task: tokio::task::JoinHandle<(Vec<String>, usize)>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let (failures, rounds) = task.await.expect("handshake loop");
    assert!(rounds > 5, "the handshake loop ran ({rounds} rounds)");
    assert!(
        failures.is_empty(),
        "{} handshakes of hosts served before failed while the file was written, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

async fn all_three_handshake(pki: &Pki, lg: &Linkgate) {
    let tls = Arc::new(client_tls(pki, &[b"http/1.1"]));
    for h in THREE {
        assert_eq!(handshake(&tls, lg.https, h).await, Ok(()), "{h} is served");
    }
}

fn generation(lg: &Linkgate) -> u64 {
    lg.live.load().generation
}

/// "Write part, close, append the rest": an editor or tool that truncates
/// and writes the first host, closes, and 100 ms later appends the other two
/// one after the other, 250 ms apart. Every pause is shorter than the settle
/// period, so linkgate reads the file once, whole; the old watcher read it
/// 250 ms after the first close and dropped the third host until the next
/// reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_waits_for_a_config_written_in_parts() {
    let Served { dir, pki, up, lg, .. } = three_hosts().await;
    all_three_handshake(&pki, &lg).await;
    let before = generation(&lg);
    let (stop, task) = keep_handshaking(&pki, &lg);

    let path = dir.path().join("linkgate.toml");
    let (first, second, third) = (
        hosts_config(&up, &THREE[..1]),
        host_section(THREE[1], &stem_of(THREE[1])),
        host_section(THREE[2], &stem_of(THREE[2])),
    );
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        std::fs::write(&path, first).expect("write the first part");
        std::thread::sleep(Duration::from_millis(100));
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).expect("reopen");
        file.write_all(second.as_bytes()).expect("append");
        std::thread::sleep(Duration::from_millis(250));
        file.write_all(third.as_bytes()).expect("append");
    })
    .await
    .expect("writer");

    wait_for("the reload", async || generation(&lg) > before).await;
    no_handshake_failed(stop, task).await;
    all_three_handshake(&pki, &lg).await;
    // Twice the settle period (src/reload/mod.rs, `SETTLE`): any second reload would have happened.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(generation(&lg), before + 1, "one reload, of the whole file");
    lg.stop().await;
}

/// The config is being written (one host of three so far, the file still
/// open) when another watched file finishes a write: a certificate renewed
/// in place. Found by the outside audit: that finished write started a
/// reload that read the config halfway and dropped two hosts for 2 s. The
/// config is read once it is closed, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_does_not_read_a_config_still_being_written_when_a_certificate_changes() {
    let Served { dir, pki, up, lg, .. } = three_hosts().await;
    all_three_handshake(&pki, &lg).await;
    let before = generation(&lg);
    let (stop, task) = keep_handshaking(&pki, &lg);

    let path = dir.path().join("linkgate.toml");
    let cert = dir.path().join(format!("{}.pem", stem_of(THREE[0])));
    let (first, rest) = (
        hosts_config(&up, &THREE[..1]),
        format!(
            "{}{}",
            host_section(THREE[1], &stem_of(THREE[1])),
            host_section(THREE[2], &stem_of(THREE[2]))
        ),
    );
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).expect("truncate");
        file.write_all(first.as_bytes()).expect("the first part");
        std::thread::sleep(Duration::from_millis(700));
        // A renewal of host 1's certificate, written in place and closed.
        let pem = std::fs::read(&cert).expect("read the certificate");
        std::fs::write(&cert, pem).expect("rewrite the certificate");
        // Longer than the settle period (src/reload/mod.rs, `SETTLE`).
        std::thread::sleep(Duration::from_millis(2000));
        file.write_all(rest.as_bytes()).expect("the rest");
    })
    .await
    .expect("writer");

    wait_for("the reload", async || generation(&lg) > before).await;
    no_handshake_failed(stop, task).await;
    all_three_handshake(&pki, &lg).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(generation(&lg), before + 1, "one reload, of the whole file");
    lg.stop().await;
}

/// "Delete the file, then write it slowly": no reload while the new file is
/// open for writing, however long the pauses, and the running configuration
/// serves every host meanwhile. An empty file (closed) is not read either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_waits_until_a_deleted_config_is_rewritten_and_closed() {
    let Served { dir, pki, up, lg, .. } = three_hosts().await;
    let before = generation(&lg);
    let (stop, task) = keep_handshaking(&pki, &lg);
    let path = dir.path().join("linkgate.toml");
    // Longer than the settle period (src/reload/mod.rs, `SETTLE`): quiet alone must not start a reload.
    let pause = Duration::from_millis(800);

    // Emptied and closed: nothing to read, the running configuration stays.
    std::fs::write(&path, "").expect("empty the file");
    tokio::time::sleep(pause).await;
    assert_eq!(generation(&lg), before, "an empty file is not loaded");

    let parts = [
        hosts_config(&up, &THREE[..1]),
        host_section(THREE[1], &stem_of(THREE[1])),
        host_section(THREE[2], &stem_of(THREE[2])),
    ];
    let live = lg.live.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        std::fs::remove_file(&path).expect("delete");
        let mut file = std::fs::File::create(&path).expect("create");
        for part in parts {
            file.write_all(part.as_bytes()).expect("write");
            std::thread::sleep(pause);
            assert_eq!(
                live.load().generation,
                before,
                "no reload while the file is open for writing"
            );
        }
    })
    .await
    .expect("writer");

    wait_for("the reload after the close", async || generation(&lg) > before).await;
    no_handshake_failed(stop, task).await;
    all_three_handshake(&pki, &lg).await;
    lg.stop().await;
}

/// The real binary, reloading on a config file renamed into place: the log
/// line names the hosts added and removed, at warn level when a host went.
#[tokio::test]
async fn reload_logs_the_hosts_added_and_removed() {
    use common::process::{wait_line, Process};
    let Fixture { dir, up, .. } = serving(&THREE).write().await;
    let path = dir.path().join("linkgate.toml");
    let json = "[log]\nformat = \"json\"\naccess = false\n";
    let write = |hosts: &[&str]| {
        let tmp = dir.path().join("linkgate.toml.tmp");
        std::fs::write(&tmp, format!("{json}{}", hosts_config(&up, hosts))).expect("write");
        std::fs::rename(&tmp, &path).expect("rename into place");
    };
    write(&THREE[..2]);
    let lg = Process::start(&path);
    let reloaded = |v: &serde_json::Value| v["message"] == "configuration reloaded";

    write(&THREE[1..]);
    let line = wait_line(&lg.lines, reloaded);
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["added"], "[\"url3.example.test\"]", "{line}");
    assert_eq!(line["removed"], "[\"url1.example.test\"]", "{line}");
    assert_eq!(line["hosts"], 2, "{line}");

    write(&THREE);
    let line = wait_line(&lg.lines, reloaded);
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["added"], "[\"url1.example.test\"]", "{line}");
    assert_eq!(line["removed"], "[]", "{line}");
    assert_eq!(line["hosts"], 3, "{line}");
}

/// How many of `conns` the server closes within `within` (all together).
async fn closed_within(conns: &mut [tokio::net::TcpStream], within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut closed = 0;
    for s in conns {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if closed_by_server(s, left.max(Duration::from_millis(1))).await {
            closed += 1;
        }
    }
    closed
}

/// Behind PROXY protocol the cap on unfinished handshakes per address
/// (here 3: the default for `max_connections = 50`) applies to the address
/// each header carries, never to the balancer's own: a fourth silent
/// connection for 203.0.113.7 is closed at once, while one for another
/// client, through the same balancer address, is served, and so is a v2
/// `LOCAL` health check (the balancer's own connection).
#[tokio::test]
async fn behind_proxy_protocol_unfinished_handshakes_are_capped_per_client_not_per_balancer() {
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = Setup::new()
        .host(CLICK)
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n")
        .admin()
        .limits("max_connections = 50\n")
        .start()
        .await;
    let stalled = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n";
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = tokio::net::TcpStream::connect(lg.https).await.expect("connect");
        tcp.write_all(stalled).await.expect("header");
        held.push(tcp);
    }
    // handshake_timeout is 10 s: within 2 s only a refusal closes one.
    assert_eq!(
        closed_within(&mut held, Duration::from_secs(2)).await,
        1,
        "one over the cap of 3"
    );

    let other = b"PROXY TCP4 198.51.100.20 10.0.0.1 40001 443\r\n";
    let resp = via_proxy_header(&pki, lg.https, other, "")
        .await
        .expect("another client");
    assert_eq!(status_of(&resp), 200, "{resp}");
    let local = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .expect("v2 LOCAL header");
    let resp = via_proxy_header(&pki, lg.https, &local, "")
        .await
        .expect("health check");
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(
        via_proxy_header(&pki, lg.https, stalled, "").await.is_err(),
        "203.0.113.7 still has 3 stalled: refused"
    );
    assert_eq!(
        metric(
            lg.admin.expect("admin listener"),
            "linkgate_connections_refused_total{reason=\"handshakes_per_address\"}"
        )
        .await,
        Some(2.0)
    );
    // Once its stalled connections are gone, 203.0.113.7 is served again.
    drop(held);
    wait_for("203.0.113.7 served again", async || {
        via_proxy_header(&pki, lg.https, stalled, "")
            .await
            .is_ok_and(|r| status_of(&r) == 200)
    })
    .await;
    lg.stop().await;
}

/// On the plain-http listener a connection counts as unfinished until its
/// first request head has been read: a fourth silent connection from one
/// address (cap 3 for `max_connections = 50`) is closed at once, others'
/// requests are served, and a connection that has sent its request stops
/// counting.
#[tokio::test]
async fn plain_http_connections_count_as_unfinished_until_their_first_request_head() {
    let Served {
        dir: _dir,
        pki: _pki,
        up: _up,
        lg,
        ..
    } = Setup::new()
        .host(CLICK)
        .admin()
        .limits("max_connections = 50\n")
        .start()
        .await;
    let http = lg.http.expect("http");
    let from_2 = || async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        socket.connect(http).await.expect("connect")
    };
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(from_2().await);
    }
    assert_eq!(
        closed_within(&mut silent, Duration::from_secs(2)).await,
        1,
        "one over the cap of 3"
    );
    let request = format!("GET /ok HTTP/1.1\r\nHost: {CLICK}\r\n\r\n");
    let resp = raw_plain(
        http,
        format!("GET /other HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("from 127.0.0.1");
    assert_eq!(status_of(&resp), 200, "{resp}");
    // One of the silent ones sends its request: it no longer counts, so a
    // new connection from 127.0.0.2 is admitted (and stays open).
    let mut buf = vec![0u8; 1024];
    let mut sent = None;
    for (i, s) in silent.iter_mut().enumerate() {
        if s.write_all(request.as_bytes()).await.is_ok() {
            if let Ok(Ok(n)) = tokio::time::timeout(HANG_GUARD, s.read(&mut buf)).await {
                if n > 0 {
                    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
                    sent = Some(i);
                    break;
                }
            }
        }
    }
    assert!(sent.is_some(), "an admitted connection is served");
    let mut another = vec![from_2().await];
    assert_eq!(closed_within(&mut another, Duration::from_secs(1)).await, 0, "admitted");
    assert_eq!(
        metric(
            lg.admin.expect("admin listener"),
            "linkgate_connections_refused_total{reason=\"handshakes_per_address\"}"
        )
        .await,
        Some(1.0)
    );
    drop((silent, another));
    lg.stop().await;
}

/// An AWS NLB with PROXY protocol on sends a PROXY header on its health
/// checks too: the admin listener reads and ignores one (v1 or v2, LOCAL
/// or with addresses, in one segment or split), so `/readyz` answers them,
/// and still answers plain HTTP.
#[tokio::test]
async fn the_admin_listener_answers_health_checks_behind_a_proxy_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Served {
        dir: _dir, up: _up, lg, ..
    } = Setup::new().host(CLICK).admin().start().await;
    let admin = lg.admin.expect("admin");
    let get = b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let sig: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let v2_local = [sig, &[0x20, 0x00, 0x00, 0x00]].concat();
    let v2_tcp4 = [
        sig,
        &[0x21, 0x11, 0x00, 0x0c, 10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x26, 0xad],
    ]
    .concat();
    let v1 = b"PROXY TCP4 10.0.0.1 10.0.0.2 12345 9901\r\n".to_vec();
    for (what, header, split) in [
        ("none", Vec::new(), false),
        ("v2 LOCAL", v2_local.clone(), false),
        ("v2 LOCAL, split", v2_local, true),
        ("v2 TCP4", v2_tcp4, false),
        ("v1", v1.clone(), false),
        ("v1, split", v1, true),
    ] {
        let mut s = tokio::net::TcpStream::connect(admin).await.expect("connect");
        if split {
            s.write_all(&header[..3]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&header[3..]).await.expect("write");
        } else {
            s.write_all(&header).await.expect("write");
        }
        s.write_all(get).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(HANG_GUARD, s.read_to_end(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
    }
    // A malformed header closes the connection unanswered.
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("connect");
    s.write_all(b"PROXY NONSENSE\r\n").await.expect("write");
    s.write_all(get).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, s.read_to_end(&mut answer))
        .await
        .expect("closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}
