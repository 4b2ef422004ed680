//! linkgate: a TLS-terminating reverse proxy for email link-branding hosts.
//!
//! Email providers rewrite tracked links and open pixels through a branded
//! host (`url1234.example.com`, a CNAME to the provider). linkgate takes that
//! traffic, presents the branded host's certificate, and forwards each
//! request to the provider with the Host header set to the branded name.
//!
//! The request path, in order, with the file for each phase:
//! 1. [`server`] (`server/mod.rs`): binding, one worker per core, drain.
//! 2. `server/accept.rs`: a connection accepted; its slot in the handshake
//!    budget ([`admission`]); the PROXY header ([`server::proxy_protocol`],
//!    `server/proxy_protocol.rs`); plain HTTP or TLS.
//! 3. `server/handshake.rs`: the ClientHello; **where SNI is chosen** (an
//!    unknown or missing one is refused before any certificate is sent,
//!    [`tls`]'s `SniResolver`, `tls/mod.rs`); TLS-ALPN-01 answers; then
//!    [`tls::stream`] (`tls/stream.rs`).
//! 4. `server/http.rs`: HTTP/1.1 (parked between requests) or HTTP/2, with
//!    what is known about the connection ([`connection`]) and its I/O
//!    wrappers (`server/io.rs`).
//! 5. [`proxy`]: the authority check, local answers ([`files`], ACME
//!    HTTP-01, redirects) and the forward (`proxy/mod.rs`); what is refused
//!    before forwarding and **where Host is set** (`proxy/request.rs`,
//!    `rewrite_request_headers`); **where an error becomes a status**
//!    (`proxy/error.rs`, `ProxyError::status`). Every short answer of linkgate's own (errors,
//!    local answers, the admin endpoints) is built by `response.rs`; what a
//!    browser sees when the upstream fails (the HTML page, `error_page`) by
//!    [`error_page`] (`error_page/accept.rs`: what the Accept header asks for).
//! 6. [`upstream`] (`upstream/mod.rs`): the client to the provider, its one
//!    retry; `upstream/pool.rs` (idle connections), `upstream/body.rs` (the
//!    bodies of one exchange), `upstream/connect.rs` (dial, upstream TLS).
//! 7. [`access`]: the response body as it is sent; the access log line.
//!
//! Beside the path:
//! - [`config`]: the TOML file's shape and its validation into [`config::Config`]; [`host`]: host names.
//! - [`reload`]: the live configuration, SIGHUP and file-watch reloads (`reload/watch.rs`: the file watcher).
//! - [`acme`]: certificates over ACME: `acme/storage.rs` (shared storage, locks), `acme/challenge.rs`
//!   (answers on the request path), `acme/task.rs` (one supervised task per host), `acme/client.rs` (the CA, bounded).
//! - [`admin`]: /healthz, /readyz, /metrics; [`metrics`]: the Prometheus metrics.
//! - [`check`]: `linkgate check`, the offline report; [`doctor`]: `linkgate doctor`, probes from outside
//!   (`doctor/dns.rs`, `doctor/fetch.rs`, `doctor/verdict.rs`, `doctor/report.rs`, `doctor/summary.rs`).
//! - [`provider`]: the provider presets (SendGrid, Amazon SES, …), as data.
//! - [`account`]: every branding on the provider's account, from its API (`account/sendgrid/`; the bounded
//!   HTTPS client in `account/https.rs`), for `doctor`'s account audit and `linkgate import` ([`import`]).
//! - [`text`]: outside text made safe to print and log; `error`: errors as one line with every cause;
//!   `hash`: the stable hash for storage names and ETags.
//! - `fuzzing`: entry points for the fuzz targets in `fuzz/` (hidden).
//!
//! Tests start the real server in-process: load a [`config::Config`], bind
//! [`server::Listeners`] on `127.0.0.1:0`, wrap the config in a
//! [`reload::Live`], and call [`server::run`] with a shutdown future.

pub mod access;
pub mod account;
pub mod acme;
pub mod admin;
pub mod admission;
pub mod check;
pub mod config;
pub mod connection;
pub mod doctor;
pub(crate) mod error;
pub mod error_page;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod hash;
pub mod host;
pub mod import;
pub mod inbound;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod reload;
pub(crate) mod response;
pub mod server;
pub mod text;
pub mod tls;
pub mod upstream;
