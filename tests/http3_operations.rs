//! HTTP/3 as an operator runs it: the real binary's access line and
//! metrics for a request over QUIC, and bad `listen.http3` settings refused
//! at start-up (one line, non-zero exit) and on reload (the running
//! configuration stays).

mod common;

use common::quic::H3Client;
use common::*;

/// `[listen]` with HTTP/3 on a loopback UDP port of its own.
fn listen_http3(extra: &str) -> String {
    format!("[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n{extra}")
}

/// The real binary: a click over HTTP/3 is logged as HTTP/3 (the access
/// line's `protocol`, in the form it has for HTTP/1.1 and HTTP/2) and
/// counted in the host's metrics like any other.
#[tokio::test]
async fn the_binary_logs_and_counts_a_request_over_http3() {
    let Fixture {
        dir: _dir,
        pki,
        up,
        config,
        ..
    } = Setup::new()
        .listen(&listen_http3(""))
        .host(CLICK)
        .admin()
        .extra("[log]\nformat = \"json\"\n")
        .write()
        .await;
    let lg = common::process::Process::start(&config);
    let addr = lg.http3.expect("http3 address in the listening line");
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(addr, CLICK).await.expect("handshake");
    let answer = conn
        .get(&format!("https://{CLICK}/wf/open?upn=x"))
        .await
        .expect("answer");
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(up.received().len(), 1);
    let access = common::process::wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(access["protocol"], "HTTP/3.0", "{access}");
    assert_eq!(access["tls"], "TLSv1.3", "{access}");
    assert_eq!(access["resumed"], "-", "not known over QUIC: {access}");
    assert_eq!(access["host"], CLICK, "{access}");
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["bytes"], 2, "{access}");
    let metrics = reqwest::get(format!("http://{}/metrics", lg.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("linkgate_requests_total{") && l.contains(CLICK) && l.contains("\"2xx\""));
    assert!(counted.is_some_and(|l| l.ends_with(" 1")), "{counted:?}\n{metrics}");
}

/// Bad `listen.http3` settings: one line naming the file and the key, a
/// non-zero exit before anything is bound; on reload, refused with the
/// running configuration kept.
#[tokio::test]
async fn bad_http3_settings_are_refused_at_start_and_on_reload() {
    let Served { dir, pki, up, lg, .. } = Setup::new().listen(&listen_http3("")).host(CLICK).start().await;
    let proxied = "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
    let cases = [
        // Why, and how to confirm the balancer keeps client addresses.
        (
            listen_http3(proxied),
            "listen.http3: cannot be used with proxy_protocol = true",
        ),
        (
            listen_http3(proxied),
            "set listen.http3_balancer_preserves_client_address = true",
        ),
        (
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3_advertise_port = 443\n".to_owned(),
            "listen.http3_advertise_port: needs listen.http3",
        ),
        (
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"udp/443\"\n".to_owned(),
            "listen.http3: \"udp/443\" is not an address",
        ),
    ];
    let path = dir.path().join("linkgate.toml");
    for (listen, expected) in &cases {
        let text = Setup::new().listen(listen).host_on(CLICK, "click").text(&up);
        std::fs::write(&path, &text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "off")
            .output()
            .expect("run linkgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");

        let err = lg.live.reload().await.expect_err("refused on reload");
        assert!(err.contains(expected), "{err}");
    }
    let client = H3Client::new(&pki, false);
    let mut conn = client
        .connect(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("the running configuration stays");
    assert_eq!(
        conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    lg.stop().await;
}

/// A UDP address already in use: the error names it, as for TCP.
#[test]
fn a_busy_http3_address_is_named() {
    let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let path = dir.path().join("linkgate.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"{addr}\"\n{}",
            host_section(CLICK, "click")
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run linkgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (UDP, listen.http3)")),
        "{stderr}"
    );
}
