//! Configuration: the TOML file as written ([`RawConfig`]) and the checked
//! [`Config`] built from it by [`Config::load`].
//!
//! `Config::load` does every check that can be done before binding a socket:
//! parsing, addresses, the upstream URL, reading and matching every
//! certificate and key, and certificate/host coverage. Any failure is a
//! [`ConfigError`] whose `Display` is one line naming the file and the key or
//! host at fault.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

use crate::host::HostName;
use crate::tls;

/// Where to read the config when neither `--config` nor `$LINKGATE_CONFIG` says.
pub const DEFAULT_PATH: &str = "config/linkgate.toml";
/// The upstream used when `[upstream] url` is not set.
pub const DEFAULT_UPSTREAM: &str = "https://sendgrid.net";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: RawListen,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default, rename = "host")]
    hosts: Vec<RawHost>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    https: String,
    http: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_to: Option<String>,
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

/// A validated configuration. Every value in it has been checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub listen: Listen,
    pub upstream: Upstream,
    /// One entry per `[[host]]`, in file order, names unique.
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
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
}

#[derive(Clone)]
pub struct Host {
    pub name: HostName,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The loaded chain and key, shared between hosts that name the same files.
    pub certified_key: Arc<CertifiedKey>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Why a configuration was refused. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
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
    /// Reads, parses and validates the file at `path`, loading every
    /// certificate and key it names. Blocking: call it at start-up or from a
    /// blocking task.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates `text` as if read from `path` (relative file
    /// names are resolved against `path`'s folder).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map(|span| line_of(text, span.start)),
            message: e.message().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let key_err = |key: &'static str, message: String| ConfigError::Key {
            path: path.to_path_buf(),
            key,
            message,
        };

        let listen = Listen {
            https: parse_addr(&raw.listen.https).map_err(|m| key_err("listen.https", m))?,
            http: raw
                .listen
                .http
                .as_deref()
                .map(parse_addr)
                .transpose()
                .map_err(|m| key_err("listen.http", m))?,
        };
        if listen.http == Some(listen.https) && listen.https.port() != 0 {
            return Err(key_err("listen.http", "must differ from listen.https".into()));
        }

        let upstream = build_upstream(raw.upstream, base).map_err(|(key, m)| key_err(key, m))?;

        if raw.hosts.is_empty() {
            return Err(key_err(
                "host",
                "no [[host]] configured: add one per link branding".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut loaded: BTreeMap<(PathBuf, PathBuf), Arc<CertifiedKey>> = BTreeMap::new();
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        for raw_host in raw.hosts {
            let host_err = |message: String| ConfigError::Host {
                path: path.to_path_buf(),
                host: raw_host.name.clone(),
                message,
            };
            let name = HostName::parse(&raw_host.name).map_err(|e| host_err(e.to_string()))?;
            if !seen.insert(name.clone()) {
                return Err(host_err("duplicate host: each name may appear once".into()));
            }
            let cert_path = base.join(&raw_host.cert);
            let key_path = base.join(&raw_host.key);
            let certified_key = match loaded.get(&(cert_path.clone(), key_path.clone())) {
                Some(ck) => ck.clone(),
                None => {
                    let ck = Arc::new(tls::load_certified_key(&cert_path, &key_path).map_err(host_err)?);
                    loaded.insert((cert_path.clone(), key_path.clone()), ck.clone());
                    ck
                }
            };
            tls::check_covers(&certified_key, &name).map_err(|m| host_err(format!("{}: {m}", cert_path.display())))?;
            hosts.push(Host {
                name,
                cert_path,
                key_path,
                certified_key,
            });
        }

        Ok(Self {
            path: path.to_path_buf(),
            listen,
            upstream,
            hosts,
        })
    }
}

fn build_upstream(raw: RawUpstream, base: &Path) -> Result<Upstream, (&'static str, String)> {
    let url = raw.url.as_deref().unwrap_or(DEFAULT_UPSTREAM);
    let uri: http::Uri = url.parse().map_err(|e| ("upstream.url", format!("{url:?}: {e}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(("upstream.url", format!("{url:?}: must start with http:// or https://"))),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or(("upstream.url", format!("{url:?}: no host")))?;
    if authority.as_str().contains('@') {
        return Err(("upstream.url", format!("{url:?}: user information is not allowed")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err((
            "upstream.url",
            format!("{url:?}: give only scheme, host and port: the request path is forwarded as it came"),
        ));
    }
    let connect_to = raw
        .connect_to
        .as_deref()
        .map(parse_addr)
        .transpose()
        .map_err(|m| ("upstream.connect_to", m))?;
    let ca_certs = match raw.ca_file {
        Some(file) => {
            let file = base.join(file);
            if scheme == Scheme::HTTP {
                return Err(("upstream.ca_file", "only applies to an https upstream url".into()));
            }
            Some(tls::load_certs(&file).map_err(|m| ("upstream.ca_file", m))?)
        }
        None => None,
    };
    let duration = |key: &'static str, value: Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(v) => parse_duration(&v).map_err(|m| (key, m)),
    };
    Ok(Upstream {
        scheme,
        authority,
        connect_to,
        ca_certs,
        connect_timeout: duration("upstream.connect_timeout", raw.connect_timeout, Duration::from_secs(5))?,
        response_timeout: duration(
            "upstream.response_timeout",
            raw.response_timeout,
            Duration::from_secs(30),
        )?,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:443\" or \"[::]:443\""))
}

/// Parses durations written as a number and a unit: `250ms`, `10s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. \"500ms\", \"10s\", \"5m\""))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit, use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
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
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("[listen]\nhttps = \"127.0.0.1:0\"\nhtps = \"x\"\n");
        assert!(e.starts_with("/etc/linkgate/linkgate.toml:3: "), "{e}");
        assert!(e.contains("htps"), "{e}");
        assert!(!e.contains('\n'), "{e}");
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
