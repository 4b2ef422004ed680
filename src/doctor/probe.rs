//! One host's probes, in order: DNS, https, plain http (when the config
//! has a listener for it) and HTTP/3 (when it has `listen.http3`, held
//! against what the https answer showed), each bounded by `--timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;

use super::dns::dns;
use super::fetch::{https, plain, read_body, Head, PeerLeaf};
use super::verdict::classify;
use super::{http3, normalise, HostReport, Options, Outcome};
use crate::provider::Preset;

/// Every probe of `host`, with `tls` for https and `quic` for HTTP/3 (when it is on).
pub(super) async fn probe_host(
    host: &str,
    resolver: &TokioResolver,
    (tls, quic): (&Arc<rustls::ClientConfig>, Option<&quinn::ClientConfig>),
    opts: &Options,
) -> HostReport {
    let preset = opts.providers.get(&normalise(host)).copied();
    let path = opts
        .probe
        .url
        .clone()
        .unwrap_or_else(|| preset.map_or("/", |p| p.probe_path).to_owned());
    let (chain, addresses, dns) =
        match tokio::time::timeout(opts.probe.timeout, dns(host, resolver, opts, preset)).await {
            Ok(r) => r,
            Err(_) => (
                Vec::new(),
                Vec::new(),
                Outcome::fail(
                    format!("DNS gave no answer within {:?}", opts.probe.timeout),
                    "check the name servers of the zone",
                ),
            ),
        };
    let https_target = opts
        .probe
        .connect
        .or_else(|| addresses.first().map(|ip| SocketAddr::new(*ip, 443)));
    let (https, over_tcp) = match https_target {
        None => (
            Outcome::skipped("no address to connect to (give --connect to probe anyway)"),
            None,
        ),
        Some(addr) => {
            answered(
                opts.probe.timeout,
                ("https", &path),
                preset,
                https(host, addr, tls, &path),
            )
            .await
        }
    };
    let http = opts.has_http.then(|| {
        opts.probe
            .connect_http
            .or_else(|| addresses.first().map(|ip| SocketAddr::new(*ip, 80)))
    });
    let http = match http {
        None => None,
        Some(None) => Some(Outcome::skipped(
            "no address to connect to (give --connect-http to probe anyway)",
        )),
        Some(Some(addr)) => Some(
            answered(opts.probe.timeout, ("http", &path), preset, plain(host, addr, &path))
                .await
                .0,
        ),
    };
    let http3 = match (opts.http3_port, quic) {
        (Some(advertised), Some(quic)) => {
            let target = opts
                .probe
                .connect_http3
                .or_else(|| addresses.first().map(|ip| SocketAddr::new(*ip, advertised)));
            Some(match target {
                None => Outcome::skipped("no address to connect to (give --connect-http3 to probe anyway)"),
                Some(addr) => {
                    let probe = http3::Probe {
                        host,
                        addr,
                        advertised,
                        path: &path,
                        preset,
                        limit: opts.probe.timeout,
                    };
                    http3::check(&probe, quic, over_tcp.as_ref()).await
                }
            })
        }
        _ => None,
    };
    HostReport {
        name: host.to_owned(),
        provider: preset.map(|p| p.name),
        probe_path: path,
        preset,
        cname_chain: chain,
        addresses: addresses.iter().map(ToString::to_string).collect(),
        dns,
        https,
        http,
        http3,
        acme: opts.acme.get(&normalise(host)).cloned(),
    }
}

/// Runs `probe` (a GET of `path`) up to the response head (connect, TLS, request) within
/// `limit`, then reads the body within `limit` again, on its own: an answer
/// whose body never ends is still reported with its status. Also what the
/// answer showed that the HTTP/3 check needs (its certificate and `Alt-Svc`), when there was one.
async fn answered(
    limit: Duration,
    (scheme, path): (&str, &str),
    preset: Option<&'static Preset>,
    probe: impl std::future::Future<Output = Result<Head, Outcome>>,
) -> (Outcome, Option<http3::OverTcp>) {
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(head)) => {
            let seen = http3::OverTcp {
                leaf: head.extensions().get::<PeerLeaf>().map(|l| l.0.clone()),
                alt_svc: head
                    .headers()
                    .get(http::header::ALT_SVC)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            };
            (classify(read_body(head, limit).await, scheme, preset, path), Some(seen))
        }
        Ok(Err(failed)) => (failed, None),
        Err(_) => (
            Outcome::fail(
                format!("no answer within {limit:?}"),
                "check that linkgate runs and that the address and port are reachable",
            ),
            None,
        ),
    }
}
