//! The configuration file exactly as written: serde shapes that mirror the
//! TOML, with every unknown key refused. [`super::Config::from_toml`] turns
//! them into checked values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// A folder with one subfolder per host (named after it) holding its
    /// certificate and key: for `[[host]]`s that give neither (nor `acme`).
    pub certs_dir: Option<PathBuf>,
    /// The HTML page a browser gets when the upstream fails, for every
    /// host that names none of its own.
    pub error_page: Option<PathBuf>,
    pub listen: RawListen,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default, rename = "host")]
    pub hosts: Vec<RawHost>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub log: RawLog,
    pub acme: Option<RawAcme>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: Option<String>,
    pub email: Option<String>,
    pub storage: Option<PathBuf>,
    pub challenge: Option<String>,
    pub renew_before: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: String,
    pub http: Option<String>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// HTTP/3 (QUIC) on this UDP address.
    pub http3: Option<String>,
    /// The port `Alt-Svc` advertises for HTTP/3 (default: the bound one).
    pub http3_advertise_port: Option<u16>,
    /// With `proxy_protocol`: the operator confirms the balancer passes UDP
    /// through with client addresses preserved.
    #[serde(default)]
    pub http3_balancer_preserves_client_address: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub provider: Option<String>,
    pub region: Option<String>,
    pub url: Option<String>,
    pub connect_to: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub name: String,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Obtain the certificate over ACME instead of reading `cert`/`key`.
    #[serde(default)]
    pub acme: bool,
    pub hsts: Option<String>,
    pub ocsp: Option<PathBuf>,
    /// This host's own upstream, when it is not `[upstream]`'s.
    pub provider: Option<String>,
    pub region: Option<String>,
    pub url: Option<String>,
    pub connect_to: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// URL path → local file served instead of forwarding (app-association files).
    #[serde(default)]
    pub files: BTreeMap<String, PathBuf>,
    /// `forward` or `redirect`: what the plain-http listener does for this host.
    pub http: Option<String>,
    /// This host's page for a browser when the upstream fails (else the top-level one).
    pub error_page: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u32>,
    pub max_handshakes: Option<u32>,
    pub handshakes_per_address: Option<u32>,
    pub connections_per_address: Option<u32>,
    pub max_header_bytes: Option<SizeValue>,
    pub max_request_body: Option<SizeValue>,
    pub upstream_per_connection: Option<u32>,
    pub max_upstream_connections: Option<u32>,
}

/// A size written as a number of bytes or as text with a unit (`"1MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_delay: Option<String>,
    pub grace_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub access: Option<bool>,
    pub query: Option<bool>,
}
