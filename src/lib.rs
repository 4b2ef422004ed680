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
//! - [`server`]: listeners, handshakes, per-connection tasks, graceful shutdown.
//! - [`proxy`]: authority check, header rewrite, streaming forward, error → status.
//! - [`upstream`]: the pooled client to the provider, upstream TLS.
//!
//! Tests start the real server in-process: load a [`config::Config`], bind
//! [`server::Listeners`] on `127.0.0.1:0`, and call [`server::run`] with a
//! shutdown future.

pub mod config;
pub mod host;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;
