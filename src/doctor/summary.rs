//! `linkgate doctor`'s last line: how many link brandings pass, of which
//! providers, and what to ask each provider next; or which hosts fail which
//! check and what to do.

use super::report::{display, HostReport, ProviderCount};
use crate::provider;

/// The providers of `hosts`, counted, in the order they first appear.
pub(super) fn providers(hosts: &[HostReport]) -> Vec<ProviderCount> {
    let mut out: Vec<ProviderCount> = Vec::new();
    for h in hosts {
        let name = h.preset.map(|p| p.name);
        if let Some(seen) = out.iter_mut().find(|c| c.provider == name) {
            seen.hosts += 1;
            continue;
        }
        out.push(ProviderCount {
            provider: name,
            display: display(h.preset),
            hosts: 1,
            https_switch: h.preset.map(|p| p.https_switch).filter(|s| !s.is_empty()),
            https_source: h.preset.map(|p| p.https_source),
        });
    }
    out
}

/// What the account audit found, for the last line.
#[derive(Debug, Clone, Copy)]
pub(super) enum Audit {
    /// No API key: not run.
    NotRun,
    /// Every branding on the account is ready.
    Ready,
    /// Some branding is not.
    NotReady,
    /// The account could not be read (why, in a few words): whether every
    /// branding is ready is not known.
    Unreadable(&'static str),
}

/// The summary line for `hosts`, of whom `failing` fail a check; `audit`
/// is what the account audit found.
pub(super) fn summary(
    hosts: &[HostReport],
    failing: &[&HostReport],
    providers: &[ProviderCount],
    audit: Audit,
) -> String {
    let counts = providers
        .iter()
        .map(|c| format!("{} ×{}", c.display, c.hosts))
        .collect::<Vec<_>>()
        .join(", ");
    let sendgrid = providers.iter().any(|c| c.provider == Some(provider::DEFAULT));
    if failing.is_empty() {
        let next: Vec<String> = providers
            .iter()
            .map(|c| next_step(c, !matches!(audit, Audit::NotRun)))
            .collect();
        let mut line = if let Audit::Unreadable(why) = audit {
            format!(
                "all {} link brandings ({counts}) pass both checks, but the SendGrid account could not be read \
                 ({why}; the account: line above says more), so whether every branding on it is ready is not \
                 known: do not ask SendGrid Support yet; fix that and run doctor again; keep the CNAMEs pointing \
                 at the proxy.",
                hosts.len()
            )
        } else if matches!(audit, Audit::NotReady) {
            format!(
                "all {} link brandings ({counts}) pass both checks, but not every branding on the SendGrid account \
                 is ready (the account: line above says which and what to do): do not ask SendGrid Support yet; \
                 keep the CNAMEs pointing at the proxy.",
                hosts.len()
            )
        } else {
            format!(
                "all {} link brandings ({counts}) pass both checks — {}; keep the CNAMEs pointing at the proxy.",
                hosts.len(),
                next.join("; ")
            )
        };
        if sendgrid {
            line.push_str(
                " Do not re-validate the SendGrid link brandings in the SendGrid UI: that validation expects the \
                 CNAME to point at sendgrid.net, fails now that it points at the proxy, and breaks the branding.",
            );
        }
        return line;
    }
    let mixed = providers.len() > 1;
    let list: Vec<String> = failing
        .iter()
        .map(|h| {
            let mut what = Vec::new();
            for (check, o) in [
                ("DNS", Some(&h.dns)),
                ("HTTPS", Some(&h.https)),
                ("HTTP", h.http.as_ref()),
                ("HTTP/3", h.http3.as_ref()),
            ] {
                if let Some(o) = o.filter(|o| o.status == "fail") {
                    what.push(format!("{check}: {}", o.fix.as_deref().unwrap_or(&o.message)));
                }
            }
            let provider = if mixed {
                format!(" [{}]", display(h.preset))
            } else {
                String::new()
            };
            format!("{}{provider} ({})", h.name, what.join("; "))
        })
        .collect();
    let mut line = format!(
        "{} of {} link brandings ({counts}) fail: {}.",
        failing.len(),
        hosts.len(),
        list.join(" | ")
    );
    if sendgrid {
        line.push_str(" SendGrid enables SSL tracking only when every branding of the account passes.");
    }
    line
}

/// What to do at one provider once its brandings pass; `audited`: the
/// account audit ran (and found every branding ready). SendGrid switches
/// every branding of a user at once, so without the audit the next step is
/// the audit (README, step 7), not SendGrid Support.
fn next_step(c: &ProviderCount, audited: bool) -> String {
    match (c.provider, c.https_switch) {
        (Some(provider::DEFAULT), Some(_)) if !audited => format!(
            "{display}: run the account audit next (step 7: set {env} or give --api-key-file): {display} switches \
             a user to https only when every branding of that user passes, also any missing from this config; \
             go to {display} Support only once it says every branding is ready",
            display = c.display,
            env = crate::account::SENDGRID_API_KEY_ENV,
        ),
        (Some(_), Some(switch)) => format!("{}: {switch}", c.display),
        // The README's Providers table says the same: "no documented switch for a proxy".
        (Some(_), None) => format!(
            "{display}: no documented switch to https tracking links for a proxy (README, \"Providers\"): ask \
             {display} how to serve them over https through your own proxy{source}",
            display = c.display,
            source = c
                .https_source
                .map(|s| format!(" (its https page: {s})"))
                .unwrap_or_default(),
        ),
        (None, _) => "url upstream: switch its tracking links to https where they are made".to_owned(),
    }
}
