//! What a recipient's browser sees when the provider cannot be reached: the
//! HTML page (built in, or the brand's own `error_page`) for a browser's
//! navigation, the short text for every other client, both with
//! Retry-After, Cache-Control: no-store and Vary: Accept; the page files
//! refused at start-up and on reload as every other file is.

mod common;

use std::path::Path;
use std::process::Command;

use common::process::has;
use common::*;
use http::Version;
use linkgate::error_page::BUILTIN;

/// What Chrome sends when it follows a link.
const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";

/// A port nothing listens on, and an `[upstream]` section dialling it.
fn down_upstream() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{closed}\"\n")
}

/// `GET path` on `host` with `accept` (none when empty): status, version, headers, body.
async fn get(
    c: &reqwest::Client,
    lg: &Linkgate,
    host: &str,
    path: &str,
    accept: &str,
) -> (u16, Version, reqwest::header::HeaderMap, String) {
    let mut req = c.get(lg.url(host, path));
    if !accept.is_empty() {
        req = req.header("accept", accept);
    }
    let resp = req.send().await.expect("request");
    let (status, version, headers) = (resp.status().as_u16(), resp.version(), resp.headers().clone());
    (status, version, headers, resp.text().await.expect("body"))
}

/// The headers every upstream-failure answer carries, HTML or text.
#[track_caller]
fn assert_failure_headers(headers: &reqwest::header::HeaderMap, content_type: &str) {
    assert_eq!(headers["content-type"], content_type);
    assert_eq!(headers["retry-after"], "60");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["vary"], "accept");
    assert!(
        headers.get("connection").is_none(),
        "an upstream failure keeps the connection"
    );
}

#[tokio::test]
async fn a_browser_gets_the_page_and_other_clients_the_short_text() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new().host(CLICK).upstream(|_| down_upstream()).start().await;
    for (c, version) in [
        (client(&pki, &lg, &[CLICK]), Version::HTTP_11),
        (h2_client(&pki, &lg, &[CLICK]), Version::HTTP_2),
    ] {
        let (status, v, headers, body) = get(&c, &lg, CLICK, "/ls/click?upn=abc", BROWSER).await;
        assert_eq!((status, v), (502, version));
        assert_failure_headers(&headers, "text/html; charset=utf-8");
        assert_eq!(headers["content-length"], BUILTIN.len().to_string());
        assert_eq!(body, BUILTIN);
        assert!(body.contains("This link can't be opened right now"), "{body}");

        // curl and wget send */*; a script may name text/html at q=0.
        for accept in ["*/*", "text/html;q=0, */*", "application/json"] {
            let (status, v, headers, body) = get(&c, &lg, CLICK, "/ls/click?upn=abc", accept).await;
            assert_eq!((status, v), (502, version), "{accept}");
            assert_failure_headers(&headers, "text/plain; charset=utf-8");
            assert_eq!(body, "upstream unavailable\n", "{accept}");
        }

        // HEAD: the page's headers, no body.
        let resp = c
            .head(lg.url(CLICK, "/ls/click?upn=abc"))
            .header("accept", BROWSER)
            .send()
            .await
            .expect("head");
        assert_eq!((resp.status().as_u16(), resp.version()), (502, version));
        assert_failure_headers(resp.headers(), "text/html; charset=utf-8");
        assert_eq!(
            resp.headers()["content-length"],
            BUILTIN.len().to_string(),
            "the GET's length"
        );
        assert_eq!(resp.bytes().await.expect("body").len(), 0);
    }

    // No Accept at all (what doctor sends), on the wire: the text.
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!("GET /ls/click?upn=abc HTTP/1.1\r\nHost: {CLICK}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("raw request");
    assert_eq!(status_of(&raw), 502, "{raw}");
    assert!(raw.ends_with("\r\n\r\nupstream unavailable\n"), "{raw}");
    // A HEAD on the wire: the head ends the answer, nothing follows it.
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!("HEAD /ls/click HTTP/1.1\r\nHost: {CLICK}\r\nAccept: text/html\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("raw request");
    assert_eq!(status_of(&raw), 502, "{raw}");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/html; charset=utf-8\r\n"), "{raw}");
    assert!(
        lower.contains(&format!("content-length: {}\r\n", BUILTIN.len())),
        "{raw}"
    );
    assert!(raw.ends_with("\r\n\r\n"), "a body after a HEAD's head: {raw}");

    // A refusal is no upstream failure: text, and the HTTP/1 connection closes, as before.
    let raw = raw_tls(
        &pki,
        lg.https,
        CLICK,
        format!("GET / HTTP/1.1\r\nHost: {CLICK}\r\nHost: {CLICK}\r\nAccept: {BROWSER}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("raw request");
    assert_eq!(status_of(&raw), 400, "{raw}");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/plain; charset=utf-8\r\n"), "{raw}");
    assert!(lower.contains("connection: close\r\n"), "{raw}");
    assert!(!lower.contains("retry-after"), "{raw}");
    assert!(up.received().is_empty(), "nothing reached the stand-in");
    lg.stop().await;
}

#[tokio::test]
async fn a_hosts_own_page_beats_the_top_level_one_which_serves_the_others() {
    const OPEN: &str = "open.example.test";
    let Served { dir: _dir, pki, lg, .. } = Setup::new()
        .listen(&format!("error_page = \"pages/brand.html\"\n{}", listen_section()))
        .file(
            "pages/brand.html",
            "<!DOCTYPE html><title>Brand</title><p>Brand: back soon</p>\n",
        )
        .file("open.html", "<p>Open: back soon</p>\n")
        .host(CLICK)
        .host_with(OPEN, "error_page = \"open.html\"\n")
        .upstream(|_| down_upstream())
        .start()
        .await;
    for c in [client(&pki, &lg, &[CLICK, OPEN]), h2_client(&pki, &lg, &[CLICK, OPEN])] {
        let (status, _, headers, body) = get(&c, &lg, CLICK, "/ls/click?upn=1", BROWSER).await;
        assert_eq!(status, 502);
        assert_failure_headers(&headers, "text/html; charset=utf-8");
        assert_eq!(body, "<!DOCTYPE html><title>Brand</title><p>Brand: back soon</p>\n");
        let (status, _, headers, body) = get(&c, &lg, OPEN, "/ls/click?upn=2", BROWSER).await;
        assert_eq!(status, 502);
        assert_failure_headers(&headers, "text/html; charset=utf-8");
        assert_eq!(body, "<p>Open: back soon</p>\n");
        // Other clients keep the text whatever page is configured.
        for host in [CLICK, OPEN] {
            let (status, _, _, body) = get(&c, &lg, host, "/ls/click?upn=3", "*/*").await;
            assert_eq!((status, body.as_str()), (502, "upstream unavailable\n"), "{host}");
        }
    }
    lg.stop().await;
}

#[tokio::test]
async fn an_upstream_that_stalls_past_response_timeout_gets_the_page_too() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host(CLICK)
        .response_timeout("1s") // the stand-in's /slow answers after 5 s
        .start()
        .await;
    let c = h2_client(&pki, &lg, &[CLICK]);
    let (status, _, headers, body) = get(&c, &lg, CLICK, "/slow", BROWSER).await;
    assert_eq!(status, 504);
    assert_failure_headers(&headers, "text/html; charset=utf-8");
    assert_eq!(body, BUILTIN);
    let c = client(&pki, &lg, &[CLICK]);
    let (status, _, headers, body) = get(&c, &lg, CLICK, "/slow", "*/*").await;
    assert_eq!((status, body.as_str()), (504, "upstream timed out\n"));
    assert_failure_headers(&headers, "text/plain; charset=utf-8");
    let got = up.received();
    assert_eq!(got.len(), 2, "both requests reached the stand-in");
    assert_eq!(got[0].header("accept"), Some(BROWSER), "Accept is forwarded untouched");
    lg.stop().await;
}

/// `linkgate serve` on `toml` (written to `<dir>/linkgate.toml`): exit status and stderr.
fn serve(dir: &Path, toml: &str) -> (Option<i32>, String) {
    let path = dir.join("linkgate.toml");
    std::fs::write(&path, toml).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run linkgate");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_bad_error_page_stops_start_up_with_one_line_naming_it() {
    let fixture = Setup::new().host(CLICK).write().await;
    let dir = fixture.dir.path();
    let config = dir.join("linkgate.toml").display().to_string();
    let host = host_section(CLICK, "click");
    std::fs::write(dir.join("big.html"), vec![b'x'; 64 * 1024 + 1]).expect("write");
    std::fs::write(dir.join("latin1.html"), b"<p>caf\xe9</p>").expect("write");
    let cases = [
        (
            format!("error_page = \"missing.html\"\n{}{host}", listen_section()),
            format!("{config}: error_page: {}/missing.html: cannot read: ", dir.display()),
        ),
        (
            format!("{}{host}error_page = \"big.html\"\n", listen_section()),
            format!(
                "{config}: host \"{CLICK}\": error_page: {}/big.html: larger than 64 KiB",
                dir.display()
            ),
        ),
        (
            format!("{}{host}error_page = \"latin1.html\"\n", listen_section()),
            format!(
                "{config}: host \"{CLICK}\": error_page: {}/latin1.html: not UTF-8",
                dir.display()
            ),
        ),
    ];
    for (toml, want) in cases {
        let (code, stderr) = serve(dir, &toml);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&want), "want {want:?}, got {stderr}");
    }

    // `check` says the same: the top-level one among the file's errors, a host's on its row.
    std::fs::write(
        dir.join("linkgate.toml"),
        format!("error_page = \"missing.html\"\n{}{host}", listen_section()),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["check", "--format", "json", "--config"])
        .arg(dir.join("linkgate.toml"))
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(has(&report["errors"][0], "error_page: "), "{report}");
    assert!(has(&report["errors"][0], "missing.html: cannot read"), "{report}");
    std::fs::write(
        dir.join("linkgate.toml"),
        format!("{}{host}error_page = \"big.html\"\n", listen_section()),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["check", "--format", "json", "--config"])
        .arg(dir.join("linkgate.toml"))
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let row = &report["hosts"][0];
    assert_eq!(row["status"], "error", "{report}");
    assert!(has(&row["problems"][0]["message"], "error_page: "), "{report}");
    assert!(
        has(&row["problems"][0]["message"], "big.html: larger than 64 KiB"),
        "{report}"
    );
}

#[tokio::test]
async fn a_bad_page_on_reload_keeps_the_old_one_and_a_good_one_replaces_it() {
    let Served { dir, pki, lg, .. } = Setup::new()
        .host_with(CLICK, "error_page = \"brand.html\"\n")
        .file("brand.html", "<p>first</p>")
        .upstream(|_| down_upstream())
        .start()
        .await;
    let c = client(&pki, &lg, &[CLICK]);
    let page = async || get(&c, &lg, CLICK, "/ls/click", BROWSER).await.3;
    assert_eq!(page().await, "<p>first</p>");

    std::fs::write(dir.path().join("brand.html"), vec![b'x'; 100 * 1024]).expect("write");
    let err = lg.live.reload().await.expect_err("an oversized page is refused");
    assert!(
        err.contains(&format!("host \"{CLICK}\": error_page: ")) && err.contains("brand.html: larger than 64 KiB"),
        "{err}"
    );
    assert_eq!(page().await, "<p>first</p>", "the running configuration stays");

    std::fs::write(dir.path().join("brand.html"), "<p>second</p>").expect("write");
    lg.live.reload().await.expect("reload");
    assert_eq!(page().await, "<p>second</p>");
    lg.stop().await;
}

#[tokio::test]
async fn editing_the_page_file_reloads_it() {
    let Served { dir, pki, lg, .. } = Setup::new()
        .listen(&format!("error_page = \"pages/brand.html\"\n{}", listen_section()))
        .file("pages/brand.html", "<p>first</p>")
        .host(CLICK)
        .upstream(|_| down_upstream())
        .watching()
        .start()
        .await;
    let c = client(&pki, &lg, &[CLICK]);
    let page = async || get(&c, &lg, CLICK, "/ls/click", BROWSER).await.3;
    assert_eq!(page().await, "<p>first</p>");
    // Written beside it and renamed into place, as a deploy does.
    let pages = dir.path().join("pages");
    std::fs::write(pages.join("brand.html.new"), "<p>second</p>").expect("write");
    std::fs::rename(pages.join("brand.html.new"), pages.join("brand.html")).expect("rename");
    wait_for("the new page", async || page().await == "<p>second</p>").await;
    lg.stop().await;
}
