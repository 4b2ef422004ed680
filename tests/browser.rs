//! A recipient's browser, for real: headless Chromium follows a tracked
//! link while the provider is down and shows linkgate's page (the built-in
//! one, or the brand's own), over a TLS connection it trusts the way a
//! browser trusts a certificate, not with certificate errors ignored.
//!
//! Skipped, with the reason printed, where `chromium` is not installed
//! (`apt-get install chromium`; .ci/run installs it, so CI never skips).

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

/// Chromium's DOM of `url` after it loaded, with `host` mapped to
/// linkgate and `spki` (linkgate's leaf) trusted.
async fn dump_dom(lg: &Linkgate, profile: &std::path::Path, host: &str, spki: &str, url: &str) -> String {
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
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--host-resolver-rules=MAP {host} {}", lg.https))
    .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
    .arg("--dump-dom")
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Killed if the test gives up on it (its helpers exit with it). Never a
    // `kill -<group>` from here: a mistyped group is every process there is.
    .process_group(0)
    .kill_on_drop(true);
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
