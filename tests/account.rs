//! `linkgate doctor` with a SendGrid API key audits every branding on the
//! account against the config. The real binary runs against an https
//! stand-in of the API (`common::provider_api`) serving the documented
//! shapes: several pages, subusers through `on-behalf-of`, an invalid
//! branding, EU ones, the default one. The tests read what a user sees and
//! what the stand-in received, and look for the key in every byte printed.
//! `linkgate import`, and the API's refusals, are in `tests/import.rs`.

mod common;

use common::doctor::{dns_server, linkgate, API_KEY_ENV};
use common::process::has;
use common::provider_api::{
    doctor_config, link, no_key, sample_account, strings, Account, Paging, ProviderApi, TEST_KEY as KEY,
};
use common::*;
use serde_json::Value;

/// The row of branding `id` in doctor's account report.
fn branding(report: &Value, id: u64) -> &Value {
    report["account"]["brandings"]
        .as_array()
        .expect("brandings")
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("branding {id} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_audits_every_branding_on_the_account() {
    let dns = dns_server().await;
    let Served {
        dir, pki, up: _up, lg, ..
    } = Setup::new().host("ok.example.test").start().await;
    let ca = pki.write_ca(dir.path());
    let api = ProviderApi::start(&pki, sample_account()).await;
    let config = doctor_config(dir.path());
    let ca = ca.display().to_string();
    let mut args = strings(&["doctor", "--config"]);
    args.push(config.display().to_string());
    args.extend(strings(&[
        "--resolver",
        &dns.to_string(),
        "--timeout",
        "5s",
        "--host",
        "ok.example.test",
    ]));
    args.extend(strings(&["--connect", &lg.https.to_string(), "--ca-file", &ca]));
    args.extend(strings(&["--provider-api", &api.url(), "--provider-api-ca", &ca]));
    args.extend(strings(&[
        "--on-behalf-of",
        "sub1",
        "--eu-subuser",
        "eusub",
        "--api-page-size",
        "2",
    ]));
    let mut json = args.clone();
    json.extend(strings(&["--format", "json"]));

    let run = linkgate(json, vec![(API_KEY_ENV, KEY.into())]).await;
    no_key(&run, KEY);
    let report = run.json();
    // The probed host passes; the account does not, so doctor fails.
    assert_eq!(run.code, Some(1), "{report}");
    assert_eq!(report["hosts"][0]["https"]["status"], "pass", "{report}");
    let account = &report["account"];
    assert_eq!(account["ok"], false, "{account}");
    assert_eq!(account["provider"], "sendgrid");
    // Three listings: the key's own (three pages of two), the subuser's, the EU subuser's.
    let listed: Vec<(Value, Value, Value, Value)> = account["listed"]
        .as_array()
        .expect("listed")
        .iter()
        .map(|l| {
            (
                l["on_behalf_of"].clone(),
                l["region"].clone(),
                l["pages"].clone(),
                l["brandings"].clone(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (Value::Null, "global".into(), 3.into(), 4.into()),
            ("sub1".into(), "global".into(), 1.into(), 1.into()),
            ("eusub".into(), "eu".into(), 1.into(), 1.into()),
        ]
    );
    // The stand-in saw every page asked with the key as a Bearer token, and the subusers named.
    let got: Vec<(Option<String>, Option<usize>, Option<usize>)> = api
        .received()
        .iter()
        .map(|r| (r.on_behalf_of.clone(), r.limit, r.offset))
        .collect();
    assert_eq!(
        got,
        [
            (None, Some(2), Some(0)),
            (None, Some(2), Some(2)),
            (None, Some(2), Some(4)),
            (Some("sub1".into()), Some(2), Some(0)),
            (Some("eusub".into()), Some(2), Some(0)),
        ]
    );
    let bearer = format!("Bearer {KEY}");
    assert!(api
        .received()
        .iter()
        .all(|r| r.authorization.as_deref() == Some(bearer.as_str()) && r.path == "/v3/whitelabel/links"));

    // Served, valid, the default: ready, and which record moves.
    let ok = branding(&report, 11);
    assert_eq!(
        (ok["served"].clone(), ok["ready"].clone(), ok["default"].clone()),
        (true.into(), true.into(), true.into())
    );
    assert!(
        has(
            &ok["notes"][0],
            "the default branding: SendGrid uses it for mail whose From domain has no link branding of its own"
        ),
        "{ok}"
    );
    // Its host was probed and its DNS check passed: the record already points at linkgate.
    assert_eq!(report["hosts"][0]["dns"]["status"], "pass", "{report}");
    assert_eq!(
        ok["dns_advice"],
        "ok.example.test CNAME sendgrid.net moves, and already points at linkgate (doctor's DNS check of \
         ok.example.test passed); 7.example.test CNAME sendgrid.net stays as it is (SendGrid's check of who owns \
         the branding)"
    );
    // One not probed still has to be pointed.
    assert!(
        has(
            &branding(&report, 12)["dns_advice"],
            "new.example.test CNAME sendgrid.net moves: point it at linkgate (your load balancer's name)"
        ),
        "{report}"
    );
    assert_eq!(ok["records"][0]["moves_to_proxy"], true);
    assert_eq!(ok["records"][1]["record"], "owner_cname");
    // One nobody added: the [[host]] entry to add, and the README's step.
    let new = branding(&report, 12);
    assert_eq!(new["served"], false);
    assert_eq!(new["problems"][0]["kind"], "not_served");
    assert!(
        has(&new["problems"][0]["fix"], "step 1 not done: list your branded hosts"),
        "{new}"
    );
    assert_eq!(new["add"], "[[host]]\nname = \"new.example.test\"\n");
    // Invalid at SendGrid: what happened and the documented way out.
    let broken = branding(&report, 13);
    assert_eq!(
        (broken["served"].clone(), broken["valid"].clone()),
        (true.into(), false.into())
    );
    assert_eq!(broken["problems"][0]["kind"], "invalid");
    assert!(
        has(
            &broken["problems"][0]["message"],
            "warns not to re-validate after changing the CNAME"
        ),
        "{broken}"
    );
    assert!(
        has(
            &broken["problems"][0]["fix"],
            "point broken.example.test's CNAME back at sendgrid.net, validate it again in SendGrid"
        ),
        "{broken}"
    );
    assert!(
        has(&broken["problems"][0]["fix"], "then point the CNAME at linkgate again"),
        "{broken}"
    );
    // An EU branding (its CNAME names eu.sendgrid.net) forwarded to the global endpoint.
    let eu = branding(&report, 14);
    assert_eq!(
        (eu["region"].clone(), eu["problems"][0]["kind"].clone()),
        ("eu".into(), "wrong_region".into())
    );
    assert!(
        has(
            &eu["problems"][0]["fix"],
            "set region = \"eu\" on its [[host]] (linkgate then forwards it to https://eu.sendgrid.net)"
        ),
        "{eu}"
    );
    // The subusers' brandings, the EU one's entry with its region.
    let sub = branding(&report, 21);
    assert_eq!(
        (sub["user"].clone(), sub["listed_for"].clone(), sub["served"].clone()),
        ("sub1".into(), "sub1".into(), false.into())
    );
    let eusub = branding(&report, 31);
    assert_eq!(eusub["region"], "eu");
    assert_eq!(
        eusub["add"],
        "[[host]]\nname = \"eusub.example.test\"\nregion = \"eu\"\n"
    );
    let summary = account["summary"].as_str().expect("summary");
    assert!(
        summary.starts_with(
            "account: 5 of 6 link brandings on the SendGrid account (the API key's own account, on behalf of sub1, \
             EU subuser eusub; users: parent ×4, sub1 ×1, eusub ×1) are not ready: new.example.test (not served by \
             linkgate), broken.example.test (invalid at SendGrid), euparent.example.test (forwarded to the wrong \
             region), sub.example.test (not served by linkgate), eusub.example.test (not served by linkgate)"
        ),
        "{summary}"
    );
    // The hosts' own summary does not send anyone to SendGrid Support.
    assert!(has(&report["summary"], "do not ask SendGrid Support yet"), "{report}");

    // The text form says the same to a person.
    let run = linkgate(args, vec![(API_KEY_ENV, KEY.into())]).await;
    no_key(&run, KEY);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let text = &run.stdout;
    for line in [
        "ACCOUNT SendGrid: 6 link brandings (the API key's own account, on behalf of sub1, EU subuser eusub)",
        "ID  HOST                   USER    REGION  SendGrid  LINKGATE    DEFAULT",
        "11  ok.example.test        parent  global  valid     served      default",
        "12  new.example.test       parent  global  valid     NOT SERVED  -",
        "13  broken.example.test    parent  global  INVALID   served      -",
        "    [[host]]",
        "    name = \"new.example.test\"",
        "    region = \"eu\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
    assert!(
        text.contains("new.example.test (SendGrid id 12, user parent): linkgate does not serve it"),
        "{text}"
    );
    assert!(
        text.contains("broken.example.test (SendGrid id 13, user parent): SendGrid marks it invalid"),
        "{text}"
    );
    assert!(
        text.contains("sub.example.test records: sub.example.test CNAME sendgrid.net moves"),
        "{text}"
    );
    assert!(
        text.contains("\naccount: 5 of 6 link brandings on the SendGrid account"),
        "{text}"
    );
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_whose_every_branding_is_served_and_valid_passes() {
    let dns = dns_server().await;
    let Served {
        dir, pki, up: _up, lg, ..
    } = Setup::new().host("ok.example.test").start().await;
    let ca = pki.write_ca(dir.path());
    let api = ProviderApi::start(
        &pki,
        Account {
            key: KEY.into(),
            links: vec![(
                None,
                vec![link(11, "ok.example.test", "parent", 7, true, true, "sendgrid.net")],
            )],
            throttle: Vec::new(),
            paging: Paging::AsDocumented,
            refusal: None,
        },
    )
    .await;
    let config = doctor_config(dir.path());
    let key_file = dir.path().join("sendgrid.key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("write key");
    let ca = ca.display().to_string();
    let mut args = strings(&["doctor", "--config"]);
    args.push(config.display().to_string());
    args.extend(strings(&[
        "--resolver",
        &dns.to_string(),
        "--timeout",
        "5s",
        "--host",
        "ok.example.test",
    ]));
    args.extend(strings(&[
        "--connect",
        &lg.https.to_string(),
        "--ca-file",
        &ca,
        "--format",
        "json",
    ]));
    args.extend(strings(&["--provider-api", &api.url(), "--provider-api-ca", &ca]));
    args.extend(["--api-key-file".to_owned(), key_file.display().to_string()]);
    let run = linkgate(args, Vec::new()).await;
    no_key(&run, KEY);
    let report = run.json();
    assert_eq!(run.code, Some(0), "{report}");
    assert_eq!(report["account"]["ok"], true);
    assert!(
        has(
            &report["account"]["summary"],
            "account: all 1 link brandings on the SendGrid account (the API key's own account; users: parent ×1) \
             are served by linkgate and valid at SendGrid — with every host above passing, ask SendGrid Support"
        ),
        "{report}"
    );
    assert!(
        has(
            &report["summary"],
            "SendGrid: ask SendGrid Support to enable SSL click and open tracking"
        ),
        "{report}"
    );
    assert_eq!(api.received().len(), 1);
    lg.stop().await;
}
