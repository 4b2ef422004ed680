//! `/metrics` as a real Prometheus (Debian's `prometheus` package) reads it:
//! it scrapes linkgate's admin listener, and its API then knows each series
//! with its type and help, including counters that are still 0. `promtool
//! check metrics` passes on the classic text format served to scrapers that
//! do not ask for OpenMetrics. Skipped, with the reason, where prometheus or
//! promtool is missing; .ci/run installs them.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn api(base: &str, path: String) -> Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .expect("prometheus API")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("JSON")
}

#[tokio::test]
async fn prometheus_scrapes_every_series_with_its_type_and_help() {
    if !installed("prometheus") || !installed("promtool") {
        eprintln!("SKIPPED: prometheus or promtool is not installed (apt-get install prometheus)");
        return;
    }
    let Served {
        dir, pki, up: _up, lg, ..
    } = Setup::new().host(CLICK).admin().start().await;
    let resp = client(&pki, &lg, &[CLICK])
        .get(lg.url(CLICK, "/wf/open"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    // The classic format, as a scraper without an Accept header gets it.
    let classic = reqwest::get(lg.admin_url("/metrics")).await.expect("metrics");
    assert_eq!(
        classic.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let classic = classic.text().await.expect("text");
    assert!(
        classic.contains("# TYPE linkgate_requests_total counter\n"),
        "{classic}"
    );
    assert!(!classic.contains("# EOF"), "{classic}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), classic.as_bytes()).expect("write");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // OpenMetrics for a scraper that asks for it.
    let open = reqwest::Client::new()
        .get(lg.admin_url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .expect("metrics");
    assert_eq!(
        open.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.text().await.expect("text").ends_with("# EOF\n"));

    // A real Prometheus scrapes it once a second.
    let web = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: linkgate\n    static_configs:\n      - targets: [\"{}\"]\n",
            lg.admin.expect("admin")
        ),
    )
    .expect("write prometheus.yml");
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let base = format!("http://127.0.0.1:{web}");
    let result = async {
        // Up, and the first scrape in.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{base}/api/v1/query?query=up")).await {
                if let Some(v) = r.text().await.ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                    if v["data"]["result"][0]["value"][1] == "1" {
                        break;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus never scraped linkgate"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let query = |q: &str| api(&base, format!("/api/v1/query?query={q}"));
        let requests = query("linkgate_requests_total%7Bclass%3D%222xx%22%7D").await;
        assert_eq!(requests["data"]["result"][0]["value"][1], "1", "{requests}");
        // Counters with known labels exist at 0 before anything happened.
        for series in [
            "linkgate_config_reloads_total%7Bresult%3D%22failure%22%7D",
            "linkgate_upstream_errors_total%7Bkind%3D%22timeout%22%7D",
            "linkgate_tls_handshakes_total%7Bresult%3D%22unknown_sni%22%7D",
            "linkgate_connections_refused_total%7Breason%3D%22max_handshakes%22%7D",
        ] {
            let v = query(series).await;
            assert_eq!(v["data"]["result"][0]["value"][1], "0", "{series}: {v}");
        }
        // Type and help, as Prometheus records them: per metric family, so a
        // counter's under its name without `_total` (it parsed OpenMetrics;
        // before, it was served OpenMetrics labelled as the classic format,
        // parsed it as classic and matched no series to its TYPE).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let meta = api(&base, "/api/v1/metadata".into()).await;
            let of = |name: &str| meta["data"][name][0].clone();
            let wanted = [
                ("linkgate_requests", "counter"),
                ("linkgate_tls_handshakes", "counter"),
                ("linkgate_open_connections", "gauge"),
                ("linkgate_request_duration_seconds", "histogram"),
            ];
            if wanted.iter().all(|(name, _)| !of(name).is_null()) {
                for (name, kind) in wanted {
                    let m = of(name);
                    assert_eq!(m["type"], kind, "{name}: {m}");
                    assert!(m["help"].as_str().is_some_and(|h| !h.is_empty()), "{name}: {m}");
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no metadata for linkgate's series: {meta}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    result
}
