//! Scale-out behind a real load balancer: HAProxy (TCP mode, PROXY protocol
//! v2, health checks on /readyz) in front of three linkgate replicas, under
//! continuous load: a rolling restart of every replica loses no request; a
//! replica killed with SIGKILL loses at most the requests in flight on it
//! and HAProxy routes around it within its check interval; a certificate
//! renewed on all replicas is picked up with no failed request. The counts
//! are printed. Skipped, with the reason printed, where haproxy is not
//! installed; .ci/run installs it.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::Process;
use common::*;

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A replica on `https` and `admin`: PROXY protocol from loopback, a short drain, JSON logs.
fn replica(https: u16, admin: u16) -> Setup {
    Setup::new()
        .host(CLICK)
        .listen(&format!(
            "[listen]\nhttps = \"127.0.0.1:{https}\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n"
        ))
        .admin_listen(format!("127.0.0.1:{admin}"))
        .extra("[shutdown]\ndrain_delay = \"1s\"\ngrace_period = \"10s\"\n[log]\nformat = \"json\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_roll_die_and_reload_behind_haproxy() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy); .ci/run installs it");
        return;
    }
    let fixture = Setup::new().host(CLICK).write().await;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let configs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, (https, admin))| fixture.write_config(&format!("lg{i}.toml"), &replica(*https, *admin)))
        .collect();
    let Fixture { dir, pki, up, .. } = fixture;
    let mut instances: Vec<Process> = configs.iter().map(|c| Process::start(c)).collect();

    let frontend = free_port();
    let servers: String = ports
        .iter()
        .enumerate()
        .map(|(i, (https, admin))| {
            format!("    server lg{i} 127.0.0.1:{https} send-proxy-v2 check port {admin} inter 200ms fall 2 rise 2\n")
        })
        .collect();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 2000\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
             frontend tls\n    bind 127.0.0.1:{frontend}\n    default_backend linkgate\n\
             backend linkgate\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n\
             retries 3\n    option redispatch\n{servers}"
        ),
    )
    .expect("write haproxy.cfg");
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let lb: SocketAddr = format!("127.0.0.1:{frontend}").parse().expect("addr");
    // Wait until every server is up in HAProxy's eyes (two passed checks each).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let tls = client_tls(&pki, &[b"http/1.1"]);
        clients.push(tokio::spawn(async move {
            let url = format!("https://{CLICK}:{frontend}/wf/open?upn=rolling");
            while !stop.load(Ordering::Relaxed) {
                // A new connection for every few requests, as a stream of mail clients would make.
                let c = reqwest::Client::builder()
                    .tls_backend_preconfigured(tls.clone())
                    .resolve(CLICK, lb)
                    .no_proxy()
                    .build()
                    .expect("client");
                for _ in 0..5 {
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            eprintln!("status {}", r.status());
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("error {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, config) in configs.iter().enumerate() {
        let before = ok.load(Ordering::Relaxed);
        instances[i].signal("TERM");
        let code = tokio::task::block_in_place(|| instances[i].wait());
        assert_eq!(code, 0, "instance {i} drained and exited cleanly");
        instances[i] = Process::start(config);
        // Let HAProxy see it healthy again before rolling the next one.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            ok.load(Ordering::Relaxed) > before,
            "traffic kept flowing while instance {i} restarted"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rolled_ok, rolled_failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rolling restart of 3 replicas: {rolled_ok} requests succeeded, {rolled_failed} failed");
    assert!(rolled_ok > 100, "enough traffic to mean something: {rolled_ok}");
    assert_eq!(rolled_failed, 0, "no request lost during the rolling restart");

    // SIGKILL one replica: only what was in flight on it may fail, and once
    // HAProxy's checks (200 ms x 2) have marked it down, nothing more does.
    let (ok0, failed0) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let _ = instances[1].child.kill();
    let _ = instances[1].child.wait();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let failed_after_check = failed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok1, failed1) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "SIGKILL of one replica: {} succeeded, {} failed (all within the check interval)",
        ok1 - ok0,
        failed1 - failed0
    );
    assert!(
        failed1 - failed0 <= 8,
        "at most the requests in flight on the killed replica fail"
    );
    assert_eq!(
        failed1, failed_after_check,
        "no failure once HAProxy marked the replica down"
    );
    assert!(ok1 > ok0 + 50, "the other replicas kept serving");
    instances[1] = Process::start(&configs[1]);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Renew the certificate on all replicas (certbot's write-then-rename):
    // every replica reloads it, and no request fails.
    let (ok2, failed2) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let renewed = pki.leaf(&[CLICK]);
    std::fs::write(dir.path().join("click.pem.new"), &renewed.cert_pem).expect("write");
    std::fs::write(dir.path().join("click.key.new"), &renewed.key_pem).expect("write");
    std::fs::rename(dir.path().join("click.key.new"), dir.path().join("click.key")).expect("rename");
    std::fs::rename(dir.path().join("click.pem.new"), dir.path().join("click.pem")).expect("rename");
    for (i, instance) in instances.iter().enumerate() {
        let reloaded = tokio::task::block_in_place(|| {
            common::process::wait_line(&instance.lines, |v| v["message"] == "configuration reloaded")
        });
        assert!(reloaded["generation"].as_u64().is_some(), "replica {i} reloaded");
    }
    // Every new handshake through the balancer now gets the renewed certificate.
    for _ in 0..6 {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&pki, &[b"http/1.1"])));
        let tcp = tokio::net::TcpStream::connect(lb).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
        let tls = connector.connect(name, tcp).await.expect("handshake");
        let served = tls.get_ref().1.peer_certificates().expect("certificate")[0].clone();
        assert_eq!(served, renewed.der, "a replica still serves the old certificate");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let (ok3, failed3) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "certificate renewed on 3 replicas: {} succeeded, {} failed",
        ok3 - ok2,
        failed3 - failed2
    );
    assert_eq!(failed3, failed2, "no request lost while the certificate was reloaded");
    // The client address came through PROXY protocol v2 (the test client is on loopback).
    assert!(up
        .received()
        .iter()
        .all(|r| r.header("x-forwarded-for") == Some("127.0.0.1")));
}
