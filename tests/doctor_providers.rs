//! `linkgate doctor` knows each provider: every host is probed at its own
//! provider's path (or `--url`'s, for all), "Host not forwarded" needs the
//! provider's own wrong-host page (a bare 404 blames nothing), the summary
//! names the providers and what to ask each, and every "step N" doctor
//! prints is the README's step N. The real doctor (a child process) probes a
//! real linkgate in front of a recording stand-in upstream, with the names
//! in the in-test DNS zone of `common::doctor`.

mod common;

use std::path::{Path, PathBuf};

use common::doctor::{dns_server, doctor_async, doctor_text, host, linkgate, API_KEY_ENV};
use common::process::has;
use common::provider_api::{link, Account, Paging, ProviderApi};
use common::*;

/// Each branding, its `[[host]]` upstream keys in doctor's config, and the
/// path doctor must fetch from it when `--url` is not given.
const BRANDINGS: [(&str, &str, &str); 8] = [
    ("sg.example.test", "", "/wf/open?upn=linkgate-doctor"),
    ("mg.example.test", "provider = \"mailgun\"\n", "/o/linkgate-doctor"),
    (
        "ses.example.test",
        "provider = \"amazon-ses\"\nregion = \"us-east-1\"\n",
        "/I0/linkgate-doctor",
    ),
    ("sp.example.test", "provider = \"sparkpost\"\n", "/q/linkgate-doctor~~/"),
    ("it.example.test", "provider = \"iterable\"\n", "/u/linkgate-doctor"),
    (
        "cio.example.test",
        "provider = \"customer-io\"\n",
        "/e/o/linkgate-doctor",
    ),
    // A plain url upstream: a neutral path, no wrong-host page.
    ("plain.example.test", "url = \"http://upstream.example.test\"\n", "/"),
    // A plain url naming SendGrid's endpoint is SendGrid.
    (
        "sgurl.example.test",
        "url = \"http://sendgrid.net\"\n",
        "/wf/open?upn=linkgate-doctor",
    ),
];

/// Mailgun and SendGrid brandings whose provider (the stand-in) answers 404,
/// with a plain body or with SendGrid's "Wrong Link" page.
const NOT_FOUND: [(&str, &str); 4] = [
    ("mg404.example.test", "provider = \"mailgun\"\nregion = \"eu\"\n"),
    ("mgpage.example.test", "provider = \"mailgun\"\n"),
    ("sg404.example.test", ""),
    ("sgpage.example.test", "provider = \"sendgrid\"\n"),
];

const WRONG_LINK: &str = "<html><title>Wrong Link</title>Wrong Link</html>";

/// doctor's config: every branding above with its upstream keys, and a plain-http listener.
fn doctor_config(dir: &Path) -> PathBuf {
    let mut toml = String::from("[listen]\nhttps = \"127.0.0.1:443\"\nhttp = \"127.0.0.1:80\"\n");
    for (name, keys) in BRANDINGS
        .iter()
        .map(|(n, k, _)| (n, k))
        .chain(NOT_FOUND.iter().map(|(n, k)| (n, k)))
    {
        toml.push_str(&format!(
            "[[host]]\nname = \"{name}\"\ncert = \"x.pem\"\nkey = \"x.key\"\n{keys}"
        ));
    }
    let path = dir.join("doctor.toml");
    std::fs::write(&path, toml).expect("write");
    path
}

/// `--host` for each of `hosts`, and where and how to reach linkgate.
fn args(hosts: &[&str], lg: &Linkgate, ca: &Path) -> Vec<String> {
    let mut args: Vec<String> = hosts
        .iter()
        .flat_map(|h| ["--host".to_owned(), (*h).to_owned()])
        .collect();
    args.extend([
        "--connect".into(),
        lg.https.to_string(),
        "--connect-http".into(),
        lg.http.expect("http").to_string(),
        "--ca-file".into(),
        ca.display().to_string(),
    ]);
    args
}

/// The targets the stand-in received for `host`, from the `from`th request on.
fn targets(up: &StandIn, from: usize, host: &str) -> Vec<String> {
    up.received()[from..]
        .iter()
        .filter(|r| r.header("host") == Some(host))
        .map(|r| r.target.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_is_probed_at_its_providers_path_and_the_summary_names_the_providers() {
    let dns = dns_server().await;
    let mut setup = Setup::new();
    for (name, _, _) in BRANDINGS {
        setup = setup.host(name);
    }
    let Served { dir, pki, up, lg, .. } = setup.start().await;
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path());
    let names: Vec<&str> = BRANDINGS.iter().map(|(n, _, _)| *n).collect();

    let (code, report) = doctor_async(&config, dns, args(&names, &lg, &ca)).await;
    assert_eq!(code, 0, "{report}");
    for (name, _, path) in BRANDINGS {
        // https and http, each at the provider's path, with the branded Host.
        assert_eq!(targets(&up, 0, name), [path, path], "{name}");
        assert_eq!(host(&report, name)["probe_path"], path, "{name}");
    }
    let provider = |name: &str| host(&report, name)["provider"].clone();
    assert_eq!(provider("mg.example.test"), "mailgun");
    assert_eq!(provider("sgurl.example.test"), "sendgrid");
    assert!(provider("plain.example.test").is_null());
    let sendgrid = &report["providers"][0];
    assert_eq!(sendgrid["provider"], "sendgrid", "{report}");
    assert_eq!(sendgrid["display"], "SendGrid", "{report}");
    assert_eq!(sendgrid["hosts"], 2, "{report}");
    assert_eq!(report["providers"].as_array().map(Vec::len), Some(7), "{report}");
    let summary = report["summary"].as_str().expect("summary");
    for said in [
        "all 8 link brandings (SendGrid ×2, Mailgun ×1, Amazon SES ×1, SparkPost ×1, Iterable ×1, \
         Customer.io ×1, url upstream ×1) pass both checks",
        "SendGrid: run the account audit next (step 7: set SENDGRID_API_KEY or give --api-key-file)",
        "Amazon SES: set HttpsPolicy = REQUIRE",
        "SparkPost: set the tracking domain to \"secure\": true",
        "Mailgun: no documented switch to https tracking links for a proxy (README, \"Providers\"): ask Mailgun \
         how to serve them over https through your own proxy (its https page: \
         https://help.mailgun.com/hc/en-us/articles/360011566033-HTTPS-Tracking-Links)",
        "Iterable: no documented switch to https tracking links for a proxy",
        "Customer.io: no documented switch to https tracking links for a proxy",
        "Do not re-validate the SendGrid link brandings",
    ] {
        assert!(summary.contains(said), "{said:?} in {summary}");
    }
    // What the README's Providers table says for them: no switch "as it describes".
    assert!(!summary.contains("as it describes"), "{summary}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for provider in ["Mailgun", "Iterable", "Customer.io"] {
        let row = format!("| no documented switch for a proxy: ask {provider}; see [");
        assert!(readme.contains(&row), "{row:?} in the README's Providers table");
    }
    // No API key: the account audit comes before SendGrid Support.
    assert!(!summary.contains("ask SendGrid Support"), "{summary}");

    // --url: that path for every host, whatever its provider.
    let from = up.received().len();
    let mut custom = args(&names, &lg, &ca);
    custom.extend(["--url".into(), "/ls/click?upn=from-a-real-email".into()]);
    let (code, report) = doctor_async(&config, dns, custom).await;
    assert_eq!(code, 0, "{report}");
    for (name, _, _) in BRANDINGS {
        let path = "/ls/click?upn=from-a-real-email";
        assert_eq!(targets(&up, from, name), [path, path], "{name}");
        assert_eq!(host(&report, name)["probe_path"], path, "{name}");
    }

    // The text form names each host's provider and the path it fetched.
    let (code, text) = doctor_text(&config, dns, args(&["mg.example.test", "plain.example.test"], &lg, &ca)).await;
    assert_eq!(code, Some(0), "{text}");
    let row = text.lines().find(|l| l.starts_with("mg.example.test ")).expect("row");
    assert!(row.ends_with("Mailgun"), "{row}");
    assert!(
        text.contains("mg.example.test probe: GET /o/linkgate-doctor\n"),
        "{text}"
    );
    assert!(text.contains("plain.example.test probe: GET /\n"), "{text}");

    // A --url that is not a path and query is refused before any probe.
    let (code, text) = doctor_text(&config, dns, vec!["--url".into(), "https://x.example/o".into()]).await;
    assert_eq!(code, Some(2), "{text}");
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_blames_the_host_header_only_with_the_providers_own_page() {
    let dns = dns_server().await;
    let up = StandIn::plain_answering(|host, _| match host {
        "mg404.example.test" | "sg404.example.test" => Some((404, "404 page not found\n")),
        "mgpage.example.test" | "sgpage.example.test" => Some((404, WRONG_LINK)),
        _ => None,
    })
    .await;
    let mut setup = Setup::new().standin(up);
    for (name, _) in NOT_FOUND {
        setup = setup.host(name);
    }
    let Served { dir, pki, up, lg, .. } = setup.start().await;
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path());
    let names: Vec<&str> = NOT_FOUND.iter().map(|(n, _)| *n).collect();

    let (code, report) = doctor_async(&config, dns, args(&names, &lg, &ca)).await;
    assert_eq!(code, 1, "{report}");
    // Every upstream request carried its branded Host: linkgate forwards it.
    for name in names {
        assert_eq!(targets(&up, 0, name).len(), 2, "{name}");
    }
    let blamed = |row: &serde_json::Value, check: &str| {
        row[check]["fix"]
            .as_str()
            .is_some_and(|f| f.contains("Host header is not forwarded"))
    };
    for name in ["mg404.example.test", "mgpage.example.test"] {
        // A 404 from Mailgun, even one with SendGrid's page, is not Mailgun's wrong-host page.
        let row = host(&report, name);
        for check in ["https", "http"] {
            assert_eq!(row[check]["status"], "fail", "{row}");
            assert_eq!(
                row[check]["message"],
                format!("{check} answered 404 to GET /o/linkgate-doctor"),
                "{row}"
            );
            assert!(!blamed(row, check), "{row}");
            let fix = row[check]["fix"].as_str().unwrap_or_default();
            assert!(
                fix.contains("what Mailgun answers for a wrong Host header is not known"),
                "{row}"
            );
            assert!(
                fix.contains("give --url with the path and query of a tracked link"),
                "{row}"
            );
        }
    }
    // SendGrid: its own "Wrong Link" page still reads "Host not forwarded"; a bare 404 does not.
    let page = host(&report, "sgpage.example.test");
    assert!(
        has(&page["https"]["message"], "SendGrid's \"Wrong Link\" page"),
        "{page}"
    );
    assert!(blamed(page, "https") && blamed(page, "http"), "{page}");
    let bare = host(&report, "sg404.example.test");
    assert_eq!(
        bare["https"]["message"],
        "https answered 404 to GET /wf/open?upn=linkgate-doctor"
    );
    assert!(!blamed(bare, "https") && !blamed(bare, "http"), "{bare}");

    let summary = report["summary"].as_str().expect("summary");
    assert!(
        summary
            .starts_with("4 of 4 link brandings (Mailgun ×2, SendGrid ×2) fail: mg404.example.test [Mailgun] (HTTPS: "),
        "{summary}"
    );
    assert!(
        summary.contains("sgpage.example.test [SendGrid] (HTTPS: the Host header is not forwarded"),
        "{summary}"
    );
    lg.stop().await;
}

/// The README's steps in "Enabling SSL click tracking with linkgate, step
/// by step": number → heading (the bold text, its final period dropped).
fn readme_steps() -> Vec<(u32, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let section = readme
        .split("\n## Enabling SSL click tracking with linkgate, step by step\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the step-by-step section");
    section
        .lines()
        .filter_map(|line| {
            let (number, rest) = line.split_once(". **")?;
            let heading = rest.split_once("**")?.0.trim_end_matches('.');
            Some((number.parse().ok()?, heading.to_owned()))
        })
        .collect()
}

/// Every "step N" in `text` and what follows its "step N not done: ".
fn steps_named(text: &str) -> Vec<(u32, String)> {
    text.match_indices("step ")
        .filter_map(|(at, _)| {
            let rest = &text[at + "step ".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let number = digits.parse().ok()?;
            let said = rest[digits.len()..].strip_prefix(" not done: ").unwrap_or("");
            Some((number, said.to_owned()))
        })
        .collect()
}

/// doctor's "step N" messages name the README's step N: a renumbered
/// README (or a message left behind) fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_doctor_names_is_the_readmes_step() {
    let steps = readme_steps();
    let numbers: Vec<u32> = steps.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=7).collect::<Vec<_>>(), "{steps:?}");

    let dns = dns_server().await;
    let dir = tempfile::TempDir::new().expect("tempdir");
    let config = dir.path().join("doctor.toml");
    std::fs::write(
        &config,
        "[listen]\nhttps = \"127.0.0.1:443\"\n\
         [[host]]\nname = \"stale.example.test\"\ncert = \"x.pem\"\nkey = \"x.key\"\n\
         [[host]]\nname = \"mgstale.example.test\"\ncert = \"x.pem\"\nkey = \"x.key\"\nprovider = \"mailgun\"\n",
    )
    .expect("write");
    // Both CNAMEs still lead to their provider; and the SendGrid account
    // (a stand-in of its API) has a branding the config lacks.
    let pki = Pki::new();
    let ca = pki.write_ca(dir.path()).display().to_string();
    let key = "SG.steps-test-key";
    let api = ProviderApi::start(
        &pki,
        Account {
            key: key.into(),
            links: vec![(
                None,
                vec![link(
                    5,
                    "missing.example.test",
                    "parent",
                    7,
                    false,
                    true,
                    "sendgrid.net",
                )],
            )],
            throttle: Vec::new(),
            paging: Paging::AsDocumented,
            refusal: None,
        },
    )
    .await;
    let mut args: Vec<String> = ["doctor", "--config"].map(str::to_owned).to_vec();
    args.push(config.display().to_string());
    args.extend(["--resolver", &dns.to_string(), "--timeout", "5s"].map(str::to_owned));
    args.extend(["--provider-api", &api.url(), "--provider-api-ca", &ca].map(str::to_owned));
    let run = linkgate(args, vec![(API_KEY_ENV, key.into())]).await;
    let text = run.stdout;
    assert_eq!(run.code, Some(1), "{text}");
    let named = steps_named(&text);
    assert!(named.len() >= 3, "doctor names the step to do: {text}");
    assert!(
        named.iter().any(|(n, _)| *n == 1),
        "the missing branding names step 1: {text}"
    );
    for (number, said) in named {
        let heading = steps
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, h)| h.to_lowercase())
            .unwrap_or_else(|| panic!("doctor names step {number}, which the README does not have: {text}"));
        assert!(
            said.to_lowercase().starts_with(&heading),
            "doctor's step {number} says {said:?}; the README's step {number} is {heading:?}"
        );
    }
}
