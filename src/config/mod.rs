//! Configuration: the TOML file as written ([`RawConfig`]) and the checked
//! [`Config`] built from it by [`Config::load`].
//!
//! `Config::load` does every check that can be done before binding a socket:
//! parsing, addresses, the upstream URL, reading and matching every
//! certificate and key, and certificate/host coverage. Any failure is a
//! [`ConfigError`] whose `Display` is one line naming the file and the key or
//! host at fault. [`Outline`] reads a file once without loading anything,
//! for the subcommands.

mod build;
mod hosts;
mod listen;
mod outline;
mod raw;
mod units;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use rustls::sign::CertifiedKey;

pub use build::preset_of;
use build::*;
pub use hosts::{explain_key_mismatch, load_host, HostEntry, LoadedPairs};
use listen::build_listen;
pub use listen::{Http3, Listen};
pub use outline::{HostUpstreams, Outline};
pub use units::{parse_duration, parse_size, IpNet};

use crate::error_page::ErrorPage;
use crate::files::{self, StaticFile};
use crate::host::HostName;
use crate::provider::{self, Preset};
use crate::tls;
use raw::{RawAcme, RawConfig, RawLimits, RawLog, RawShutdown, RawUpstream, SizeValue};

/// Where to read the config when neither `--config` nor `$LINKGATE_CONFIG` says.
pub const DEFAULT_PATH: &str = "config/linkgate.toml";

/// A validated configuration. Every value in it has been checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub listen: Listen,
    /// Every distinct upstream, `[upstream]`'s first (the default for hosts
    /// that do not name their own); hosts refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// One entry per `[[host]]`, in file order, names unique.
    pub hosts: Vec<Host>,
    /// `[admin] listen`: where /healthz, /readyz and /metrics are served.
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    /// `[acme]`: how hosts with `acme = true` get their certificates.
    pub acme: Option<Acme>,
    /// `certs_dir`, resolved: hosts without cert and key take theirs from
    /// its subfolder named after them (watched for reloads as a whole, for a
    /// Kubernetes projected volume's `..data` swap).
    pub certs_dir: Option<PathBuf>,
    /// The top-level `error_page`, read: the page of every host that names
    /// none of its own (kept here too so that it is watched and checked
    /// even when every host names its own).
    pub error_page: Option<Arc<ErrorPage>>,
}

/// `[acme]`, checked.
#[derive(Debug, Clone)]
pub struct Acme {
    /// The ACME directory URL (https).
    pub directory: String,
    /// `mailto:` contact for the account, from `email`.
    pub contact: Option<String>,
    /// Account key, certificates, keys, locks and challenge answers; may be
    /// shared by every replica.
    pub storage: PathBuf,
    pub challenge: Challenge,
    /// Renew this long before a certificate expires.
    pub renew_before: Duration,
    /// Trust these roots for the ACME server's own TLS instead of the public web roots.
    pub ca_certs: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// External account binding, for CAs that require one (ZeroSSL, Google).
    pub eab: Option<Eab>,
}

/// An ACME external account binding: the CA's key id and HMAC key.
#[derive(Clone)]
pub struct Eab {
    pub kid: String,
    pub hmac_key: Vec<u8>,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab").field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// The ACME challenge linkgate answers to prove it serves a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// A special certificate on the https listener (ALPN `acme-tls/1`).
    TlsAlpn01,
    /// A token under `/.well-known/acme-challenge/` on the plain-http listener.
    Http01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Http01 => "http-01",
        }
    }
}

/// Bounds on every phase of a connection and on request sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// PROXY header (if expected) and TLS handshake, from accept.
    pub handshake_timeout: Duration,
    /// Time to receive a complete HTTP/1 request head, counted from when linkgate
    /// starts waiting for one (so it also bounds a keep-alive wait).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: u32,
    /// Connections accepted and not yet through their handshake (PROXY
    /// header and TLS; on plain http, until their first request head), at
    /// most this many at once; more are closed at once.
    pub max_handshakes: u32,
    /// Unfinished handshakes from one client address (the PROXY header's,
    /// when there is one; an IPv6 /64), at most this many at once.
    pub handshakes_per_address: u32,
    /// Connections open from one client address (counted as for
    /// handshakes), at most this many at once, whatever their phase.
    pub connections_per_address: u32,
    /// Request heads above this answer 431.
    pub max_header_bytes: usize,
    /// Request bodies above this answer 413.
    pub max_request_body: u64,
    /// Upstream connections one client connection (HTTP/2: its streams) may
    /// hold at a time; further streams wait their turn.
    pub upstream_per_connection: u32,
    /// Upstream connections open at once across the process. `None`: half
    /// the descriptors the process may open, after a reserve (see
    /// [`Limits::upstream_connections`]).
    pub max_upstream_connections: Option<u32>,
}

/// Descriptors kept back from the upstream cap for accepting, the admin
/// listener (at most `admin::ADMIN_CONNECTIONS` connections), log
/// and config files, file watches and ACME storage.
const DESCRIPTOR_RESERVE: u64 = 256;

impl Limits {
    /// The cap on upstream connections in force: as configured, or half of
    /// what the descriptor limit leaves after [`DESCRIPTOR_RESERVE`], so
    /// that upstream connections can never take the descriptors that
    /// accepting clients and the admin listener need.
    pub fn upstream_connections(&self) -> usize {
        let derived = descriptor_limit().map_or(4096, |n| n.saturating_sub(DESCRIPTOR_RESERVE) / 2);
        let n = self.max_upstream_connections.map_or(derived, u64::from);
        usize::try_from(n.max(1)).unwrap_or(usize::MAX)
    }

    /// Descriptors the process may need at once: a connection per
    /// `max_connections`, the upstream connections, and the reserve.
    pub fn descriptors_needed(&self) -> u64 {
        u64::from(self.max_connections) + self.upstream_connections() as u64 + DESCRIPTOR_RESERVE
    }
}

/// The soft limit on open descriptors, from `/proc/self/limits` (Linux).
pub fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 20_000,
            max_handshakes: 5_000,
            handshakes_per_address: 256,
            connections_per_address: 5_000,
            max_header_bytes: 16_384,
            max_request_body: 1 << 20,
            upstream_per_connection: 32,
            max_upstream_connections: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// After SIGTERM, keep accepting this long with /readyz already 503.
    pub drain_delay: Duration,
    /// Then stop accepting and give in-flight requests this long to finish.
    pub grace_period: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// One access line per request.
    pub access: bool,
    /// Log the query string too (tracking tokens identify recipients: off by default).
    pub query: bool,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            access: true,
            query: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port to put in the request URI; the host is also the TLS
    /// server name verified on an https upstream.
    pub authority: Authority,
    /// Dial this address instead of resolving `authority`.
    pub connect_to: Option<SocketAddr>,
    /// Trust these roots instead of the public web roots (PEM, already read).
    pub ca_certs: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// The provider preset it came from (`None` for a bare `url`).
    pub provider: Option<&'static Preset>,
    /// The provider's cap on request heads: above it, 431 instead of forwarding.
    pub max_header_bytes: Option<usize>,
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme
            && self.authority == other.authority
            && self.connect_to == other.connect_to
            && self.ca_certs == other.ca_certs
            && self.connect_timeout == other.connect_timeout
            && self.response_timeout == other.response_timeout
            && self.pool_idle_timeout == other.pool_idle_timeout
            && self.max_header_bytes == other.max_header_bytes
            && self.provider.map(|p| p.name) == other.provider.map(|p| p.name)
    }
}

#[derive(Clone)]
pub struct Host {
    pub name: HostName,
    pub certificate: CertSource,
    /// `Strict-Transport-Security` added to every https response for this host.
    pub hsts: Option<HeaderValue>,
    /// Index of this host's upstream in [`Config::upstreams`].
    pub upstream: usize,
    /// URL path → file answered locally, never forwarded.
    pub files: HashMap<String, Arc<StaticFile>>,
    /// What the plain-http listener does for this host.
    pub http: HttpMode,
    /// The HTML page a browser gets when the upstream fails: the host's
    /// `error_page`, else the top-level one; `None`: the built-in page.
    pub error_page: Option<Arc<ErrorPage>>,
}

/// Where a host's certificate comes from.
#[derive(Clone)]
pub enum CertSource {
    /// `cert` and `key` files (and an `ocsp` response to staple).
    Files {
        cert: PathBuf,
        key: PathBuf,
        ocsp: Option<PathBuf>,
        /// The loaded chain and key (and OCSP response), shared between
        /// hosts that name the same files.
        certified_key: Arc<CertifiedKey>,
    },
    /// `acme = true`: obtained and renewed by linkgate, kept in `[acme] storage`.
    Acme,
}

impl Host {
    /// The certificate loaded from `cert`/`key`, if the host has files.
    pub fn file_certificate(&self) -> Option<&Arc<CertifiedKey>> {
        match &self.certificate {
            CertSource::Files { certified_key, .. } => Some(certified_key),
            CertSource::Acme => None,
        }
    }

    pub fn is_acme(&self) -> bool {
        matches!(self.certificate, CertSource::Acme)
    }
}

/// What the plain-http listener does with a configured host's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Forward as over https (links in emails sent before the switch keep working).
    Forward,
    /// Answer 308 to the same URL over https.
    Redirect,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field(
                "certificate",
                &match &self.certificate {
                    CertSource::Files { cert, .. } => cert.display().to_string(),
                    CertSource::Acme => "acme".into(),
                },
            )
            .field("hsts", &self.hsts)
            .field("upstream", &self.upstream)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("http", &self.http)
            .field(
                "error_page",
                &self.error_page.as_ref().map(|p| p.path.display().to_string()),
            )
            .finish_non_exhaustive()
    }
}

/// Why a configuration was refused. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a `source`: the cause is part of the one line, said once.
    #[error("{}: cannot read: {error}{}", path.display(), if error.kind() == std::io::ErrorKind::NotFound {
        " (name another with --config FILE or the LINKGATE_CONFIG variable)"
    } else {
        ""
    })]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: {key}: {message}", path.display())]
    Key {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("{}: host \"{host}\": {message}", path.display())]
    Host {
        path: PathBuf,
        host: String,
        message: String,
    },
}

impl Config {
    /// `[upstream]`: the default for hosts that do not name their own.
    pub fn default_upstream(&self) -> &Upstream {
        &self.upstreams[0]
    }

    /// Reads, parses and validates the file at `path`, loading every
    /// certificate and key it names. Blocking: call it at start-up or from a
    /// blocking task.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates `text` as if read from `path` (relative file
    /// names are resolved against `path`'s folder).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let key_err = |key: &'static str, message: String| ConfigError::Key {
            path: path.to_path_buf(),
            key,
            message,
        };

        let listen = build_listen(&raw.listen).map_err(|(key, m)| key_err(key, m))?;

        let default_upstream = raw.upstream.clone();
        let upstream = build_upstream(raw.upstream, base).map_err(|(key, m)| key_err(key, m))?;
        let mut upstreams = vec![upstream];
        let admin = raw
            .admin
            .listen
            .as_deref()
            .map(parse_addr)
            .transpose()
            .map_err(|m| key_err("admin.listen", m))?;
        let limits = build_limits(raw.limits).map_err(|(key, m)| key_err(key, m))?;
        let shutdown = build_shutdown(raw.shutdown).map_err(|(key, m)| key_err(key, m))?;
        let log = build_log(raw.log).map_err(|(key, m)| key_err(key, m))?;
        let acme = raw
            .acme
            .map(|a| build_acme(a, base, &listen))
            .transpose()
            .map_err(|(key, m)| key_err(key, m))?;

        let error_page = raw
            .error_page
            .map(|file| ErrorPage::load(&base.join(file)))
            .transpose()
            .map_err(|m| key_err("error_page", m))?
            .map(Arc::new);

        if raw.hosts.is_empty() {
            return Err(key_err(
                "host",
                "no [[host]] configured: add one per link branding".into(),
            ));
        }
        let mut seen = HashMap::new();
        let mut loaded = LoadedPairs::new();
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        let certs_dir = raw.certs_dir.as_deref();
        let resolved: Vec<HostEntry> = raw
            .hosts
            .into_iter()
            .map(|h| HostEntry::resolve(h, base, certs_dir))
            .collect();
        let certs_dir = certs_dir.map(|d| base.join(d));
        for entry in &resolved {
            let host_err = |message: String| ConfigError::Host {
                path: path.to_path_buf(),
                host: entry.name.clone(),
                message,
            };
            let mut host = load_host(entry, &mut loaded)
                .map_err(|m| host_err(hosts::explain_key_mismatch(m, entry, &resolved)))?;
            if host.error_page.is_none() {
                host.error_page.clone_from(&error_page);
            }
            let own = build_upstream(entry.upstream_settings(&default_upstream), base)
                .map_err(|(key, m)| host_err(format!("{}: {m}", key.trim_start_matches("upstream."))))?;
            host.upstream = match upstreams.iter().position(|u| *u == own) {
                Some(i) => i,
                None => {
                    upstreams.push(own);
                    upstreams.len() - 1
                }
            };
            if host.is_acme() && acme.is_none() {
                return Err(host_err(
                    "acme = true needs an [acme] section (directory, storage): see README, \"Automatic certificates\""
                        .into(),
                ));
            }
            if let Some(first) = seen.get(&host.name) {
                return Err(host_err(format!(
                    "duplicate host: it is also [[host]] #{first}; each name may appear once (remove one)"
                )));
            }
            seen.insert(host.name.clone(), hosts.len() + 1);
            hosts.push(host);
        }

        Ok(Self {
            path: path.to_path_buf(),
            listen,
            upstreams,
            hosts,
            admin,
            limits,
            shutdown,
            log,
            acme,
            certs_dir,
            error_page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::from_toml(text, Path::new("/etc/linkgate/linkgate.toml")) {
            Ok(_) => "<accepted>".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_unknown_key_names_the_table_it_landed_in() {
        // proxy_protocol uncommented below the last [[host]] (the template's
        // trap before its options moved into their own tables).
        let e = err("[listen]\nhttps = \"127.0.0.1:0\"\n[[host]]\nname = \"a.test\"\nacme = true\n[[host]]\nname = \"b.test\"\nacme = true\nproxy_protocol = true\n");
        assert!(e.starts_with("/etc/linkgate/linkgate.toml:9: "), "{e}");
        assert!(
            e.contains("in [[host]] #2 (b.test): unknown field `proxy_protocol`"),
            "{e}"
        );
        let e = err("[listen]\nhttps = \"127.0.0.1:0\"\n[admin] # the admin listener\nlisten = \"127.0.0.1:1\"\nidle_timeout = \"1s\"\n");
        assert!(e.contains("in [admin]: unknown field `idle_timeout`"), "{e}");
        // A top-level key written below a table: where it belongs.
        let e =
            err("[listen]\nhttps = \"127.0.0.1:0\"\n[[host]]\nname = \"a.test\"\nacme = true\ncerts_dir = \"certs\"\n");
        assert!(
            e.contains("`certs_dir` is a top-level key: put it above the first [table]"),
            "{e}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key_and_a_duration_its_form() {
        let e = err("[listen]\nhttps = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay = 15\n[[host]]\nname = \"a.test\"\nacme = true\n");
        assert!(
            e.starts_with("/etc/linkgate/linkgate.toml:4: drain_delay: invalid type: integer `15`"),
            "{e}"
        );
        assert!(e.contains("a duration is a string with its unit, e.g. \"15s\""), "{e}");
        let e = err(
            "[listen]\nhttps = \"127.0.0.1:0\"\nproxy_protocol = \"yes\"\n[[host]]\nname = \"a.test\"\nacme = true\n",
        );
        assert!(e.contains(":3: proxy_protocol: invalid type: string"), "{e}");
        assert!(!e.contains("duration"), "{e}");
    }

    /// Every option the template shows commented out parses where it
    /// stands once uncommented (with its table header and the options
    /// before it, when the table is commented too): none lands in another
    /// table.
    #[test]
    fn every_commented_option_in_the_template_belongs_to_its_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/linkgate.toml");
        let template = std::fs::read_to_string(&path).expect("template");
        let lines: Vec<&str> = template.lines().collect();
        let is_header = |l: &str| l.trim_start_matches("# ").starts_with('[');
        let is_option = |l: &str| {
            l.strip_prefix("# ")
                .and_then(|rest| rest.split_once(" = "))
                .is_some_and(|(key, _)| !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        };
        let mut tried = 0;
        for (i, line) in lines.iter().enumerate() {
            if !is_option(line) {
                continue;
            }
            let header = lines[..i].iter().rposition(|l| is_header(l));
            let mut text: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
            text[i] = line[2..].to_string();
            if let Some(h) = header.filter(|&h| lines[h].starts_with("# ")) {
                // A commented table: its header and its options up to this one.
                text[h] = lines[h][2..].to_string();
                for j in h + 1..i {
                    if is_option(lines[j]) {
                        text[j] = lines[j][2..].to_string();
                    }
                }
            }
            if let Err(e) = parse_raw(&text.join("\n"), &path) {
                panic!("line {}: {line:?} uncommented: {e}", i + 1);
            }
            tried += 1;
        }
        assert!(tried > 20, "only {tried} commented options found");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("[listen]\nhttps = \"127.0.0.1:0\"\nhtps = \"x\"\n");
        assert!(e.starts_with("/etc/linkgate/linkgate.toml:3: "), "{e}");
        assert!(e.contains("htps"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn acme_settings_and_hosts_are_checked_with_the_key_or_host_named() {
        let listen = "[listen]\nhttps = \"127.0.0.1:1\"\n";
        let acme = "[acme]\ndirectory = \"https://acme.test/dir\"\nstorage = \"acme\"\n";
        let host = "[[host]]\nname = \"a.test\"\nacme = true\n";
        let cases = [
            (
                format!("{listen}{host}"),
                "host \"a.test\": acme = true needs an [acme] section",
            ),
            (
                format!("{listen}{acme}[[host]]\nname = \"a.test\"\nacme = true\ncert = \"c\"\nkey = \"k\"\n"),
                "host \"a.test\": acme = true replaces cert and key",
            ),
            (
                format!("{listen}{acme}[[host]]\nname = \"a.test\"\nacme = true\nocsp = \"o.der\"\n"),
                "host \"a.test\": ocsp: applies to hosts with cert and key",
            ),
            (
                format!("{listen}{acme}[[host]]\nname = \"a.test\"\n"),
                "host \"a.test\": cert: missing",
            ),
            (
                format!("{listen}[acme]\nstorage = \"acme\"\n{host}"),
                "acme.directory: missing",
            ),
            (
                format!("{listen}[acme]\ndirectory = \"http://acme.test/dir\"\nstorage = \"s\"\n{host}"),
                "acme.directory: \"http://acme.test/dir\": must be an https:// URL",
            ),
            (
                format!("{listen}[acme]\ndirectory = \"https://acme.test/dir\"\n{host}"),
                "acme.storage: missing",
            ),
            (
                format!("{listen}{acme}challenge = \"dns-01\"\n{host}"),
                "acme.challenge: \"dns-01\"",
            ),
            (
                format!("{listen}{acme}challenge = \"http-01\"\n{host}"),
                "acme.challenge: http-01 is answered on the plain-http listener",
            ),
            (
                format!("{listen}{acme}email = \"ops\"\n{host}"),
                "acme.email: \"ops\" is not an email address",
            ),
            (
                format!("{listen}{acme}renew_before = \"soon\"\n{host}"),
                "acme.renew_before",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "want {want:?}, got {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let ok = Config::from_toml(
            &format!("{listen}{acme}email = \"ops@example.com\"\nrenew_before = \"20d\"\n{host}"),
            Path::new("/etc/linkgate/linkgate.toml"),
        )
        .expect("valid");
        let acme = ok.acme.expect("[acme]");
        assert_eq!(
            acme.storage,
            Path::new("/etc/linkgate/acme"),
            "relative to the config file"
        );
        assert_eq!(acme.contact.as_deref(), Some("mailto:ops@example.com"));
        assert_eq!(acme.challenge, Challenge::TlsAlpn01);
        assert_eq!(acme.renew_before, Duration::from_secs(20 * 86400));
        assert!(ok.hosts[0].is_acme());
    }

    #[test]
    fn missing_listen_is_an_error() {
        let e = err("[[host]]\nname = \"a.test\"\ncert = \"c\"\nkey = \"k\"\n");
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn bad_addresses_and_urls_name_the_key() {
        let e = err("[listen]\nhttps = \"443\"\n");
        assert!(e.contains("listen.https"), "{e}");
        let e = err("[listen]\nhttps = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:1\"\n");
        assert!(e.contains("listen.http:"), "{e}");
        for url in [
            "ftp://x",
            "sendgrid.net",
            "https://sendgrid.net/path",
            "https://u@sendgrid.net",
        ] {
            let e = err(&format!(
                "[listen]\nhttps = \"127.0.0.1:1\"\n[upstream]\nurl = \"{url}\"\n"
            ));
            assert!(e.contains("upstream.url"), "{url}: {e}");
        }
        let e = err("[listen]\nhttps = \"127.0.0.1:1\"\n[upstream]\nresponse_timeout = \"fast\"\n");
        assert!(e.contains("upstream.response_timeout"), "{e}");
    }

    #[test]
    fn no_hosts_is_an_error() {
        let e = err("[listen]\nhttps = \"127.0.0.1:1\"\n");
        assert!(e.contains("no [[host]]"), "{e}");
    }

    #[test]
    fn invalid_host_name_is_named() {
        let e =
            err("[listen]\nhttps = \"127.0.0.1:1\"\n[[host]]\nname = \"*.example.com\"\ncert = \"c\"\nkey = \"k\"\n");
        assert!(e.contains("host \"*.example.com\""), "{e}");
    }
}

#[cfg(test)]
mod operations_tests {
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("/etc/linkgate/linkgate.toml")).map_err(|e| e.to_string())
    }

    const BASE: &str = "[listen]\nhttps = \"127.0.0.1:1\"\n";

    #[test]
    fn operational_sections_are_validated() {
        for (extra, key) in [
            ("[limits]\nhandshake_timeout = \"soon\"\n", "limits.handshake_timeout"),
            ("[limits]\nmax_header_bytes = \"1KB\"\n", "limits.max_header_bytes"),
            ("[limits]\nmax_request_body = \"lots\"\n", "limits.max_request_body"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nmax_handshakes = 0\n", "limits.max_handshakes"),
            (
                "[limits]\nmax_connections = 50\nmax_handshakes = 51\n",
                "limits.max_handshakes",
            ),
            (
                "[limits]\nhandshakes_per_address = 0\n",
                "limits.handshakes_per_address",
            ),
            (
                "[limits]\nmax_handshakes = 8\nhandshakes_per_address = 9\n",
                "limits.handshakes_per_address",
            ),
            ("[shutdown]\ngrace_period = \"0s\"\n", "shutdown.grace_period"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
            ("[listen]\n", ""),
        ] {
            let text = if extra.starts_with("[listen]") {
                "[listen]\nhttps = \"127.0.0.1:1\"\nproxy_protocol = true\n".to_string()
            } else {
                format!("{BASE}{extra}")
            };
            let e = load(&text).expect_err("must be refused");
            let key = if key.is_empty() { "listen.trusted_proxies" } else { key };
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = load("[listen]\nhttps = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/99\"]\n").expect_err("bad cidr");
        assert!(e.contains("listen.trusted_proxies"), "{e}");
    }

    #[test]
    fn handshake_budgets_default_to_fractions_of_max_connections() {
        let budgets = |limits: &str| {
            let raw: RawLimits = toml::from_str(limits).expect("toml");
            let l = build_limits(raw).expect("valid");
            (l.max_handshakes, l.handshakes_per_address)
        };
        assert_eq!(budgets(""), (5_000, 256), "the defaults");
        assert_eq!(budgets("max_connections = 50\n"), (12, 3));
        assert_eq!(budgets("max_connections = 2\n"), (1, 1));
        assert_eq!(budgets("max_handshakes = 100\n"), (100, 25));
        assert_eq!(
            budgets("max_connections = 10\nmax_handshakes = 10\nhandshakes_per_address = 10\n"),
            (10, 10)
        );
        assert_eq!(Limits::default(), build_limits(RawLimits::default()).expect("valid"));
    }
}
