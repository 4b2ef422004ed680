//! `linkgate check`: everything `serve` validates at start-up, without
//! binding anything, plus the warnings an operator wants before deploying.
//!
//! The verdict on the file comes from [`Config::from_toml`], the same
//! function `serve` uses, so the two never disagree; each host is then also
//! checked on its own (with [`crate::config::load_host`], again `serve`'s
//! code) so that every host gets a row even when one of them is broken.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::acme::Storage;
use crate::config::{self, Acme, CertSource, Config, LoadedPairs};
use crate::host::HostName;
use crate::tls::{self, CertSummary};

/// Certificates expiring sooner than this are a warning.
const EXPIRY_WARNING_DAYS: i64 = 21;

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: String,
    /// No errors (warnings allowed).
    pub ok: bool,
    /// Problems with the file as a whole (syntax, unknown keys, addresses, upstream).
    pub errors: Vec<String>,
    pub hosts: Vec<HostReport>,
}

#[derive(Debug, Serialize)]
pub struct HostReport {
    pub name: String,
    /// `ok`, `warning` or `error`.
    pub status: &'static str,
    pub expires_in_days: Option<i64>,
    /// RFC 3339.
    pub not_after: Option<String>,
    pub issuer: Option<String>,
    /// The leaf's key type and size, e.g. `ECDSA P-256`, `RSA 2048`.
    pub key: Option<String>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    /// `error` or `warning`.
    pub severity: &'static str,
    pub message: String,
}

impl Report {
    pub fn has_warnings(&self) -> bool {
        self.hosts
            .iter()
            .any(|h| h.problems.iter().any(|p| p.severity == "warning"))
    }
}

/// Checks the config file at `path`. Blocking (reads files).
pub fn check(path: &Path) -> Report {
    let mut report = Report {
        config: path.display().to_string(),
        ok: true,
        errors: Vec::new(),
        hosts: Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(error) => {
            report.ok = false;
            // The same words as serve's.
            let read = crate::config::ConfigError::Read {
                path: path.to_path_buf(),
                error,
            };
            report.errors.push(read.to_string());
            return report;
        }
    };
    // The verdict: exactly what `serve` would say.
    let whole = Config::from_toml(&text, path);
    if let Err(e) = &whole {
        report.ok = false;
        if !matches!(e, config::ConfigError::Host { .. }) {
            report.errors.push(e.to_string());
        }
    }
    let Ok(entries) = config::Outline::parse(&text, path).map(|o| o.host_entries()) else {
        return report;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut loaded = LoadedPairs::new();
    let mut seen = HashMap::new();
    let acme = whole.as_ref().ok().and_then(|c| c.acme.clone());
    for entry in &entries {
        let mut row = HostReport {
            name: entry.name.clone(),
            status: "ok",
            expires_in_days: None,
            not_after: None,
            issuer: None,
            key: None,
            problems: Vec::new(),
        };
        match config::load_host(entry, &mut loaded) {
            Err(message) => {
                row.error(config::explain_key_mismatch(message, entry, &entries));
                // What the certificate says, when it parses on its own (a key that does not match, say).
                if let Some(chain) = entry.cert.as_deref().and_then(|c| tls::load_certs(c).ok()) {
                    certificate_checks(&mut row, &chain, now);
                }
            }
            Ok(host) => {
                match seen.get(&host.name) {
                    Some(first) => row.error(format!(
                        "duplicate host: it is also [[host]] #{first}; each name may appear once (remove one)"
                    )),
                    None => {
                        seen.insert(host.name.clone(), report.hosts.len() + 1);
                    }
                }
                match &host.certificate {
                    CertSource::Files { certified_key, key, .. } => {
                        certificate_checks(&mut row, &certified_key.cert, now);
                        key_file_checks(&mut row, key);
                    }
                    CertSource::Acme => acme_checks(&mut row, acme.as_ref(), &host.name, now),
                }
            }
        }
        if row.problems.iter().any(|p| p.severity == "error") {
            report.ok = false;
        }
        report.hosts.push(row);
    }
    // A host refused for something beyond its files (its upstream, say):
    // the verdict's reason goes on that host's row.
    if let Err(config::ConfigError::Host { host, message, .. }) = &whole {
        match report.hosts.iter_mut().find(|r| r.name == *host) {
            Some(row) if row.status != "error" => row.error(message.clone()),
            Some(_) => {}
            None => report.errors.push(format!("host {host}: {message}")),
        }
    }
    report
}

impl HostReport {
    fn error(&mut self, message: String) {
        self.status = "error";
        self.problems.push(Problem {
            severity: "error",
            message,
        });
    }

    fn warning(&mut self, message: String) {
        if self.status == "ok" {
            self.status = "warning";
        }
        self.problems.push(Problem {
            severity: "warning",
            message,
        });
    }
}

fn certificate_checks(row: &mut HostReport, chain: &[rustls_pki_types::CertificateDer<'static>], now: i64) {
    let summaries: Vec<CertSummary> = chain.iter().filter_map(tls::summarize).collect();
    let Some(leaf) = summaries.first() else {
        row.error("the leaf certificate cannot be parsed".into());
        return;
    };
    row.issuer = Some(leaf.issuer_name.clone());
    row.key = Some(leaf.key.clone());
    row.not_after = Some(leaf.not_after_text.clone());
    let days = (leaf.not_after - now).div_euclid(86_400);
    row.expires_in_days = Some(days);
    if leaf.not_after < now {
        row.error(format!(
            "certificate expired {} days ago ({}): renew it",
            -days, leaf.not_after_text
        ));
    } else if leaf.not_before > now {
        row.error("certificate is not valid yet (check the clock, or wait)".into());
    } else if days < EXPIRY_WARNING_DAYS {
        row.warning(format!("certificate expires in {days} days: renew it"));
    }
    if let Some(bits) = leaf.rsa_bits.filter(|b| *b < 2048) {
        row.error(format!("RSA key of {bits} bits: browsers need at least 2048"));
    }
    for pair in summaries.windows(2) {
        if pair[0].issuer_raw != pair[1].subject_raw {
            row.warning(format!(
                "chain out of order: \"{}\" is followed by \"{}\", which did not issue it; put each certificate before its issuer",
                pair[0].subject_name, pair[1].subject_name
            ));
            break;
        }
    }
    if let Some(top) = summaries.last() {
        if !top.self_signed && !tls::is_public_root_subject(&top.issuer_raw) {
            row.warning(format!(
                "serve the full chain: \"{}\" was issued by \"{}\", which is neither in the file nor a public root (use fullchain.pem, not cert.pem; ignore for a private CA your clients trust)",
                top.subject_name, top.issuer_name
            ));
        }
    }
}

/// An `acme = true` host: what storage holds for it (what `serve` would
/// serve at start-up) and the last failure, if any.
fn acme_checks(row: &mut HostReport, acme: Option<&Acme>, host: &HostName, now: i64) {
    let Some(acme) = acme else { return };
    let storage = Storage::new(&acme.storage);
    match storage.load_certificate(host) {
        Ok(Some(stored)) => certificate_checks(row, &stored.key.cert, now),
        Ok(None) => row.warning(format!(
            "acme: no certificate in {} yet: `serve` orders one ({}), and this host's handshakes fail until it is issued",
            acme.storage.display(),
            acme.challenge.as_str()
        )),
        Err(e) => row.warning(format!("acme: {e}: `serve` orders a new one")),
    }
    if let Some(error) = storage.status(host).last_error {
        // The CA's words, as stored by any replica: shown escaped.
        row.warning(format!("acme: last attempt failed: {}", crate::text::Printable(&error)));
    }
}

/// Who besides linkgate's user can read a private key, and the fix for
/// where it lives. Group access is fine when the group is linkgate's own
/// (a Kubernetes Secret volume with the pod's `fsGroup` is `root:<fsGroup>`
/// mode 0440, and linkgate runs in that group).
#[cfg(unix)]
fn key_file_checks(row: &mut HostReport, key: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = std::fs::metadata(key) else { return };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o006 != 0 {
        let what = if mode & 0o004 != 0 { "readable" } else { "writable" };
        row.warning(format!(
            "{} is {what} by every user on this machine (mode {mode:o}): chown it to the user linkgate runs as and chmod 600 it (in a Kubernetes Secret volume: defaultMode: 0440 and the pod's fsGroup set to linkgate's group)",
            key.display()
        ));
        return;
    }
    // The group this process runs in: /proc/self is owned by it (Linux).
    let own_group = std::fs::metadata("/proc/self").ok().map(|m| m.gid());
    if mode & 0o060 != 0 && own_group != Some(meta.gid()) {
        row.warning(format!(
            "{} is readable by group {} (mode {mode:o}), not only by linkgate's user{}: chown it to the user linkgate runs as and chmod 600 it (in a Kubernetes Secret volume: set the pod's fsGroup to linkgate's group, so the group is linkgate's own)",
            key.display(),
            meta.gid(),
            own_group.map_or(String::new(), |g| format!(" (linkgate's group here is {g})"))
        ));
    }
}

#[cfg(not(unix))]
fn key_file_checks(_: &mut HostReport, _: &Path) {}

/// `linkgate check`: the report on `config`, printed. Exit status: 0 no
/// errors, 1 errors (or warnings with `strict`), 2 unusable arguments.
pub fn command(config: &Path, json: bool, strict: bool) -> std::process::ExitCode {
    use std::process::ExitCode;
    let report = check(config);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("linkgate: error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render_text(&report));
    }
    if report.ok && !(strict && report.has_warnings()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The human form: one aligned row per host, then the file's own errors and a summary.
/// Every cell is printable text: names and errors from certificates and the
/// CA are shown with their control characters escaped.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let printable = |cell: String| crate::text::printable(&cell).into_owned();
    let rows: Vec<[String; 6]> = report
        .hosts
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                h.status.to_string(),
                h.expires_in_days.map_or("-".into(), |d| format!("{d}d")),
                h.key.clone().unwrap_or_else(|| "-".into()),
                h.issuer.clone().unwrap_or_else(|| "-".into()),
                if h.problems.is_empty() {
                    "-".into()
                } else {
                    h.problems
                        .iter()
                        .map(|p| format!("{}: {}", p.severity, p.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            ]
            .map(printable)
        })
        .collect();
    let header = ["HOST", "STATUS", "EXPIRES", "KEY", "ISSUER", "PROBLEMS"].map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // No table at all when no host could be read (a missing file, say).
    let table = if rows.is_empty() { None } else { Some(&header) };
    for row in table.into_iter().chain(&rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
    }
    for e in &report.errors {
        let _ = writeln!(out, "error: {}", crate::text::Printable(e));
    }
    let count = |s: &str| report.hosts.iter().filter(|h| h.status == s).count();
    let _ = writeln!(
        out,
        "{}: {} hosts, {} ok, {} with warnings, {} with errors{}",
        report.config,
        report.hosts.len(),
        count("ok"),
        count("warning"),
        count("error"),
        if report.errors.is_empty() {
            String::new()
        } else {
            format!(", {} file errors", report.errors.len())
        }
    );
    out
}
