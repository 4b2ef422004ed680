//! `linkgate doctor`: checks every link branding from the outside, the way
//! SendGrid does before it enables SSL click tracking: (1) the host's CNAME
//! no longer leads to sendgrid.net, and (2) the https version of a tracked
//! URL loads with a valid certificate and reaches the provider with the
//! branded Host. Also (3) the plain-http URL still answers, for emails sent
//! before the switch. Hosts are probed concurrently, each probe bounded: up
//! to the response head, and then the body on its own, so a stalled body is
//! reported with the status that came before it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::{AlertDescription, CertificateError};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::provider::{self, Preset};

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configured hosts to probe.
    pub hosts: Vec<String>,
    /// Whether the config has a plain-http listener (then probe http too).
    pub has_http: bool,
    /// Each host's provider preset (by lower-case name), for what "not
    /// switched yet" and a wrong-host answer look like. SendGrid when absent.
    pub providers: HashMap<String, &'static Preset>,
    /// Name server `IP:PORT`; the system's when `None`.
    pub resolver: Option<SocketAddr>,
    /// The CNAME chain must reach this name.
    pub expect_target: Option<String>,
    /// Connect here for https instead of the resolved address on 443.
    pub connect: Option<SocketAddr>,
    /// Connect here for http instead of the resolved address on 80.
    pub connect_http: Option<SocketAddr>,
    /// Trust these roots instead of the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Path and query of the tracked URL to fetch.
    pub url: String,
    /// Bound on each probe (DNS, https, http) of each host.
    pub timeout: Duration,
    /// What `[acme] storage` says about each ACME host (lower-case name).
    pub acme: HashMap<String, String>,
}

/// What `linkgate doctor` was asked besides the configuration file.
pub struct Asked {
    /// Only these hosts; every configured one when empty.
    pub hosts: Vec<String>,
    pub resolver: Option<SocketAddr>,
    pub expect_target: Option<String>,
    pub connect: Option<SocketAddr>,
    pub connect_http: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    pub url: String,
    pub timeout: Duration,
    /// Print JSON instead of text.
    pub json: bool,
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
    let opts = Options {
        hosts,
        has_http: outline.has_http(),
        providers,
        resolver: asked.resolver,
        expect_target: asked.expect_target,
        connect: asked.connect,
        connect_http: asked.connect_http,
        ca_file: asked.ca_file,
        url: asked.url,
        timeout: asked.timeout,
        acme,
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

#[derive(Debug, Serialize)]
pub struct Report {
    /// Every host passed every check.
    pub ok: bool,
    pub hosts: Vec<HostReport>,
    pub summary: String,
}

#[derive(Debug, Serialize)]
pub struct HostReport {
    pub name: String,
    pub cname_chain: Vec<String>,
    pub addresses: Vec<String>,
    pub dns: Outcome,
    pub https: Outcome,
    /// `None` when the config has no plain-http listener.
    pub http: Option<Outcome>,
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
    fn pass(message: String) -> Self {
        Self {
            status: "pass",
            message,
            fix: None,
        }
    }

    fn fail(message: String, fix: &str) -> Self {
        Self {
            status: "fail",
            message,
            fix: Some(fix.to_owned()),
        }
    }

    fn skipped(message: &str) -> Self {
        Self {
            status: "skipped",
            message: message.to_owned(),
            fix: None,
        }
    }

    fn passed(&self) -> bool {
        self.status == "pass"
    }
}

/// Runs every probe for every host and builds the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let resolver = Arc::new(resolver(opts.resolver)?);
    let tls = Arc::new(client_tls(opts.ca_file.as_deref())?);
    let opts = Arc::new(opts);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in opts.hosts.iter().enumerate() {
        let (host, resolver, tls, opts) = (host.clone(), resolver.clone(), tls.clone(), opts.clone());
        tasks.spawn(async move { (i, probe_host(&host, &resolver, &tls, &opts).await) });
    }
    let mut hosts: Vec<(usize, HostReport)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        hosts.push(done?);
    }
    hosts.sort_by_key(|(i, _)| *i);
    let hosts: Vec<HostReport> = hosts.into_iter().map(|(_, h)| h).collect();
    let failing: Vec<&HostReport> = hosts
        .iter()
        .filter(|h| !h.dns.passed() || !h.https.passed() || h.http.as_ref().is_some_and(|o| !o.passed()))
        .collect();
    let all_sendgrid = hosts.iter().all(|h| {
        opts.providers
            .get(&normalise(&h.name))
            .is_none_or(|p| p.name == provider::DEFAULT)
    });
    let summary = if failing.is_empty() && !all_sendgrid {
        format!(
            "all {} link brandings pass both checks — ask each provider to switch its tracking links to https \
             (README, \"Providers\"), and keep the CNAMEs pointing at the proxy.",
            hosts.len()
        )
    } else if failing.is_empty() {
        format!(
            "all {} link brandings pass both checks — ask SendGrid Support to enable SSL click and open tracking. \
             Do not re-validate these link brandings in the SendGrid UI: that validation expects the CNAME to point at \
             sendgrid.net, fails now that it points at the proxy, and breaks the branding.",
            hosts.len()
        )
    } else {
        let list: Vec<String> = failing
            .iter()
            .map(|h| {
                let mut what = Vec::new();
                for (check, o) in [
                    ("DNS", Some(&h.dns)),
                    ("HTTPS", Some(&h.https)),
                    ("HTTP", h.http.as_ref()),
                ] {
                    if let Some(o) = o.filter(|o| o.status == "fail") {
                        what.push(format!("{check}: {}", o.fix.as_deref().unwrap_or(&o.message)));
                    }
                }
                format!("{} ({})", h.name, what.join("; "))
            })
            .collect();
        format!(
            "{} of {} link brandings fail: {}. SendGrid enables SSL tracking only when every branding passes.",
            failing.len(),
            hosts.len(),
            list.join(" | ")
        )
    };
    Ok(Report {
        ok: failing.is_empty(),
        hosts,
        summary,
    })
}

fn resolver(server: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    let builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.build()?)
}

fn client_tls(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in crate::tls::load_certs(path).map_err(anyhow::Error::msg)? {
                roots.add(cert)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn probe_host(
    host: &str,
    resolver: &TokioResolver,
    tls: &Arc<rustls::ClientConfig>,
    opts: &Options,
) -> HostReport {
    let preset = opts
        .providers
        .get(&normalise(host))
        .copied()
        .or_else(|| provider::find(provider::DEFAULT).ok());
    let (chain, addresses, dns) = match tokio::time::timeout(opts.timeout, dns(host, resolver, opts, preset)).await {
        Ok(r) => r,
        Err(_) => (
            Vec::new(),
            Vec::new(),
            Outcome::fail(
                format!("DNS gave no answer within {:?}", opts.timeout),
                "check the name servers of the zone",
            ),
        ),
    };
    let https_target = opts
        .connect
        .or_else(|| addresses.first().map(|ip| SocketAddr::new(*ip, 443)));
    let https = match https_target {
        None => Outcome::skipped("no address to connect to (give --connect to probe anyway)"),
        Some(addr) => answered(opts.timeout, "https", preset, https(host, addr, tls, &opts.url)).await,
    };
    let http = opts.has_http.then(|| {
        opts.connect_http
            .or_else(|| addresses.first().map(|ip| SocketAddr::new(*ip, 80)))
    });
    let http = match http {
        None => None,
        Some(None) => Some(Outcome::skipped(
            "no address to connect to (give --connect-http to probe anyway)",
        )),
        Some(Some(addr)) => Some(answered(opts.timeout, "http", preset, plain(host, addr, &opts.url)).await),
    };
    HostReport {
        name: host.to_owned(),
        cname_chain: chain,
        addresses: addresses.iter().map(ToString::to_string).collect(),
        dns,
        https,
        http,
        acme: opts.acme.get(&normalise(host)).cloned(),
    }
}

/// Runs `probe` up to the response head (connect, TLS, request) within
/// `limit`, then reads the body within `limit` again, on its own: an answer
/// whose body never ends is still reported with its status.
async fn answered(
    limit: Duration,
    scheme: &str,
    preset: Option<&'static Preset>,
    probe: impl std::future::Future<Output = Result<Head, Outcome>>,
) -> Outcome {
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(head)) => classify(read_body(head, limit).await, scheme, preset),
        Ok(Err(failed)) => failed,
        Err(_) => Outcome::fail(
            format!("no answer within {limit:?}"),
            "check that linkgate runs and that the address and port are reachable",
        ),
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The CNAME chain of `host`, its addresses, and the verdict on them.
async fn dns(
    host: &str,
    resolver: &TokioResolver,
    opts: &Options,
    preset: Option<&'static Preset>,
) -> (Vec<String>, Vec<IpAddr>, Outcome) {
    let mut chain = Vec::new();
    let mut current = normalise(host);
    for _ in 0..8 {
        let answer = match resolver.lookup(format!("{current}."), RecordType::CNAME).await {
            Ok(answer) => answer,
            Err(e) if e.is_nx_domain() && chain.is_empty() => {
                return (
                    chain,
                    Vec::new(),
                    Outcome::fail(
                        format!("{host} does not exist in DNS (NXDOMAIN)"),
                        "create the link branding's CNAME record, pointing at the proxy",
                    ),
                )
            }
            Err(_) => break,
        };
        let next = answer.answers().iter().find_map(|r| match &r.data {
            RData::CNAME(target) if normalise(&r.name.to_string()) == current => Some(normalise(&target.0.to_string())),
            _ => None,
        });
        match next {
            Some(next) if !chain.contains(&next) => {
                chain.push(next.clone());
                current = next;
            }
            _ => break,
        }
    }
    let addresses: Vec<IpAddr> = match resolver.lookup_ip(format!("{}.", normalise(host))).await {
        Ok(ips) => ips.iter().collect(),
        Err(_) => Vec::new(),
    };
    let shown = if chain.is_empty() {
        "no CNAME".to_owned()
    } else {
        format!("CNAME {}", chain.join(" → "))
    };
    let provider_targets = preset.map(Preset::cname_suffixes).unwrap_or_default();
    let still_provider = chain.iter().find(|n| {
        provider_targets
            .iter()
            .any(|t| *n == t || n.ends_with(&format!(".{t}")))
    });
    let outcome = if let Some(target) = still_provider {
        Outcome::fail(
            format!(
                "{shown}: still points at {} ({target})",
                preset.map_or("the provider", |p| p.display)
            ),
            "step 4 not done: point the CNAME at the proxy (your linkgate load balancer's name)",
        )
    } else if let Some(target) = opts
        .expect_target
        .as_deref()
        .map(normalise)
        .filter(|t| !chain.contains(t))
    {
        Outcome::fail(
            format!("{shown}: does not lead to {target}"),
            "point the CNAME at the expected target",
        )
    } else if addresses.is_empty() {
        Outcome::fail(
            format!("{shown}: the name does not resolve to any address"),
            "fix the CNAME's target or add A/AAAA records",
        )
    } else if chain.is_empty() {
        Outcome::pass(format!(
            "no CNAME; A/AAAA {} (an A record works for SendGrid only if it reaches linkgate)",
            join(&addresses)
        ))
    } else {
        Outcome::pass(format!("{shown}; addresses {}", join(&addresses)))
    };
    (chain, addresses, outcome)
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// TLS with SNI = host, verified; then GET the tracked URL, up to the response head.
async fn https(host: &str, addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, url: &str) -> Result<Head, Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        Outcome::fail(
            format!("cannot connect to {addr}: {e}"),
            "check that linkgate listens there and the firewall allows 443",
        )
    })?;
    let Ok(name) = rustls_pki_types::ServerName::try_from(host.to_owned()) else {
        return Err(Outcome::fail(
            format!("{host} is not a valid name"),
            "fix the host name in the config",
        ));
    };
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| tls_failure(host, &e))?;
    fetch(stream, host, url).await
}

/// Plain http: GET the tracked URL, up to the response head.
async fn plain(host: &str, addr: SocketAddr, url: &str) -> Result<Head, Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        Outcome::fail(
            format!("cannot connect to {addr}: {e}"),
            "links in emails sent before the switch are plain http: keep the http listener reachable on port 80",
        )
    })?;
    fetch(tcp, host, url).await
}

/// Turns a TLS error into "Your connection is not private" with its cause and fix.
fn tls_failure(host: &str, e: &std::io::Error) -> Outcome {
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let (cause, fix) = match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            ("the certificate has expired".to_owned(), "renew the certificate; linkgate reloads it without a restart")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. })) => {
            ("the certificate is not valid yet".to_owned(), "check the clocks, or wait until it is valid")
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => (
            format!("the certificate is not valid for {host}"),
            "get a certificate that names this host; a wildcard covers exactly one label (*.example.com does not cover a.b.example.com)",
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => (
            "the certificate's issuer is not trusted: unknown CA or incomplete chain".to_owned(),
            "serve the full chain (fullchain.pem, leaf first, then intermediates) from a public CA",
        ),
        Some(rustls::Error::AlertReceived(AlertDescription::UnrecognisedName)) => (
            format!("the server does not serve {host} (unrecognized_name)"),
            "add this host as a [[host]] in linkgate's config",
        ),
        Some(other) => (format!("TLS error: {other}"), "check the certificate and the TLS settings"),
        None => (format!("TLS handshake failed: {e}"), "check that the address is linkgate's https listener"),
    };
    Outcome::fail(format!("Your connection is not private: {cause}"), fix)
}

/// The response head of one GET; its body is still to be read.
type Head = http::Response<hyper::body::Incoming>;

/// How much of a body is kept to look for a provider's error page.
const BODY_KEPT: usize = 64 * 1024;
/// A body still going after this much is reported as one that does not end
/// (a tracked link's answer is a redirect or a small page).
const BODY_READ_AT_MOST: usize = 16 << 20;

/// What one GET got: its status and the start of its body.
struct Answer {
    status: u16,
    /// The first [`BODY_KEPT`] bytes, decoded lossily. Searched for a
    /// provider's error page, never printed.
    body: String,
    /// Why the body is incomplete, when it did not end.
    unfinished: Option<String>,
}

async fn fetch<IO>(io: IO, host: &str, url: &str) -> Result<Head, Outcome>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: &dyn std::fmt::Display| {
        Outcome::fail(
            format!("the request failed: {e}"),
            "check that linkgate answers on this address",
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(url)
        .header(http::header::HOST, host)
        .header(
            http::header::USER_AGENT,
            concat!("linkgate-doctor/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| failed(&e))?;
    sender.send_request(req).await.map_err(|e| failed(&e))
}

/// Reads the body of `head` for at most `limit` (its own bound, after the
/// head's) and keeps its start.
async fn read_body(head: Head, limit: Duration) -> Answer {
    let status = head.status().as_u16();
    let mut body = head.into_body();
    let mut kept = Vec::new();
    let mut received = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let data = match frame.map(http_body::Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(e) => return Some(format!("the body broke off after {received} bytes: {e}")),
            };
            received += data.len();
            // The start is enough to recognise a provider's page; the rest
            // is read (not kept) only to see that the body ends.
            let room = BODY_KEPT - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if received > BODY_READ_AT_MOST {
                return Some(format!("the body did not end after {} MiB", BODY_READ_AT_MOST >> 20));
            }
        }
        None
    };
    let unfinished = tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Some(format!(
            "the body did not end within {limit:?} ({received} bytes arrived)"
        ))
    });
    Answer {
        status,
        body: String::from_utf8_lossy(&kept).into_owned(),
        unfinished,
    }
}

/// The verdict on an answer; one whose body did not end fails, with its status.
fn classify(answer: Answer, scheme: &str, preset: Option<&'static Preset>) -> Outcome {
    let mut outcome = verdict(&answer, scheme, preset);
    if let Some(unfinished) = answer.unfinished {
        if outcome.passed() {
            outcome = Outcome::fail(
                format!("{}, but {unfinished}", outcome.message),
                "the answer started but did not end (it stalled, or kept flowing): check linkgate's log \
                 and the provider's answer (linkgate passes the provider's body on as it arrives)",
            );
        } else {
            outcome.message = format!("{}; {unfinished}", outcome.message);
        }
    }
    outcome
}

fn verdict(answer: &Answer, scheme: &str, preset: Option<&'static Preset>) -> Outcome {
    let status = answer.status;
    let lower = answer.body.to_ascii_lowercase();
    let marker = preset.map_or("", |p| p.wrong_host_marker);
    if (!marker.is_empty() && lower.contains(marker)) || status == 404 {
        Outcome::fail(
            format!(
                "{scheme} answered {status}: {}",
                preset.map_or("the provider's answer for an unknown tracking host", |p| p.wrong_host_page)
            ),
            "the Host header is not forwarded: the proxy must send Host = the branded name (linkgate does; check what is in front of it)",
        )
    } else if (status == 502 || status == 504)
        && [crate::proxy::UPSTREAM_UNAVAILABLE, crate::proxy::UPSTREAM_TIMED_OUT]
            .iter()
            .any(|body| lower.contains(body.trim_end()))
    {
        Outcome::fail(
            format!("{scheme} answered {status} from linkgate: the provider is unreachable from linkgate"),
            "check linkgate's outbound network and [upstream] url / connect_to; its log says why",
        )
    } else if status == 421 {
        Outcome::fail(
            format!("{scheme} answered 421"),
            "linkgate does not serve this host: add it as a [[host]]",
        )
    } else if (200..400).contains(&status) {
        Outcome::pass(format!("{scheme} answered {status}"))
    } else {
        Outcome::fail(
            format!("{scheme} answered {status}"),
            "check linkgate's log and the provider's answer",
        )
    }
}

/// The human form: one row per host, then the details of what failed, then the summary.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let width = report.hosts.iter().map(|h| h.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(out, "{:<width$}  {:<7}  {:<7}  {:<7}", "HOST", "DNS", "HTTPS", "HTTP");
    for h in &report.hosts {
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<7}  {:<7}",
            h.name,
            h.dns.status,
            h.https.status,
            h.http.as_ref().map_or("-", |o| o.status)
        );
    }
    for h in &report.hosts {
        for (check, o) in [
            ("dns", Some(&h.dns)),
            ("https", Some(&h.https)),
            ("http", h.http.as_ref()),
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
    let _ = writeln!(out, "{}", report.summary);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str, unfinished: Option<&str>) -> Answer {
        Answer {
            status,
            body: body.to_owned(),
            unfinished: unfinished.map(str::to_owned),
        }
    }

    #[test]
    fn an_unfinished_body_keeps_the_status_and_fails() {
        let sendgrid = provider::find(provider::DEFAULT).ok();
        let done = classify(answer(200, "GIF89a", None), "https", sendgrid);
        assert_eq!((done.status, done.message.as_str()), ("pass", "https answered 200"));

        let stalled = classify(
            answer(200, "GIF89a", Some("the body did not end within 3s")),
            "https",
            sendgrid,
        );
        assert_eq!(stalled.status, "fail");
        assert_eq!(
            stalled.message,
            "https answered 200, but the body did not end within 3s"
        );
        assert!(stalled.fix.is_some_and(|f| f.contains("stalled")));

        // A failure recognised from the start of the body stays that failure, and says the body did not end.
        let wrong = classify(
            answer(200, "<title>Wrong Link</title>", Some("the body did not end within 3s")),
            "https",
            sendgrid,
        );
        assert_eq!(wrong.status, "fail");
        assert!(
            wrong.message.ends_with("; the body did not end within 3s"),
            "{}",
            wrong.message
        );
        assert!(wrong.fix.is_some_and(|f| f.contains("Host header")));
    }
}
