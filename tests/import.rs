//! `linkgate import sendgrid` prints every branding on the account as
//! `[[host]]` entries the config loader takes; and the API's refusals (401,
//! 403), its rate limits (429) and unusable arguments are one line each,
//! for import and doctor alike, without the key. The real binary runs
//! against the https stand-in of the API in `common::provider_api`.

mod common;

use std::time::Duration;

use common::doctor::{linkgate, Run, API_KEY_ENV};
use common::process::has;
use common::provider_api::{
    doctor_config, link, no_key, sample_account, strings, Account, Paging, ProviderApi, TEST_KEY as KEY,
};
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_prints_entries_the_config_loader_takes() {
    let pki = Pki::new();
    let dir = tempfile::TempDir::new().expect("tempdir");
    let ca = pki.write_ca(dir.path());
    let mut own: Vec<Value> = (1..=7)
        .map(|i| {
            link(
                100 + i,
                &format!("l{i}.example.test"),
                "parent",
                7,
                i == 1,
                i != 4,
                "sendgrid.net",
            )
        })
        .collect();
    // A name and a user that would break the TOML and the terminal if printed as they are.
    let mut hostile = link(
        199,
        "evil.example.test",
        "parent\n[[host]]",
        7,
        false,
        true,
        "sendgrid.net",
    );
    hostile["dns"]["domain_cname"]["host"] = "evil.example.test\"\n[[host]]\nname = \"x\u{1b}[2J".into();
    own.push(hostile);
    let api = ProviderApi::start(
        &pki,
        Account {
            key: KEY.into(),
            links: vec![
                (None, own),
                (
                    Some("sub1".into()),
                    vec![link(121, "sub.example.test", "sub1", 8, false, true, "sendgrid.net")],
                ),
                (
                    Some("eusub".into()),
                    vec![link(131, "eu.example.test", "eusub", 9, false, true, "eu.sendgrid.net")],
                ),
            ],
            throttle: Vec::new(),
            paging: Paging::AsDocumented,
            refusal: None,
        },
    )
    .await;
    let key_file = dir.path().join("sendgrid.key");
    std::fs::write(&key_file, KEY).expect("write key");
    let mut args = strings(&["import", "sendgrid", "--provider-api", &api.url()]);
    args.extend(["--provider-api-ca".to_owned(), ca.display().to_string()]);
    args.extend(["--api-key-file".to_owned(), key_file.display().to_string()]);
    args.extend(strings(&[
        "--on-behalf-of",
        "sub1",
        "--eu-subuser",
        "eusub",
        "--api-page-size",
        "3",
    ]));
    let run = linkgate(args, Vec::new()).await;
    no_key(&run, KEY);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stderr, "");
    let out = &run.stdout;
    // Every page of the key's own: 3 + 3 + 2.
    let offsets: Vec<Option<usize>> = api
        .received()
        .iter()
        .filter(|r| r.on_behalf_of.is_none())
        .map(|r| r.offset)
        .collect();
    assert_eq!(offsets, [Some(0), Some(3), Some(6)]);
    assert!(out.starts_with("# linkgate import sendgrid: 10 link brandings on the SendGrid account (the API key's own account, on behalf of sub1, EU subuser eusub), from https://127.0.0.1:"), "{out}");
    for said in [
        "# SendGrid branding 101, user parent; the default branding\n[[host]]\nname = \"l1.example.test\"\n",
        "# SendGrid branding 104, user parent; SendGrid marks it invalid: `linkgate doctor` says how to fix it\n[[host]]\nname = \"l4.example.test\"\n",
        "# SendGrid branding 121, user sub1; listed on behalf of sub1\n[[host]]\nname = \"sub.example.test\"\n",
        "# SendGrid branding 131, user eusub; listed on behalf of eusub; EU regional\n[[host]]\nname = \"eu.example.test\"\nregion = \"eu\"\n",
        "# SendGrid branding 199, user parent\\x0a[[host]]\n# skipped: evil.example.test\"\\x0a[[host]]\\x0aname = \"x\\x1b[2j is not a host name linkgate can serve\n",
    ] {
        assert!(out.contains(said), "{said:?} in\n{out}");
    }

    // Pasted after a [listen] section, the real loader takes it: every
    // branding a host, certificates from certs_dir, the EU one forwarded to
    // eu.sendgrid.net.
    let names: Vec<String> = (1..=7)
        .map(|i| format!("l{i}.example.test"))
        .chain(["sub.example.test".to_owned(), "eu.example.test".to_owned()])
        .collect();
    let leaf = pki.leaf(&names.iter().map(String::as_str).collect::<Vec<_>>());
    for name in &names {
        let folder = dir.path().join("certs").join(name);
        std::fs::create_dir_all(&folder).expect("mkdir");
        std::fs::write(folder.join("tls.crt"), &leaf.cert_pem).expect("cert");
        std::fs::write(folder.join("tls.key"), &leaf.key_pem).expect("key");
    }
    let path = dir.path().join("linkgate.toml");
    std::fs::write(
        &path,
        format!("certs_dir = \"certs\"\n[listen]\nhttps = \"127.0.0.1:0\"\n\n{out}"),
    )
    .expect("write");
    let config = linkgate::config::Config::load(&path).unwrap_or_else(|e| panic!("refused: {e}\n{out}"));
    let loaded: Vec<String> = config.hosts.iter().map(|h| h.name.to_string()).collect();
    assert_eq!(loaded, names);
    let upstream = |name: &str| {
        let host = config.hosts.iter().find(|h| h.name.to_string() == name).expect("host");
        config.upstreams[host.upstream].authority.to_string()
    };
    assert_eq!(upstream("eu.example.test"), "eu.sendgrid.net");
    assert_eq!(upstream("l1.example.test"), "sendgrid.net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refusals_and_rate_limits_are_one_line_without_the_key() {
    let pki = Pki::new();
    let dir = tempfile::TempDir::new().expect("tempdir");
    let ca = pki.write_ca(dir.path()).display().to_string();
    let import = |api: &ProviderApi, extra: &[&str]| {
        let mut args = strings(&[
            "import",
            "sendgrid",
            "--provider-api",
            &api.url(),
            "--provider-api-ca",
            &ca,
        ]);
        args.extend(strings(extra));
        args
    };
    let one_line = |run: &Run| {
        assert_eq!(run.stdout, "", "{run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    };

    // Another key: 401, the permission named, neither key shown.
    let api = ProviderApi::start(&pki, sample_account()).await;
    let wrong = "SG.some-other-key-entirely";
    let run = linkgate(import(&api, &[]), vec![(API_KEY_ENV, wrong.into())]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    one_line(&run);
    no_key(&run, wrong);
    assert!(
        run.stderr
            .contains("SendGrid refused the API key (401 from GET https://127.0.0.1:"),
        "{run:?}"
    );
    assert!(run.stderr.contains("the whitelabel.read permission"), "{run:?}");
    assert!(run.stderr.contains("\"authorization required\""), "{run:?}");
    // A user that is not a subuser: 403.
    let run = linkgate(
        import(&api, &["--on-behalf-of", "stranger"]),
        vec![(API_KEY_ENV, KEY.into())],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    one_line(&run);
    no_key(&run, KEY);
    assert!(run.stderr.contains("SendGrid answered 403"), "{run:?}");
    assert!(run.stderr.contains("(on behalf of stranger)"), "{run:?}");
    assert!(run.stderr.contains("lacks the whitelabel.read permission"), "{run:?}");
    assert!(
        run.stderr.contains("or stranger is not a subuser of the key's account"),
        "{run:?}"
    );
    // No key at all, a key on the command line is not an option, an http API is refused.
    let run = linkgate(import(&api, &[]), Vec::new()).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("no API key: set SENDGRID_API_KEY or give --api-key-file FILE"),
        "{run:?}"
    );
    let run = linkgate(import(&api, &["--api-key", KEY]), Vec::new()).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    let run = linkgate(
        strings(&["import", "sendgrid", "--provider-api", &format!("http://{}", api.addr)]),
        vec![(API_KEY_ENV, KEY.into())],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("must start with https://"), "{run:?}");
    // doctor with the wrong key reports the account as not readable, in JSON, without the key.
    let config = doctor_config(dir.path());
    let mut args = strings(&["doctor", "--config"]);
    args.push(config.display().to_string());
    args.extend(strings(&[
        "--host",
        "ok.example.test",
        "--timeout",
        "2s",
        "--connect",
        "127.0.0.1:9",
        "--format",
        "json",
    ]));
    args.extend(strings(&["--provider-api", &api.url(), "--provider-api-ca", &ca]));
    let run = linkgate(args.clone(), vec![(API_KEY_ENV, wrong.into())]).await;
    no_key(&run, wrong);
    let report = run.json();
    assert_eq!(run.code, Some(1), "{report}");
    assert!(has(&report["account"]["error"], "401 from GET"), "{report}");
    assert!(
        has(&report["account"]["summary"], "the SendGrid account could not be read"),
        "{report}"
    );
    let text_args: Vec<String> = args
        .iter()
        .filter(|a| *a != "--format" && *a != "json")
        .cloned()
        .collect();
    let run = linkgate(text_args, vec![(API_KEY_ENV, wrong.into())]).await;
    no_key(&run, wrong);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.stdout.matches("401 from GET").count(),
        1,
        "said once: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("\naccount: the SendGrid account could not be read, so whether every branding on it is ready is not known: SendGrid refused the API key (401"),
        "{}",
        run.stdout
    );

    // A 429 with Retry-After: 1 is waited out once, then the page is asked again.
    let mut throttled = sample_account();
    throttled.throttle = vec![(None, 1, "1")];
    let api = ProviderApi::start(&pki, throttled).await;
    let run = linkgate(import(&api, &[]), vec![(API_KEY_ENV, KEY.into())]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    no_key(&run, KEY);
    let got = api.received();
    assert_eq!((got[0].offset, got[1].offset), (Some(0), Some(0)), "{got:?}");
    assert!(got[1].at.duration_since(got[0].at) >= Duration::from_secs(1), "{got:?}");
    assert!(
        run.stdout.contains("[[host]]\nname = \"new.example.test\"\n"),
        "{run:?}"
    );
    // One asking for an hour is not waited for: one request, and how long it asked.
    let mut throttled = sample_account();
    throttled.throttle = vec![(None, 10, "3600")];
    let api = ProviderApi::start(&pki, throttled).await;
    let run = linkgate(import(&api, &[]), vec![(API_KEY_ENV, KEY.into())]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    one_line(&run);
    assert!(
        run.stderr.contains("SendGrid rate-limited the API key (429 from GET"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("it asks to wait 3600s; linkgate waits at most 60s in all"),
        "{run:?}"
    );
    assert_eq!(api.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_that_would_never_end_is_stopped() {
    let pki = Pki::new();
    let dir = tempfile::TempDir::new().expect("tempdir");
    let ca = pki.write_ca(dir.path()).display().to_string();
    let run = |api: &ProviderApi| {
        let args = strings(&[
            "import",
            "sendgrid",
            "--provider-api",
            &api.url(),
            "--provider-api-ca",
            &ca,
            "--api-page-size",
            "2",
        ]);
        linkgate(args, vec![(API_KEY_ENV, KEY.into())])
    };
    // An API that ignores offset: the second page holds nothing new, and ends it.
    let mut ignores = sample_account();
    ignores.paging = Paging::IgnoresOffset;
    let api = ProviderApi::start(&pki, ignores).await;
    let out = run(&api).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let offsets: Vec<Option<usize>> = api.received().iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [Some(0), Some(2)]);
    assert_eq!(out.stdout.matches("[[host]]").count(), 2, "{out:?}");
    // One with new brandings on every page: stopped after 100 pages, saying so.
    let mut endless = sample_account();
    endless.paging = Paging::Endless;
    let api = ProviderApi::start(&pki, endless).await;
    let out = run(&api).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("still more brandings after 100 pages of 2: stopped"),
        "{out:?}"
    );
    assert_eq!(api.received().len(), 100);
    no_key(&out, KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_given_where_it_does_not_belong_is_never_printed() {
    let secret = KEY.splitn(3, '.').nth(2).expect("a secret part");
    // The key where its file's name belongs, with = or apart: refused
    // (arguments, exit 2), the way out named, the key not shown.
    for args in [
        vec![
            "import".to_owned(),
            "sendgrid".to_owned(),
            format!("--api-key-file={KEY}"),
        ],
        strings(&["import", "sendgrid", "--api-key-file", KEY]),
    ] {
        let run = linkgate(args, Vec::new()).await;
        no_key(&run, KEY);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(
            run.stderr.contains(
                "--api-key-file: the value given looks like an API key, not a file name (it is not shown here): \
                 put the key in a file and give that file's path, or set SENDGRID_API_KEY"
            ),
            "{run:?}"
        );
    }
    // The key as a positional argument, or behind an option that does not
    // exist: clap's refusal, with the key shown as <api key>.
    for args in [
        strings(&["import", "sendgrid", KEY]),
        strings(&["doctor", "--config", "linkgate.toml", KEY]),
        vec!["import".to_owned(), "sendgrid".to_owned(), format!("--api-key={KEY}")],
    ] {
        let run = linkgate(args, Vec::new()).await;
        no_key(&run, KEY);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("error: unexpected argument"), "{run:?}");
    }
    let run = linkgate(strings(&["import", "sendgrid", KEY]), Vec::new()).await;
    assert!(run.stderr.contains("unexpected argument '<api key>' found"), "{run:?}");

    // An API whose refusal echoes the key in another case, and its secret
    // part alone: both redacted.
    let pki = Pki::new();
    let dir = tempfile::TempDir::new().expect("tempdir");
    let ca = pki.write_ca(dir.path()).display().to_string();
    let mut echoes = sample_account();
    echoes.key = "SG.the-accepted-key.0000000000000000000000".into();
    echoes.refusal = Some(format!(
        "bad key {} (secret {})",
        KEY.to_ascii_uppercase(),
        secret.to_ascii_uppercase()
    ));
    let api = ProviderApi::start(&pki, echoes).await;
    let args = strings(&[
        "import",
        "sendgrid",
        "--provider-api",
        &api.url(),
        "--provider-api-ca",
        &ca,
    ]);
    let run = linkgate(args, vec![(API_KEY_ENV, KEY.into())]).await;
    no_key(&run, KEY);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("\"bad key <api key> (secret <api key>)\""),
        "{run:?}"
    );
}
