//! A stand-in for SendGrid's API, `GET /v3/whitelabel/links`: an https
//! hyper server on loopback with a test-CA certificate for `127.0.0.1`,
//! answering the documented shapes
//! (<https://www.twilio.com/docs/sendgrid/api-reference/link-branding/retrieve-all-branded-links>):
//! a JSON array of branded links, paged with `limit` and `offset`; the
//! account's own links, or a subuser's with `on-behalf-of`; 401 for another
//! key, 403 for a user that is not a subuser, 429 with `Retry-After` on
//! command. It records every request it gets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::doctor::Run;
use super::{Leaf, Pki};

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub path: String,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
    pub authorization: Option<String>,
    pub on_behalf_of: Option<String>,
    pub at: Instant,
}

/// What the stand-in's account holds and how it misbehaves.
#[derive(Default, Clone)]
pub struct Account {
    /// The key it accepts (`Authorization: Bearer <key>`).
    pub key: String,
    /// Each user's branded links: `None` the key's own account, `Some(name)` a subuser.
    pub links: Vec<(Option<String>, Vec<Value>)>,
    /// The first N requests for a user (`None`: the account's own) answer
    /// 429 with this `Retry-After`.
    pub throttle: Vec<(Option<String>, usize, &'static str)>,
    pub paging: Paging,
    /// What a 401 says instead of "authorization required" (an API that
    /// echoes the key it was sent).
    pub refusal: Option<String>,
}

/// How the stand-in pages.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `limit` links from `offset`, as documented.
    #[default]
    AsDocumented,
    /// The first `limit` links whatever the `offset`.
    IgnoresOffset,
    /// A full page of links never seen before, for every `offset`.
    Endless,
}

/// The stand-in API, running.
pub struct ProviderApi {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    _stop: oneshot::Sender<()>,
}

impl ProviderApi {
    /// Serves `account` over https with a certificate from `pki` for 127.0.0.1.
    pub async fn start(pki: &Pki, account: Account) -> Self {
        Self::start_with(&pki.leaf(&["127.0.0.1"]), account).await
    }

    /// Serves `account` over https presenting `cert` (an expired one, one
    /// for another name, a CA's own).
    pub async fn start_with(cert: &Leaf, account: Account) -> Self {
        let acceptor = cert.acceptor();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind api");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let account = Arc::new(account);
        let throttled = Arc::new(Mutex::new(HashMap::<Option<String>, usize>::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut stopped => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let (acceptor, recorded, account, throttled) =
                    (acceptor.clone(), recorded.clone(), account.clone(), throttled.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = service_fn(move |req| {
                        let answer = answer(req, &recorded, &account, &throttled);
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            _stop: stop,
        }
    }

    /// `https://127.0.0.1:<port>`, for `--provider-api`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<ApiRequest> {
        self.requests.lock().expect("lock").clone()
    }
}

fn answer(
    req: Request<Incoming>,
    recorded: &Mutex<Vec<ApiRequest>>,
    account: &Account,
    throttled: &Mutex<HashMap<Option<String>, usize>>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let query: HashMap<&str, &str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let number = |name: &str| query.get(name).and_then(|v| v.parse::<usize>().ok());
    let request = ApiRequest {
        path: req.uri().path().to_owned(),
        limit: number("limit"),
        offset: number("offset"),
        authorization: header("authorization"),
        on_behalf_of: header("on-behalf-of"),
        at: Instant::now(),
    };
    recorded.lock().expect("lock").push(request.clone());
    let errors = |status: StatusCode, message: &str| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"errors": [{"field": null, "message": message}]}).to_string(),
            )))
            .expect("response")
    };
    if request.path != "/v3/whitelabel/links" {
        return errors(StatusCode::NOT_FOUND, "not found");
    }
    if request.authorization.as_deref() != Some(&format!("Bearer {}", account.key)) {
        let message = account.refusal.as_deref().unwrap_or("authorization required");
        return errors(StatusCode::UNAUTHORIZED, message);
    }
    let user = request.on_behalf_of.clone();
    if let Some((_, times, retry_after)) = account.throttle.iter().find(|(u, _, _)| *u == user) {
        let mut seen = throttled.lock().expect("lock");
        let count = seen.entry(user.clone()).or_default();
        if *count < *times {
            *count += 1;
            let mut response = errors(StatusCode::TOO_MANY_REQUESTS, "too many requests");
            response
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static(retry_after));
            response
                .headers_mut()
                .insert("x-ratelimit-remaining", http::HeaderValue::from_static("0"));
            return response;
        }
    }
    let Some((_, links)) = account.links.iter().find(|(u, _)| *u == user) else {
        return errors(StatusCode::FORBIDDEN, "access forbidden");
    };
    let limit = request.limit.unwrap_or(50);
    let offset = match account.paging {
        Paging::AsDocumented => request.offset.unwrap_or(0).min(links.len()),
        Paging::IgnoresOffset | Paging::Endless => 0,
    };
    let mut page: Vec<Value> = links[offset..].iter().take(limit).cloned().collect();
    if account.paging == Paging::Endless {
        let from = request.offset.unwrap_or(0) as u64;
        page = (from..from + limit as u64)
            .map(|id| {
                link(
                    1000 + id,
                    &format!("e{id}.example.test"),
                    "parent",
                    7,
                    false,
                    true,
                    "sendgrid.net",
                )
            })
            .collect();
    }
    Response::builder()
        .header("content-type", "application/json")
        .header("x-ratelimit-limit", "500")
        .header("x-ratelimit-remaining", "499")
        .body(Full::new(Bytes::from(serde_json::to_string(&page).expect("json"))))
        .expect("response")
}

/// A branded link as the reference shows one: `host` is
/// `<subdomain>.<domain>`, its `domain_cname` points at `target`
/// (`sendgrid.net`, or `eu.sendgrid.net` for an EU one) and its
/// `owner_cname` is `<user_id>.<domain>` → `sendgrid.net`.
pub fn link(id: u64, host: &str, user: &str, user_id: u64, default: bool, valid: bool, target: &str) -> Value {
    let (subdomain, domain) = host.split_once('.').expect("a host with a domain");
    json!({
        "id": id,
        "domain": domain,
        "subdomain": subdomain,
        "username": user,
        "user_id": user_id,
        "default": default,
        "valid": valid,
        "legacy": false,
        "dns": {
            "domain_cname": {"valid": valid, "type": "cname", "host": host, "data": target},
            "owner_cname": {"valid": true, "type": "cname", "host": format!("{user_id}.{domain}"), "data": "sendgrid.net"}
        }
    })
}

/// The key the stand-in accepts in the tests; no output may contain it.
pub const TEST_KEY: &str = "SG.linkgate-test-key.never-printed-0123456789abcdef";

/// The account most tests use: the key's own brandings (one served
/// and ready, the default; one nobody added to linkgate; one invalid; one
/// EU branding forwarded to the global endpoint), a subuser's and an EU
/// subuser's.
pub fn sample_account() -> Account {
    Account {
        key: TEST_KEY.into(),
        links: vec![
            (
                None,
                vec![
                    link(11, "ok.example.test", "parent", 7, true, true, "sendgrid.net"),
                    link(12, "new.example.test", "parent", 7, false, true, "sendgrid.net"),
                    link(13, "broken.example.test", "parent", 7, false, false, "sendgrid.net"),
                    link(14, "euparent.example.test", "parent", 7, false, true, "eu.sendgrid.net"),
                ],
            ),
            (
                Some("sub1".into()),
                vec![link(21, "sub.example.test", "sub1", 8, false, true, "sendgrid.net")],
            ),
            (
                Some("eusub".into()),
                vec![link(
                    31,
                    "eusub.example.test",
                    "eusub",
                    9,
                    false,
                    true,
                    "eu.sendgrid.net",
                )],
            ),
        ],
        throttle: Vec::new(),
        paging: Paging::AsDocumented,
        refusal: None,
    }
}

/// A doctor config naming the brandings linkgate serves (ok, broken, euparent without its region).
pub fn doctor_config(dir: &Path) -> PathBuf {
    let mut toml = String::from("[listen]\nhttps = \"127.0.0.1:443\"\n");
    for h in ["ok", "broken", "euparent"] {
        toml.push_str(&format!(
            "[[host]]\nname = \"{h}.example.test\"\ncert = \"x.pem\"\nkey = \"x.key\"\n"
        ));
    }
    let path = dir.join("doctor.toml");
    std::fs::write(&path, toml).expect("write");
    path
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// The key, in any case, and its secret part (after its second dot)
/// appear nowhere in what `run` printed.
pub fn no_key(run: &Run, key: &str) {
    let printed = format!("{}\n{}", run.stdout, run.stderr).to_ascii_lowercase();
    let secret = key.splitn(3, '.').nth(2);
    for needle in [Some(key), secret].into_iter().flatten() {
        assert!(
            !printed.contains(&needle.to_ascii_lowercase()),
            "the key (or {needle:?}) was printed: {run:?}"
        );
    }
}
