//! Per-host TLS policy: HSTS on https answers only, OCSP stapling from a
//! response file, and the refusals for bad values.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use tempfile::TempDir;

fn openssl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have_openssl() -> bool {
    let ok = Command::new("openssl").arg("version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
    }
    ok
}

#[tokio::test]
async fn hsts_is_sent_on_https_only_and_only_for_hosts_that_ask() {
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = Setup::new()
        .host_with(CLICK, "hsts = \"max-age=31536000; includeSubDomains\"\n")
        .host("plain.example.test")
        .start()
        .await;
    let c = client(&pki, &lg, &[CLICK, "plain.example.test"]);
    let resp = c.get(lg.url(CLICK, "/wf/open")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Also on answers linkgate makes itself.
    let resp = c
        .get(lg.url(CLICK, "/"))
        .header("host", "plain.example.test")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 421);
    assert!(resp.headers().contains_key("strict-transport-security"));
    // Not for a host without it, and never over plain http (links in old emails keep working).
    let resp = c.get(lg.url("plain.example.test", "/")).send().await.expect("request");
    assert!(!resp.headers().contains_key("strict-transport-security"));
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://{}/ls/click", lg.http.expect("http")))
        .header("host", CLICK)
        .send()
        .await
        .expect("plain request");
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("strict-transport-security"));
    lg.stop().await;
}

#[test]
fn bad_hsts_and_ocsp_values_are_refused_naming_the_host() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    std::fs::write(dir.path().join("junk.der"), b"not an OCSP response").expect("write");
    for (extra, expected) in [
        ("hsts = \"max-age=soon\"\n", "hsts"),
        ("hsts = \"includeSubDomains\"\n", "max-age=<seconds> is required"),
        ("hsts = \"max-age=1; nosniff\"\n", "unknown directive"),
        ("ocsp = \"missing.der\"\n", "missing.der: cannot read OCSP response"),
        ("ocsp = \"junk.der\"\n", "junk.der: not a DER OCSP response"),
    ] {
        let path = dir.path().join("linkgate.toml");
        std::fs::write(
            &path,
            format!("{}{}{extra}", listen_section(), host_section(CLICK, "click")),
        )
        .expect("write config");
        let err = linkgate::config::Config::load(&path).expect_err(extra).to_string();
        assert!(err.contains(CLICK) && err.contains(expected), "{extra}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

// openssl runs blocking on this thread while linkgate's reloader runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_response_is_stapled_and_replaced_on_reload() {
    if !have_openssl() {
        return;
    }
    let fixture = Setup::new()
        .host_with(CLICK, "ocsp = \"click.ocsp.der\"\n")
        .watching()
        .write()
        .await;
    let d = &fixture.dir.path().to_owned();
    fixture.pki.write_ca(d);
    fixture.pki.write_ca_key(d);
    // An OCSP response for the leaf, signed by the CA, as `openssl ocsp` makes one.
    let serial = String::from_utf8(openssl(d, &["x509", "-in", "click.pem", "-noout", "-serial"]).stdout)
        .expect("utf8")
        .trim()
        .trim_start_matches("serial=")
        .to_owned();
    let make_response = |status: &str, out: &str| {
        std::fs::write(
            d.join("index.txt"),
            format!(
                "{status}\t301231235959Z\t{}\t{serial}\tunknown\t/CN={CLICK}\n",
                if status == "R" { "251231235959Z" } else { "" }
            ),
        )
        .expect("index");
        openssl(
            d,
            &[
                "ocsp",
                "-issuer",
                "ca.pem",
                "-cert",
                "click.pem",
                "-no_nonce",
                "-reqout",
                "req.der",
            ],
        );
        openssl(
            d,
            &[
                "ocsp",
                "-index",
                "index.txt",
                "-rsigner",
                "ca.pem",
                "-rkey",
                "ca.key",
                "-CA",
                "ca.pem",
                "-reqin",
                "req.der",
                "-respout",
                out,
                "-ndays",
                "1",
            ],
        );
    };
    make_response("V", "click.ocsp.der");
    let Served {
        dir: _dir, up: _up, lg, ..
    } = fixture.start().await;
    let port = lg.https.port().to_string();
    let stapled = |tls: &'static str| {
        let out = openssl(
            d,
            &[
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                CLICK,
                "-status",
                tls,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for tls in ["-tls1_3", "-tls1_2"] {
        let out = stapled(tls);
        assert!(out.contains("OCSP Response Status: successful"), "{tls}: {out}");
        assert!(out.contains("Cert Status: good"), "{tls}: {out}");
    }
    // A fresh response file (here: the certificate revoked) is picked up without a restart.
    make_response("R", "next.der");
    std::fs::rename(d.join("next.der"), d.join("click.ocsp.der")).expect("rename");
    let mut out = String::new();
    for _ in 0..50 {
        out = stapled("-tls1_3");
        if out.contains("Cert Status: revoked") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(out.contains("Cert Status: revoked"), "{out}");
    lg.stop().await;
}

/// The server picks the suite, AES-128-GCM first: an OpenSSL client (which
/// asks for AES-256-GCM first, like curl and most mail scanners) gets
/// AES-128-GCM on TLS 1.3 and 1.2, and a client offering only another suite
/// still gets that one.
#[tokio::test]
async fn server_prefers_aes_128_gcm_whatever_the_client_asks_first() {
    if !have_openssl() {
        return;
    }
    let (dir, _pki, _up, lg) = serve_click("").await;
    let d = dir.path();
    let connect = format!("127.0.0.1:{}", lg.https.port());
    // Off the test's thread: the server runs on it.
    let negotiated = |args: &[&str]| {
        let all: Vec<String> = ["s_client", "-connect", &connect, "-servername", CLICK]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let d = d.to_owned();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = all.iter().map(String::as_str).collect();
                openssl(&d, &args)
            })
            .await
            .expect("openssl task");
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            out.lines()
                .find_map(|l| l.split_once(", Cipher is ").map(|(_, c)| c.trim().to_owned()))
                .unwrap_or_else(|| panic!("no cipher line in: {out}"))
        }
    };
    let tls13_256_first = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256";
    assert_eq!(
        negotiated(&["-tls1_3", "-ciphersuites", tls13_256_first]).await,
        "TLS_AES_128_GCM_SHA256"
    );
    assert_eq!(negotiated(&["-tls1_3"]).await, "TLS_AES_128_GCM_SHA256");
    assert_eq!(
        negotiated(&["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"]).await,
        "TLS_AES_256_GCM_SHA384"
    );
    assert_eq!(
        negotiated(&["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"]).await,
        "TLS_CHACHA20_POLY1305_SHA256"
    );
    let tls12_256_first = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256";
    assert_eq!(
        negotiated(&["-tls1_2", "-cipher", tls12_256_first]).await,
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    );
    lg.stop().await;
}

/// A client offering only ALPN `http/1.0` (old HTTP libraries, some mail
/// scanners) is not refused with `no_application_protocol`: it gets
/// `http/1.0`, and its HTTP/1.0 request is answered by the upstream.
#[tokio::test]
async fn a_client_offering_only_alpn_http_1_0_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, pki, up, lg) = serve_click("").await;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(&pki, &[b"http/1.0"])));
    let tcp = tokio::net::TcpStream::connect(lg.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("the handshake succeeds");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    tls.write_all(format!("GET /wf/open?upn=old HTTP/1.0\r\nHost: {CLICK}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    // The answer ends the connection (HTTP/1.0 without keep-alive).
    let _ = tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut out)).await;
    drop(tls);
    let answer = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        answer.contains("x-upstream: stand-in") && answer.ends_with("ok"),
        "{answer}"
    );
    let got = up.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].target, "/wf/open?upn=old");
    lg.stop().await;
}
