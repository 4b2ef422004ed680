//! Start-up refusals: every bad configuration is refused with one line that
//! names the file and the key or host, before anything is bound.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tempfile::TempDir;

fn refusal(dir: &Path, toml: &str) -> String {
    let path = dir.join("linkgate.toml");
    std::fs::write(&path, toml).expect("write config");
    match linkgate::config::Config::load(&path) {
        Ok(_) => panic!("config was accepted:\n{toml}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error must be one line: {msg}");
            assert!(
                msg.starts_with(&path.display().to_string()),
                "error must name the file: {msg}"
            );
            msg
        }
    }
}

fn base() -> String {
    "[listen]\nhttps = \"127.0.0.1:0\"\n".to_string()
}

#[test]
fn missing_certificate_or_key_file() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"nope.pem\"\nkey = \"click.key\"\n",
            base()
        ),
    );
    assert!(
        msg.contains(&format!("host \"{CLICK}\"")) && msg.contains("nope.pem"),
        "{msg}"
    );
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"click.pem\"\nkey = \"nope.key\"\n",
            base()
        ),
    );
    assert!(msg.contains("nope.key") && msg.contains("cannot read"), "{msg}");
}

#[test]
fn file_without_pem_content() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    std::fs::write(dir.path().join("empty.pem"), "not a pem file\n").expect("write");
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"empty.pem\"\nkey = \"click.key\"\n",
            base()
        ),
    );
    assert!(msg.contains("empty.pem") && msg.contains("no CERTIFICATE"), "{msg}");
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"click.pem\"\nkey = \"click.pem\"\n",
            base()
        ),
    );
    assert!(msg.contains("no PEM private key"), "{msg}");
}

#[test]
fn key_that_does_not_match_its_certificate() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    pki.write_leaf(dir.path(), "other", &[CLICK]);
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"click.pem\"\nkey = \"other.key\"\n",
            base()
        ),
    );
    assert!(
        msg.contains("other.key is not the private key of the certificate in"),
        "{msg}"
    );
    assert!(msg.contains("openssl x509 -noout -pubkey -in"), "{msg}");
    assert!(!msg.contains("KeyMismatch"), "{msg}");
    // The only host: nothing to say about other hosts' certificates.
    assert!(!msg.contains("other configured host"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn certificate_for_another_name() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &["www.example.test"]);
    let msg = refusal(dir.path(), &format!("{}{}", base(), host_section(CLICK, "click")));
    assert!(msg.contains(&format!("host \"{CLICK}\"")), "{msg}");
    assert!(
        msg.contains("does not cover this host (its names: www.example.test)"),
        "{msg}"
    );
}

#[test]
fn nested_name_under_a_one_label_wildcard_is_explained() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "wild", &["*.example.test"]);
    let msg = refusal(
        dir.path(),
        &format!("{}{}", base(), host_section("url1.links.example.test", "wild")),
    );
    assert!(
        msg.contains(
            "a wildcard covers exactly one label: *.example.test covers a.example.test but not url1.links.example.test"
        ),
        "{msg}"
    );
}

#[test]
fn duplicate_hosts() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let msg = refusal(
        dir.path(),
        &format!(
            "{}{}{}",
            base(),
            host_section(CLICK, "click"),
            host_section("Click.Example.Test.", "click")
        ),
    );
    assert!(
        msg.contains("host \"Click.Example.Test.\": duplicate host: it is also [[host]] #1"),
        "{msg}"
    );
}

#[test]
fn bad_toml_and_unknown_keys() {
    let dir = TempDir::new().expect("tempdir");
    let msg = refusal(dir.path(), "[listen\nhttps = 1\n");
    assert!(msg.contains("linkgate.toml:1:"), "{msg}");
    let msg = refusal(
        dir.path(),
        &format!("{}[upstream]\nurl = \"https://sendgrid.net\"\nsni = \"x\"\n", base()),
    );
    assert!(
        msg.contains("linkgate.toml:5:") && msg.contains("unknown field `sni`"),
        "{msg}"
    );
    let msg = refusal(
        dir.path(),
        &format!(
            "{}[[host]]\nname = \"{CLICK}\"\ncert = \"a\"\nkey = \"b\"\ncerts = \"c\"\n",
            base()
        ),
    );
    assert!(msg.contains("unknown field `certs`"), "{msg}");
}

#[test]
fn accepted_key_formats_pkcs8_pkcs1_sec1() {
    let Ok(out) = Command::new("openssl").arg("version").output() else {
        eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
        return;
    };
    assert!(out.status.success());
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let sh = |script: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(d)
            .stderr(Stdio::null())
            .status()
            .expect("sh");
        assert!(st.success(), "{script}");
    };
    // RSA key in PKCS#1 ("BEGIN RSA PRIVATE KEY") and EC key in SEC1 ("BEGIN EC PRIVATE KEY").
    sh("openssl genrsa -traditional -out rsa.key 2048 2>/dev/null || openssl genrsa -out rsa.key 2048");
    sh(&format!(
        "openssl req -x509 -new -key rsa.key -subj /CN={CLICK} -addext subjectAltName=DNS:{CLICK} -days 2 -out rsa.pem"
    ));
    sh("openssl ecparam -name prime256v1 -genkey -noout -out ec.key");
    sh(&format!(
        "openssl req -x509 -new -key ec.key -subj /CN={CLICK} -addext subjectAltName=DNS:{CLICK} -days 2 -out ec.pem"
    ));
    sh("openssl pkcs8 -topk8 -nocrypt -in ec.key -out ec8.key");
    assert!(std::fs::read_to_string(d.join("rsa.key"))
        .expect("read")
        .contains("BEGIN RSA PRIVATE KEY"));
    assert!(std::fs::read_to_string(d.join("ec.key"))
        .expect("read")
        .contains("BEGIN EC PRIVATE KEY"));
    for (cert, key) in [("rsa.pem", "rsa.key"), ("ec.pem", "ec.key"), ("ec.pem", "ec8.key")] {
        let path = d.join("linkgate.toml");
        std::fs::write(
            &path,
            format!(
                "{}[[host]]\nname = \"{CLICK}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                base()
            ),
        )
        .expect("write");
        if let Err(e) = linkgate::config::Config::load(&path) {
            panic!("{key} refused: {e}");
        }
    }
}

/// The real binary: a bad certificate is reported on one line naming the
/// host, with a non-zero exit, and before binding — the https port is held
/// by this test, so binding first would have failed with a different error.
#[test]
fn binary_refuses_bad_config_before_binding() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &["www.example.test"]);
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let path = dir.path().join("linkgate.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\nhttps = \"127.0.0.1:{port}\"\n{}",
            host_section(CLICK, "click")
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run linkgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("host \"{CLICK}\"")) && stderr.contains("does not cover"),
        "{stderr}"
    );

    // With a good certificate the same config gets as far as binding, and names the busy address.
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "-c"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run linkgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    drop(held);
}

#[test]
fn binary_reads_config_from_environment_and_has_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve"])
        .env("LINKGATE_CONFIG", "/nonexistent/linkgate.toml")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("/nonexistent/linkgate.toml: cannot read"), "{stderr}");
    // One line, the cause said once, and how to name another file.
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(
        stderr.contains("--config FILE or the LINKGATE_CONFIG variable"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("linkgate {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "--help"])
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--config") && help.contains("LINKGATE_CONFIG"), "{help}");
}

#[test]
fn bundled_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = linkgate::config::Config::load(&root.join("config/example.toml"))
        .unwrap_or_else(|e| panic!("config/example.toml: {e}"));
    assert_eq!(config.hosts[0].name.as_str(), CLICK);
    assert_eq!(config.listen.https.to_string(), "127.0.0.1:8443");
    // The quick start starts without a descriptor warning on a desktop's 1024 open files.
    assert!(
        config.limits.descriptors_needed() <= 1024,
        "{}",
        config.limits.descriptors_needed()
    );
    // The production template names certificates the operator must add: it parses, and fails only on those.
    let err = linkgate::config::Config::load(&root.join("config/linkgate.toml")).expect_err("template needs certs");
    assert!(err.to_string().contains("host \"url1234.example.com\""), "{err}");
}

/// ACME storage that cannot be created is refused at start-up, in one line
/// naming the file and the key, before anything is bound.
#[test]
fn binary_refuses_acme_storage_it_cannot_write() {
    let dir = TempDir::new().expect("tempdir");
    // A regular file where the storage folder should be.
    std::fs::write(dir.path().join("blocker"), "").expect("write");
    let path = dir.path().join("linkgate.toml");
    std::fs::write(
        &path,
        format!(
            "{}[acme]\ndirectory = \"https://acme.example.test/dir\"\nstorage = \"blocker/acme\"\n\
             [[host]]\nname = \"{CLICK}\"\nacme = true\n",
            base()
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .output()
        .expect("run linkgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("acme.storage: cannot create"),
        "{stderr}"
    );
}
