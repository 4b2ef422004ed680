//! Resource exhaustion, against the real binary: thousands of idle and
//! half-open connections, one address stalling handshakes, running out of
//! file descriptors, a flood of admin connections. Memory stays bounded,
//! legitimate requests keep being served, nothing aborts.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::{wait_line, Process};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// [`CLICK`] with an admin listener, JSON logs without access lines, and
/// `limits`; the config is written for [`Process`].
async fn fixture(limits: &str) -> Fixture {
    Setup::new()
        .host(CLICK)
        .admin()
        .extra("[log]\nformat = \"json\"\naccess = false\n")
        .limits(limits)
        .write()
        .await
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
    // All from one address: what a half-open connection costs is
    // measured here, not the per-address cap.
    let Fixture {
        dir: _dir,
        pki,
        up,
        config,
        ..
    } = fixture(
        // header_read_timeout bounds the wait for a first request too (10 s by
        // default): on a loaded machine this test's timeline passed it and the
        // idle TLS connections were (rightly) cut before the last check.
        "handshake_timeout = \"3s\"\nidle_timeout = \"120s\"\nheader_read_timeout = \"120s\"\nhandshakes_per_address = 5000\n",
    )
    .await;
    let lg = Process::start(&config);
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

    // The half-open ones are cut at handshake_timeout; the idle TLS ones stay
    // (idle_timeout and header_read_timeout are 120 s).
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
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config,
        ..
    } = fixture("handshake_timeout = \"60s\"\n").await;
    let mut lg = Process::start_with_fd_limit(&config, 64);
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

/// One address (127.0.0.2) keeps far more silent TCP connections open than
/// `max_connections`, each a new one as soon as linkgate closes the last
/// (at `handshake_timeout`, or at once when refused): with the handshake
/// budget and the per-address cap at their defaults for 50 connections
/// (12 and 3), a client that was already connected and new clients from
/// 127.0.0.1 all get their answers while it does. Before, the stalled
/// sockets took every slot, and new clients waited in the backlog behind
/// them for several handshake timeouts.
#[tokio::test]
async fn one_address_stalling_handshakes_does_not_lock_out_other_clients() {
    const ATTACKER_SOCKETS: usize = 300;
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config,
        ..
    } = fixture("max_connections = 50\nhandshake_timeout = \"2s\"\n").await;
    let lg = Process::start(&config);
    // Connected before the attack, kept alive throughout.
    let established = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(&pki, &[b"http/1.1"]))
        .no_proxy()
        .resolve(CLICK, lg.https)
        .timeout(HANG_GUARD)
        .build()
        .expect("client");
    let url = format!("https://{CLICK}:{}/kept", lg.https.port());
    assert_eq!(established.get(&url).send().await.expect("before").status(), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..ATTACKER_SOCKETS {
        let (stop, connects, https) = (stop.clone(), connects.clone(), lg.https);
        attackers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket
                    .bind("127.0.0.2:0".parse().expect("addr"))
                    .expect("bind 127.0.0.2");
                if let Ok(mut s) = socket.connect(https).await {
                    connects.fetch_add(1, Ordering::Relaxed);
                    // Silent until linkgate closes it (giving up after
                    // 3 s, longer than handshake_timeout, to start over).
                    let _ = closed_by_server(&mut s, Duration::from_secs(3)).await;
                }
                // Then a new one, a moment later (so that the flood does not
                // take the CPU the test itself needs).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    wait_for("every attacker socket to be connected once", async || {
        connects.load(Ordering::Relaxed) >= ATTACKER_SOCKETS
    })
    .await;

    // Over several handshake timeouts, new clients and the established one.
    let mut served = Vec::new();
    for _ in 0..8 {
        // Generous for one request on loopback; before, it waited for several
        // batches of 50 stalled sockets to be cut at handshake_timeout.
        served.push(
            tokio::time::timeout(Duration::from_secs(5), try_request(&pki, lg.https))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
        );
        served.push(
            established
                .get(&url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string()),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let made = connects.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.await.expect("attacker task");
    }
    eprintln!("attacker connections made: {made}; answers: {served:?}");
    assert!(served.iter().all(|r| *r == Ok(200)), "{served:?}");
    assert!(made > ATTACKER_SOCKETS * 2, "the attacker kept reconnecting: {made}");
    let refused = metric(
        lg.admin,
        "linkgate_connections_refused_total{reason=\"handshakes_per_address\"}",
    )
    .await
    .unwrap_or(0.0);
    eprintln!("refused for their address: {refused}");
    assert!(
        refused >= ATTACKER_SOCKETS as f64,
        "stalled connections over the per-address cap were refused and counted: {refused}"
    );
}

/// Admin connections held at once (`linkgate::admin::ADMIN_CONNECTIONS`).
const ADMIN_CAP: usize = 16;

/// With 128 descriptors, 200 idle connections to the admin port: at most 16
/// are kept, the others closed as they are accepted (within 2 s) and
/// counted, so an https request through the proxy is served while the flood
/// stands (within 3 s, before the flood's 5 s admin head timeout could free
/// anything), and once
/// the flood is closed /readyz answers on a new admin connection. (The
/// flood's 16 are not told apart from a health checker's: while it stands a
/// new admin connection is refused too.) Before, the admin listener took
/// every descriptor and the https listener could accept nothing.
#[tokio::test]
async fn a_flood_of_admin_connections_leaves_the_proxy_its_descriptors() {
    const FLOOD: usize = 200;
    // Four upstream connections are plenty here; derived from 128
    // descriptors the cap would be 1, which two workers' pools share badly.
    let limits = "max_upstream_connections = 4\n";
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config,
        ..
    } = fixture(limits).await;
    let lg = Process::start_with_fd_limit(&config, 128);
    assert_eq!(legit_request(&pki, lg.https).await, 200);

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(
            TcpStream::connect(lg.admin)
                .await
                .expect("connect (the kernel queues it)"),
        );
    }
    // Within 2 s, before the admin head timeout (5 s) closes anything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut closed = 0;
    for s in &mut flood {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if closed_by_server(s, left.max(Duration::from_millis(1))).await {
            closed += 1;
        }
    }
    assert!(
        closed >= FLOOD - ADMIN_CAP,
        "admin connections over the cap are closed at once: {closed} of {FLOOD}"
    );
    let served = tokio::time::timeout(Duration::from_secs(3), try_request(&pki, lg.https)).await;
    assert!(
        matches!(served, Ok(Ok(200))),
        "an https request while the admin flood stands: {served:?}"
    );

    drop(flood);
    let readyz = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let url = format!("http://{}/readyz", lg.admin);
    wait_for("/readyz on a new admin connection", async || {
        readyz.get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let refused = metric(
        lg.admin,
        "linkgate_connections_refused_total{reason=\"admin_connections\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(refused >= (FLOOD - ADMIN_CAP) as f64, "counted: {refused}");
    assert_eq!(legit_request(&pki, lg.https).await, 200);
}

/// Few upstream connections allowed (a low `ulimit -n`, or
/// `max_upstream_connections`): a worker's idle pooled connection must not
/// keep another worker's requests waiting for a permit until they time out
/// (found by the outside audit: under `ulimit -n 256`, sequential clicks got
/// 504 after 30 s). Each request comes on a new client connection, so the
/// kernel hands them to either worker.
#[tokio::test]
async fn an_idle_upstream_connection_in_one_worker_does_not_starve_another() {
    // The stand-in's upstream section sets a 2 s response timeout.
    let Fixture {
        dir: _dir,
        pki: _pki,
        up,
        config,
        ..
    } = fixture("max_upstream_connections = 1\n").await;
    let lg = Process::start(&config);
    let http = lg.http;
    let mut statuses = Vec::new();
    for _ in 0..16 {
        let answer = raw_plain(
            http,
            format!("GET /c HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
        statuses.push(status_of(&answer));
    }
    assert!(statuses.iter().all(|&s| s == 200), "every click answered: {statuses:?}");
    assert_eq!(up.received().len(), 16);
}

/// One address that opens connections, makes one keep-alive request on
/// each and then idles (found by the outside audit: with `max_connections
/// = 200` it held all 200 and new honest clients on both listeners got
/// nothing until `idle_timeout`). Capped per address
/// (`limits.connections_per_address`, a quarter of `max_connections` by
/// default), so honest clients from another address are served.
#[tokio::test]
async fn one_address_holding_idle_connections_does_not_lock_out_other_clients() {
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config,
        ..
    } = fixture("max_connections = 40\nidle_timeout = \"60s\"\n").await;
    let lg = Process::start(&config);
    let mut held = Vec::new();
    for _ in 0..60 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), socket.connect(lg.http)).await else {
            continue;
        };
        let request = format!("GET /idle HTTP/1.1\r\nHost: {CLICK}\r\n\r\n");
        if s.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 512];
        // Answered (and then idle), or closed at once when over the cap.
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        held.push(s);
    }
    for _ in 0..5 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            raw_plain(
                lg.http,
                format!("GET /honest HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes(),
            ),
        )
        .await
        .expect("an honest client is served while the attacker idles")
        .expect("request");
        assert_eq!(status_of(&answer), 200, "{answer}");
    }
    assert_eq!(legit_request(&pki, lg.https).await, 200, "https too");
    let refused = metric(
        lg.admin,
        "linkgate_connections_refused_total{reason=\"connections_per_address\"}",
    )
    .await;
    assert!(
        refused.is_some_and(|n| n >= 20.0),
        "the attacker's extra connections were refused: {refused:?}"
    );
    drop(held);
}
