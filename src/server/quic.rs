//! The HTTP/3 listener: one QUIC endpoint on the UDP socket of
//! `listen.http3`, on a thread and single-threaded runtime of its own (the
//! TCP workers are untouched by it), with its own per-generation proxy and
//! upstream pool under the process's shared caps.
//!
//! What each QUIC connection is held to, from the existing limits: a slot
//! of `limits.max_connections` (shared with TCP; refused at once when none
//! is free), the handshake budget and the per-address caps (a QUIC peer
//! address is the client's: there is no PROXY protocol for UDP),
//! `handshake_timeout`, `idle_timeout` (QUIC's own idle timeout too) and 128
//! concurrent request streams, as HTTP/2. Address validation: quinn's
//! anti-amplification limit always applies, and once half the handshake
//! budget is in use a client whose address is not validated yet is sent a
//! Retry first. Connection migration is on. 0-RTT is off (`tls::quic_server_config`).
//!
//! Drain: the endpoint stops accepting and every connection gets GOAWAY at
//! the moment the TCP listeners close; in-flight requests get the grace
//! period; the endpoint (the UDP socket) closes last.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};
use tokio::task::JoinSet;

use super::accept::admit_client;
use super::{http3, ProxyCache, Shared};
use crate::config::Limits;
use crate::reload::Live;

/// Concurrent request streams per connection, as HTTP/2's `max_concurrent_streams`.
const MAX_REQUEST_STREAMS: u32 = 128;

/// Client-initiated unidirectional streams open at once per connection:
/// HTTP/3 needs three (control, QPACK encoder and decoder); room for a few
/// more that a client may open (reserved types, GREASE), each stopped as
/// soon as its type is read and its slot given back when the client resets
/// it (`quic_streams/uni.rs`).
const MAX_UNI_STREAMS: u32 = 8;

/// Request bytes a client may have sent that linkgate has not read yet,
/// per connection: HTTP/2's connection window (hyper's, 1 MiB). quinn's
/// default is unbounded, and its 1.25 MB per stream times 128 streams let
/// one client park 160 MB in a connection whose streams wait for an
/// upstream slot.
const RECEIVE_WINDOW: u32 = 1024 * 1024;

/// The same per request stream. Smaller than HTTP/2's (1 MiB): an HTTP/3
/// DATA frame has no 16 KiB size cap, a stream's first chunk is read whole
/// before it waits for an upstream slot, and 128 streams at this window
/// hold 8 MiB at most. Request bodies here are clicks and unsubscribe
/// POSTs, far smaller.
const STREAM_RECEIVE_WINDOW: u32 = 64 * 1024;

/// The longest interval between keep-alive PINGs (HTTP/2's).
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// HTTP/3's error code for a close that is no error (RFC 9114 §8.1).
const H3_NO_ERROR: u32 = 0x100;

/// The endpoint's QUIC and TLS settings, built before any thread starts so
/// that a configuration quinn refuses stops linkgate at start-up.
pub(super) fn server_config(live: &Arc<Live>, limits: &Limits) -> anyhow::Result<quinn::ServerConfig> {
    let tls = QuicServerConfig::try_from(live.quic_tls()?)
        .map_err(|e| anyhow::anyhow!("listen.http3: cannot set up QUIC's TLS: {e}"))?;
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(IdleTimeout::try_from(limits.idle_timeout).map_err(|e| {
            anyhow::anyhow!("limits.idle_timeout: too long for QUIC's idle timeout: {e}")
        })?))
        // PINGs while the peer answers them, as HTTP/2's keep-alive: a
        // request waiting on a slow upstream is not cut by QUIC's idle
        // timeout, which is left to catch peers that vanished. An idle
        // connection is closed by `idle_timeout` counted over requests
        // (`http3::connection`), as on TCP.
        .keep_alive_interval(Some((limits.idle_timeout / 2).min(KEEP_ALIVE)))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_REQUEST_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(tls));
    config.transport_config(Arc::new(transport)).migration(true);
    Ok(config)
}

/// Serves HTTP/3 on `socket` until the server drains (see the module doc).
pub(super) async fn serve(shared: Arc<Shared>, socket: std::net::UdpSocket, config: quinn::ServerConfig) {
    let endpoint = match Endpoint::new(EndpointConfig::default(), Some(config), socket, Arc::new(TokioRuntime)) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the HTTP/3 socket");
            return;
        }
    };
    let proxies = Arc::new(ProxyCache::new(
        shared.live.clone(),
        shared.upstream.clone(),
        shared.alt_svc.clone(),
    ));
    let mut stopping = shared.stopping.clone();
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let incoming = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let metrics = &shared.live.metrics;
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            metrics.refused("max_connections");
            incoming.refuse();
            continue;
        };
        let Some(current) = proxies.current() else {
            incoming.refuse();
            continue;
        };
        let limits = &current.active.config.limits;
        let loaded = shared.handshakes.in_progress() >= (limits.max_handshakes as usize).div_ceil(2);
        if loaded && !incoming.remote_address_validated() && incoming.may_retry() {
            // The client must prove it receives at its address before any handshake work.
            let _ = incoming.retry();
            continue;
        }
        let peer = incoming.remote_address();
        let admitted = match admit_client(&shared, &current.active.config, peer) {
            Ok(a) => a,
            Err(refusal) => {
                metrics.refused(refusal.reason());
                tracing::debug!(peer = %peer, reason = refusal.reason(), "QUIC connection refused before its handshake");
                incoming.refuse();
                continue;
            }
        };
        let (shared, proxies) = (shared.clone(), proxies.clone());
        tasks.spawn(async move {
            let metrics = &shared.live.metrics;
            metrics.open_connections.inc();
            http3::connection(&shared, current, proxies, incoming, admitted).await;
            metrics.open_connections.dec();
            drop(permit);
        });
    }
    // No new connections (refused at once, CONNECTION_REFUSED: an endpoint
    // without a server configuration would leave them to time out); those
    // open got GOAWAY from their own task.
    let grace = shared.live.load().config.shutdown.grace_period;
    let deadline = tokio::time::Instant::now() + grace;
    let drained = async {
        loop {
            tokio::select! {
                done = tasks.join_next() => if done.is_none() { break },
                Some(incoming) = endpoint.accept() => incoming.refuse(),
            }
        }
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        tracing::warn!("grace period over, closing remaining HTTP/3 connections");
        shared.live.grace_over.store(true, std::sync::atomic::Ordering::SeqCst);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Last: the UDP socket, once every connection's close has been sent
    // (bounded, should a peer never acknowledge it).
    endpoint.close(VarInt::from_u32(H3_NO_ERROR), b"shutting down");
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let _ = tokio::time::timeout(left.max(Duration::from_millis(100)), endpoint.wait_idle()).await;
}

/// The HTTP/3 thread's runtime (built before any thread starts, like the workers').
pub(super) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}
