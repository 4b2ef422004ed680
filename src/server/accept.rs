//! One accepted connection up to HTTP: its slot in the handshake budget
//! (QUIC connections take theirs here too),
//! the PROXY header when the listener expects one, then plain HTTP or the
//! TLS handshake and the protocol ALPN chose.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::proxy_protocol;
use crate::admission::{ClientSlot, Handshake, Refusal};
use crate::config::Config;
use crate::connection::ConnInfo;
use crate::proxy::Proxy;

use super::handshake::tls_handshake;
use super::http::{serve, Protocol};
use super::{ProxyCache, Shared};

/// A slot in the handshake budget for a connection just accepted from
/// `peer`, counted against its address too when that is the client's (no
/// PROXY protocol; not a trusted proxy relaying many clients). Taken in the
/// accept loop, without a pause between the two, so that connections about
/// to be refused for their address never hold the budget meanwhile.
/// Its slot among the client address's open connections is taken too.
pub(super) fn admit(shared: &Shared, config: &Config, peer: SocketAddr) -> Result<Admitted, Refusal> {
    let handshake = shared.handshakes.begin(config.limits.max_handshakes)?;
    if config.listen.proxy_protocol || config.listen.is_trusted(peer.ip()) {
        return Ok(Admitted {
            handshake,
            client: None,
        });
    }
    claim_address(shared, config, peer, handshake)
}

/// As [`admit`], for a peer whose address is always the client's (QUIC:
/// there is no PROXY protocol for UDP), unless it is a trusted proxy.
pub(super) fn admit_client(shared: &Shared, config: &Config, peer: SocketAddr) -> Result<Admitted, Refusal> {
    let handshake = shared.handshakes.begin(config.limits.max_handshakes)?;
    if config.listen.is_trusted(peer.ip()) {
        return Ok(Admitted {
            handshake,
            client: None,
        });
    }
    claim_address(shared, config, peer, handshake)
}

fn claim_address(
    shared: &Shared,
    config: &Config,
    peer: SocketAddr,
    handshake: Handshake,
) -> Result<Admitted, Refusal> {
    handshake.claim_address(peer.ip(), config.limits.handshakes_per_address)?;
    let client = Some(shared.clients.claim(peer.ip(), config.limits.connections_per_address)?);
    Ok(Admitted { handshake, client })
}

/// What an accepted connection holds: its handshake slot (given back once
/// the handshake is over) and its slot among its address's connections
/// (held until it closes; taken after the PROXY header when there is one).
pub(super) struct Admitted {
    handshake: Handshake,
    client: Option<ClientSlot>,
}

impl Admitted {
    /// The handshake slot (to give back once it is over) and the address slot.
    pub(super) fn into_parts(self) -> (Handshake, Option<ClientSlot>) {
        (self.handshake, self.client)
    }
}

/// One client connection, from accept to close. Its handshake slot is given
/// back once the TLS handshake is over (on plain http, once its first
/// request head has been read); its address slot when it closes.
pub(super) async fn connection(
    shared: &Shared,
    proxy: Arc<Proxy>,
    proxies: Arc<ProxyCache>,
    mut stream: TcpStream,
    peer: SocketAddr,
    is_tls: bool,
    admitted: Admitted,
) {
    let Admitted {
        handshake,
        client: mut _client,
    } = admitted;
    let _ = stream.set_nodelay(true);
    let listen = &proxy.active.config.listen;
    let limits = &proxy.active.config.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    let trusted = listen.is_trusted(peer.ip());
    let mut client = peer;
    if listen.proxy_protocol {
        if !trusted {
            shared.live.metrics.refused("untrusted_proxy");
            if let Some(unlogged) = shared.proxy_refusals.due() {
                tracing::warn!(peer = %peer, unlogged_since_last = unlogged, "connection refused: listen.proxy_protocol is on and this peer is not in listen.trusted_proxies (name the balancer's addresses there, e.g. the VPC's CIDR)");
            }
            return;
        }
        match timeout_at(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(Some(addr))) => {
                client = addr;
                // Now the client's address is known: its handshakes are
                // counted together (never the balancer's own, which a
                // v2 LOCAL health check keeps).
                let claimed = handshake
                    .claim_address(addr.ip(), limits.handshakes_per_address)
                    .and_then(|()| shared.clients.claim(addr.ip(), limits.connections_per_address));
                match claimed {
                    Ok(slot) => _client = Some(slot),
                    Err(refusal) => {
                        shared.live.metrics.refused(refusal.reason());
                        tracing::debug!(client = %client, reason = refusal.reason(), "connection refused before its handshake");
                        return;
                    }
                }
            }
            Ok(Ok(None)) => {}
            // Closed before a byte came: a TCP health check, a scanner.
            Ok(Err(proxy_protocol::ProxyHeaderError::Io(e))) => {
                tracing::debug!(peer = %peer, error = %e, "connection closed before its PROXY header");
                return;
            }
            Ok(Err(e)) => {
                shared.live.metrics.refused("proxy_header");
                if let Some(unlogged) = shared.proxy_refusals.due() {
                    tracing::warn!(peer = %peer, error = %e, unlogged_since_last = unlogged, "connection dropped: listen.proxy_protocol is on and the connection did not start with a PROXY header (does the balancer send one?)");
                }
                return;
            }
            Err(_) => {
                shared.live.metrics.refused("proxy_header");
                tracing::debug!(peer = %peer, "connection dropped: no PROXY header in time");
                return;
            }
        }
    }
    let keep_forwarded = trusted && !listen.proxy_protocol;
    let stopping = shared.stopping.clone();
    if !is_tls {
        let info = ConnInfo::new(client, None, keep_forwarded, None);
        let pending = Some(Arc::new(handshake));
        serve(proxy, proxies, stream, info, Protocol::Http1, stopping, pending).await;
        return;
    }
    // Built in a block, so that the TLS stream moved into it is not also
    // kept in this function's own state while it is served (a future holds
    // every local live across an await: here a second copy of the stream).
    let serving = {
        let established = Box::pin(tls_handshake(&proxy.active, &shared.live, stream, client, deadline)).await;
        // Over, whatever the outcome: its slots are free for others (and it is
        // not kept in the state of a connection that may stay open for long).
        drop(handshake);
        let Some((tls, host)) = established else {
            return;
        };
        let protocol = if tls.alpn_protocol() == Some(b"h2") {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
            Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
            _ => None,
        };
        let info = ConnInfo::new(client, Some(host), keep_forwarded, version).with_tls_resumed(tls.resumed());
        serve(proxy, proxies, tls, info, protocol, stopping, None)
    };
    serving.await;
}
