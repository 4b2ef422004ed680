//! A recipient's browser, for real: headless Chromium follows a tracked
//! link while the provider is down and shows linkgate's page (the built-in
//! one, or the brand's own), over a TLS connection it trusts the way a
//! browser trusts a certificate, not with certificate errors ignored; and
//! follows a click over HTTP/3 (QUIC only, the test CA trusted from an NSS
//! database) to the landing page.
//!
//! Skipped, with the reason printed, where `chromium` (or, for HTTP/3,
//! `certutil`) is not installed (`apt-get install chromium libnss3-tools`;
//! .ci/run installs both, so CI never skips).

mod common;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::*;

/// Chromium starts, loads one page and quits well within this; past it, it is killed.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(60);

const BRAND: &str = "brand.example.test";

/// Whether `chromium` can be run here.
fn chromium_installed() -> bool {
    std::process::Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The base64 SHA-256 of a certificate's SubjectPublicKeyInfo: what
/// `--ignore-certificate-errors-spki-list` pins (Chromium trusts exactly that key).
fn spki_sha256(cert: &[u8]) -> String {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("leaf certificate");
    let sha256 = linkgate::tls::provider()
        .cipher_suites
        .iter()
        .find_map(|s| {
            s.tls13()
                .filter(|t| t.common.hash_provider.algorithm() == rustls::crypto::hash::HashAlgorithm::SHA256)
        })
        .expect("a SHA-256 suite")
        .common
        .hash_provider;
    base64::engine::general_purpose::STANDARD.encode(sha256.hash(parsed.tbs_certificate.subject_pki.raw).as_ref())
}

/// How one Chromium run trusts linkgate and reaches it.
struct Run<'a> {
    /// Its `--user-data-dir`.
    profile: &'a std::path::Path,
    /// `--host-resolver-rules`: `MAP <host> <address>`.
    resolve: String,
    /// More switches.
    args: Vec<String>,
    /// `HOME` for it (where it finds `.pki/nssdb`), when not the test's.
    home: Option<&'a std::path::Path>,
}

/// Chromium's DOM of `url` after it loaded, with `host` mapped to
/// linkgate and `spki` (linkgate's leaf) trusted.
async fn dump_dom(lg: &Linkgate, profile: &std::path::Path, host: &str, spki: &str, url: &str) -> String {
    let run = Run {
        profile,
        resolve: format!("MAP {host} {}", lg.https),
        args: vec![format!("--ignore-certificate-errors-spki-list={spki}")],
        home: None,
    };
    chromium_dom(&run, url).await
}

/// Chromium's DOM of `url` after it loaded (and followed any redirects), run as `run` says.
async fn chromium_dom(run: &Run<'_>, url: &str) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ])
    .arg(format!("--user-data-dir={}", run.profile.display()))
    .arg(format!("--host-resolver-rules={}", run.resolve))
    .args(&run.args)
    .arg("--dump-dom")
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Killed if the test gives up on it (its helpers exit with it). Never a
    // `kill -<group>` from here: a mistyped group is every process there is.
    .process_group(0)
    .kill_on_drop(true);
    if let Some(home) = run.home {
        cmd.env("HOME", home);
    }
    let child = cmd.spawn().expect("start chromium");
    let out = tokio::time::timeout(CHROMIUM_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {CHROMIUM_DEADLINE:?}"))
        .expect("chromium's output");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_page_when_the_provider_is_down() {
    if !chromium_installed() {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let Served { dir, lg, leaves, .. } = Setup::new()
        .host(CLICK)
        .host_with(BRAND, "error_page = \"brand.html\"\n")
        .file(
            "brand.html",
            "<!DOCTYPE html><meta charset=\"utf-8\"><title>Example</title><h1>Example Shop is busy</h1><p>Try again soon.</p>\n",
        )
        .upstream(move |_| format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{closed}\"\n"))
        .start()
        .await;

    let url = lg.url(CLICK, "/ls/click?upn=u001.AbCdEf-2FgHiJ");
    let dom = dump_dom(
        &lg,
        &dir.path().join("chromium-1"),
        CLICK,
        &spki_sha256(&leaves["click"].der),
        &url,
    )
    .await;
    assert!(dom.contains("<h1>This link can't be opened right now</h1>"), "{dom}");
    assert!(dom.contains("<p>Please try again in a minute.</p>"), "{dom}");
    assert!(!dom.contains("upstream unavailable"), "{dom}");

    let url = lg.url(BRAND, "/ls/click?upn=u002");
    let dom = dump_dom(
        &lg,
        &dir.path().join("chromium-2"),
        BRAND,
        &spki_sha256(&leaves["brand"].der),
        &url,
    )
    .await;
    assert!(dom.contains("<h1>Example Shop is busy</h1>"), "{dom}");
    assert!(!dom.contains("This link can't be opened"), "{dom}");

    lg.stop().await;
}

/// Whether `certutil` (Debian's `libnss3-tools`) can be run here.
fn certutil_installed() -> bool {
    std::process::Command::new("certutil")
        .arg("-H")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Makes `<home>/.pki/nssdb`, the NSS database Chromium on Linux reads its
/// own trust anchors from, with the CA in `ca_pem` trusted to issue server certificates.
fn nss_trusting(home: &std::path::Path, ca_pem: &std::path::Path) {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).expect("mkdir nssdb");
    let db = format!("sql:{}", db.display());
    for args in [
        vec!["-N", "-d", &db, "--empty-password"],
        vec!["-A", "-d", &db, "-n", "linkgate test CA", "-t", "C,,", "-i"],
    ] {
        let mut cmd = std::process::Command::new("certutil");
        cmd.args(&args);
        if args[0] == "-A" {
            cmd.arg(ca_pem);
        }
        let out = cmd.output().expect("run certutil");
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

const LANDING: &str =
    "<!DOCTYPE html><meta charset=\"utf-8\"><title>Spring sale</title><h1>Welcome to the spring sale</h1>\n";

/// A click over HTTP/3 in a real browser: Chromium, told that the branded
/// origin speaks QUIC, trusting the test CA from an NSS database as a
/// locally installed root (no certificate error ignored), follows the
/// provider's redirect to the landing page. Both requests reach the
/// upstream with the branded Host; nothing at all came over TCP: a TCP
/// listener of the test's own on the origin's port saw no connection, and
/// linkgate counted no TLS-over-TCP handshake (QUIC handshakes are not in
/// that count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_follows_a_click_over_http3_to_the_landing_page() {
    if !chromium_installed() || !certutil_installed() {
        eprintln!("skipped: chromium or certutil is not installed (apt-get install chromium libnss3-tools)");
        return;
    }
    let up = StandIn::plain_answering(|_, target| {
        if target.starts_with("/ls/click?") {
            Some((302, "/landing?utm_source=email"))
        } else if target.starts_with("/landing?") {
            Some((200, LANDING))
        } else if target == "/favicon.ico" {
            // Chromium may ask for it once the page is in; a 4xx, counted apart.
            Some((404, ""))
        } else {
            None
        }
    })
    .await;
    let Served { dir, pki, up, lg, .. } = Setup::new()
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n")
        .admin()
        .host(CLICK)
        .standin(up)
        .start()
        .await;
    let quic = lg.http3.expect("http3 socket");
    assert_ne!(quic.port(), lg.https.port());
    // The origin's port over TCP is ours: a browser that fell back to TCP would be seen here.
    let trap = tokio::net::TcpListener::bind(("127.0.0.1", quic.port()))
        .await
        .expect("bind a TCP listener on the QUIC port");
    let tcp_accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = tcp_accepts.clone();
    let trap_task = tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    let home = dir.path().join("home");
    nss_trusting(&home, &pki.write_ca(dir.path()));
    let origin = format!("{CLICK}:{}", quic.port());
    let run = Run {
        profile: &dir.path().join("chromium-h3"),
        resolve: format!("MAP {CLICK} 127.0.0.1"),
        args: vec![format!("--origin-to-force-quic-on={origin}")],
        home: Some(&home),
    };
    let dom = chromium_dom(&run, &format!("https://{origin}/ls/click?upn=u003.QuIc-2Fclick")).await;
    assert!(dom.contains("<h1>Welcome to the spring sale</h1>"), "{dom}");

    let got = up.received();
    let targets: Vec<&str> = got
        .iter()
        .map(|r| r.target.as_str())
        .filter(|t| *t != "/favicon.ico")
        .collect();
    assert_eq!(
        targets,
        ["/ls/click?upn=u003.QuIc-2Fclick", "/landing?utm_source=email"],
        "{got:?}"
    );
    for r in &got {
        assert_eq!(r.header("host"), Some(CLICK), "{r:?}");
    }
    assert_eq!(
        tcp_accepts.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a TCP connection came"
    );
    let admin = lg.admin.expect("admin");
    assert_eq!(
        metric(admin, "linkgate_tls_handshakes_total{result=\"ok\"}").await,
        Some(0.0),
        "a TLS handshake over TCP"
    );
    // The click's 302 and the landing page's 200, each counted once.
    for class in ["2xx", "3xx"] {
        let series = format!("linkgate_requests_total{{host=\"{CLICK}\",class=\"{class}\"}}");
        assert_eq!(metric(admin, &series).await, Some(1.0), "{series}");
    }
    trap_task.abort();
    lg.stop().await;
}
