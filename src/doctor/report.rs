//! `linkgate doctor`'s report: each host's outcomes, the providers
//! involved, and the text form.

use serde::Serialize;

use super::account::AccountReport;
use super::account_text;
use crate::provider::Preset;

#[derive(Debug, Serialize)]
pub struct Report {
    /// Every host passed every check (and, with an API key, every branding
    /// on the account is ready).
    pub ok: bool,
    pub hosts: Vec<HostReport>,
    /// The providers of the hosts probed, in the order they first appear.
    pub providers: Vec<ProviderCount>,
    /// The account audit, when an API key was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountReport>,
    pub summary: String,
}

/// How many of the hosts probed go to one provider, and what switches its
/// tracking links to https.
#[derive(Debug, Serialize)]
pub struct ProviderCount {
    /// The preset's name (`provider = "..."`); `None` for hosts with a plain `url` upstream.
    pub provider: Option<&'static str>,
    /// The provider's name as people write it ("url upstream" for a plain `url`).
    pub display: &'static str,
    pub hosts: usize,
    /// What switches the provider's tracking links to https, when its
    /// documentation says (see `https_source` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_switch: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_source: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct HostReport {
    pub name: String,
    /// The host's provider preset (`provider = "..."`); `None` for a plain `url` upstream.
    pub provider: Option<&'static str>,
    /// The path and query fetched: `--url`, or the provider's probe path.
    pub probe_path: String,
    #[serde(skip)]
    pub(super) preset: Option<&'static Preset>,
    pub cname_chain: Vec<String>,
    pub addresses: Vec<String>,
    pub dns: Outcome,
    pub https: Outcome,
    /// `None` when the config has no plain-http listener.
    pub http: Option<Outcome>,
    /// `None` when the config has no `listen.http3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http3: Option<Outcome>,
    /// For an `acme = true` host: its certificate in storage (valid until,
    /// last error, next attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    /// `pass`, `fail` or `skipped`.
    pub status: &'static str,
    pub message: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Outcome {
    pub(super) fn pass(message: String) -> Self {
        Self {
            status: "pass",
            message,
            fix: None,
        }
    }

    pub(super) fn fail(message: String, fix: &str) -> Self {
        Self {
            status: "fail",
            message,
            fix: Some(fix.to_owned()),
        }
    }

    pub(super) fn skipped(message: &str) -> Self {
        Self {
            status: "skipped",
            message: message.to_owned(),
            fix: None,
        }
    }

    pub(super) fn passed(&self) -> bool {
        self.status == "pass"
    }
}

/// The human form: one row per host, then the details of what failed, the
/// account audit (or how to run it), then the summary.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let width = report.hosts.iter().map(|h| h.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        out,
        "{:<width$}  {:<7}  {:<7}  {:<7}  {:<7}  PROVIDER",
        "HOST", "DNS", "HTTPS", "HTTP", "HTTP/3"
    );
    for h in &report.hosts {
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<7}  {:<7}  {:<7}  {}",
            h.name,
            h.dns.status,
            h.https.status,
            h.http.as_ref().map_or("-", |o| o.status),
            h.http3.as_ref().map_or("-", |o| o.status),
            display(h.preset)
        );
    }
    for h in &report.hosts {
        let _ = writeln!(out, "{} probe: GET {}", h.name, crate::text::printable(&h.probe_path));
        for (check, o) in [
            ("dns", Some(&h.dns)),
            ("https", Some(&h.https)),
            ("http", h.http.as_ref()),
            ("http3", h.http3.as_ref()),
        ] {
            let Some(o) = o else { continue };
            let _ = write!(out, "{} {check}: {}", h.name, o.message);
            if let Some(fix) = &o.fix {
                let _ = write!(out, " — fix: {fix}");
            }
            out.push('\n');
        }
        if let Some(acme) = &h.acme {
            let _ = writeln!(out, "{} acme: {acme}", h.name);
        }
    }
    match &report.account {
        Some(audit) => {
            account_text::render(audit, &mut out);
            let _ = writeln!(out, "{}", audit.summary);
        }
        None if report
            .providers
            .iter()
            .any(|p| p.provider == Some(crate::provider::DEFAULT)) =>
        {
            let _ = writeln!(
                out,
                "account: not checked: set {} (or give --api-key-file) to check every branding on the SendGrid \
                 account, not only these",
                crate::account::SENDGRID_API_KEY_ENV
            );
        }
        None => {}
    }
    let _ = writeln!(out, "{}", report.summary);
    out
}

/// How a host's provider is named in the report.
pub(super) fn display(preset: Option<&'static Preset>) -> &'static str {
    preset.map_or("url upstream", |p| p.display)
}
