//! `linkgate check`: the offline report, through the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::process::has;
use common::*;
use tempfile::TempDir;

fn check(config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run linkgate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json(config: &Path) -> (i32, serde_json::Value) {
    let (code, out) = check(config, &["--format", "json"]);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}")),
    )
}

fn write_pair(dir: &Path, stem: &str, leaf: &Leaf, chain: &[&str]) {
    let mut pem = leaf.cert_pem.clone();
    for c in chain {
        pem.push_str(c);
    }
    std::fs::write(dir.join(format!("{stem}.pem")), pem).expect("write");
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&key, &leaf.key_pem).expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn config(dir: &Path, hosts: &[(&str, &str)]) -> std::path::PathBuf {
    let mut toml = "[listen]\nhttps = \"127.0.0.1:443\"\n".to_string();
    for (name, stem) in hosts {
        toml.push_str(&host_section(name, stem));
    }
    let path = dir.join("linkgate.toml");
    std::fs::write(&path, toml).expect("write");
    path
}

#[test]
fn a_good_configuration_passes_with_a_row_per_host() {
    let dir = TempDir::new().expect("tempdir");
    let root = Pki::new();
    let inter = root.intermediate();
    let leaf = inter.leaf_valid(&["url1.example.test", "url2.example.test"], days(-1), days(90));
    write_pair(dir.path(), "san", &leaf, &[&inter.ca_pem]);
    let path = config(
        dir.path(),
        &[("url1.example.test", "san"), ("url2.example.test", "san")],
    );
    let (code, report) = json(&path);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["errors"], serde_json::json!([]));
    let hosts = report["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2);
    for h in hosts {
        // The intermediate's issuer (the test root) is not a public root: a warning, not an error.
        assert_eq!(h["status"], "warning", "{h}");
        assert_eq!(h["issuer"], "linkgate test intermediate");
        assert_eq!(h["key"], "ECDSA P-256", "rcgen's default key");
        let d = h["expires_in_days"].as_i64().expect("days");
        assert!((88..=90).contains(&d), "{d}");
        assert!(h["not_after"].as_str().is_some_and(|t| t.ends_with('Z')), "{h}");
        assert!(
            h["problems"][0]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serve the full chain")),
            "{h}"
        );
    }
    let (code, text) = check(&path, &[]);
    assert_eq!(code, 0);
    assert!(text.starts_with("HOST "), "{text}");
    assert!(text.contains("url2.example.test  warning"), "{text}");
    assert!(text.contains("2 hosts, 0 ok, 2 with warnings, 0 with errors"), "{text}");
    let (code, _) = check(&path, &["--strict"]);
    assert_eq!(code, 1, "--strict makes warnings fail");
}

#[test]
fn expiry_is_an_error_when_past_and_a_warning_when_close() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    write_pair(
        dir.path(),
        "old",
        &pki.leaf_valid(&["old.example.test"], days(-100), days(-3)),
        &[],
    );
    write_pair(
        dir.path(),
        "soon",
        &pki.leaf_valid(&["soon.example.test"], days(-80), days(10)),
        &[],
    );
    write_pair(
        dir.path(),
        "future",
        &pki.leaf_valid(&["future.example.test"], days(5), days(100)),
        &[],
    );
    let path = config(
        dir.path(),
        &[
            ("old.example.test", "old"),
            ("soon.example.test", "soon"),
            ("future.example.test", "future"),
        ],
    );
    let (code, report) = json(&path);
    assert_eq!(code, 1);
    assert_eq!(report["ok"], false);
    let row = |name: &str| {
        report["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .expect("row")
    };
    let old = row("old.example.test");
    assert_eq!(old["status"], "error");
    assert!(old.to_string().contains("certificate expired 3 days ago"), "{old}");
    let soon = row("soon.example.test");
    assert!(
        soon.to_string().contains("certificate expires in 9 days")
            || soon.to_string().contains("certificate expires in 10 days"),
        "{soon}"
    );
    assert_ne!(soon["status"], "error");
    let future = row("future.example.test");
    assert_eq!(future["status"], "error");
    assert!(future.to_string().contains("not valid yet"), "{future}");
}

#[test]
fn every_host_is_reported_even_when_one_is_broken() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    let inter = pki.intermediate();
    write_pair(
        dir.path(),
        "wild",
        &pki.leaf_valid(&["*.example.test"], days(-1), days(60)),
        &[],
    );
    write_pair(
        dir.path(),
        "other",
        &pki.leaf_valid(&["www.example.test"], days(-1), days(60)),
        &[],
    );
    // A leaf without its intermediate.
    write_pair(
        dir.path(),
        "bare",
        &inter.leaf_valid(&["bare.example.test"], days(-1), days(60)),
        &[],
    );
    let path = config(
        dir.path(),
        &[
            ("url1.example.test", "wild"),
            ("url1.links.example.test", "wild"),
            ("click.example.test", "other"),
            ("bare.example.test", "bare"),
        ],
    );
    let (code, report) = json(&path);
    assert_eq!(code, 1);
    let rows = report["hosts"].as_array().expect("hosts");
    assert_eq!(rows.len(), 4, "{report}");
    assert_ne!(rows[0]["status"], "error", "{}", rows[0]);
    assert!(
        rows[1].to_string().contains(
            "a wildcard covers exactly one label: *.example.test covers a.example.test but not url1.links.example.test"
        ),
        "{}",
        rows[1]
    );
    assert!(
        rows[2]
            .to_string()
            .contains("does not cover this host (its names: www.example.test)"),
        "{}",
        rows[2]
    );
    assert_eq!(rows[3]["status"], "warning");
    assert!(rows[3].to_string().contains("serve the full chain"), "{}", rows[3]);
}

#[test]
fn readable_keys_wrong_order_and_file_errors() {
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    let inter = pki.intermediate();
    let leaf = inter.leaf_valid(&["a.example.test"], days(-1), days(60));
    // Intermediate first, then the leaf: out of order.
    std::fs::write(dir.path().join("a.pem"), format!("{}{}", inter.ca_pem, leaf.cert_pem)).expect("write");
    std::fs::write(dir.path().join("a.key"), &leaf.key_pem).expect("write");
    std::fs::set_permissions(dir.path().join("a.key"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let path = config(dir.path(), &[("a.example.test", "a")]);
    let (_, report) = json(&path);
    // The first certificate is the intermediate, so serve refuses the pair: an error, like serve.
    assert_eq!(report["hosts"][0]["status"], "error", "{report}");

    std::fs::write(dir.path().join("a.pem"), format!("{}{}", leaf.cert_pem, inter.ca_pem)).expect("write");
    let (code, report) = json(&path);
    assert_eq!(code, 0, "{report}");
    assert!(
        report
            .to_string()
            .contains("is readable by every user on this machine (mode 644): chown it to the user linkgate runs as and chmod 600 it"),
        "{report}"
    );

    std::fs::write(&path, "[listen]\nhttps = \"127.0.0.1:443\"\nport = 1\n").expect("write");
    let (code, report) = json(&path);
    assert_eq!(code, 1);
    assert!(has(&report["errors"][0], "unknown field `port`"), "{report}");

    let (code, text) = check(&dir.path().join("missing.toml"), &[]);
    assert_eq!(code, 1);
    // The error and the summary, no empty table.
    assert!(
        !text.contains("HOST") && text.starts_with("error: ") && text.contains("--config"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .args(["check", "--format", "yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "unusable arguments");
}

/// Names inside a certificate come from whoever made it: a CA or issuer
/// name carrying terminal escapes is shown escaped, never raw.
#[test]
fn names_from_certificates_reach_no_terminal_raw() {
    let dir = TempDir::new().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["a.example.test".to_owned()]).expect("params");
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "\x1b[2J\x1b]0;owned\x07\x1b[32mall ok\u{202e}",
    );
    let cert = params.self_signed(&key).expect("self-signed");
    let leaf = Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    };
    write_pair(dir.path(), "a", &leaf, &[]);
    let config = config(dir.path(), &[("a.example.test", "a")]);
    let (_, out) = check(&config, &[]);
    assert!(
        out.contains("\\x1b[2J\\x1b]0;owned\\x07\\x1b[32mall ok\\u{202e}"),
        "the issuer is shown, escaped:\n{out}"
    );
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n') && !out.contains('\u{202e}'),
        "no control character reaches the terminal:\n{out:?}"
    );
}

/// A key readable by a group is fine when the group is linkgate's own (a
/// Kubernetes Secret volume: root:<fsGroup>, mode 0440, linkgate in that
/// group), and named with its fix when it is another.
#[test]
fn a_group_readable_key_is_fine_in_linkgates_own_group_and_named_otherwise() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new().expect("tempdir");
    let pki = Pki::new();
    let leaf = pki.leaf(&["a.example.test"]);
    // The whole chain, so the key's mode is the only thing --strict can see.
    write_pair(dir.path(), "a", &leaf, &[&pki.ca_pem]);
    let key = dir.path().join("a.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let path = config(dir.path(), &[("a.example.test", "a")]);
    // The file's group is the test's own, as linkgate's is in the pod.
    let (code, out) = check(&path, &["--strict"]);
    assert_eq!(
        code, 0,
        "a Secret volume's 0440 in linkgate's group passes --strict: {out}"
    );

    // Another group (root can hand the file to one): named, with the fix.
    let own = std::fs::metadata(&key).expect("meta").gid();
    let other = own + 4242;
    let chowned = Command::new("chgrp")
        .arg(other.to_string())
        .arg(&key)
        .status()
        .is_ok_and(|s| s.success());
    if !chowned {
        eprintln!("SKIPPED the other-group half: chgrp needs root here");
        return;
    }
    let (code, out) = check(&path, &["--strict"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "is readable by group {other} (mode 440), not only by linkgate's user"
        )),
        "{out}"
    );
    assert!(out.contains("set the pod's fsGroup to linkgate's group"), "{out}");
}

/// Two hosts' keys swapped: each row says so in plain words, names the host
/// whose certificate the key belongs to, still shows the certificate's
/// issuer and expiry, and the compare command it gives works as written.
#[test]
fn swapped_keys_are_named_with_the_host_they_belong_to_and_a_command_that_shows_it() {
    let dir = TempDir::new().expect("tempdir");
    let root = Pki::new();
    let one = root.leaf_valid(&["url1.example.test"], days(-1), days(60));
    let two = root.leaf_valid(&["url2.example.test"], days(-1), days(60));
    write_pair(dir.path(), "one", &one, &[]);
    write_pair(dir.path(), "two", &two, &[]);
    let toml = "[listen]\nhttps = \"127.0.0.1:443\"\n\
        [[host]]\nname = \"url1.example.test\"\ncert = \"one.pem\"\nkey = \"two.key\"\n\
        [[host]]\nname = \"url2.example.test\"\ncert = \"two.pem\"\nkey = \"one.key\"\n";
    let path = dir.path().join("linkgate.toml");
    std::fs::write(&path, toml).expect("write");
    let (code, report) = json(&path);
    assert_eq!(code, 1, "{report}");
    let hosts = report["hosts"].as_array().expect("hosts");
    for (row, other, key) in [
        (&hosts[0], "url2.example.test", "two.key"),
        (&hosts[1], "url1.example.test", "one.key"),
    ] {
        assert_eq!(row["status"], "error", "{row}");
        let problem = row["problems"][0]["message"].as_str().expect("message");
        assert!(
            problem.contains(&format!("{key} is not the private key of the certificate")),
            "{problem}"
        );
        assert!(
            problem.contains(&format!("it is the key of the certificate for {other}")),
            "{problem}"
        );
        assert!(!problem.contains("KeyMismatch"), "{problem}");
        assert!(row["issuer"].as_str().is_some_and(|i| !i.is_empty()), "{row}");
        assert!(
            row["expires_in_days"].as_i64().is_some_and(|d| (58..=60).contains(&d)),
            "{row}"
        );

        // The two commands it gives print different digests here, and the same for a matching pair.
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("skipping the compare commands: openssl not installed");
            continue;
        }
        let commands: Vec<&str> = problem.split('`').skip(1).step_by(2).collect();
        assert_eq!(commands.len(), 2, "{problem}");
        let run = |cmd: &str| {
            let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_ne!(run(commands[0]), run(commands[1]), "{problem}");
        let key_path = dir.path().join(key).display().to_string();
        let own_key = dir.path().join(if key == "two.key" { "one.key" } else { "two.key" });
        assert_eq!(
            run(commands[0]),
            run(&commands[1].replace(&key_path, &own_key.display().to_string())),
            "{problem}"
        );
    }
}
