//! The stand-in upstream: a well-behaved hyper server (plain or TLS) on
//! loopback, standing in for sendgrid.net, that records every request it
//! receives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use super::Leaf;

/// What the stand-in upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target exactly as sent (origin-form).
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Which connection it came on: 1 for the first the stand-in accepted, and so on.
    pub conn: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A stand-in for sendgrid.net. Routes:
/// - first, the answer [`StandIn::plain_answering`]'s function picks for a
///   request's Host header and target, when it picks one;
/// - `/stream`: sends `first-chunk\n`, waits for [`StandIn::release`], then `rest\n`;
/// - `/big?n=N`: N bytes of a known pattern;
/// - `/echo`: the request body back;
/// - `/slow`: answers after 5 s;
/// - `/redirect`: 302 with Location, Set-Cookie and Content-Encoding;
/// - `/hop`: a response carrying hop-by-hop headers;
/// - `/rate-limited`: an ACME CA's 429 with `Retry-After: 7200`;
/// - anything else: 200 `ok`.
pub struct StandIn {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Connections open right now.
    open: Arc<AtomicUsize>,
    pub release: Arc<Notify>,
    _stop: oneshot::Sender<()>,
}

type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A test's own answer (status, body) to a request, from its Host header and
/// target; `None` leaves the request to the usual routes.
type Answers = Arc<dyn Fn(&str, &str) -> Option<(u16, &'static str)> + Send + Sync>;

impl StandIn {
    /// A plain-http stand-in.
    pub async fn plain() -> Self {
        Self::start(None, None, None).await
    }

    /// A plain-http stand-in that answers what `answer(host, target)` picks,
    /// and what the usual routes say where it picks nothing: a provider's
    /// 404 or its page for an unknown Host, for chosen brandings. A 3xx
    /// answer's body is also its `Location` (a click's redirect to the landing page).
    pub async fn plain_answering(
        answer: impl Fn(&str, &str) -> Option<(u16, &'static str)> + Send + Sync + 'static,
    ) -> Self {
        Self::start(None, None, Some(Arc::new(answer))).await
    }

    /// A plain-http stand-in that closes a keep-alive connection, without a
    /// word, once it has been idle for `idle` (as upstreams do).
    pub async fn plain_closing_idle_after(idle: Duration) -> Self {
        Self::start(None, Some(idle), None).await
    }

    /// An https stand-in presenting `leaf`.
    pub async fn tls(leaf: &Leaf) -> Self {
        Self::start(Some(leaf.acceptor()), None, None).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>, idle: Option<Duration>, answers: Option<Answers>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let open = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (reqs, rel, open_conns) = (requests.clone(), release.clone(), open.clone());
        tokio::spawn(async move {
            let mut accepted = 0;
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted += 1;
                let conn = accepted;
                let (reqs, rel, tls, open) = (reqs.clone(), rel.clone(), tls.clone(), open_conns.clone());
                let answers = answers.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, reqs.clone(), rel.clone(), conn, answers.clone()));
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    if let Some(idle) = idle {
                        // hyper's head timer runs from the end of each response.
                        builder
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(idle);
                    }
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            requests,
            open,
            release,
            _stop: stop,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// Connections open to the stand-in right now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// The byte pattern `/big` serves: byte i is `i % 251`.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

async fn handle(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    release: Arc<Notify>,
    conn: usize,
    answers: Option<Answers>,
) -> Result<Response<UpBody>, Infallible> {
    let (parts, body) = req.into_parts();
    // Only complete requests are recorded: a body that fails to arrive is an
    // aborted request the upstream never acts on.
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full("incomplete request"))
                .expect("response"))
        }
    };
    let target = parts.uri.to_string();
    requests.lock().expect("lock").push(Recorded {
        method: parts.method.to_string(),
        target: target.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        conn,
    });
    let host = parts.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
    if let Some((status, body)) = answers.and_then(|answer| answer(host, &target)) {
        let mut resp = Response::builder().status(status);
        if (300..400).contains(&status) {
            // A redirect's body is where it points, as a provider's click answer does.
            resp = resp.header("location", body);
        }
        return Ok(resp.body(full(body)).expect("response"));
    }
    let path = parts.uri.path();
    let resp = match path {
        "/stream" => {
            let (mut tx, rx) =
                http_body_util::channel::Channel::<Bytes, Box<dyn std::error::Error + Send + Sync>>::new(4);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"first-chunk\n")).await;
                release.notified().await;
                let _ = tx.send_data(Bytes::from_static(b"rest\n")).await;
            });
            Response::new(rx.boxed())
        }
        "/big" => {
            let n: usize = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1024);
            Response::new(full(pattern(n)))
        }
        "/echo" => Response::new(full(body)),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("slow"))
        }
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "https://www.example.com/landing?utm=1")
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/")
            .header("content-encoding", "gzip")
            .body(full(&b"\x1f\x8b not really gzip"[..]))
            .expect("response"),
        "/hop" => Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "yes")
            .body(full("hop"))
            .expect("response"),
        // What an ACME CA answers when a rate limit is hit (RFC 8555 §6.6).
        "/rate-limited" => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "7200")
            .header("content-type", "application/problem+json")
            .body(full(
                r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many certificates already issued"}"#,
            ))
            .expect("response"),
        // What a provider answers when the Host header was not the branded name.
        _ if parts.headers.get("host").is_some_and(|h| h == "sendgrid.net") => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("<html><title>Wrong Link</title>Wrong Link</html>"))
            .expect("response"),
        _ => Response::builder()
            .header("x-upstream", "stand-in")
            .body(full("ok"))
            .expect("response"),
    };
    Ok(resp)
}
