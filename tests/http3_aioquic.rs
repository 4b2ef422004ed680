//! An HTTP/3 client no one here wrote: aioquic (Python, PyPI) follows a
//! tracked link to linkgate over QUIC, verifying the certificate against
//! the test CA (`tests/clients/aioquic_get.py`), and the stand-in upstream
//! receives it with the branded Host and the query as sent; a name
//! linkgate does not serve fails aioquic's handshake.
//!
//! Skipped, with the reason printed, where the Python module `aioquic` is
//! missing (`pip install aioquic`; .ci/run installs it, and under CI a
//! missing module fails the test instead).

mod common;

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/aioquic_get.py");

/// Whether `python3` can import aioquic; under CI its absence is a failure.
fn aioquic_installed() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import aioquic"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "CI must have aioquic (.ci/run pip-installs it)"
    );
    found
}

/// Runs the aioquic client; its JSON answer, or its one-line failure.
async fn aioquic_get(ca: &std::path::Path, host: &str, port: u16, path: &str) -> Result<serde_json::Value, String> {
    let run = tokio::process::Command::new("python3")
        .arg(SCRIPT)
        .arg(ca)
        .args([host, &port.to_string(), path])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("aioquic finishes")
        .expect("run python3");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn aioquic_follows_a_click_over_http3() {
    if !aioquic_installed() {
        eprintln!("skipped: the Python module aioquic is not installed (pip install aioquic)");
        return;
    }
    let Served { dir, pki, up, lg, .. } = Setup::new()
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n")
        .host(CLICK)
        .start()
        .await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write CA");
    let port = lg.http3.expect("http3 socket").port();

    let target = "/ls/click?upn=u001.a%2fB%2Bc-3D&x=";
    let answer = aioquic_get(&ca, CLICK, port, target).await.expect("aioquic's request");
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["body"], "ok", "{answer}");
    assert_eq!(answer["alpn"], "h3", "{answer}");
    assert_eq!(
        answer["headers"]["alt-svc"],
        format!("h3=\":{port}\"; ma=86400"),
        "{answer}"
    );
    let got = up.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].target, target);
    assert_eq!(got[0].header("host"), Some(CLICK));
    assert_eq!(got[0].header("user-agent"), Some("aioquic"));

    let refused = aioquic_get(&ca, "unknown.example.test", port, "/")
        .await
        .expect_err("an unknown name fails the handshake");
    // Closed by the server (a timeout would say TimeoutError).
    assert!(refused.starts_with("aioquic: ConnectionError"), "{refused}");
    assert_eq!(up.received().len(), 1, "nothing more went upstream");
    lg.stop().await;
}
