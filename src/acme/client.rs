//! Talking to the CA: the HTTP client instant-acme uses, which bounds
//! every answer (size, time, `Retry-After`), the account, and one order
//! from start to certificate.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Response};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use super::challenge::{alpn01_certificate, valid_token, ChallengeFiles};
use super::storage::write_private;
use super::task::out_of_descriptors;
use super::Storage;
use crate::config::{Acme, Challenge};
use crate::error::chain;
use crate::host::HostName;
use crate::tls;

/// The longest a CA's `Retry-After` is obeyed: a week (Let's Encrypt's
/// longest rate-limit window). Longer, and a host would never renew.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86400);
/// Each answer from the CA, head and whole body, within this.
const CA_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read from the CA. A directory, an order or a
/// certificate chain is a few kilobytes.
const MAX_CA_BODY: usize = 256 * 1024;

/// The HTTP client linkgate talks to the CA with. It notes the last
/// Retry-After the CA sent, so a rate-limited host backs off as asked.
#[derive(Clone)]
struct CaClient {
    inner: HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaClient {
    fn new(acme: &Acme, retry_after: Arc<Mutex<Option<SystemTime>>>) -> Result<Self, String> {
        let tls = tls::client_config(acme.ca_certs.as_deref()).map_err(|e| format!("acme.ca_file: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after,
        })
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let is_get = req.method() == Method::GET;
        let fut = self.inner.request(req);
        let retry_after = self.retry_after.clone();
        let whole = async move {
            let resp = fut.await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let (mut parts, body) = resp.into_parts();
            // instant-acme reads Retry-After itself when it polls an order
            // (and adds it to the clock unchecked): it only ever sees the
            // bounded value.
            let after = parts
                .headers
                .remove(header::RETRY_AFTER)
                .and_then(|v| retry_after_delay(&v));
            if let Some(delay) = after {
                parts.headers.insert(header::RETRY_AFTER, delay.as_secs().into());
                if !parts.status.is_success() {
                    *retry_after.lock().unwrap_or_else(PoisonError::into_inner) = Some(SystemTime::now() + delay);
                }
            }
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_CA_BODY))
                .await
                .map_err(|e| {
                    let message = if e.is::<http_body_util::LengthLimitError>() {
                        format!("the ACME server's answer is larger than {} KiB", MAX_CA_BODY / 1024)
                    } else {
                        format!("the ACME server's answer broke off: {}", chain(&*e))
                    };
                    instant_acme::Error::Other(message.into())
                })?
                .to_bytes();
            // The directory GET (the only GET) is parsed whatever its
            // status: say what the server answered instead.
            if is_get && !parts.status.is_success() {
                let problem = serde_json::from_slice::<instant_acme::Problem>(&body)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
                return Err(instant_acme::Error::Other(
                    format!("the ACME directory answered {}: {problem}", parts.status).into(),
                ));
            }
            Ok(BytesResponse::from(Response::from_parts(
                parts,
                http_body_util::Full::new(body),
            )))
        };
        Box::pin(async move {
            tokio::time::timeout(CA_ANSWER_TIMEOUT, whole).await.map_err(|_| {
                instant_acme::Error::Other(
                    format!(
                        "the ACME server did not send its whole answer within {}s",
                        CA_ANSWER_TIMEOUT.as_secs()
                    )
                    .into(),
                )
            })?
        })
    }
}

/// How long a `Retry-After` value asks to wait, at most [`MAX_RETRY_AFTER`]
/// (a CA's figure is never added to the clock unchecked: 2^64-1 seconds
/// overflows it). `None` if it is neither delay-seconds nor an HTTP-date.
fn retry_after_delay(value: &header::HeaderValue) -> Option<Duration> {
    let value = value.to_str().ok()?.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The account for `acme.directory`: from storage, or created (once, under
/// the account lock, by whichever replica gets there first).
async fn account(acme: &Acme, storage: &Storage, owner: &str, client: &CaClient) -> Result<Account, String> {
    let path = storage.account_path(&acme.directory);
    let unreachable =
        |e: instant_acme::Error| format!("cannot reach the ACME directory {}: {}", acme.directory, chain(&e));
    for _ in 0..60 {
        if let Ok(json) = tokio::fs::read(&path).await {
            let credentials: AccountCredentials = serde_json::from_slice(&json)
                .map_err(|e| format!("{}: not an ACME account file: {e}", path.display()))?;
            return Account::builder_with_http(Box::new(client.clone()))
                .from_credentials(credentials)
                .await
                .map_err(unreachable);
        }
        let lock = {
            let (storage, owner) = (storage.clone(), owner.to_owned());
            tokio::task::spawn_blocking(move || storage.try_lock("account", &owner)).await
        };
        match lock.unwrap_or_else(|_| Err(io::Error::other("shutting down"))) {
            Ok(Some(_lock)) => {
                if tokio::fs::metadata(&path).await.is_ok() {
                    continue;
                }
                let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
                let eab = acme
                    .eab
                    .as_ref()
                    .map(|e| instant_acme::ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
                let (account, credentials) = Account::builder_with_http(Box::new(client.clone()))
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        acme.directory.clone(),
                        eab.as_ref(),
                    )
                    .await
                    .map_err(|e| format!("cannot create the ACME account: {}", chain(&e)))?;
                let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
                write_private(&path, &json).map_err(|e| format!("cannot store the ACME account: {e}"))?;
                tracing::info!(directory = %acme.directory, account = account.id(), "ACME: account created");
                return Ok(account);
            }
            Ok(None) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(e) if out_of_descriptors(&e) => {
                return Err(format!(
                    "cannot open the account lock file: linkgate has run out of file descriptors ({e})"
                ))
            }
            Err(e) => return Err(format!("cannot write a lock file in storage: {e}")),
        }
    }
    Err("another replica holds the account lock but no account appeared".into())
}

/// One issuance: order, challenge, finalize. Returns the chain and the new
/// private key as one PEM (the stored form).
pub(super) async fn obtain(
    acme: &Acme,
    storage: &Storage,
    host: &HostName,
    owner: &str,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
) -> Result<String, String> {
    let client = CaClient::new(acme, retry_after)?;
    let account = account(acme, storage, owner, &client).await?;
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("order refused: {}", chain(&e)))?;
    let kind = match acme.challenge {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    };
    let mut written = ChallengeFiles::default();
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("cannot fetch the authorization: {}", chain(&e)))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| format!("the CA offers no {} challenge", acme.challenge.as_str()))?;
            let key_authorization = challenge.key_authorization();
            let (path, contents) = match acme.challenge {
                Challenge::Http01 => {
                    if !valid_token(&challenge.token) {
                        return Err("the CA sent an invalid challenge token".into());
                    }
                    (
                        storage.http01_path(&challenge.token),
                        key_authorization.as_str().as_bytes().to_vec(),
                    )
                }
                Challenge::TlsAlpn01 => (
                    storage.alpn01_path(host),
                    alpn01_certificate(host, key_authorization.digest().as_ref())?.into_bytes(),
                ),
            };
            write_private(&path, &contents).map_err(|e| format!("cannot write the challenge to storage: {e}"))?;
            written.0.push(path);
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("cannot start the validation: {}", chain(&e)))?;
        }
    }
    let polling = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120));
    let status = order
        .poll_ready(&polling)
        .await
        .map_err(|e| format!("validation did not finish: {}", chain(&e)))?;
    if status != OrderStatus::Ready {
        return Err(validation_error(&mut order, acme.challenge).await);
    }
    drop(written);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("finalization refused: {}", chain(&e)))?;
    let chain = order
        .poll_certificate(&polling)
        .await
        .map_err(|e| format!("certificate not delivered: {}", chain(&e)))?;
    Ok(format!("{chain}{}", key.serialize_pem()))
}

/// Why validation failed, from the challenge's error.
async fn validation_error(order: &mut instant_acme::Order, challenge: Challenge) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(problem) = &c.error {
                    return format!("{} validation failed: {problem}", challenge.as_str());
                }
            }
        }
    }
    format!("{} validation failed (the CA gave no reason)", challenge.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_whatever_the_ca_sends() {
        let delay = |v: &str| retry_after_delay(&header::HeaderValue::from_str(v).expect("value"));
        assert_eq!(delay("120"), Some(Duration::from_secs(120)));
        assert_eq!(delay(" 7200 "), Some(Duration::from_secs(7200)));
        assert_eq!(delay("18446744073709551615"), Some(MAX_RETRY_AFTER));
        assert_eq!(delay("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_RETRY_AFTER));
        assert_eq!(delay("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(delay("-5"), None);
        assert_eq!(delay("soon"), None);
    }
}
