//! The HTTP/3 check of `linkgate doctor`, when the config has
//! `listen.http3`: one GET of the tracked URL over QUIC (quinn and h3, TLS
//! 1.3, ALPN `h3`, the same roots as the https probe), judged like the https
//! answer, and held against what the https probe saw: the same leaf
//! certificate, and an `Alt-Svc` header naming the port HTTP/3 is
//! advertised on (without it no browser ever tries HTTP/3).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::CertificateDer;

use super::fetch::{Answer, BODY_KEPT, BODY_READ_AT_MOST};
use super::verdict::classify;
use super::Outcome;
use crate::provider::Preset;

/// What the https probe saw that the HTTP/3 check is held against.
#[derive(Debug, Default)]
pub(super) struct OverTcp {
    /// The leaf certificate presented over TCP.
    pub(super) leaf: Option<CertificateDer<'static>>,
    /// The `Alt-Svc` header of the https answer (`None`: there was none).
    pub(super) alt_svc: Option<String>,
}

/// The QUIC client configuration: `tls`'s roots, TLS 1.3 only (QUIC has no
/// other), ALPN `h3`, no 0-RTT.
pub(super) fn client(roots: rustls::RootCertStore) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.enable_early_data = false;
    Ok(quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?)))
}

/// Where the HTTP/3 probe goes and what it is held against.
pub(super) struct Probe<'a> {
    pub(super) host: &'a str,
    pub(super) addr: SocketAddr,
    /// The port HTTP/3 is advertised on (`listen.http3_advertise_port`, else the bound port).
    pub(super) advertised: u16,
    pub(super) path: &'a str,
    pub(super) preset: Option<&'static Preset>,
    pub(super) limit: Duration,
}

/// The HTTP/3 outcome of one host: the GET over QUIC, then the certificate
/// and `Alt-Svc` compared with `tcp` (what the https probe saw; `None` when it got no answer).
pub(super) async fn check(probe: &Probe<'_>, config: &quinn::ClientConfig, tcp: Option<&OverTcp>) -> Outcome {
    let Head {
        _endpoint,
        connection,
        stream,
        status,
        leaf,
    } = match tokio::time::timeout(probe.limit, head(probe, config)).await {
        Ok(Ok(got)) => got,
        Ok(Err(failed)) => return failed,
        Err(_) => return unreachable(probe, &format!("no HTTP/3 answer within {:?}", probe.limit)),
    };
    let answer = read_body(stream, status, probe.limit).await;
    connection.close(0u32.into(), b"done");
    let outcome = classify(answer, "http3", probe.preset, probe.path);
    if !outcome.passed() {
        return outcome;
    }
    let Some(tcp) = tcp else {
        return outcome;
    };
    if tcp.leaf.as_ref().is_some_and(|l| Some(l) != leaf.as_ref()) {
        return Outcome::fail(
            format!("{}, but with another certificate than over https", outcome.message),
            "HTTP/3 and https must be the same linkgate (or present the same certificate): check which server \
             answers UDP on this port",
        );
    }
    alt_svc(outcome, tcp.alt_svc.as_deref(), probe.advertised)
}

/// The verdict on the https answer's `Alt-Svc` header, given the HTTP/3
/// answer that passed. Only the ports it names are shown, never its text
/// (nothing a target sends reaches the terminal but numbers).
fn alt_svc(passed: Outcome, header: Option<&str>, advertised: u16) -> Outcome {
    let Some(value) = header else {
        return Outcome::fail(
            format!(
                "{}, but the https answer has no Alt-Svc header, so no browser will try HTTP/3",
                passed.message
            ),
            "check that what answers https is linkgate with listen.http3 set, and that nothing in front of it \
             drops the Alt-Svc header",
        );
    };
    let ports = h3_ports(value);
    if ports.contains(&advertised) {
        return Outcome::pass(format!(
            "{}; https advertises it (Alt-Svc h3=\":{advertised}\")",
            passed.message
        ));
    }
    let named = match ports.as_slice() {
        [] => "no HTTP/3 (h3) port".to_owned(),
        ports => format!(
            "HTTP/3 on port {}",
            ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    Outcome::fail(
        format!(
            "{}, but the https answer's Alt-Svc names {named}, not {advertised}",
            passed.message
        ),
        "set listen.http3_advertise_port to the UDP port clients reach HTTP/3 on (the balancer's public port)",
    )
}

/// The ports of the `h3=":PORT"` alternatives (same host) in an `Alt-Svc` value (RFC 7838 §3).
fn h3_ports(value: &str) -> Vec<u16> {
    value
        .split(',')
        .filter_map(|alt| alt.trim().strip_prefix("h3=\":"))
        .filter_map(|rest| rest.split('"').next())
        .filter_map(|port| port.parse().ok())
        .collect()
}

/// A failure to reach HTTP/3 on UDP at all.
fn unreachable(probe: &Probe<'_>, why: &str) -> Outcome {
    Outcome::fail(
        format!("{why} (UDP {})", probe.addr),
        "check that linkgate listens there (listen.http3) and that firewalls and the load balancer pass UDP to \
         it on the same port as https; browsers fall back to TCP meanwhile, but the HTTP/3 advertised is not served",
    )
}

type Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// An HTTP/3 answer up to its head; its body is still to be read.
struct Head {
    /// Kept while the connection is in use.
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    stream: Stream,
    status: u16,
    /// The leaf certificate presented in the QUIC handshake.
    leaf: Option<CertificateDer<'static>>,
}

/// Handshake (SNI = host, verified), then `GET path` up to the response head.
async fn head(probe: &Probe<'_>, config: &quinn::ClientConfig) -> Result<Head, Outcome> {
    let local: SocketAddr = match probe.addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = quinn::Endpoint::client(local)
        .map_err(|e| Outcome::fail(format!("cannot open a UDP socket: {e}"), "check the local network"))?;
    let connecting = endpoint
        .connect_with(config.clone(), probe.addr, probe.host)
        .map_err(|e| {
            Outcome::fail(
                format!("cannot start a QUIC connection: {e}"),
                "fix the host name or address",
            )
        })?;
    let connection = connecting.await.map_err(|e| handshake_failure(probe, &e))?;
    let leaf = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let failed = |e: &dyn std::fmt::Display| {
        Outcome::fail(
            // h3's errors may carry a close reason from the peer: escaped.
            format!("the HTTP/3 request failed: {}", crate::text::printable(&e.to_string())),
            "check that linkgate answers HTTP/3 on this address (its log says why)",
        )
    };
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(async move {
        let _ = driver.wait_idle().await;
    });
    let req = http::Request::get(format!("https://{}{}", probe.host, probe.path))
        .header(
            http::header::USER_AGENT,
            concat!("linkgate-doctor/", env!("CARGO_PKG_VERSION")),
        )
        .body(())
        .map_err(|e| failed(&e))?;
    let mut stream = send.send_request(req).await.map_err(|e| failed(&e))?;
    stream.finish().await.map_err(|e| failed(&e))?;
    let status = stream.recv_response().await.map_err(|e| failed(&e))?.status().as_u16();
    Ok(Head {
        _endpoint: endpoint,
        connection,
        stream,
        status,
        leaf,
    })
}

/// Whether a QUIC error code is a TLS alert (the CRYPTO_ERROR range, RFC 9000 §20.1).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// A QUIC handshake that did not complete, in plain words.
fn handshake_failure(probe: &Probe<'_>, e: &quinn::ConnectionError) -> Outcome {
    use quinn::ConnectionError as E;
    match e {
        E::TimedOut => unreachable(probe, "no QUIC answer"),
        E::TransportError(t) if is_tls_alert(t.code) => Outcome::fail(
            // rustls's words may quote names from the presented certificate: escaped.
            format!(
                "Your connection is not private over HTTP/3: {}",
                crate::text::printable(&t.to_string())
            ),
            "HTTP/3 must present the same valid certificate as https: check the certificate for this host",
        ),
        E::ConnectionClosed(c) if is_tls_alert(c.error_code) => Outcome::fail(
            format!(
                "the server refused the QUIC handshake for {}: {}",
                probe.host, c.error_code
            ),
            "add this host as a [[host]] in linkgate's config",
        ),
        other => Outcome::fail(
            format!(
                "the QUIC handshake with UDP {} failed: {}",
                probe.addr,
                without_reason(other)
            ),
            "check that the address is linkgate's listen.http3",
        ),
    }
}

/// A connection error without the reason text a peer may have put in its
/// close frame (never printed: it is the target's text).
fn without_reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => format!("closed by the server: {}", c.error_code),
        quinn::ConnectionError::ApplicationClosed(a) => format!("closed by the server with code {}", a.error_code),
        other => other.to_string(),
    }
}

/// Reads the body on `stream` within `limit` (its own bound, after the
/// head's) and keeps its start, as over TCP.
async fn read_body(mut stream: Stream, status: u16, limit: Duration) -> Answer {
    let mut kept = Vec::new();
    let mut received = 0usize;
    let read = async {
        loop {
            match stream.recv_data().await {
                Ok(None) => return None,
                Ok(Some(mut chunk)) => {
                    let data = chunk.copy_to_bytes(chunk.remaining());
                    received += data.len();
                    let room = BODY_KEPT - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if received > BODY_READ_AT_MOST {
                        return Some(format!("the body did not end after {} MiB", BODY_READ_AT_MOST >> 20));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    return Some(format!(
                        "the body broke off after {received} bytes: {}",
                        crate::text::printable(&e)
                    ));
                }
            }
        }
    };
    let unfinished = tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Some(format!(
            "the body did not end within {limit:?} ({received} bytes arrived)"
        ))
    });
    Answer {
        status,
        body: String::from_utf8_lossy(&kept).into_owned(),
        unfinished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed() -> Outcome {
        Outcome::pass("http3 answered 200".to_owned())
    }

    #[test]
    fn alt_svc_must_name_the_advertised_port() {
        let ok = alt_svc(passed(), Some("h3=\":443\"; ma=86400"), 443);
        assert!(ok.passed(), "{ok:?}");
        let among = alt_svc(passed(), Some("h2=\":443\", h3=\":8443\"; ma=60"), 8443);
        assert!(among.passed(), "{among:?}");
        let wrong = alt_svc(passed(), Some("h3=\":4433\"; ma=86400"), 443);
        assert_eq!(wrong.status, "fail");
        assert!(
            wrong.message.ends_with("Alt-Svc names HTTP/3 on port 4433, not 443"),
            "{wrong:?}"
        );
        assert!(wrong.fix.is_some_and(|f| f.contains("http3_advertise_port")));
        let prefix = alt_svc(passed(), Some("h3=\":4430\""), 443);
        assert_eq!(prefix.status, "fail", "port 443 is not a prefix match of 4430");
        // Another host's alternative, and HTTP/2: no h3 port here; the text itself is never shown.
        let other = alt_svc(passed(), Some("h3=\"evil\x1b[2J.example:443\", h2=\":443\""), 443);
        assert!(
            other.message.ends_with("Alt-Svc names no HTTP/3 (h3) port, not 443"),
            "{other:?}"
        );
        let none = alt_svc(passed(), None, 443);
        assert_eq!(none.status, "fail");
        assert!(none.message.contains("no Alt-Svc header"), "{none:?}");
    }
}
