//! The DNS check: the host's CNAME chain must have left the provider (and
//! reach `--expect-target` when given) and resolve to an address.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;

use super::{normalise, Options, Outcome};
use crate::provider::Preset;

/// The fix when a CNAME still leads to the provider: the README's step (in
/// "Enabling SSL click tracking with linkgate, step by step") that points it,
/// by its number and heading; `tests/doctor_providers.rs` checks both against the README.
const POINT_THE_CNAME: &str = "step 5 not done: point each CNAME at linkgate (your load balancer's name)";

pub(super) fn resolver(server: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    let builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.build()?)
}

/// The CNAME chain of `host`, its addresses, and the verdict on them.
pub(super) async fn dns(
    host: &str,
    resolver: &TokioResolver,
    opts: &Options,
    preset: Option<&'static Preset>,
) -> (Vec<String>, Vec<IpAddr>, Outcome) {
    let mut chain = Vec::new();
    let mut current = normalise(host);
    for _ in 0..8 {
        let answer = match resolver.lookup(format!("{current}."), RecordType::CNAME).await {
            Ok(answer) => answer,
            Err(e) if e.is_nx_domain() && chain.is_empty() => {
                return (
                    chain,
                    Vec::new(),
                    Outcome::fail(
                        format!("{host} does not exist in DNS (NXDOMAIN)"),
                        "create the link branding's CNAME record, pointing at the proxy",
                    ),
                )
            }
            Err(_) => break,
        };
        let next = answer.answers().iter().find_map(|r| match &r.data {
            RData::CNAME(target) if normalise(&r.name.to_string()) == current => Some(normalise(&target.0.to_string())),
            _ => None,
        });
        match next {
            Some(next) if !chain.contains(&next) => {
                chain.push(next.clone());
                current = next;
            }
            _ => break,
        }
    }
    let addresses: Vec<IpAddr> = match resolver.lookup_ip(format!("{}.", normalise(host))).await {
        Ok(ips) => ips.iter().collect(),
        Err(_) => Vec::new(),
    };
    let shown = if chain.is_empty() {
        "no CNAME".to_owned()
    } else {
        format!("CNAME {}", chain.join(" → "))
    };
    let provider_targets = preset.map(Preset::cname_suffixes).unwrap_or_default();
    let still_provider = chain.iter().find(|n| {
        provider_targets
            .iter()
            .any(|t| *n == t || n.ends_with(&format!(".{t}")))
    });
    let outcome = if let Some(target) = still_provider {
        Outcome::fail(
            format!(
                "{shown}: still points at {} ({target})",
                preset.map_or("the provider", |p| p.display)
            ),
            POINT_THE_CNAME,
        )
    } else if let Some(target) = opts
        .probe
        .expect_target
        .as_deref()
        .map(normalise)
        .filter(|t| !chain.contains(t))
    {
        Outcome::fail(
            format!("{shown}: does not lead to {target}"),
            "point the CNAME at the expected target",
        )
    } else if addresses.is_empty() {
        Outcome::fail(
            format!("{shown}: the name does not resolve to any address"),
            "fix the CNAME's target or add A/AAAA records",
        )
    } else if chain.is_empty() {
        Outcome::pass(format!(
            "no CNAME; A/AAAA {} (an A record works for {} only if it reaches linkgate)",
            join(&addresses),
            preset.map_or("the provider", |p| p.display)
        ))
    } else {
        Outcome::pass(format!("{shown}; addresses {}", join(&addresses)))
    };
    (chain, addresses, outcome)
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
