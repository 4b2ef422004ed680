//! SendGrid's "Retrieve all branded links", `GET /v3/whitelabel/links`,
//! every page, for the key's own account and each subuser asked for: the
//! requests, paging and errors here; the answer's shape, and how a branded
//! link becomes a [`Branding`], in `links.rs`.
//!
//! As the reference has it
//! (<https://www.twilio.com/docs/sendgrid/api-reference/link-branding/retrieve-all-branded-links>,
//! and its OpenAPI file `spec/json/tsg_link_branding_v3.json` in
//! github.com/twilio/sendgrid-oai):
//! - base `https://api.sendgrid.com` "for global users and subusers",
//!   `https://api.eu.sendgrid.com` "for EU regional subusers";
//! - `Authorization: Bearer <key>`; `on-behalf-of: <subuser-username>` (or
//!   `account-id <id>`) lists a subuser's brandings with the parent's key;
//! - an array of branded links: `id`, `domain`, `subdomain`, `username`,
//!   `user_id`, `default`, `valid`, `legacy`, and `dns` with `domain_cname`
//!   ("the DNS record generated to point to your link branding subdomain",
//!   required) and `owner_cname` ("to verify who created the link
//!   branding"), each `valid`, `type`, `host`, `data`. The schema types the
//!   three flags as strings with the values `true`/`false` while its
//!   examples are JSON booleans: both are read. Other `dns` entries (Auto
//!   SSL brandings carry more) are kept as records that stay.
//!
//! Where the reference says less:
//! - Paging: the endpoint documents only `limit` ("Limits the number of
//!   results returned per page"), with no maximum and no page count; the
//!   v3 API's general "Responses" page pages with `limit` and `offset`
//!   (<https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/responses>).
//!   So: `limit` and `offset`; a page shorter than `limit` is the last; a
//!   page with nothing new (an API that ignores `offset`) ends it too; and
//!   after [`MAX_PAGES`] pages the listing fails rather than loop.
//! - Region: a branded link has no region field. One is EU when it was
//!   listed through the EU base, or when its `domain_cname` points at
//!   `eu.sendgrid.net` (where "Regional Email send" serves links).
//! - Which record moves: "Only the first CNAME from the branded link needs
//!   to point to the CDN" (SendGrid, "SSL Click Tracking Steps",
//!   <https://support.sendgrid.com/hc/en-us/articles/1260802541709-SSL-Click-Tracking-Steps>):
//!   `domain_cname` moves to the proxy; `owner_cname` and the rest stay.
//! - 401 and 403: the key needs the `whitelabel.read` scope ("Read Only
//!   Access for Whitelabels", SendGrid's API key permissions list).
//! - 429: SendGrid documents `X-RateLimit-Reset` (a Unix time) on it
//!   (<https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits>);
//!   a `Retry-After` is honoured first. Either is waited for up to
//!   [`MAX_WAIT`] in all and [`MAX_RETRIES`] times per page, then the
//!   listing fails saying how long SendGrid asked for.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;

use super::https::{Answer, Api};
use super::{AccountError, Ask, Branding, Brandings, Listed};
use crate::provider::Preset;
use crate::text::printable;
use links::{branding, parse, RawLink};

mod links;

/// Where the API key is read from when no `--api-key-file` is given.
pub const API_KEY_ENV: &str = "SENDGRID_API_KEY";

const PATH: &str = "/v3/whitelabel/links";
/// The scope "Retrieve all branded links" needs.
const PERMISSION: &str = "whitelabel.read";
/// Pages per listing at most: 100 pages of 50 are well over the 3,000 link
/// brandings a user may have (the description of SendGrid's Domain
/// Authentication API).
const MAX_PAGES: usize = 100;
/// Rate-limit waits per page at most.
const MAX_RETRIES: u32 = 3;
/// Rate-limit waits in all, per run.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// The wait when a 429 says nothing about how long.
const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// The brandings of every listing `ask` names: the key's own account, each
/// `on_behalf_of` user, each EU subuser (through the EU base).
pub(super) async fn list(provider: &'static Preset, ask: &Ask) -> Result<Brandings, AccountError> {
    let mut waited = Duration::ZERO;
    let mut listed = Vec::new();
    let mut brandings: Vec<Branding> = Vec::new();
    for Planned { user, region, api } in plan(provider, ask)? {
        let (pages, links) = list_one(&api, ask, user, &mut waited).await?;
        let mut count = 0;
        for link in links {
            let branding = branding(link, user, region);
            // A branding two listings share (a parent's, associated with a
            // subuser) is one branding.
            if !brandings
                .iter()
                .any(|b| b.id == branding.id && b.region == branding.region)
            {
                count += 1;
                brandings.push(branding);
            }
        }
        listed.push(Listed {
            on_behalf_of: user.map(str::to_owned),
            region,
            api: api.base().to_owned(),
            pages,
            brandings: count,
        });
    }
    Ok(Brandings {
        provider,
        listed,
        brandings,
    })
}

/// One listing to make: whose (`on-behalf-of`), which region, through which API.
pub(super) struct Planned<'a> {
    user: Option<&'a str>,
    region: &'static str,
    api: Api,
}

/// Each listing `ask` names with the API it goes to; an unusable
/// `--provider-api` or `--provider-api-ca` fails here, before any request.
pub(super) fn plan<'a>(provider: &Preset, ask: &'a Ask) -> Result<Vec<Planned<'a>>, AccountError> {
    let mut plan: Vec<(Option<&str>, &'static str)> = vec![(None, "global")];
    plan.extend(ask.on_behalf_of.iter().map(|u| (Some(u.as_str()), "global")));
    plan.extend(ask.eu_subusers.iter().map(|u| (Some(u.as_str()), "eu")));
    plan.into_iter()
        .map(|(user, region)| {
            let base = match (&ask.api, provider.api_base(Some(region))) {
                (Some(api), _) => api.clone(),
                (None, Some(base)) => base.to_owned(),
                (None, None) => return Err(AccountError::Usage(format!("{} has no {region} API", provider.display))),
            };
            Ok(Planned {
                user,
                region,
                api: Api::new(&base, ask.ca_file.as_deref(), ask.timeout)?,
            })
        })
        .collect()
}

/// Every page of one user's listing: how many pages, and the links.
async fn list_one(
    api: &Api,
    ask: &Ask,
    user: Option<&str>,
    waited: &mut Duration,
) -> Result<(usize, Vec<RawLink>), AccountError> {
    let mut headers = HeaderMap::new();
    let mut bearer = HeaderValue::from_str(&format!("Bearer {}", ask.key.expose()))
        .map_err(|_| AccountError::Usage("the API key is not a valid header value".into()))?;
    bearer.set_sensitive(true);
    headers.insert(http::header::AUTHORIZATION, bearer);
    headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("linkgate/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(user) = user {
        let value = HeaderValue::from_str(user).map_err(|_| {
            AccountError::Usage(format!("--on-behalf-of {}: not a valid header value", printable(user)))
        })?;
        headers.insert("on-behalf-of", value);
    }
    let limit = ask.page_size.max(1);
    let mut links: Vec<RawLink> = Vec::new();
    let mut seen = HashSet::new();
    // Counts what the API returned, repeats included: the next page starts after them.
    let mut offset = 0;
    for page in 1..=MAX_PAGES {
        let target = format!("{PATH}?limit={limit}&offset={offset}");
        let answer = get_page(api, &target, headers.clone(), ask, user, waited).await?;
        let got: Vec<RawLink> = parse(&answer.body).map_err(|e| {
            AccountError::Answer(format!(
                "GET {}{target}: not the documented list of branded links: {e}",
                api.base()
            ))
        })?;
        let full = got.len() >= limit;
        offset += got.len();
        let before = links.len();
        links.extend(got.into_iter().filter(|l| seen.insert(l.id)));
        if !full || links.len() == before {
            return Ok((page, links));
        }
    }
    Err(AccountError::Answer(format!(
        "{}{PATH}: still more brandings after {MAX_PAGES} pages of {limit}: stopped (give --api-page-size up to 500)",
        api.base()
    )))
}

/// One page, waiting out 429s within the budget; 401/403 and every other
/// status end the listing with what SendGrid said.
async fn get_page(
    api: &Api,
    target: &str,
    headers: HeaderMap,
    ask: &Ask,
    user: Option<&str>,
    waited: &mut Duration,
) -> Result<Answer, AccountError> {
    let url = format!("{}{target}", api.base());
    let whose = user.map_or_else(String::new, |u| format!(" (on behalf of {})", printable(u)));
    for retry in 0..=MAX_RETRIES {
        let answer = api.get(target, headers.clone()).await?;
        let said = || said(&answer.body, ask);
        match answer.status {
            StatusCode::OK => return Ok(answer),
            StatusCode::UNAUTHORIZED => {
                return Err(AccountError::Refused(format!(
                    "SendGrid refused the API key (401 from GET {url}{whose}{}): give a valid key in {API_KEY_ENV} \
                     or --api-key-file, one with the {PERMISSION} permission (\"Read Only Access for Whitelabels\")",
                    said()
                )))
            }
            StatusCode::FORBIDDEN => {
                let subuser = user.map_or_else(String::new, |u| {
                    format!(", or {} is not a subuser of the key's account", printable(u))
                });
                return Err(AccountError::Refused(format!(
                    "SendGrid answered 403 to GET {url}{whose}{}: the API key lacks the {PERMISSION} permission \
                     (\"Read Only Access for Whitelabels\"){subuser}",
                    said()
                )));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let wait = wait_asked(&answer.headers, SystemTime::now()).unwrap_or(DEFAULT_WAIT);
                if retry == MAX_RETRIES || beyond_budget(*waited, wait) {
                    return Err(AccountError::RateLimited(format!(
                        "SendGrid rate-limited the API key (429 from GET {url}{whose}): it asks to wait {}s; \
                         linkgate waits at most {}s in all and {MAX_RETRIES} times per page, and has waited {}s: \
                         run it again later",
                        wait.as_secs(),
                        MAX_WAIT.as_secs(),
                        waited.as_secs()
                    )));
                }
                tokio::time::sleep(wait).await;
                *waited += wait;
            }
            status => {
                return Err(AccountError::Answer(format!(
                    "SendGrid answered {status} to GET {url}{whose}{}",
                    said()
                )))
            }
        }
    }
    Err(AccountError::RateLimited(format!(
        "GET {url}: rate-limited {MAX_RETRIES} times"
    )))
}

/// Whether waiting `wait` more, after `waited`, passes [`MAX_WAIT`]; a
/// figure that would overflow the clock does too.
fn beyond_budget(waited: Duration, wait: Duration) -> bool {
    waited.checked_add(wait).is_none_or(|total| total > MAX_WAIT)
}

/// `: <SendGrid's error messages>`, from its documented `{"errors":
/// [{"field", "message"}]}`, printable, short, and without the key.
fn said(body: &[u8], ask: &Ask) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        message: Option<String>,
    }
    let Ok(errors) = serde_json::from_slice::<Errors>(body) else {
        return String::new();
    };
    let text: Vec<String> = errors.errors.into_iter().filter_map(|e| e.message).collect();
    if text.is_empty() {
        return String::new();
    }
    let text: String = ask.key.redact(&text.join("; ")).chars().take(200).collect();
    format!(": \"{}\"", printable(&text))
}

/// How long a 429 asks to wait: `Retry-After` (seconds or an HTTP date),
/// else SendGrid's `X-RateLimit-Reset` (a Unix time).
fn wait_asked(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(value) = text("retry-after") {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(value) {
            return Some(at.duration_since(now).unwrap_or_default());
        }
    }
    let reset = text("x-ratelimit-reset")?.parse::<u64>().ok()?;
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset))?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_429_says_how_long_to_wait() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_392_815_000);
        let mut headers = HeaderMap::new();
        assert_eq!(wait_asked(&headers, now), None);
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("1392815263"));
        assert_eq!(wait_asked(&headers, now), Some(Duration::from_secs(263)));
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(wait_asked(&headers, now), Some(Duration::from_secs(7)));
        headers.insert("retry-after", HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        assert_eq!(wait_asked(&headers, now), Some(Duration::ZERO));
        // An hour, or 2^64-1 seconds, is beyond the budget, not an overflow.
        let mut huge = HeaderMap::new();
        huge.insert("retry-after", HeaderValue::from_static("18446744073709551615"));
        let asked = wait_asked(&huge, now).expect("a wait");
        assert!(beyond_budget(Duration::from_secs(1), asked));
        assert!(beyond_budget(Duration::ZERO, Duration::from_secs(3600)));
        assert!(!beyond_budget(Duration::from_secs(30), Duration::from_secs(30)));
        let mut past = HeaderMap::new();
        past.insert("x-ratelimit-reset", HeaderValue::from_static("10"));
        assert_eq!(wait_asked(&past, now), Some(Duration::ZERO));
    }

    #[test]
    fn sendgrids_error_text_is_shown_short_printable_and_without_the_key() {
        let ask = Ask {
            key: super::super::ApiKey::new("SG.k"),
            on_behalf_of: Vec::new(),
            eu_subusers: Vec::new(),
            api: None,
            ca_file: None,
            page_size: 50,
            timeout: Duration::from_secs(1),
        };
        let body = br#"{"errors": [{"field": null, "message": "authorization required for SG.k\u001b[2J"}]}"#;
        assert_eq!(said(body, &ask), ": \"authorization required for <api key>\\x1b[2J\"");
        assert_eq!(said(b"<html>", &ask), "");
    }
}
