//! A stand-in ACME CA (RFC 8555) that misbehaves on command, for what
//! Pebble will not do: issue certificates that are already expired, answer
//! with endless or dripping bodies, send absurd `Retry-After` values, or put
//! terminal escape sequences in its error text.
//!
//! It speaks just enough ACME for instant-acme: directory, nonces, account,
//! order, one authorization that is already valid (so no challenge is
//! needed), finalization and the certificate. JWS signatures are not
//! checked; the CSR's public key is read so the certificate it issues
//! matches the key linkgate generated.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, PublicKeyData, SignatureAlgorithm};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use x509_parser::prelude::FromDer;

use super::Pki;

/// How the stand-in CA misbehaves.
#[derive(Clone)]
pub enum Misbehaviour {
    /// Issues certificates valid from `not_before` to `not_after` seconds
    /// from now (negative: in the past).
    Issues { not_before: i64, not_after: i64 },
    /// The directory answers 200 with a body that never ends.
    EndlessDirectory,
    /// The directory answers 200 and sends its body one byte a second.
    DrippingDirectory,
    /// newOrder answers 429 `rateLimited` with this `Retry-After`.
    RateLimited(&'static str),
    /// The order never gets ready; every look at it says `Retry-After` this.
    PendingOrder(&'static str),
    /// newOrder answers 400 with this problem detail.
    Problem(String),
}

type Body = BoxBody<Bytes, Infallible>;

/// The stand-in CA, serving https on loopback until dropped.
pub struct StandInCa {
    pub addr: SocketAddr,
    /// The root the certificates it issues chain to.
    pub root: rustls_pki_types::CertificateDer<'static>,
    /// newOrder requests received.
    orders: Arc<AtomicUsize>,
    /// Body bytes sent in all.
    sent: Arc<AtomicU64>,
    /// Requests received, as "METHOD path".
    requests: Arc<Mutex<Vec<String>>>,
    _stop: oneshot::Sender<()>,
}

struct Shared {
    misbehaviour: Misbehaviour,
    base: String,
    pki: Pki,
    orders: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
    nonces: AtomicU64,
    finalized: Mutex<bool>,
    certificate: Mutex<Option<String>>,
}

impl StandInCa {
    /// Starts the CA presenting a certificate for `localhost` from `pki`,
    /// and issuing from a PKI of its own.
    pub async fn start(pki: &Pki, misbehaviour: Misbehaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind CA");
        let addr = listener.local_addr().expect("addr");
        let acceptor = pki.leaf(&["localhost"]).acceptor();
        let (orders, sent, requests) = (Arc::default(), Arc::new(AtomicU64::new(0)), Arc::default());
        let issuing = Pki::new();
        let root = issuing.ca_der.clone();
        let shared = Arc::new(Shared {
            misbehaviour,
            base: format!("https://localhost:{}", addr.port()),
            pki: issuing,
            orders: Arc::clone(&orders),
            sent: Arc::clone(&sent),
            requests: Arc::clone(&requests),
            nonces: AtomicU64::new(0),
            finalized: Mutex::new(false),
            certificate: Mutex::new(None),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let svc = service_fn(move |req| answer(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            root,
            orders,
            sent,
            requests,
            _stop: stop,
        }
    }

    /// The directory URL to configure as `acme.directory`.
    pub fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.addr.port())
    }

    /// newOrder requests received so far.
    pub fn orders(&self) -> usize {
        self.orders.load(Ordering::SeqCst)
    }

    /// Body bytes the CA has sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Requests received so far, as "METHOD path".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

async fn answer(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_owned();
    shared
        .requests
        .lock()
        .expect("lock")
        .push(format!("{} {path}", parts.method));
    let base = &shared.base;
    let json = |status: StatusCode, value: serde_json::Value| {
        let body = Bytes::from(value.to_string());
        shared.sent.fetch_add(body.len() as u64, Ordering::SeqCst);
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body).boxed())
            .expect("response")
    };
    let order = |status: &str, certificate: bool| {
        let mut order = serde_json::json!({
            "status": status,
            "expires": "2099-01-01T00:00:00Z",
            "identifiers": [{"type": "dns", "value": "ignored.example.test"}],
            "authorizations": [format!("{base}/authz/1")],
            "finalize": format!("{base}/finalize/1"),
        });
        if certificate {
            order["certificate"] = format!("{base}/cert/1").into();
        }
        order
    };
    let problem = |status: StatusCode, kind: &str, detail: &str| {
        let mut r = json(
            status,
            serde_json::json!({"type": format!("urn:ietf:params:acme:error:{kind}"), "detail": detail}),
        );
        r.headers_mut()
            .insert("content-type", "application/problem+json".parse().expect("value"));
        r
    };
    let mut response = match (parts.method.clone(), path.as_str()) {
        (Method::GET, "/dir") => match shared.misbehaviour {
            Misbehaviour::EndlessDirectory => Response::new(
                Flood {
                    sent: shared.sent.clone(),
                    drip: None,
                }
                .boxed(),
            ),
            Misbehaviour::DrippingDirectory => Response::new(
                Flood {
                    sent: shared.sent.clone(),
                    drip: Some(Box::pin(tokio::time::sleep(Duration::ZERO))),
                }
                .boxed(),
            ),
            _ => json(
                StatusCode::OK,
                serde_json::json!({
                    "newNonce": format!("{base}/nonce"),
                    "newAccount": format!("{base}/account"),
                    "newOrder": format!("{base}/order"),
                    "revokeCert": format!("{base}/revoke"),
                    "keyChange": format!("{base}/key-change"),
                }),
            ),
        },
        (_, "/nonce") => Response::new(http_body_util::Empty::new().boxed()),
        (Method::POST, "/account") => {
            let mut r = json(StatusCode::CREATED, serde_json::json!({"status": "valid"}));
            r.headers_mut()
                .insert("location", format!("{base}/acct/1").parse().expect("value"));
            r
        }
        (Method::POST, "/order") => {
            shared.orders.fetch_add(1, Ordering::SeqCst);
            *shared.finalized.lock().expect("lock") = false;
            match &shared.misbehaviour {
                Misbehaviour::RateLimited(after) => {
                    let mut r = problem(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rateLimited",
                        "too many new orders recently",
                    );
                    r.headers_mut().insert("retry-after", after.parse().expect("value"));
                    r
                }
                Misbehaviour::Problem(detail) => problem(StatusCode::BAD_REQUEST, "rejectedIdentifier", detail),
                _ => {
                    let mut r = json(StatusCode::CREATED, order("pending", false));
                    r.headers_mut()
                        .insert("location", format!("{base}/order/1").parse().expect("value"));
                    r
                }
            }
        }
        (Method::POST, "/authz/1") => json(
            StatusCode::OK,
            serde_json::json!({
                "status": "valid",
                "identifier": {"type": "dns", "value": "ignored.example.test"},
                "challenges": [],
            }),
        ),
        (Method::POST, "/order/1") => match shared.misbehaviour {
            Misbehaviour::PendingOrder(after) => {
                let mut r = json(StatusCode::OK, order("pending", false));
                r.headers_mut().insert("retry-after", after.parse().expect("value"));
                r
            }
            _ if *shared.finalized.lock().expect("lock") => json(StatusCode::OK, order("valid", true)),
            _ => json(StatusCode::OK, order("ready", false)),
        },
        (Method::POST, "/finalize/1") => match issue(&shared, &body) {
            Ok(chain) => {
                *shared.certificate.lock().expect("lock") = Some(chain);
                *shared.finalized.lock().expect("lock") = true;
                json(StatusCode::OK, order("valid", true))
            }
            Err(e) => problem(StatusCode::BAD_REQUEST, "badCSR", &e),
        },
        (Method::POST, "/cert/1") => {
            let chain = shared.certificate.lock().expect("lock").clone().unwrap_or_default();
            shared.sent.fetch_add(chain.len() as u64, Ordering::SeqCst);
            Response::builder()
                .header("content-type", "application/pem-certificate-chain")
                .body(http_body_util::Full::new(Bytes::from(chain)).boxed())
                .expect("response")
        }
        _ => problem(StatusCode::NOT_FOUND, "malformed", "no such resource"),
    };
    let nonce = shared.nonces.fetch_add(1, Ordering::SeqCst);
    response
        .headers_mut()
        .insert("replay-nonce", format!("nonce{nonce:08}").parse().expect("value"));
    Ok(response)
}

/// The certificate chain (PEM) for the CSR in a finalize request's JWS.
fn issue(shared: &Shared, jws: &[u8]) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jws: serde_json::Value = serde_json::from_slice(jws).map_err(|e| e.to_string())?;
    let payload = b64
        .decode(jws["payload"].as_str().ok_or("no payload")?)
        .map_err(|e| e.to_string())?;
    let payload: serde_json::Value = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
    let csr = b64
        .decode(payload["csr"].as_str().ok_or("no csr")?)
        .map_err(|e| e.to_string())?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr).map_err(|e| e.to_string())?;
    let info = &csr.certification_request_info;
    let key = CsrKey(info.subject_pki.subject_public_key.data.to_vec());
    let names: Vec<String> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    let Misbehaviour::Issues { not_before, not_after } = shared.misbehaviour else {
        return Err("this CA does not issue".into());
    };
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(names).map_err(|e| e.to_string())?;
    params.not_before = now + time::Duration::seconds(not_before);
    params.not_after = now + time::Duration::seconds(not_after);
    let cert = params.signed_by(&key, &shared.pki.issuer).map_err(|e| e.to_string())?;
    Ok(format!("{}{}", cert.pem(), shared.pki.ca_pem))
}

/// The P-256 public key of a CSR (what linkgate generates).
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A body that never ends: 64 KiB at a time as fast as it is read, or one
/// byte a second.
struct Flood {
    sent: Arc<AtomicU64>,
    drip: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Flood {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = match &mut self.drip {
            None => Bytes::from(vec![b' '; 64 * 1024]),
            Some(sleep) => {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_secs(1));
                Bytes::from_static(b" ")
            }
        };
        self.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}
