//! `linkgate doctor`'s account audit: every branding on the SendGrid
//! account (from [`crate::account`]) held against the configuration. A
//! branding linkgate does not serve (or cannot: its name is not a host
//! name), serves towards another provider or region, or that SendGrid
//! marks invalid stops SendGrid's switch to https
//! tracking, which covers every branding of a user at once. For each one:
//! what is wrong and what to do, which DNS record moves to linkgate and
//! which stays, and which one is the default.

use serde::Serialize;

use crate::account::{AccountError, Branding, Brandings, Listed};
use crate::import::host_entry;
use crate::provider::Preset;
use crate::text::printable;

/// The config's view of every host: its provider and that provider's region.
pub type Served = crate::config::HostUpstreams;

/// The README's step (number and heading) a branding missing from the config
/// skipped; `tests/doctor_providers.rs` checks it against the README.
const LIST_THE_HOSTS: &str = "step 1 not done: list your branded hosts";

/// SendGrid's own word on re-validating a branding behind a proxy.
const REVALIDATE_SOURCE: &str =
    "https://www.twilio.com/docs/sendgrid/ui/account-and-settings/custom-ssl-configurations";

#[derive(Debug, Serialize)]
pub struct AccountReport {
    /// The provider's preset name (`sendgrid`).
    pub provider: &'static str,
    /// Every branding was listed, is served by linkgate towards it, and is valid there.
    pub ok: bool,
    /// Each listing made: whose, through which API base, how many pages and brandings.
    pub listed: Vec<Listed>,
    pub brandings: Vec<BrandingReport>,
    /// Why the account could not be read (then `brandings` is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// That reason in a few words, for doctor's last line.
    #[serde(skip)]
    pub unreadable: Option<&'static str>,
    pub summary: String,
}

#[derive(Debug, Serialize)]
pub struct BrandingReport {
    #[serde(flatten)]
    pub branding: Branding,
    /// A `[[host]]` in the config with this name.
    pub served: bool,
    /// Served towards the provider and region it belongs to, and valid there.
    pub ready: bool,
    pub problems: Vec<Problem>,
    /// Which DNS record moves to linkgate and which stay as the provider made them.
    pub dns_advice: String,
    /// The default branding; a legacy one.
    pub notes: Vec<String>,
    /// The `[[host]]` entry to add, when linkgate does not serve it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    /// `not_served`, `not_a_host_name`, `other_provider`, `wrong_region` or `invalid`.
    pub kind: &'static str,
    pub message: String,
    pub fix: String,
}

/// The audit of `listed` against `served`.
pub(super) fn audit(
    provider: &'static Preset,
    listed: Result<Brandings, AccountError>,
    served: &Served,
) -> AccountReport {
    let listed = match listed {
        Ok(l) => l,
        Err(e) => {
            return AccountReport {
                provider: provider.name,
                ok: false,
                listed: Vec::new(),
                brandings: Vec::new(),
                summary: format!(
                    "account: the {} account could not be read, so whether every branding on it is ready \
                     is not known: {e}",
                    provider.display
                ),
                error: Some(e.to_string()),
                unreadable: Some(match e {
                    AccountError::Usage(_) => "the arguments for its API cannot work",
                    AccountError::Refused(_) => "it refused the API key",
                    AccountError::RateLimited(_) => "it rate-limited the API key for longer than linkgate waits",
                    AccountError::Unreachable(_) => "its API could not be reached",
                    AccountError::Answer(_) => "its API's answer is not the documented one",
                }),
            }
        }
    };
    let brandings: Vec<BrandingReport> = listed
        .brandings
        .into_iter()
        .map(|b| branding(provider, b, served))
        .collect();
    let ok = brandings.iter().all(|b| b.ready);
    let summary = summary(provider, &listed.listed, &brandings);
    AccountReport {
        provider: provider.name,
        ok,
        listed: listed.listed,
        brandings,
        error: None,
        unreadable: None,
        summary,
    }
}

fn branding(provider: &'static Preset, branding: Branding, served: &Served) -> BrandingReport {
    let host = printable(&branding.host).into_owned();
    let mut problems = Vec::new();
    let entry = served.get(&branding.host);
    // A name that is not a host name is no `[[host]]` to add: `import`
    // skips it too.
    let host_name = crate::host::HostName::parse(&branding.host).is_ok();
    let add = (entry.is_none() && host_name).then(|| host_entry(&branding));
    match entry {
        None if !host_name => problems.push(Problem {
            kind: "not_a_host_name",
            message: format!(
                "{} lists it, but it is not a valid host name, so linkgate cannot serve it (`linkgate import` \
                 skips it too) and {}'s switch to https tracking, which takes every branding of the user at once, \
                 fails on it",
                provider.display, provider.display
            ),
            fix: format!(
                "look at branding {} in {} (Settings → Sender Authentication → Link Branding): correct or delete \
                 it there; it cannot be a [[host]]",
                branding.id, provider.display
            ),
        }),
        None => problems.push(Problem {
            kind: "not_served",
            message: format!(
                "linkgate does not serve it, so {}'s switch to https tracking, which takes every branding of \
                 the user at once, fails on it",
                provider.display
            ),
            fix: format!(
                "{LIST_THE_HOSTS} (this one is missing from linkgate's config): add its [[host]] entry \
                 (`linkgate import {}` prints every branding's)",
                provider.name
            ),
        }),
        Some((other, _)) if other.map(|p| p.name) != Some(provider.name) => problems.push(Problem {
            kind: "other_provider",
            message: format!(
                "linkgate serves it, but forwards it to {}",
                other.map_or("a plain url upstream", |p| p.display)
            ),
            fix: format!("set provider = \"{}\" on its [[host]]", provider.name),
        }),
        Some((_, region)) if region.as_deref().unwrap_or("global") != branding.region => {
            let endpoint = provider.url(Some(branding.region)).unwrap_or_default();
            problems.push(Problem {
                kind: "wrong_region",
                message: format!(
                    "{} branding, but linkgate forwards it to {}'s {} endpoint",
                    region_name(branding.region),
                    provider.display,
                    region.as_deref().unwrap_or("default")
                ),
                fix: format!(
                    "set region = \"{}\" on its [[host]] (linkgate then forwards it to {endpoint})",
                    branding.region
                ),
            });
        }
        Some(_) => {}
    }
    if !branding.valid {
        let target = branding
            .records
            .iter()
            .find(|r| r.moves_to_proxy)
            .map_or_else(|| "sendgrid.net".to_owned(), |r| printable(&r.data).into_owned());
        problems.push(Problem {
            kind: "invalid",
            message: format!(
                "{} marks it invalid: its last validation did not find its DNS records as {} generated them. \
                 Validating a branding whose CNAME already points at the proxy does that ({REVALIDATE_SOURCE} \
                 warns not to re-validate after changing the CNAME)",
                provider.display, provider.display
            ),
            fix: format!(
                "point {host}'s CNAME back at {target}, validate it again in {} (Settings → Sender Authentication → \
                 Link Branding), then point the CNAME at linkgate again and leave it validated",
                provider.display
            ),
        });
    }
    let mut notes = Vec::new();
    if branding.default {
        notes.push(format!(
            "the default branding: {} uses it for mail whose From domain has no link branding of its own",
            provider.display
        ));
    }
    if branding.legacy {
        notes.push(format!(
            "made with {}'s legacy whitelabel tool: it still works, but changing it means creating a new link branding",
            provider.display
        ));
    }
    BrandingReport {
        served: entry.is_some(),
        ready: problems.is_empty(),
        problems,
        dns_advice: dns_advice(provider, &branding, false),
        notes,
        add,
        branding,
    }
}

/// Says, of each branding whose host doctor probed and found pointed at
/// linkgate (its DNS check passed), that its record already moves there.
pub(super) fn pointed(report: &mut AccountReport, pointed: &[&str]) {
    let Ok(provider) = crate::provider::find(report.provider) else {
        return;
    };
    for b in &mut report.brandings {
        let host = b.branding.host.trim_end_matches('.');
        if pointed
            .iter()
            .any(|p| p.trim_end_matches('.').eq_ignore_ascii_case(host))
        {
            b.dns_advice = dns_advice(provider, &b.branding, true);
        }
    }
}

/// Which record to point at linkgate (or, `pointed`, that it already is:
/// doctor's DNS check of the host passed), and which to leave as they are.
fn dns_advice(provider: &Preset, branding: &Branding, pointed: bool) -> String {
    let parts: Vec<String> = branding
        .records
        .iter()
        .map(|r| {
            let record = format!(
                "{} {} {}",
                printable(&r.host),
                printable(&r.kind).to_uppercase(),
                printable(&r.data)
            );
            if r.moves_to_proxy && pointed {
                format!(
                    "{record} moves, and already points at linkgate (doctor's DNS check of {} passed)",
                    printable(&branding.host)
                )
            } else if r.moves_to_proxy {
                format!("{record} moves: point it at linkgate (your load balancer's name)")
            } else if r.record == "owner_cname" {
                format!(
                    "{record} stays as it is ({}'s check of who owns the branding)",
                    provider.display
                )
            } else {
                format!("{record} stays as {} generated it", provider.display)
            }
        })
        .collect();
    parts.join("; ")
}

/// "an EU regional", "a global": a region with its article.
fn region_name(region: &str) -> String {
    match region {
        "eu" => "an EU regional".to_owned(),
        other => format!("a {other}"),
    }
}

/// The account's last line: ready or not, per user, and what to ask.
fn summary(provider: &Preset, listed: &[Listed], brandings: &[BrandingReport]) -> String {
    let whose = listed.iter().map(Listed::whose).collect::<Vec<_>>().join(", ");
    let mut users: Vec<(&str, usize)> = Vec::new();
    for b in brandings {
        match users.iter_mut().find(|(u, _)| *u == b.branding.user) {
            Some((_, n)) => *n += 1,
            None => users.push((&b.branding.user, 1)),
        }
    }
    let users = users
        .iter()
        .map(|(u, n)| format!("{} ×{n}", printable(u)))
        .collect::<Vec<_>>()
        .join(", ");
    if brandings.is_empty() {
        return format!(
            "account: no link brandings on the {} account ({whose}): nothing there for linkgate to serve",
            provider.display
        );
    }
    let failing: Vec<String> = brandings
        .iter()
        .filter(|b| !b.ready)
        .map(|b| {
            let what: Vec<String> = b
                .problems
                .iter()
                .map(|p| match p.kind {
                    "not_served" => "not served by linkgate".to_owned(),
                    "not_a_host_name" => "not a valid host name".to_owned(),
                    "invalid" => format!("invalid at {}", provider.display),
                    "other_provider" => "forwarded to another provider".to_owned(),
                    _ => "forwarded to the wrong region".to_owned(),
                })
                .collect();
            format!("{} ({})", printable(&b.branding.host), what.join(", "))
        })
        .collect();
    if failing.is_empty() {
        format!(
            "account: all {} link brandings on the {} account ({whose}; users: {users}) are served by linkgate and \
             valid at {} — with every host above passing, ask {} Support to enable SSL click and open tracking, for \
             each of these users: a subuser is switched separately",
            brandings.len(),
            provider.display,
            provider.display,
            provider.display
        )
    } else {
        format!(
            "account: {} of {} link brandings on the {} account ({whose}; users: {users}) are not ready: {} — {} \
             enables SSL tracking for a user only when every branding of that user passes; fix these before asking \
             {} Support",
            failing.len(),
            brandings.len(),
            provider.display,
            failing.join(", "),
            provider.display,
            provider.display
        )
    }
}
