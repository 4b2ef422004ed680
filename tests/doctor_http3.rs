//! `linkgate doctor` when the config has `listen.http3`: one HTTP/3 request
//! per branding (over QUIC, verifying the same certificate as https) and the
//! `Alt-Svc` header of the https answer checked against the advertised
//! port. Against linkgate in-process: QUIC answers and is advertised; the
//! UDP port has nothing listening; `Alt-Svc` names another port; QUIC
//! presents another certificate than TCP.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::doctor::{dns_server, doctor_async, host};
use common::process::has;
use common::*;

const OK: &str = "ok.example.test";

/// A config for doctor naming [`OK`], with `listen.http3` on `http3` (and `extra_listen`).
fn doctor_config(dir: &Path, http3: SocketAddr, extra_listen: &str) -> PathBuf {
    let toml = format!(
        "[listen]\nhttps = \"127.0.0.1:443\"\nhttp3 = \"{http3}\"\n{extra_listen}\
         [[host]]\nname = \"{OK}\"\ncert = \"x.pem\"\nkey = \"x.key\"\n"
    );
    let path = dir.join("doctor.toml");
    std::fs::write(&path, toml).expect("write");
    path
}

/// linkgate serving [`OK`] over TCP and over QUIC, with `extra_listen` in `[listen]`.
async fn serve(extra_listen: &str) -> Served {
    Setup::new()
        .listen(&format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n{extra_listen}"
        ))
        .host(OK)
        .start()
        .await
}

/// doctor's arguments for [`OK`]: https to linkgate, HTTP/3 to `udp`, the test CA trusted.
fn args(lg: &Linkgate, udp: SocketAddr, ca: &Path) -> Vec<String> {
    [
        "--host",
        OK,
        "--connect",
        &lg.https.to_string(),
        "--connect-http3",
        &udp.to_string(),
        "--ca-file",
        &ca.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_that_answers_with_the_same_certificate_and_is_advertised_passes() {
    let dns = dns_server().await;
    let Served { dir, pki, up, lg, .. } = serve("").await;
    let quic = lg.http3.expect("http3 socket");
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), quic, "");

    let (code, report) = doctor_async(&config, dns, args(&lg, quic, &ca)).await;
    assert_eq!(code, 0, "{report}");
    let ok = host(&report, OK);
    assert_eq!(ok["https"]["status"], "pass", "{ok}");
    assert_eq!(ok["http3"]["status"], "pass", "{ok}");
    let said = format!(
        "http3 answered 200; https advertises it (Alt-Svc h3=\":{}\")",
        quic.port()
    );
    assert_eq!(ok["http3"]["message"], said, "{ok}");
    // The tracked URL reached the upstream twice with the branded Host: over TCP and over QUIC.
    let probes = up
        .received()
        .iter()
        .filter(|r| r.target == "/wf/open?upn=linkgate-doctor" && r.header("host") == Some(OK))
        .count();
    assert_eq!(probes, 2, "{:?}", up.received());
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_port_with_nothing_listening_fails_http3_in_plain_words() {
    let dns = dns_server().await;
    let Served {
        dir, pki, up: _up, lg, ..
    } = serve("").await;
    // A UDP port that was free a moment ago, closed again: nothing answers QUIC there.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), closed, "");

    let (code, report) = doctor_async(&config, dns, args(&lg, closed, &ca)).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["ok"], false);
    let ok = host(&report, OK);
    assert_eq!(ok["https"]["status"], "pass", "TCP is fine: {ok}");
    assert_eq!(ok["http3"]["status"], "fail", "{ok}");
    assert!(has(&ok["http3"]["message"], &format!("(UDP {closed})")), "{ok}");
    assert!(
        has(&ok["http3"]["message"], "no HTTP/3 answer within") || has(&ok["http3"]["message"], "no QUIC answer"),
        "{ok}"
    );
    assert!(has(&ok["http3"]["fix"], "pass UDP"), "{ok}");
    let summary = report["summary"].as_str().expect("summary");
    assert!(summary.starts_with("1 of 1 link brandings"), "{summary}");
    assert!(
        summary.contains(&format!("{OK} (HTTP/3: check that linkgate listens there")),
        "{summary}"
    );
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_naming_another_port_than_the_advertised_one_fails() {
    let dns = dns_server().await;
    // linkgate advertises 8443, but the doctor config's HTTP/3 port (no advertise port) is the bound one.
    let Served {
        dir, pki, up: _up, lg, ..
    } = serve("http3_advertise_port = 8443\n").await;
    let quic = lg.http3.expect("http3 socket");
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), quic, "");

    let (code, report) = doctor_async(&config, dns, args(&lg, quic, &ca)).await;
    assert_eq!(code, 1, "{report}");
    let ok = host(&report, OK);
    assert_eq!(ok["http3"]["status"], "fail", "{ok}");
    let message = format!(
        "http3 answered 200, but the https answer's Alt-Svc names HTTP/3 on port 8443, not {}",
        quic.port()
    );
    assert_eq!(ok["http3"]["message"], message, "{ok}");
    assert!(has(&ok["http3"]["fix"], "set listen.http3_advertise_port"), "{ok}");
    let summary = report["summary"].as_str().expect("summary");
    assert!(summary.contains("HTTP/3: set listen.http3_advertise_port"), "{summary}");

    // The same linkgate, with the doctor config saying what it advertises: it passes.
    let config = doctor_config(dir.path(), quic, "http3_advertise_port = 8443\n");
    let (code, report) = doctor_async(&config, dns, args(&lg, quic, &ca)).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(host(&report, OK)["http3"]["status"], "pass", "{report}");
    lg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_presenting_another_certificate_than_https_fails() {
    let dns = dns_server().await;
    let Served { dir, pki, up, lg, .. } = serve("").await;
    // Another linkgate on UDP, with a leaf of its own for the same name from the same CA:
    // valid on its own, but not what https presents.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("mkdir");
    pki.write_leaf(&other_dir, "other", &[OK]);
    let other = Linkgate::start(
        &other_dir,
        &format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n{}{}",
            plain_upstream(&up),
            host_section(OK, "other")
        ),
    )
    .await;
    let quic = other.http3.expect("http3 socket");
    let ca = pki.write_ca(dir.path());
    let config = doctor_config(dir.path(), quic, "");

    let (code, report) = doctor_async(&config, dns, args(&lg, quic, &ca)).await;
    assert_eq!(code, 1, "{report}");
    let ok = host(&report, OK);
    assert_eq!(ok["https"]["status"], "pass", "{ok}");
    assert_eq!(ok["http3"]["status"], "fail", "{ok}");
    assert_eq!(
        ok["http3"]["message"], "http3 answered 200, but with another certificate than over https",
        "{ok}"
    );
    assert!(has(&ok["http3"]["fix"], "the same certificate"), "{ok}");
    other.stop().await;
    lg.stop().await;
}
