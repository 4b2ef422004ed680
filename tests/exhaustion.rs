//! Resource exhaustion, against the real binary: thousands of idle and
//! half-open connections, and running out of file descriptors. Memory stays
//! bounded, legitimate requests keep being served, nothing aborts.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::process::{wait_line, Process};
use common::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLICK: &str = "click.example.test";

fn config(dir: &std::path::Path, up: &StandIn, limits: &str) -> std::path::PathBuf {
    let path = dir.join("linkgate.toml");
    std::fs::write(
        &path,
        format!(
            "{}{}[log]\nformat = \"json\"\naccess = false\n[limits]\n{limits}{}",
            listen_section(),
            plain_upstream(up),
            host_section(CLICK, "click")
        ),
    )
    .expect("write config");
    path
}

async fn legit_request(pki: &Pki, https: SocketAddr) -> u16 {
    try_request(pki, https).await.expect("a legitimate request is served")
}

async fn try_request(pki: &Pki, https: SocketAddr) -> reqwest::Result<u16> {
    let resp = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(pki, &[b"http/1.1"]))
        .no_proxy()
        .resolve(CLICK, https)
        .timeout(HANG_GUARD)
        .build()
        .expect("client")
        .get(format!("https://{CLICK}:{}/legit", https.port()))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

#[tokio::test]
async fn thousands_of_idle_and_half_open_connections_stay_bounded() {
    const IDLE_TLS: usize = 1_000;
    const SILENT: usize = 1_500;
    const PARTIAL_HELLO: usize = 1_500;
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let up = StandIn::plain().await;
    let lg = Process::start(&config(
        dir.path(),
        &up,
        "handshake_timeout = \"3s\"\nidle_timeout = \"120s\"\n",
    ));
    assert_eq!(legit_request(&pki, lg.https).await, 200);
    let baseline = lg.rss_bytes();

    // Idle TLS connections: handshake done, no request.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&pki, &[b"http/1.1"])));
    let mut idle = Vec::with_capacity(IDLE_TLS);
    for _ in 0..IDLE_TLS {
        let tcp = TcpStream::connect(lg.https).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
        idle.push(connector.connect(name, tcp).await.expect("handshake"));
    }
    // Half-open: TCP only, and TCP plus the first bytes of a ClientHello.
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(lg.https).await.expect("connect"));
    }
    let mut partial = Vec::with_capacity(PARTIAL_HELLO);
    for _ in 0..PARTIAL_HELLO {
        let mut s = TcpStream::connect(lg.https).await.expect("connect");
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("partial hello");
        partial.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = lg.rss_bytes();
    let per_connection = loaded.saturating_sub(baseline) / (IDLE_TLS + SILENT + PARTIAL_HELLO) as u64;
    eprintln!(
        "RSS {} KiB -> {} KiB with {} connections: {} bytes per connection",
        baseline / 1024,
        loaded / 1024,
        IDLE_TLS + SILENT + PARTIAL_HELLO,
        per_connection
    );
    // Bounded: well under what a buffer per connection without limits would cost.
    assert!(
        per_connection < 64 * 1024,
        "{per_connection} bytes per idle or half-open connection"
    );
    // A legitimate client is served while all of them are open.
    assert_eq!(legit_request(&pki, lg.https).await, 200);

    // The half-open ones are cut at handshake_timeout; the idle TLS ones stay (idle_timeout is 120 s).
    for s in silent.iter_mut().chain(partial.iter_mut()).step_by(50) {
        assert!(
            closed_by_server(s, Duration::from_secs(10)).await,
            "a half-open connection outlived handshake_timeout"
        );
    }
    let mut buf = [0u8; 16];
    let still_open = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut buf)).await;
    assert!(still_open.is_err(), "an idle TLS connection is kept until idle_timeout");
    drop((silent, partial));
    assert_eq!(legit_request(&pki, lg.https).await, 200);
    let upstream_saw: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(
        upstream_saw, ["/legit"; 3],
        "only the legitimate requests reach the upstream"
    );
}

#[tokio::test]
async fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let up = StandIn::plain().await;
    let mut lg = Process::start_with_fd_limit(&config(dir.path(), &up, "handshake_timeout = \"60s\"\n"), 64);
    assert_eq!(legit_request(&pki, lg.https).await, 200);

    // More connections than the process has descriptors: accept fails with EMFILE.
    let mut hogs = Vec::new();
    for _ in 0..120 {
        hogs.push(
            TcpStream::connect(lg.https)
                .await
                .expect("connect (the kernel queues it)"),
        );
    }
    let warned = wait_line(&lg.lines, |v| v["message"] == "accept failed; retrying shortly");
    assert!(
        warned["error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files")),
        "{warned}"
    );
    assert!(
        lg.child.try_wait().expect("try_wait").is_none(),
        "linkgate must not exit"
    );

    // Once descriptors are free again, it serves as before.
    drop(hogs);
    let mut status = 0;
    for _ in 0..50 {
        status = tokio::time::timeout(Duration::from_secs(2), try_request(&pki, lg.https))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "served again after the descriptors were freed");
    assert!(lg.child.try_wait().expect("try_wait").is_none(), "still running");
}
