//! The real binary, driven as an operator would: signals, drain, reload on
//! SIGHUP, and the JSON access log.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::{wait_line, Process};
use common::*;

/// [`CLICK`] in front of a stand-in given 10 s to answer, with an admin
/// listener and JSON logs; `extra` follows the `[log]` keys.
fn setup(extra: &str) -> Setup {
    Setup::new()
        .host(CLICK)
        .admin()
        .response_timeout("10s")
        .extra("[log]\nformat = \"json\"\n")
        .extra(extra)
}

async fn readyz(admin: SocketAddr) -> Option<u16> {
    reqwest::get(format!("http://{admin}/readyz"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

fn plain_get(addr: SocketAddr, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
        .get(format!("http://{addr}{path}"))
        .header("host", CLICK)
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let Fixture {
        dir: _dir,
        pki: _pki,
        up: _up,
        config: path,
        ..
    } = setup("[shutdown]\ndrain_delay = \"1500ms\"\ngrace_period = \"20s\"\n")
        .write()
        .await;
    let mut lg = Process::start(&path);
    assert_eq!(readyz(lg.admin).await, Some(200));

    // A slow request (the upstream answers after 5 s) is in flight when SIGTERM arrives.
    let slow = tokio::spawn(plain_get(lg.http, "/slow").send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    lg.signal("TERM");
    let t0 = tokio::time::Instant::now();
    // /readyz turns 503 at once...
    let mut status = None;
    while t0.elapsed() < Duration::from_secs(1) {
        status = readyz(lg.admin).await;
        if status == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(503), "/readyz must say 503 while draining");
    // ...while new connections are still served during drain_delay...
    let resp = plain_get(lg.http, "/during-delay")
        .send()
        .await
        .expect("served during drain_delay");
    assert_eq!(resp.status(), 200);
    // ...and refused after it.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(t0.elapsed()) + Duration::from_millis(700)).await;
    assert!(
        tokio::net::TcpStream::connect(lg.http).await.is_err(),
        "listener still open after the delay"
    );
    assert!(
        tokio::net::TcpStream::connect(lg.https).await.is_err(),
        "listener still open after the delay"
    );
    // The in-flight request completes.
    let resp = tokio::time::timeout(HANG_GUARD, slow)
        .await
        .expect("slow request ends")
        .expect("join")
        .expect("slow request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "slow");
    assert_eq!(lg.wait(), 0, "clean exit after the drain");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let Fixture {
        dir: _dir,
        pki: _pki,
        up: _up,
        config: path,
        ..
    } = setup("[shutdown]\ngrace_period = \"60s\"\n").write().await;
    let mut lg = Process::start(&path);
    let _slow = tokio::spawn(plain_get(lg.http, "/slow").send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    lg.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = std::time::Instant::now();
    lg.signal("INT");
    assert_eq!(lg.wait(), 1);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "did not wait for the grace period"
    );
}

#[tokio::test]
async fn sighup_reloads_certificates_and_the_access_log_tells_what_happened() {
    let Fixture {
        dir,
        pki,
        up,
        config: path,
        mut leaves,
        ..
    } = setup("").write().await;
    let first = leaves.remove("click").expect("click leaf");
    let lg = Process::start(&path);
    // A fresh client each time: a resumed session would report the certificate of its first handshake.
    let fresh = || {
        reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls(&pki, &[b"http/1.1"]))
            .tls_info(true)
            .resolve(CLICK, lg.https)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("client")
    };
    let url = format!("https://{CLICK}:{}/ls/click?upn=secret-token", lg.https.port());
    let served = |resp: &reqwest::Response| {
        resp.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(<[u8]>::to_vec)
    };
    let resp = fresh().get(&url).send().await.expect("request");
    assert_eq!(served(&resp).as_deref(), Some(first.der.as_ref()));
    let body = resp.bytes().await.expect("body");

    // The access line: everything an operator needs, and no query (tracking tokens identify recipients).
    let access = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(access["host"], CLICK);
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/ls/click");
    assert_eq!(access["status"], 200);
    assert_eq!(access["bytes"], body.len() as u64);
    assert_eq!(access["tls"], "TLSv1.3");
    assert_eq!(access["protocol"], "HTTP/1.1");
    assert!(
        access["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{access}"
    );
    assert!(access["upstream_ms"].as_i64().is_some_and(|ms| ms >= 0), "{access}");
    assert!(access["total_ms"].as_u64().is_some(), "{access}");
    assert!(access["timestamp"].as_str().is_some(), "{access}");
    assert!(!access.to_string().contains("secret-token"), "{access}");

    // Replace the certificate, turn on query logging, SIGHUP.
    let second = pki.write_leaf(dir.path(), "click", &[CLICK]);
    let text = setup("query = true\n").text(&up);
    std::fs::write(&path, text).expect("write");
    lg.signal("HUP");
    wait_line(&lg.lines, |v| v["message"] == "configuration reloaded");
    let resp = fresh().get(&url).send().await.expect("request");
    assert_eq!(
        served(&resp).as_deref(),
        Some(second.der.as_ref()),
        "new certificate after SIGHUP"
    );
    let access = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(access["path"], "/ls/click?upn=secret-token");
}

fn health(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["health", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run linkgate health");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn health_subcommand_probes_the_admin_listener() {
    let drain = "[shutdown]\ndrain_delay = \"3s\"\n";
    let Fixture {
        dir,
        pki: _pki,
        up,
        config: path,
        ..
    } = setup(drain).write().await;
    let mut lg = Process::start(&path);
    // The config says port 0; point a copy at the port actually bound.
    let probe = dir.path().join("probe.toml");
    std::fs::write(&probe, setup(drain).admin_listen(lg.admin).text(&up)).expect("write");
    assert_eq!(health(&probe, &[]), (0, "/healthz: 200\n".to_owned()));
    assert_eq!(health(&probe, &["--ready"]), (0, "/readyz: 200\n".to_owned()));
    // Draining: alive, not ready.
    lg.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health(&probe, &[]).0, 0);
    assert_eq!(health(&probe, &["--ready"]), (1, "/readyz: 503\n".to_owned()));
    assert_eq!(lg.wait(), 0);
    // Gone: not alive.
    assert_eq!(health(&probe, &[]).0, 1);
    // No admin listener to probe: unusable arguments.
    let bare = dir.path().join("bare.toml");
    std::fs::write(&bare, Setup::new().host(CLICK).no_upstream().text(&up)).expect("write");
    let (code, text) = health(&bare, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no [admin] listen"), "{text}");
}

/// Operators (and the benchmark) want the resumption rate: a returning
/// client's handshake is counted as resumed and its access line says so; a
/// first visit's is a full handshake.
#[tokio::test]
async fn resumed_handshakes_are_counted_and_logged() {
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config: path,
        ..
    } = setup("").write().await;
    let lg = Process::start(&path);
    // One TLS configuration, so one session store: the second connection can resume.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(&pki, &[b"http/1.1"])));
    let name = rustls_pki_types::ServerName::try_from(CLICK).expect("name");
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(lg.https).await.expect("tcp");
        let mut tls = connector.connect(name.clone(), tcp).await.expect("handshake");
        kinds.push(tls.get_ref().1.handshake_kind());
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(format!("GET /wf/open HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(
        kinds,
        [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]
    );
    let first = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(first["resumed"], "no", "{first}");
    let second = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(second["resumed"], "yes", "{second}");
    let metrics = reqwest::get(format!("http://{}/metrics", lg.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("linkgate_tls_handshakes_resumed_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("linkgate_tls_handshakes_total{result=\"ok\"} 2\n"),
        "{metrics}"
    );
}

/// A key that applies only at start (here log.format) is logged as needing
/// a restart when a reload changes it, and the rest applies; changed back
/// to what the process started with, nothing is logged.
#[tokio::test]
async fn a_reload_names_the_keys_that_need_a_restart_against_what_is_in_force() {
    let Fixture {
        dir: _dir,
        up: _up,
        config: path,
        ..
    } = setup("").write().await;
    let lg = Process::start(&path);
    let started = std::fs::read_to_string(&path).expect("read");
    let until_reloaded = || {
        let mut seen = Vec::new();
        loop {
            let v = wait_line(&lg.lines, |_| true);
            let done = v["message"] == "configuration reloaded";
            seen.push(v);
            if done {
                return seen;
            }
        }
    };
    let restart_warnings = |seen: &[serde_json::Value]| -> Vec<String> {
        seen.iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains("restart linkgate")))
            .map(|v| v["key"].as_str().unwrap_or("?").to_string())
            .collect()
    };

    std::fs::write(&path, started.replace("format = \"json\"", "format = \"text\"")).expect("write");
    lg.signal("HUP");
    let seen = until_reloaded();
    assert_eq!(restart_warnings(&seen), ["log.format"], "{seen:?}");

    std::fs::write(&path, &started).expect("write");
    lg.signal("HUP");
    let seen = until_reloaded();
    assert!(restart_warnings(&seen).is_empty(), "changed back: {seen:?}");
}

/// Requests still waiting for the upstream when the grace period ends, over
/// HTTP/1.1 and HTTP/2, each get their access line (`status` 0, `cut`
/// `shutdown`) before linkgate exits; one whose client gave up says so.
// Multi-threaded: the stand-in and the clients' connections keep running while this waits for log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_the_end_of_the_grace_period_still_get_their_line() {
    let Fixture {
        dir: _dir,
        pki,
        up: _up,
        config: path,
        ..
    } = setup("[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"1s\"\n")
        .write()
        .await;
    let mut lg = Process::start(&path);
    assert_eq!(readyz(lg.admin).await, Some(200));
    let h1 = tokio::spawn(plain_get(lg.http, "/slow?one").send());
    let h2 = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(&pki, &[b"h2"]))
        .resolve(CLICK, lg.https)
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .expect("client");
    let url = format!("https://{CLICK}:{}/slow?two", lg.https.port());
    // A client that gives up first resets its stream: its line says `cut` `client`.
    let gave_up = h2.get(&url).timeout(Duration::from_millis(300)).send().await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    let line = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!((&line["status"], &line["cut"]), (&0.into(), &"client".into()), "{line}");
    let h2 = tokio::spawn(h2.get(url).send());
    // Both are at the upstream (it answers /slow after 5 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    lg.signal("TERM");
    assert_eq!(lg.wait(), 0);
    for cut in [h1, h2] {
        let outcome = tokio::time::timeout(HANG_GUARD, cut)
            .await
            .expect("client ends")
            .expect("join");
        assert!(outcome.is_err(), "a cut request has no answer: {outcome:?}");
    }
    let mut lines = Vec::new();
    while let Ok(v) = lg.lines.try_recv() {
        lines.push(v);
    }
    let access: Vec<_> = lines.iter().filter(|v| v["target"] == "linkgate::access").collect();
    assert_eq!(access.len(), 2, "{lines:#?}");
    let mut protocols: Vec<_> = access
        .iter()
        .map(|v| {
            assert_eq!(v["status"], 0, "{v}");
            assert_eq!(v["cut"], "shutdown", "{v}");
            assert_eq!(v["path"], "/slow", "{v}");
            assert!(v["total_ms"].as_u64().is_some_and(|ms| ms >= 1000), "{v}");
            v["protocol"].as_str().expect("protocol").to_owned()
        })
        .collect();
    protocols.sort();
    assert_eq!(protocols, ["HTTP/1.1", "HTTP/2.0"]);
    // Written before linkgate said it had stopped.
    let stopped = lines
        .iter()
        .position(|v| v["message"] == "shut down")
        .expect("shut down line");
    assert!(
        lines
            .iter()
            .rposition(|v| v["target"] == "linkgate::access")
            .is_some_and(|i| i < stopped),
        "{lines:#?}"
    );
}

/// The access line carries the user agent (truncated), leaves out `refused`
/// and `cut` when there is nothing to say, and a 504 logs how long linkgate
/// waited for the upstream.
#[tokio::test]
async fn access_lines_carry_the_user_agent_and_a_504_its_wait() {
    let Fixture {
        dir: _dir,
        up: _up,
        config: path,
        ..
    } = Setup::new()
        .host(CLICK)
        .admin()
        .response_timeout("1s")
        .extra("[log]\nformat = \"json\"\n")
        .write()
        .await;
    let lg = Process::start(&path);
    let scanner = "Mozilla/5.0 (compatible; Safe Links scanner) \"x\"";
    let resp = plain_get(lg.http, "/ls/click")
        .header("user-agent", scanner)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let line = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(line["user_agent"], scanner, "{line}");
    assert!(line.get("refused").is_none() && line.get("cut").is_none(), "{line}");

    let padded = format!("{}{}", "a".repeat(250), "é".repeat(400));
    plain_get(lg.http, "/ls/click")
        .header("user-agent", padded.as_str())
        .send()
        .await
        .expect("request");
    let line = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    let logged = line["user_agent"].as_str().expect("user_agent");
    assert!(
        logged.len() <= 256 && padded.starts_with(logged) && logged.len() >= 254,
        "{logged}"
    );

    // No User-Agent: "-"; a request for another host: refused, with the reason.
    let raw = reqwest::Client::builder().no_proxy().build().expect("client");
    let resp = raw
        .get(format!("http://{}/", lg.http))
        .header("host", "other.example.test")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 421);
    let line = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(line["user_agent"], "-", "{line}");
    assert_eq!(
        line["host"], "other.example.test",
        "a host linkgate does not serve is named: {line}"
    );
    assert!(
        line["refused"].as_str().is_some_and(|r| r.contains("misdirected")),
        "{line}"
    );

    // The upstream answers /slow after 5 s: a 504 after the 1 s response timeout.
    let resp = plain_get(lg.http, "/slow").send().await.expect("request");
    assert_eq!(resp.status(), 504);
    let line = wait_line(&lg.lines, |v| v["target"] == "linkgate::access");
    assert_eq!(line["status"], 504, "{line}");
    assert!(
        line["upstream_ms"]
            .as_i64()
            .is_some_and(|ms| (1000..5000).contains(&ms)),
        "{line}"
    );
}

/// A SIGHUP or SIGTERM sent the moment linkgate says it is listening meets
/// its handlers, never the default action (which would kill the process):
/// the handlers are installed before anything is bound.
#[tokio::test]
async fn signals_right_after_start_are_handled() {
    let Fixture {
        dir: _dir,
        up: _up,
        config: path,
        ..
    } = setup("[shutdown]\ndrain_delay = \"0s\"\n").write().await;
    for _ in 0..5 {
        let mut lg = Process::start(&path);
        lg.signal("HUP");
        wait_line(&lg.lines, |v| v["message"] == "SIGHUP received");
        lg.signal("TERM");
        assert_eq!(lg.wait(), 0, "a clean exit, not killed by the signal");
    }
}
