//! `linkgate doctor`: checks every link branding from the outside, the way
//! SendGrid does before it enables SSL click tracking: (1) the host's CNAME
//! no longer leads to its provider (sendgrid.net, mailgun.org, ...), and (2)
//! the https version of a tracked URL loads with a valid certificate and
//! reaches the provider with the branded Host. Also (3) the plain-http URL still answers, for emails sent
//! before the switch. And (4), when the config has `listen.http3`, the same
//! URL over HTTP/3, with the certificate https presented and an `Alt-Svc`
//! header on the https answer naming the advertised port. Hosts are probed concurrently, each probe bounded: up
//! to the response head, and then the body on its own, so a stalled body is
//! reported with the status that came before it.
//!
//! Each host is probed as its provider expects: the provider's own probe
//! path (an open pixel or tracked link shape, [`Preset::probe_path`]) unless
//! `--url` gives one for every host, and its own wrong-host page.
//!
//! With a SendGrid API key (`SENDGRID_API_KEY` or `--api-key-file`) it
//! also lists every branding on the account, subusers' too, and audits
//! them against the config (`account.rs`): the switch to https covers them
//! all, not only the ones linkgate knows.
//!
//! One job per file: this one (the command, the options, each host's
//! probes); `dns.rs` (the CNAME chain and its verdict); `fetch.rs` (connect,
//! TLS, one GET and its body); `probe.rs` (one host's probes, in order);
//! `http3.rs` (the GET over QUIC, held against
//! the https answer); `verdict.rs` (what an answer means);
//! `report.rs` (the report and its text form); `summary.rs` (the last line:
//! the providers involved and what to ask each); `account.rs` (the account
//! audit); `account_text.rs` (its section of the text report).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::provider::Preset;

mod account;
mod account_text;
mod dns;
mod fetch;
mod http3;
mod probe;
mod report;
mod summary;
mod verdict;

pub use account::{AccountReport, BrandingReport, Problem, Served};
pub use report::{render_text, HostReport, Outcome, ProviderCount, Report};

use dns::resolver;
use fetch::{client_tls, roots};
use probe::probe_host;

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configured hosts to probe.
    pub hosts: Vec<String>,
    /// Whether the config has a plain-http listener (then probe http too).
    pub has_http: bool,
    /// The port HTTP/3 is advertised on, when the config has `listen.http3`
    /// (`http3_advertise_port`, else the bound port): then probe HTTP/3 too.
    pub http3_port: Option<u16>,
    /// Each host's provider preset (by lower-case name), for its probe path
    /// and what "not switched yet" and a wrong-host answer look like. Absent
    /// for a plain `url` upstream: then the probe path is `/` and no answer
    /// is read as a wrong-host page.
    pub providers: HashMap<String, &'static Preset>,
    /// Where to look up and connect, what to trust and fetch, how long.
    pub probe: Settings,
    /// What `[acme] storage` says about each ACME host (lower-case name).
    pub acme: HashMap<String, String>,
    /// The account audit, when an API key was given.
    pub account: Option<Arc<AccountAudit>>,
}

/// Every branding on a provider's account, to hold against the config.
#[derive(Debug)]
pub struct AccountAudit {
    pub provider: &'static Preset,
    pub ask: crate::account::Ask,
    /// Every configured host (lower-case name), its provider and region.
    pub served: Served,
}

/// How each host is probed, as given on the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Name server `IP:PORT`; the system's when `None`.
    pub resolver: Option<SocketAddr>,
    /// The CNAME chain must reach this name.
    pub expect_target: Option<String>,
    /// Connect here for https instead of the resolved address on 443.
    pub connect: Option<SocketAddr>,
    /// Connect here for http instead of the resolved address on 80.
    pub connect_http: Option<SocketAddr>,
    /// Connect here (UDP) for HTTP/3 instead of the resolved address on the advertised port.
    pub connect_http3: Option<SocketAddr>,
    /// Trust these roots instead of the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Path and query to fetch from every host instead of each provider's probe path.
    pub url: Option<String>,
    /// Bound on each probe (DNS, https, http) of each host.
    pub timeout: Duration,
}

/// What `linkgate doctor` was asked besides the configuration file.
pub struct Asked {
    /// Only these hosts; every configured one when empty.
    pub hosts: Vec<String>,
    pub probe: Settings,
    /// Print JSON instead of text.
    pub json: bool,
    /// The account audit's options; it runs when they, or the provider's
    /// variable, give an API key.
    pub account: crate::account::Wanted,
}

/// `linkgate doctor`: reads `config` once (no certificate is loaded: it may
/// run where the keys are not), probes, prints the report. Exit status: 0
/// all pass, 1 a check failed, 2 unusable arguments.
pub fn command(config: &std::path::Path, asked: Asked) -> std::process::ExitCode {
    use std::process::ExitCode;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("linkgate: error: {e}");
        ExitCode::from(2)
    };
    if let Some(url) = asked.probe.url.as_deref().filter(|u| !is_path_and_query(u)) {
        return fail(&format!(
            "--url {}: not a path and query (like /wf/open?upn=...)",
            crate::text::printable(url)
        ));
    }
    let outline = match crate::config::Outline::read(config) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let providers = match outline.host_providers() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let all = outline.host_names();
    let hosts = if asked.hosts.is_empty() {
        all
    } else if let Some(unknown) = asked
        .hosts
        .iter()
        .find(|h| !all.iter().any(|a| a.eq_ignore_ascii_case(h)))
    {
        return fail(&format!("--host {unknown}: not a [[host]] in {}", config.display()));
    } else {
        asked.hosts
    };
    let acme = outline
        .acme_storage()
        .map_or_else(HashMap::new, |(storage, hosts)| crate::acme::describe(&storage, &hosts));
    // SendGrid is the one provider whose account API linkgate reads.
    let account = match crate::provider::find("sendgrid") {
        Ok(provider) => match asked.account.ask(provider, asked.probe.timeout) {
            Ok(None) => None,
            Ok(Some(ask)) => match outline.host_upstreams() {
                Ok(served) => Some(Arc::new(AccountAudit { provider, ask, served })),
                Err(e) => return fail(&e),
            },
            Err(e) => return fail(&e),
        },
        Err(e) => return fail(&e),
    };
    let http3_port = match outline.http3_port() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let opts = Options {
        hosts,
        has_http: outline.has_http(),
        http3_port,
        providers,
        probe: asked.probe,
        acme,
        account,
    };
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(opts)));
    let report = match report {
        Ok(r) => r,
        Err(e) => return fail(&format!("{e:#}")),
    };
    if asked.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(&e),
        }
    } else {
        print!("{}", render_text(&report));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs every probe for every host and builds the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let resolver = Arc::new(resolver(opts.probe.resolver)?);
    let roots = roots(opts.probe.ca_file.as_deref())?;
    let quic = match opts.http3_port {
        Some(_) => Some(Arc::new(http3::client(roots.clone())?)),
        None => None,
    };
    let tls = Arc::new(client_tls(roots)?);
    let opts = Arc::new(opts);
    // The account is listed while the hosts are probed.
    let listing = opts.account.clone().map(|audit| {
        tokio::spawn(async move {
            let listed = crate::account::list(audit.provider, &audit.ask).await;
            account::audit(audit.provider, listed, &audit.served)
        })
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in opts.hosts.iter().enumerate() {
        let (host, resolver, tls, opts) = (host.clone(), resolver.clone(), tls.clone(), opts.clone());
        let quic = quic.clone();
        tasks.spawn(async move { (i, probe_host(&host, &resolver, (&tls, quic.as_deref()), &opts).await) });
    }
    let mut hosts: Vec<(usize, HostReport)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        hosts.push(done?);
    }
    hosts.sort_by_key(|(i, _)| *i);
    let hosts: Vec<HostReport> = hosts.into_iter().map(|(_, h)| h).collect();
    let failing: Vec<&HostReport> = hosts
        .iter()
        .filter(|h| {
            !h.dns.passed()
                || !h.https.passed()
                || [&h.http, &h.http3]
                    .iter()
                    .any(|o| o.as_ref().is_some_and(|o| !o.passed()))
        })
        .collect();
    let providers = summary::providers(&hosts);
    let mut account = match listing {
        Some(task) => Some(task.await?),
        None => None,
    };
    let audit = match &account {
        None => summary::Audit::NotRun,
        Some(a) => match a.unreadable {
            Some(why) => summary::Audit::Unreadable(why),
            None if a.ok => summary::Audit::Ready,
            None => summary::Audit::NotReady,
        },
    };
    if let Some(report) = account.as_mut() {
        let pointed: Vec<&str> = hosts
            .iter()
            .filter(|h| h.dns.passed())
            .map(|h| h.name.as_str())
            .collect();
        account::pointed(report, &pointed);
    }
    let summary = summary::summary(&hosts, &failing, &providers, audit);
    let ok = failing.is_empty() && account.as_ref().is_none_or(|a| a.ok);
    Ok(Report {
        ok,
        hosts,
        providers,
        account,
        summary,
    })
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `url` is an origin-form request target: a path and optional query.
fn is_path_and_query(url: &str) -> bool {
    url.starts_with('/') && url.parse::<http::uri::PathAndQuery>().is_ok()
}
