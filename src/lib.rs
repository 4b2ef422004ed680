//! linkgate: a TLS-terminating reverse proxy for email link-branding hosts.
//!
//! Email providers rewrite tracked links and open pixels through a branded
//! host (`url1234.example.com`, a CNAME to the provider). linkgate takes that
//! traffic, presents the branded host's certificate, and forwards each
//! request to the provider with the Host header set to the branded name.
//!
//! Layout, one job per module:
//! - [`config`]: the TOML file's shape and its validation into [`config::Config`].
//! - [`host`]: host-name normalisation shared by config, SNI and Host checks.
//! - [`tls`]: PEM loading, certificate/key/host checks, the SNI resolver.
//! - [`tls_stream`]: the server side of a client's TLS connection, with buffers held only while in use.
//! - [`check`]: `linkgate check`, the offline report on a config file.
//! - [`doctor`]: `linkgate doctor`, DNS and HTTPS probes from the outside.
//! - [`reload`]: the live configuration, SIGHUP and file-watch reloads.
//! - [`server`]: listeners, PROXY headers, handshakes, connections, limits, drain.
//! - [`admission`]: the handshake budget and per-address cap; paced retries of failed accepts.
//! - [`proxy_protocol`]: reading PROXY v1/v2 headers.
//! - [`connection`]: what is known about a client connection, requests in flight.
//! - [`proxy`]: authority check, header rewrite, streaming forward, error → status.
//! - [`access`]: the response body wrapper: bytes sent, end of request, access log line.
//! - [`upstream`]: the pooled client to the provider, upstream TLS.
//! - [`provider`]: the provider presets (SendGrid, Amazon SES, …), as data.
//! - [`files`]: app-association files a host serves itself.
//! - [`acme`]: certificates obtained and renewed over ACME: `acme/storage.rs` (shared storage, locks), `acme/challenge.rs` (answers on the request path), `acme/task.rs` (one supervised task per host), `acme/client.rs` (the CA, bounded).
//! - [`admin`]: /healthz, /readyz, /metrics.
//! - [`metrics`]: the Prometheus metrics.
//! - [`text`]: outside text made safe to print and log.
//! - `error`: errors as one line with every cause; `hash`: the stable hash for storage names and ETags.
//! - `fuzzing`: entry points for the fuzz targets in `fuzz/` (hidden).
//!
//! Tests start the real server in-process: load a [`config::Config`], bind
//! [`server::Listeners`] on `127.0.0.1:0`, wrap the config in a
//! [`reload::Live`], and call [`server::run`] with a shutdown future.

pub mod access;
pub mod acme;
pub mod admin;
pub mod admission;
pub mod check;
pub mod config;
pub mod connection;
pub mod doctor;
pub(crate) mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod hash;
pub mod host;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod text;
pub mod tls;
pub mod tls_stream;
pub mod upstream;
