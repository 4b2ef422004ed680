//! Prometheus metrics, registered once per process and served by the admin
//! listener. Host labels only ever take configured host names (or `other`),
//! so cardinality is bounded by the config.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub host: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeLabels {
    pub host: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChallengeLabels {
    pub host: String,
    pub challenge: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request counters of one host, by status class.
#[derive(Clone, Debug)]
pub struct HostCounters([Counter; 5]);

impl HostCounters {
    /// Counts one answered request.
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.0[class].inc();
    }
}

/// Every metric linkgate exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub upstream_retries: Counter,
    pub upstream_address_failures: Counter,
    pub handshakes: Family<ResultLabels, Counter>,
    /// Successful handshakes that resumed an earlier session (a ticket): a subset of `result="ok"`.
    pub handshakes_resumed: Counter,
    pub open_connections: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub cert_expiry: Family<HostLabels, Gauge>,
    pub acme_certificates: Family<AcmeLabels, Counter>,
    pub acme_challenges: Family<ChallengeLabels, Counter>,
    pub acme_ready: Family<HostLabels, Gauge>,
    pub acme_task_restarts: Family<HostLabels, Counter>,
}

/// The label for requests whose host is not one we serve.
pub const OTHER_HOST: &str = "other";

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("linkgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by host and status class",
            requests.clone(),
        );
        let buckets = || exponential_buckets(0.0005, 2.0, 16);
        let request_duration = Histogram::new(buckets());
        registry.register_with_unit(
            "request_duration",
            "Time from request head to the end of the response head",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(buckets());
        registry.register_with_unit(
            "upstream_duration",
            "Time the upstream took to send its response head",
            prometheus_client::registry::Unit::Seconds,
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream requests by kind (connect, tls, timeout, reset, upgrade)",
            upstream_errors.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Requests sent again on a new upstream connection after a reused one closed under them before any answer",
            upstream_retries.clone(),
        );
        let upstream_address_failures = Counter::default();
        registry.register(
            "upstream_address_failures",
            "Connection attempts an address of the upstream's name refused or let time out (then tried last for 10 s)",
            upstream_address_failures.clone(),
        );
        let handshakes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result (ok, unknown_sni, no_sni, no_certificate, acme_challenge, error)",
            handshakes.clone(),
        );
        let handshakes_resumed = Counter::default();
        registry.register(
            "tls_handshakes_resumed",
            "Successful TLS handshakes that resumed an earlier session with a ticket (part of tls_handshakes_total{result=\"ok\"})",
            handshakes_resumed.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at once on accept, by reason (max_handshakes, handshakes_per_address, connections_per_address, admin_connections)",
            connections_refused.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("config_reloads", "Configuration reloads by result", reloads.clone());
        let cert_expiry = Family::<HostLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the certificate served for each host expires (Unix time)",
            cert_expiry.clone(),
        );
        let acme_certificates = Family::<AcmeLabels, Counter>::default();
        registry.register(
            "acme_certificates",
            "ACME certificate attempts by host and result (issued, renewed, failed)",
            acme_certificates.clone(),
        );
        let acme_challenges = Family::<ChallengeLabels, Counter>::default();
        registry.register(
            "acme_challenges_answered",
            "ACME validations answered by this replica, by host and challenge type",
            acme_challenges.clone(),
        );
        let acme_ready = Family::<HostLabels, Gauge>::default();
        registry.register(
            "acme_certificate_ready",
            "1 when an ACME host has a certificate to serve, 0 while its handshakes fail for want of one",
            acme_ready.clone(),
        );
        let acme_task_restarts = Family::<HostLabels, Counter>::default();
        registry.register(
            "acme_task_restarts",
            "Times a host's ACME task ended unexpectedly and was restarted (a bug: report it)",
            acme_task_restarts.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build);
        // Every counter whose labels are known in advance exists from the
        // start at 0, so `increase(...)` and alerts see the first failure.
        for kind in ["connect", "tls", "timeout", "reset", "upgrade"] {
            upstream_errors.get_or_create(&KindLabels { kind }).inc_by(0);
        }
        for result in HANDSHAKE_RESULTS {
            handshakes.get_or_create(&ResultLabels { result }).inc_by(0);
        }
        for reason in REFUSAL_REASONS {
            connections_refused.get_or_create(&ReasonLabels { reason }).inc_by(0);
        }
        for result in ["success", "failure"] {
            reloads.get_or_create(&ResultLabels { result }).inc_by(0);
        }
        Arc::new(Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            upstream_retries,
            upstream_address_failures,
            handshakes,
            handshakes_resumed,
            open_connections,
            connections_refused,
            reloads,
            cert_expiry,
            acme_certificates,
            acme_challenges,
            acme_ready,
            acme_task_restarts,
        })
    }

    /// Counts a TLS handshake outcome.
    pub fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a connection closed on accept, and why.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a reload outcome.
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The request counters of `host`, one per status class. Fetched once per
    /// configuration, so counting a request is one atomic add.
    pub fn host_counters(&self, host: &str) -> HostCounters {
        HostCounters(CLASSES.map(|class| {
            self.requests.get_or_create_owned(&RequestLabels {
                host: host.to_owned(),
                class,
            })
        }))
    }

    /// Every metric in the OpenMetrics text format (what Prometheus asks
    /// for with `Accept: application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Every metric in the classic Prometheus text format (0.0.4), for
    /// scrapers that do not ask for OpenMetrics: see [`classic`].
    pub fn encode_classic(&self) -> String {
        classic(&self.encode())
    }
}

/// The results `linkgate_tls_handshakes_total` counts.
const HANDSHAKE_RESULTS: [&str; 6] = [
    "ok",
    "unknown_sni",
    "no_sni",
    "no_certificate",
    "acme_challenge",
    "error",
];

/// The reasons `linkgate_connections_refused_total` counts.
const REFUSAL_REASONS: [&str; 6] = [
    "max_handshakes",
    "handshakes_per_address",
    "connections_per_address",
    "admin_connections",
    "untrusted_proxy",
    "proxy_header",
];

/// OpenMetrics text turned into the classic format: a counter family is
/// named after its series there (`# TYPE linkgate_requests_total counter`,
/// where OpenMetrics says `linkgate_requests`), and `# UNIT` and `# EOF`
/// do not exist. Without this a classic scraper finds no TYPE or HELP for
/// any counter series (`promtool check metrics`: "no help text").
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .is_some_and(|t| t.split_once(' ') == Some((name, "counter")));
            let suffix = if counter && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
            out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                let suffix = if name.ends_with("_total") { "" } else { "_total" };
                out.push_str(&format!("# TYPE {name}{suffix} counter\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
