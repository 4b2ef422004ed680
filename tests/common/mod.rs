//! Test helpers, one job a file:
//! - [`pki`]: the test certificate authority and its leaves;
//! - [`standin`]: the well-behaved stand-in upstream that records requests;
//! - [`origin`]: the raw-bytes upstream that misbehaves on command;
//! - [`ca`]: the stand-in ACME CA that misbehaves on command;
//! - [`linkgate`]: linkgate in-process, its configuration text, and the
//!   [`Setup`] builder for the usual fixture chain;
//! - [`process`]: linkgate as a child process, and the JSON it prints;
//! - [`doctor`]: a DNS server for `example.test`, and `linkgate doctor` run against it;
//! - [`provider_api`]: a stand-in for SendGrid's branded-links API, recording requests;
//! - [`clients`]: clients that trust the test CA, raw HTTP/1, metrics;
//! - [`quic`]: an HTTP/3 client (quinn and h3) that trusts the test CA, and raw HTTP/3 (frames, QPACK heads);
//! - [`kustomize`]: the Kubernetes manifests rendered, and what every overlay must satisfy.
//!
//! Everything in `pki`, `standin`, `linkgate` and `clients` is re-exported
//! here, so tests name it `common::X`; those modules are private because a
//! public `common::linkgate` would shadow the `linkgate` crate in tests
//! that `use common::*`.
#![allow(dead_code)]

pub mod ca;
mod clients;
pub mod doctor;
pub mod kustomize;
mod linkgate;
pub mod origin;
mod pki;
pub mod process;
pub mod provider_api;
pub mod quic;
mod standin;

#[allow(unused_imports)]
pub use {clients::*, linkgate::*, pki::*, standin::*};

use std::time::Duration;

/// A generous bound for things that should happen at once; only guards against hangs.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// A loopback port free a moment ago, for servers that cannot be told to
/// bind port 0 and report it (HAProxy, Pebble, and linkgate when another
/// server must know its port before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until `check` holds, failing the test after [`HANG_GUARD`].
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
