//! `linkgate doctor` against an in-test DNS server (`common::doctor`),
//! linkgate in-process, and deliberately misconfigured servers for each
//! failure SendGrid users meet. What doctor does per provider (probe paths,
//! wrong-host pages, the summary, the README's step numbers) is in
//! `tests/doctor_providers.rs`.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::doctor::{dns_server, doctor_async, host};
use common::process::has;
use common::*;
use tempfile::TempDir;

/// A config naming every test host (doctor reads only names and whether there is an http listener).
fn doctor_config(dir: &Path, http: bool) -> std::path::PathBuf {
    let mut toml = String::from("[listen]\nhttps = \"127.0.0.1:443\"\n");
    if http {
        toml.push_str("http = \"127.0.0.1:80\"\n");
    }
    for h in [
        "ok",
        "stale",
        "missing",
        "expired",
        "wrongname",
        "a.b",
        "nochain",
        "wronglink",
        "down",
        "stalled",
    ] {
        toml.push_str(&format!(
            "[[host]]\nname = \"{h}.example.test\"\ncert = \"x.pem\"\nkey = \"x.key\"\n"
        ));
    }
    // A Mailgun branding: doctor knows Mailgun's CNAME targets from the preset.
    toml.push_str("[[host]]\nname = \"mgstale.example.test\"\ncert = \"x.pem\"\nkey = \"x.key\"\nprovider = \"mailgun\"\nregion = \"eu\"\n");
    let path = dir.join("doctor.toml");
    std::fs::write(&path, toml).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_branding_passes_and_dns_mistakes_are_named() {
    let dns = dns_server().await;
    let Served { dir, pki, up, lg, .. } = Setup::new().host("ok.example.test").start().await;
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), true);
    let base = |host: &str| {
        vec![
            "--host".to_string(),
            host.to_string(),
            "--connect".into(),
            lg.https.to_string(),
            "--connect-http".into(),
            lg.http.expect("http").to_string(),
            "--ca-file".into(),
            ca.display().to_string(),
        ]
    };

    let (code, report) = doctor_async(&config, dns, base("ok.example.test")).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    let ok = host(&report, "ok.example.test");
    assert_eq!(ok["cname_chain"], serde_json::json!(["lb.example.test"]));
    assert_eq!(ok["addresses"], serde_json::json!(["127.0.0.1"]));
    for check in ["dns", "https", "http"] {
        assert_eq!(ok[check]["status"], "pass", "{check}: {ok}");
    }
    let summary = report["summary"].as_str().expect("summary");
    // Without an API key the account is not audited: the next step is the
    // audit (README step 7), not SendGrid Support; the hosts passed, so exit 0.
    assert!(
        summary.contains(
            "all 1 link brandings (SendGrid ×1) pass both checks — SendGrid: run the account audit next (step 7: \
             set SENDGRID_API_KEY or give --api-key-file)"
        ),
        "{summary}"
    );
    assert!(!summary.contains("ask SendGrid Support"), "{summary}");
    assert!(summary.contains("Do not re-validate"), "{summary}");
    assert!(up
        .received()
        .iter()
        .any(|r| r.target == "/wf/open?upn=linkgate-doctor" && r.header("host") == Some("ok.example.test")));

    let mut expect = base("ok.example.test");
    expect.extend(["--expect-target".into(), "lb.example.test".into()]);
    assert_eq!(doctor_async(&config, dns, expect).await.0, 0);
    let mut expect = base("ok.example.test");
    expect.extend(["--expect-target".into(), "other-lb.example.test".into()]);
    let (code, report) = doctor_async(&config, dns, expect).await;
    assert_eq!(code, 1);
    assert!(host(&report, "ok.example.test")["dns"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("does not lead to other-lb.example.test")));

    let (code, report) = doctor_async(&config, dns, base("mgstale.example.test")).await;
    assert_eq!(code, 1);
    let mg = host(&report, "mgstale.example.test");
    assert!(
        has(&mg["dns"]["message"], "still points at Mailgun (email.eu.mailgun.org)"),
        "{mg}"
    );

    let (code, report) = doctor_async(&config, dns, base("stale.example.test")).await;
    assert_eq!(code, 1);
    let stale = host(&report, "stale.example.test");
    assert_eq!(stale["dns"]["status"], "fail");
    assert!(
        has(
            &stale["dns"]["message"],
            "still points at SendGrid (u1234.wl.sendgrid.net)"
        ),
        "{stale}"
    );
    assert!(has(&stale["dns"]["fix"], "step 5 not done"), "{stale}");

    let (code, report) = doctor_async(&config, dns, base("missing.example.test")).await;
    assert_eq!(code, 1);
    let missing = host(&report, "missing.example.test");
    assert!(has(&missing["dns"]["message"], "does not exist in DNS"), "{missing}");
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_read_as_your_connection_is_not_private_with_the_cause() {
    let dns = dns_server().await;
    // linkgate serving an expired certificate (serve starts with it; check would have said so).
    let Served { dir, pki, up, lg, .. } = Setup::new()
        .cert_valid("expired", &["expired.example.test"], days(-100), days(-2))
        .host_on("expired.example.test", "expired")
        .start()
        .await;
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), false);
    // Misconfigured servers: a certificate for another name, a one-label wildcard for a nested
    // name, and a leaf served without its intermediate.
    let wrong = StandIn::tls(&pki.leaf(&["www.example.test"])).await;
    let wildcard = StandIn::tls(&pki.leaf(&["*.example.test"])).await;
    let inter = pki.intermediate();
    let bare = StandIn::tls(&inter.leaf_valid(&["nochain.example.test"], days(-1), days(30))).await;

    for (name, addr, expected) in [
        ("expired.example.test", lg.https, "the certificate has expired"),
        (
            "wrongname.example.test",
            wrong.addr,
            "the certificate is not valid for wrongname.example.test",
        ),
        (
            "a.b.example.test",
            wildcard.addr,
            "the certificate is not valid for a.b.example.test",
        ),
        ("nochain.example.test", bare.addr, "unknown CA or incomplete chain"),
    ] {
        let args = vec![
            "--host".into(),
            name.into(),
            "--connect".into(),
            addr.to_string(),
            "--ca-file".into(),
            ca.display().to_string(),
        ];
        let (code, report) = doctor_async(&config, dns, args).await;
        assert_eq!(code, 1, "{report}");
        let row = host(&report, name);
        assert_eq!(row["dns"]["status"], "pass", "{row}");
        assert_eq!(row["https"]["status"], "fail", "{row}");
        let message = row["https"]["message"].as_str().expect("message");
        assert!(message.starts_with("Your connection is not private: "), "{message}");
        assert!(message.contains(expected), "{name}: {message}");
        assert!(row["https"]["fix"].is_string(), "{row}");
        if name == "a.b.example.test" {
            assert!(
                has(&row["https"]["fix"], "a wildcard covers exactly one label"),
                "{row}"
            );
        }
        if name == "nochain.example.test" {
            assert!(has(&row["https"]["fix"], "full chain"), "{row}");
        }
    }
    assert!(up.received().is_empty());
    lg.stop().await;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn forward_without_host(
    req: http::Request<hyper::body::Incoming>,
    upstream: SocketAddr,
) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
    let up = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(up)).await?;
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert("host", http::HeaderValue::from_static("sendgrid.net"));
    Ok(sender.send_request(http::Request::from_parts(parts, body)).await?)
}

/// A misconfigured proxy: terminates TLS for `name`, forwards to `upstream` with Host: sendgrid.net.
async fn host_dropping_proxy(pki: &Pki, name: &str, upstream: SocketAddr) -> SocketAddr {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let acceptor = pki.leaf(&[name]).acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(move |req| forward_without_host(req, upstream));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_link_and_unreachable_upstream_are_told_apart() {
    let dns = dns_server().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    // linkgate in front of nothing, with a brand's page for browsers (doctor
    // still gets the text it recognises); the stand-in is behind the proxy
    // that drops Host.
    let Served { dir, pki, up, lg, .. } = Setup::new()
        .listen(&format!("error_page = \"brand.html\"\n{}", listen_section()))
        .file("brand.html", "<p>Back soon</p>")
        .host("down.example.test")
        .upstream(move |_| format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{closed}\"\n"))
        .start()
        .await;
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), false);
    let bad_proxy = host_dropping_proxy(&pki, "wronglink.example.test", up.addr).await;

    let args = |name: &str, addr: SocketAddr| {
        vec![
            "--host".into(),
            name.into(),
            "--connect".into(),
            addr.to_string(),
            "--ca-file".into(),
            ca.display().to_string(),
        ]
    };
    let (code, report) = doctor_async(&config, dns, args("wronglink.example.test", bad_proxy)).await;
    assert_eq!(code, 1);
    let row = host(&report, "wronglink.example.test");
    assert!(has(&row["https"]["message"], "\"Wrong Link\" page"), "{row}");
    assert!(has(&row["https"]["fix"], "Host header is not forwarded"), "{row}");
    assert_eq!(up.received()[0].header("host"), Some("sendgrid.net"));

    let (code, report) = doctor_async(&config, dns, args("down.example.test", lg.https)).await;
    assert_eq!(code, 1);
    let row = host(&report, "down.example.test");
    assert!(
        has(
            &row["https"]["message"],
            "502 from linkgate: the provider is unreachable"
        ),
        "{row}"
    );

    // Every host at once, concurrently; the text form names each failure and the summary lists them.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
                .args(["doctor", "--config"])
                .arg(&config)
                .args([
                    "--resolver",
                    &dns.to_string(),
                    "--timeout",
                    "3s",
                    "--host",
                    "stale.example.test",
                    "--host",
                    "missing.example.test",
                ])
                .output()
                .expect("run")
        }
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.starts_with("HOST"), "{text}");
    assert!(text.contains("2 of 2 link brandings (SendGrid ×2) fail"), "{text}");
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["doctor", "--config"])
        .arg(&config)
        .args(["--host", "not-configured.example.test"])
        .output()
        .expect("run");
    assert_eq!(unknown.status.code(), Some(2));
    lg.stop().await;
}

/// A raw TLS target for `name` that answers every request with a 200 head
/// and the start of a body (with terminal escape sequences), then sends
/// nothing more and holds the connection open, or (`endless`) goes on
/// sending body bytes for ever.
async fn stalling_target(pki: &Pki, name: &str, endless: bool) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = pki.leaf(&[name]).acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // (A control character in the head would not parse; the body carries them.)
                let answer: &[u8] =
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: 100000000000\r\n\r\n\
                    GIF89a\x1b]0;owned\x07\x1b[2J\x1b[31m partial";
                if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                if endless {
                    while tls.write_all(&[b'x'; 16 * 1024]).await.is_ok() {}
                    return;
                }
                // Never the rest of the body; the connection stays open until the test ends.
                tokio::time::sleep(HANG_GUARD).await;
                drop(tls);
            });
        }
    });
    addr
}

/// A body that stalls, or that never ends while it keeps flowing (found by
/// the outside audit: that one passed): reported with its status, as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_sends_its_head_and_stalls_is_reported_with_its_status() {
    for (endless, said) in [
        (false, "the body did not end within 2s"),
        (true, "the body did not end after 16 MiB"),
    ] {
        stalled_body_is_reported(endless, said).await;
    }
}

async fn stalled_body_is_reported(endless: bool, said: &str) {
    let dns = dns_server().await;
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), false);
    let target = stalling_target(&pki, "stalled.example.test", endless).await;

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
            .args(["doctor", "--config"])
            .arg(&config)
            .args(["--resolver", &dns.to_string(), "--timeout", "2s"])
            .args(["--host", "stalled.example.test", "--connect", &target.to_string()])
            .arg("--ca-file")
            .arg(&ca)
            .output()
            .expect("run doctor")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a body that never ends fails the check: {text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("stalled.example.test https:"))
        .unwrap_or_else(|| panic!("no https line in: {text}"));
    assert!(line.contains("https answered 200"), "{line}");
    assert!(line.contains(said), "{line}");
    assert!(!line.contains("no answer"), "{line}");
    assert!(!text.contains("check that linkgate runs"), "{text}");
    // Nothing the target sent reaches the terminal raw.
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
}
