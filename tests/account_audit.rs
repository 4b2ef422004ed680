//! What doctor's account audit says when the account holds a branding
//! that is not a host name (as `import` does: never a `[[host]]` to add),
//! and when the account could not be read while every host passes
//! (unknown, not "not ready"). The real binary runs against the https
//! stand-in of the API (`common::provider_api`) and linkgate in front of a
//! stand-in upstream.

mod common;

use common::doctor::{dns_server, linkgate, Run, API_KEY_ENV};
use common::provider_api::{doctor_config, link, no_key, strings, Account, Paging, ProviderApi, TEST_KEY as KEY};
use common::*;

/// doctor (text) on ok.example.test, through `lg`, with the API at `api` and `key`.
async fn doctor(dir: &std::path::Path, pki: &Pki, lg: &Linkgate, api: &ProviderApi, key: &str) -> Run {
    let dns = dns_server().await;
    let ca = pki.write_ca(dir).display().to_string();
    let config = doctor_config(dir);
    let mut args = strings(&["doctor", "--config"]);
    args.push(config.display().to_string());
    args.extend(strings(&[
        "--resolver",
        &dns.to_string(),
        "--timeout",
        "5s",
        "--host",
        "ok.example.test",
        "--connect",
        &lg.https.to_string(),
        "--ca-file",
        &ca,
        "--provider-api",
        &api.url(),
        "--provider-api-ca",
        &ca,
    ]));
    let run = linkgate(args, vec![(API_KEY_ENV, key.into())]).await;
    no_key(&run, key);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branding_that_is_not_a_host_name_is_never_an_entry_to_add() {
    let Served {
        dir, pki, up: _up, lg, ..
    } = Setup::new().host("ok.example.test").start().await;
    let mut odd = link(99, "odd.example.test", "parent", 7, false, true, "sendgrid.net");
    odd["dns"]["domain_cname"]["host"] = "odd.example.test\"\n[[host]]\nname = \"x".into();
    let api = ProviderApi::start(
        &pki,
        Account {
            key: KEY.into(),
            links: vec![(
                None,
                vec![
                    link(11, "ok.example.test", "parent", 7, true, true, "sendgrid.net"),
                    odd,
                ],
            )],
            throttle: Vec::new(),
            paging: Paging::AsDocumented,
            refusal: None,
        },
    )
    .await;
    let run = doctor(dir.path(), &pki, &lg, &api, KEY).await;
    let text = &run.stdout;
    assert_eq!(run.code, Some(1), "{text}");
    assert!(
        text.contains(
            "(SendGrid id 99, user parent): SendGrid lists it, but it is not a valid host name, so linkgate cannot \
             serve it (`linkgate import` skips it too)"
        ),
        "{text}"
    );
    assert!(
        text.contains("fix: look at branding 99 in SendGrid (Settings → Sender Authentication → Link Branding)"),
        "{text}"
    );
    // No TOML entry for it, no "step 1" advice: the one served branding needs no entry either.
    assert!(
        !text
            .lines()
            .any(|l| l.trim() == "[[host]]" || l.trim_start().starts_with("name = ")),
        "{text}"
    );
    assert!(!text.contains("step 1 not done"), "{text}");
    assert!(text.contains("(not a valid host name)"), "{text}");
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_that_cannot_be_read_is_unknown_not_unready() {
    let Served {
        dir, pki, up: _up, lg, ..
    } = Setup::new().host("ok.example.test").start().await;
    let api = ProviderApi::start(
        &pki,
        Account {
            key: KEY.into(),
            links: vec![(None, Vec::new())],
            throttle: Vec::new(),
            paging: Paging::AsDocumented,
            refusal: None,
        },
    )
    .await;
    let wrong = "SG.another-key.that-sendgrid-refuses-0123";
    let run = doctor(dir.path(), &pki, &lg, &api, wrong).await;
    let text = &run.stdout;
    // Every host passes; the account is unknown, so doctor does not pass.
    assert_eq!(run.code, Some(1), "{text}");
    assert!(text.contains("ok.example.test https: "), "{text}");
    let last = text.lines().last().expect("a summary");
    assert!(
        last.starts_with(
            "all 1 link brandings (SendGrid ×1) pass both checks, but the SendGrid account could not be read (it \
             refused the API key; the account: line above says more), so whether every branding on it is ready is \
             not known: do not ask SendGrid Support yet"
        ),
        "{last}"
    );
    assert!(!text.contains("not every branding"), "{text}");
    assert_eq!(text.matches("401 from GET").count(), 1, "said once: {text}");
    lg.stop().await;
}
