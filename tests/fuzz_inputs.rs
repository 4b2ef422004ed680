//! Every fuzz seed and every saved crash input (fuzz/seeds/<target>/,
//! fuzz/regressions/<target>/) through the same entry point the fuzz target
//! uses, so a crash once found stays fixed. The fuzzing itself is
//! `scripts/fuzz`, outside `cargo test`.

use std::path::Path;

fn run_inputs(target: &str, entry: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for file in dir {
            let path = file.expect("dir entry").path();
            let data = std::fs::read(&path).expect("read input");
            if let Err(panic) = std::panic::catch_unwind(|| entry(&data)) {
                std::panic::resume_unwind(Box::new(format!("{}: {panic:?}", path.display())));
            }
            count += 1;
        }
    }
    assert!(count > 0, "no inputs for {target}");
}

#[test]
fn config_inputs() {
    run_inputs("config", linkgate::fuzzing::config);
}

#[test]
fn authority_inputs() {
    run_inputs("authority", linkgate::fuzzing::authority);
}

#[test]
fn header_rewrite_inputs() {
    run_inputs("header_rewrite", linkgate::fuzzing::header_rewrite);
}

#[test]
fn pem_inputs() {
    run_inputs("pem", linkgate::fuzzing::pem);
}

#[test]
fn proxy_protocol_inputs() {
    run_inputs("proxy_protocol", linkgate::fuzzing::proxy_protocol);
}
