//! The TLS handshake: the ClientHello read first, so that an unknown or
//! missing SNI is refused (`unrecognized_name`) before any certificate is
//! sent, and a TLS-ALPN-01 validation is answered with its challenge
//! certificate and closed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::host::HostName;
use crate::metrics::ChallengeLabels;
use crate::reload::{Active, Live};
use crate::tls::stream::{Hello, TlsStream};
use crate::{acme, tls};
/// Runs the TLS handshake. A ClientHello without SNI or naming a host we do
/// not serve gets an `unrecognized_name` alert and the connection is closed.
pub(super) async fn tls_handshake(
    active: &Active,
    live: &Live,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<(Box<TlsStream>, HostName)> {
    let metrics = &live.metrics;
    let hello = match timeout_at(deadline, Hello::read(stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed before ClientHello");
            return None;
        }
        Err(_) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, "TLS handshake timed out");
            return None;
        }
    };
    let sni = hello.server_name().map(str::to_owned);
    if hello.offers_alpn(acme::ACME_TLS_ALPN) {
        // Boxed: a rare path must not grow every connection's task (its
        // state would otherwise be part of the future of each connection).
        Box::pin(answer_alpn01(active, live, hello, sni, peer, deadline)).await;
        return None;
    }
    let Some(host) = sni.as_deref().and_then(|sni| active.sni.host_for(sni).cloned()) else {
        let result = match sni.as_deref() {
            None => "no_sni",
            Some(name) if active.sni.acme_host(name).is_some() => "no_certificate",
            Some(_) => "unknown_sni",
        };
        metrics.handshake(result);
        tracing::debug!(client = %peer, sni = sni.as_deref().unwrap_or("<none>"), result, "TLS handshake refused: unknown or missing SNI, or no certificate yet");
        refuse(hello.into_io()).await;
        return None;
    };
    match timeout_at(deadline, hello.handshake(active.tls.clone())).await {
        Ok(Ok(tls)) => {
            metrics.handshake("ok");
            if tls.resumed() {
                metrics.handshakes_resumed.inc();
            }
            // Boxed: the TLS state is large (see bench/README.md for the measured sizes)
            // and would be moved into every future that serves the connection.
            Some((Box::new(tls), host))
        }
        Ok(Err(e)) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, sni = %host, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, sni = %host, "TLS handshake timed out");
            None
        }
    }
}

/// A TLS-ALPN-01 validation (ClientHello offering `acme-tls/1`): answered
/// with the challenge certificate when one is pending in storage for this
/// configured ACME host, then closed; refused like an unknown host otherwise.
async fn answer_alpn01(
    active: &Active,
    live: &Live,
    hello: Hello,
    sni: Option<String>,
    peer: SocketAddr,
    deadline: Instant,
) {
    let host = sni.as_deref().and_then(|s| active.sni.acme_host(s)).cloned();
    let config = match (&host, &active.config.acme) {
        (Some(host), Some(acme)) => acme::alpn01_config(acme, host).await,
        _ => None,
    };
    let (Some(host), Some(config)) = (host, config) else {
        live.metrics.handshake("unknown_sni");
        tracing::debug!(client = %peer, sni = sni.as_deref().unwrap_or("<none>"), "acme-tls/1 handshake refused: no challenge pending for this name");
        refuse(hello.into_io()).await;
        return;
    };
    match timeout_at(deadline, hello.handshake(config)).await {
        Ok(Ok(mut tls)) => {
            live.metrics.handshake("acme_challenge");
            live.metrics
                .acme_challenges
                .get_or_create(&ChallengeLabels {
                    host: host.to_string(),
                    challenge: "tls-alpn-01",
                })
                .inc();
            tracing::info!(client = %peer, host = %host, "ACME: answered a tls-alpn-01 challenge");
            let _ = timeout_at(deadline, tls.shutdown()).await;
        }
        _ => {
            live.metrics.handshake("error");
            tracing::debug!(client = %peer, host = %host, "acme-tls/1 handshake failed");
        }
    }
}

async fn refuse(mut io: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.shutdown().await;
    })
    .await;
}
