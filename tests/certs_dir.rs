//! `certs_dir`: a `[[host]]` with only its name takes its certificate from
//! the folder named after it (a Kubernetes TLS Secret's `tls.crt`/`tls.key`,
//! or certbot's `fullchain.pem`/`privkey.pem`); a Kubernetes projected
//! volume of every Secret, swapped through its `..data` link, is reloaded;
//! a missing pair is named with both layouts.

mod common;

use std::path::Path;

use common::*;
use tempfile::TempDir;

const A: &str = "url1.example.test";
const B: &str = "url2.example.test";

async fn served(pki: &Pki, lg: &Linkgate, host: &str) -> Option<Vec<u8>> {
    let resp = client(pki, lg, &[host]).get(lg.url(host, "/")).send().await.ok()?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>()?;
    info.peer_certificate().map(<[u8]>::to_vec)
}

/// A projected volume as the kubelet writes it: `..<version>/<host>/tls.*`,
/// `..data` pointing at the version (swapped by rename), `<host>` → `..data/<host>`.
fn projected(dir: &Path, version: &str, hosts: &[(&str, &Leaf)]) {
    for (host, leaf) in hosts {
        let folder = dir.join(version).join(host);
        std::fs::create_dir_all(&folder).expect("mkdir");
        std::fs::write(folder.join("tls.crt"), &leaf.cert_pem).expect("write");
        std::fs::write(folder.join("tls.key"), &leaf.key_pem).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for (host, _) in hosts {
        let link = dir.join(host);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{host}"), &link).expect("symlink");
        }
    }
}

fn config(up: &StandIn, hosts: &[&str]) -> String {
    let mut toml = format!("certs_dir = \"certs\"\n{}{}", listen_section(), plain_upstream(up));
    for host in hosts {
        toml.push_str(&format!("[[host]]\nname = \"{host}\"\n"));
    }
    toml
}

#[tokio::test]
async fn hosts_take_their_pair_from_certs_dir_in_either_layout_and_a_projected_volume_swap_reloads() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    let up = StandIn::plain().await;
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).expect("mkdir");
    // A: a projected volume's Secret; B: certbot's layout in a plain folder.
    let a1 = pki.leaf(&[A]);
    projected(&certs, "..v1", &[(A, &a1)]);
    let b = pki.leaf(&[B]);
    std::fs::create_dir(certs.join(B)).expect("mkdir");
    std::fs::write(certs.join(B).join("fullchain.pem"), &b.cert_pem).expect("write");
    std::fs::write(certs.join(B).join("privkey.pem"), &b.key_pem).expect("write");

    let lg = Linkgate::start_watching(dir.path(), &config(&up, &[A, B])).await;
    assert_eq!(served(&pki, &lg, A).await.as_deref(), Some(a1.der.as_ref()));
    assert_eq!(served(&pki, &lg, B).await.as_deref(), Some(b.der.as_ref()));

    // The kubelet updates the Secret: a new version, ..data swapped above
    // the hosts' folders. The new certificate is served without a restart.
    let a2 = pki.leaf(&[A]);
    projected(&certs, "..v2", &[(A, &a2)]);
    wait_for("the swapped certificate", async || {
        served(&pki, &lg, A).await.as_deref() == Some(a2.der.as_ref())
    })
    .await;
    lg.stop().await;
}

#[test]
fn a_host_without_a_pair_in_certs_dir_is_named_with_the_file_names_expected() {
    let dir = TempDir::new().expect("tempdir");
    std::fs::create_dir(dir.path().join("certs")).expect("mkdir");
    let path = dir.path().join("linkgate.toml");
    std::fs::write(
        &path,
        format!(
            "certs_dir = \"certs\"\n{}[upstream]\nurl = \"http://127.0.0.1:1\"\n[[host]]\nname = \"URL9.Example.test\"\n",
            listen_section()
        ),
    )
    .expect("write");
    let err = linkgate::config::Config::load(&path)
        .expect_err("no certificate")
        .to_string();
    let folder = dir.path().join("certs").join("url9.example.test");
    assert!(
        err.contains(&format!(
            "host \"URL9.Example.test\": no certificate in {}",
            folder.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("tls.crt and tls.key") && err.contains("fullchain.pem and privkey.pem"),
        "{err}"
    );

    // check says the same, for that host.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("certs_dir expects tls.crt and tls.key there"), "{text}");
}
