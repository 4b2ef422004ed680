//! One accepted connection up to HTTP: its slot in the handshake budget
//! (QUIC connections take theirs here too),
//! the PROXY header when the listener expects one, then plain HTTP or the
//! TLS handshake and the protocol ALPN chose.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::either::Either;

use super::proxy_protocol;
use crate::admission::{ClientSlot, Handshake, Refusal};
use crate::config::Config;
use crate::connection::ConnInfo;
use crate::proxy::Proxy;
use crate::tls::stream::TlsStream;

use super::handshake::tls_handshake;
use super::http::{serve, Established, Protocol};
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

/// A connection through its PROXY header and TLS handshake, ready for HTTP:
/// what [`Ready::serve`] needs and nothing of how it got here (the
/// connection's task then holds only this while it is open).
pub(super) enum Ready {
    Tls(Established<Box<TlsStream>>),
    /// Plain http (redirects, HTTP-01 answers).
    Plain(Established<TcpStream>),
}

impl Ready {
    /// Serves HTTP on the connection until it closes.
    pub(super) fn serve(self) -> impl Future<Output = ()> {
        match self {
            Ready::Tls(conn) => Either::Left(serve(conn)),
            // Boxed: a plain TCP stream's serving state is larger than a
            // boxed TLS stream's, and plain http is the rare case: every
            // connection's task would otherwise be sized for it.
            Ready::Plain(conn) => Either::Right(Box::pin(serve(conn))),
        }
    }
}

/// One accepted connection up to HTTP: the PROXY header when the listener
/// expects one, then the TLS handshake. `None` when the connection was
/// refused or closed on the way. Its handshake slot is given back once the
/// TLS handshake is over (on plain http, once its first request head has
/// been read).
///
/// The caller boxes this future and awaits it before [`Established::serve`]:
/// none of its state is then part of an open connection's.
pub(super) async fn establish(
    shared: Arc<Shared>,
    proxy: Arc<Proxy>,
    proxies: Arc<ProxyCache>,
    mut stream: TcpStream,
    peer: SocketAddr,
    is_tls: bool,
    admitted: Admitted,
) -> Option<Ready> {
    let Admitted {
        handshake,
        client: mut client_slot,
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
            return None;
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
                    Ok(slot) => client_slot = Some(slot),
                    Err(refusal) => {
                        shared.live.metrics.refused(refusal.reason());
                        tracing::debug!(client = %client, reason = refusal.reason(), "connection refused before its handshake");
                        return None;
                    }
                }
            }
            Ok(Ok(None)) => {}
            // Closed before a byte came: a TCP health check, a scanner.
            Ok(Err(proxy_protocol::ProxyHeaderError::Io(e))) => {
                tracing::debug!(peer = %peer, error = %e, "connection closed before its PROXY header");
                return None;
            }
            Ok(Err(e)) => {
                shared.live.metrics.refused("proxy_header");
                if let Some(unlogged) = shared.proxy_refusals.due() {
                    tracing::warn!(peer = %peer, error = %e, unlogged_since_last = unlogged, "connection dropped: listen.proxy_protocol is on and the connection did not start with a PROXY header (does the balancer send one?)");
                }
                return None;
            }
            Err(_) => {
                shared.live.metrics.refused("proxy_header");
                tracing::debug!(peer = %peer, "connection dropped: no PROXY header in time");
                return None;
            }
        }
    }
    let keep_forwarded = trusted && !listen.proxy_protocol;
    let stopping = shared.stopping.clone();
    if !is_tls {
        let info = Arc::new(ConnInfo::new(client, None, keep_forwarded, None));
        return Some(Ready::Plain(Established {
            proxy,
            proxies,
            io: stream,
            info,
            protocol: Protocol::Http1,
            stopping,
            pending: Some(Arc::new(handshake)),
            slot: client_slot,
        }));
    }
    let established = tls_handshake(&proxy.active, &shared.live, stream, client, deadline).await;
    // Over, whatever the outcome: its slots are free for others.
    drop(handshake);
    let (tls, host) = established?;
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
    let mut info = ConnInfo::new(client, Some(host), keep_forwarded, version).with_tls_resumed(tls.resumed());
    if protocol == Protocol::Http2 {
        info = info.with_upstream_slots(limits.upstream_per_connection);
    }
    Some(Ready::Tls(Established {
        proxy,
        proxies,
        io: tls,
        info: Arc::new(info),
        protocol,
        stopping,
        pending: None,
        slot: client_slot,
    }))
}
