//! Provider presets, per-host upstreams, app-association files and the
//! plain-http choice, end to end: each preset's endpoint stood in for by a
//! loopback server presenting a certificate for the provider's real name.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

/// (branded host, provider, region, the endpoint the preset must resolve to)
const PRESETS: &[(&str, &str, Option<&str>, &str)] = &[
    ("sg.example.test", "sendgrid", None, "https://sendgrid.net"),
    (
        "ses.example.test",
        "amazon-ses",
        Some("eu-west-1"),
        "https://r.eu-west-1.awstrack.me",
    ),
    ("sp.example.test", "sparkpost", Some("eu"), "https://eu.spgo.io"),
    ("mg.example.test", "mailgun", None, "http://mailgun.org"),
    (
        "it.example.test",
        "iterable",
        Some("eu"),
        "https://links.eu.iterable.com",
    ),
    ("cio.example.test", "customer-io", None, "https://track.customer.io"),
];

fn endpoint_host(url: &str) -> &str {
    url.split("://").nth(1).expect("url")
}

#[tokio::test]
async fn every_preset_forwards_to_its_own_endpoint_with_the_branded_host() {
    let pki = Pki::new();
    let mut setup = Setup::new().no_upstream().file("ca.pem", &pki.ca_pem);
    let mut stand_ins = Vec::new();
    for (branded, provider, region, url) in PRESETS {
        // The stand-in presents a certificate for the provider's real name:
        // linkgate verifies it against that name, so the URL's host is proven.
        let up = if url.starts_with("https") {
            StandIn::tls(&pki.leaf(&[endpoint_host(url)])).await
        } else {
            StandIn::plain().await
        };
        let mut keys = format!("provider = \"{provider}\"\nconnect_to = \"{}\"\n", up.addr);
        if let Some(r) = region {
            keys.push_str(&format!("region = \"{r}\"\n"));
        }
        if url.starts_with("https") {
            keys.push_str("ca_file = \"ca.pem\"\n");
        }
        setup = setup.host_with(branded, &keys);
        stand_ins.push(up);
    }
    let Served {
        dir: _dir,
        pki,
        up: _up,
        lg,
        ..
    } = setup.pki(pki).start().await;

    // The configuration resolved each preset to its scheme, host and port.
    let active = lg.live.load();
    for (branded, _, _, url) in PRESETS {
        let host = active
            .config
            .hosts
            .iter()
            .find(|h| h.name.as_str() == *branded)
            .expect("host");
        let up = &active.config.upstreams[host.upstream];
        let port = if url.starts_with("https") { 443 } else { 80 };
        assert_eq!(
            (
                up.scheme.as_str(),
                up.authority.host(),
                up.authority.port_u16().unwrap_or(port)
            ),
            (url.split("://").next().expect("scheme"), endpoint_host(url), port),
            "{branded}"
        );
    }
    assert_eq!(
        active.config.upstreams.len(),
        PRESETS.len() + 1,
        "one pool per upstream, plus [upstream]'s"
    );

    let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
    let c = client(&pki, &lg, &names);
    for (branded, ..) in PRESETS {
        let resp = c
            .get(lg.url(branded, "/ls/click?upn=abc"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{branded}");
    }
    for ((branded, provider, ..), up) in PRESETS.iter().zip(&stand_ins) {
        let got = up.received();
        assert_eq!(
            got.len(),
            1,
            "{provider}'s endpoint gets exactly its own host's request"
        );
        assert_eq!(
            got[0].header("host"),
            Some(*branded),
            "{provider}: Host is the branded name"
        );
        assert_eq!(got[0].target, "/ls/click?upn=abc");
    }
    lg.stop().await;
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run linkgate check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_provider_settings_are_refused_by_check_and_serve() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "mg", &["mg.example.test"]);
    let path = dir.path().join("linkgate.toml");
    for (upstream, host_extra, expected) in [
        (
            "[upstream]\nprovider = \"mailgun\"\nurl = \"https://mailgun.org\"\n",
            "",
            "mailgun does not accept HTTPS",
        ),
        (
            "",
            "provider = \"mailgun\"\nurl = \"https://eu.mailgun.org\"\n",
            "mailgun does not accept HTTPS",
        ),
        ("[upstream]\nprovider = \"amazon-ses\"\n", "", "needs region"),
        (
            "[upstream]\nprovider = \"sparkpost\"\nregion = \"ap\"\n",
            "",
            "no region \"ap\"",
        ),
        (
            "[upstream]\nprovider = \"postmark\"\n",
            "",
            "unknown provider \"postmark\"",
        ),
        ("", "http = \"upgrade\"\n", "neither \"forward\" nor \"redirect\""),
    ] {
        std::fs::write(
            &path,
            format!(
                "{}{upstream}{}{host_extra}",
                listen_section(),
                host_section("mg.example.test", "mg")
            ),
        )
        .expect("write config");
        let (code, text) = check(&path);
        assert_ne!(code, 0, "{upstream}{host_extra}: {text}");
        assert!(text.contains(expected), "{upstream}{host_extra}: {text}");
        let err = linkgate::config::Config::load(&path).expect_err("refused").to_string();
        assert!(err.contains(expected) && err.lines().count() == 1, "{err}");
    }
    // Mailgun over http is fine.
    std::fs::write(
        &path,
        format!(
            "{}[upstream]\nprovider = \"mailgun\"\nregion = \"eu\"\n{}",
            listen_section(),
            host_section("mg.example.test", "mg")
        ),
    )
    .expect("write config");
    let config = linkgate::config::Config::load(&path).expect("mailgun over http");
    assert_eq!(config.default_upstream().authority.as_str(), "eu.mailgun.org");
    assert_eq!(config.default_upstream().scheme.as_str(), "http");
}

#[tokio::test]
async fn amazon_ses_request_heads_over_8_kib_get_431() {
    let pki = Pki::new();
    let up = StandIn::tls(&pki.leaf(&["r.us-east-1.awstrack.me"])).await;
    let Served { dir: _dir, pki, up, lg, .. } = Setup::new()
        .file("ca.pem", &pki.ca_pem)
        .pki(pki)
        .standin(up)
        .upstream(|up| {
            format!(
                "[upstream]\nprovider = \"amazon-ses\"\nregion = \"us-east-1\"\nconnect_to = \"{}\"\nca_file = \"ca.pem\"\n",
                up.addr
            )
        })
        .host("ses.example.test")
        .start()
        .await;
    let c = client(&pki, &lg, &["ses.example.test"]);
    let under = c
        .get(lg.url("ses.example.test", "/CL0/ok"))
        .header("cookie", "a".repeat(7 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(under.status(), 200);
    let over = c
        .get(lg.url("ses.example.test", "/CL0/big"))
        .header("cookie", "a".repeat(9 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(over.status(), 431);
    let got: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(got, ["/CL0/ok"], "the oversized request is not forwarded");
    lg.stop().await;
}

const AASA: &str =
    r#"{"applinks":{"details":[{"appIDs":["ABCDE12345.com.example.app"],"components":[{"/":"/ls/click*"}]}]}}"#;
const ASSETLINKS: &str = r#"[{"relation":["delegate_permission/common.handle_all_urls"],"target":{"namespace":"android_app","package_name":"com.example.app","sha256_cert_fingerprints":["AA:BB"]}}]"#;

#[tokio::test]
async fn app_association_files_are_served_locally_validated_and_reloaded() {
    let Served {
        dir, pki, up, lg, toml, ..
    } = Setup::new()
        .file("apps/apple-app-site-association.json", AASA)
        .file("apps/assetlinks.json", ASSETLINKS)
        .host_with(
            "links.example.test",
            "[host.files]\n\
             \"/.well-known/apple-app-site-association\" = \"apps/apple-app-site-association.json\"\n\
             \"/apple-app-site-association\" = \"apps/apple-app-site-association.json\"\n\
             \"/.well-known/assetlinks.json\" = \"apps/assetlinks.json\"\n",
        )
        .watching()
        .start()
        .await;
    let d = dir.path();
    let c = client(&pki, &lg, &["links.example.test"]);
    let url = |p: &str| lg.url("links.example.test", p);

    for (path, body) in [
        ("/.well-known/apple-app-site-association", AASA),
        ("/apple-app-site-association", AASA),
        ("/.well-known/assetlinks.json", ASSETLINKS),
    ] {
        let resp = c.get(url(path)).send().await.expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert!(resp.headers().contains_key("last-modified"));
        let etag = resp.headers()["etag"].clone();
        assert_eq!(resp.text().await.expect("body"), body);
        let again = c
            .get(url(path))
            .header("if-none-match", etag.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(again.status(), 304, "{path}");
        let head = c.head(url(path)).send().await.expect("head");
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-length"], body.len().to_string().as_str());
    }
    let post = c.post(url("/.well-known/assetlinks.json")).send().await.expect("post");
    assert_eq!(post.status(), 405);
    // Everything else on the host is forwarded as before.
    let resp = c.get(url("/ls/click?upn=1")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let got: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(got, ["/ls/click?upn=1"], "the files are never forwarded");

    // A changed file is served after the reload the change triggers.
    let updated = AASA.replace("ABCDE12345", "ZYXWV98765");
    std::fs::write(d.join("apps/apple-app-site-association.json"), &updated).expect("write");
    let mut body = String::new();
    for _ in 0..100 {
        body = c
            .get(url("/.well-known/apple-app-site-association"))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body");
        if body == updated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body, updated, "generation {}", lg.live.load().generation);
    // An invalid file is refused by the reload; the last good one stays.
    std::fs::write(d.join("apps/assetlinks.json"), "[{ not json").expect("write");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let resp = c
        .get(url("/.well-known/assetlinks.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.text().await.expect("body"), ASSETLINKS);
    lg.stop().await;

    std::fs::write(d.join("linkgate.toml"), &toml).expect("write");
    let err = linkgate::config::Config::load(&d.join("linkgate.toml"))
        .expect_err("invalid JSON refused")
        .to_string();
    assert!(
        err.contains("links.example.test") && err.contains("assetlinks.json: not valid JSON"),
        "{err}"
    );
}

#[tokio::test]
async fn plain_http_forwards_by_default_and_redirects_when_asked() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .host("old.example.test")
        .host_with(
            "new.example.test",
            "http = \"redirect\"\n[host.files]\n\"/.well-known/assetlinks.json\" = \"assetlinks.json\"\n",
        )
        .file("assetlinks.json", ASSETLINKS)
        .start()
        .await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let http = lg.http.expect("http listener");
    let forwarded = c
        .get(format!("http://{http}/ls/click?upn=old&x=1"))
        .header("host", "old.example.test")
        .send()
        .await
        .expect("request");
    assert_eq!(forwarded.status(), 200);
    let redirected = c
        .post(format!("http://{http}/ls/click?upn=a%20b&x=1"))
        .header("host", "NEW.example.test:80")
        .body("kept by 308")
        .send()
        .await
        .expect("request");
    assert_eq!(redirected.status(), 308);
    assert_eq!(
        redirected.headers()["location"],
        "https://new.example.test/ls/click?upn=a%20b&x=1"
    );
    // The host's files are answered, not redirected.
    let file = c
        .get(format!("http://{http}/.well-known/assetlinks.json"))
        .header("host", "new.example.test")
        .send()
        .await
        .expect("request");
    assert_eq!(file.status(), 200);
    assert_eq!(file.text().await.expect("body"), ASSETLINKS);
    // https on the redirecting host is forwarded as usual.
    let resp = client(&pki, &lg, &["new.example.test"])
        .get(lg.url("new.example.test", "/wf/open"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let got: Vec<_> = up
        .received()
        .into_iter()
        .map(|r| (r.target.clone(), r.header("host").map(str::to_owned)))
        .collect();
    assert_eq!(
        got,
        [
            ("/ls/click?upn=old&x=1".to_owned(), Some("old.example.test".to_owned())),
            ("/wf/open".to_owned(), Some("new.example.test".to_owned())),
        ]
    );
    lg.stop().await;
}
