//! Test helpers: a test PKI made with rcgen, a stand-in upstream (plain or
//! TLS) that records what it receives, linkgate started in-process on
//! loopback, and clients that trust the test CA.
#![allow(dead_code)]

pub mod ca;
pub mod origin;
pub mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

/// A generous bound for things that should happen at once; only guards against hangs.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// A loopback port free a moment ago, for servers that cannot be told to
/// bind port 0 and report it (HAProxy, Pebble, and linkgate when another
/// server must know its port before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

// ---------------------------------------------------------------- PKI

/// A test certificate authority.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
}

/// A certificate and key, as PEM, plus the leaf's DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Leaf {
    /// A TLS acceptor presenting this certificate for any name.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = <rustls_pki_types::PrivateKeyDer<'static> as rustls_pki_types::pem::PemObject>::from_pem_slice(
            self.key_pem.as_bytes(),
        )
        .expect("key pem");
        let config = rustls::ServerConfig::builder_with_provider(linkgate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, "linkgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`, signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A leaf for `names` valid from `not_before` to `not_after`.
    pub fn leaf_valid(
        &self,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// An intermediate CA signed by this one; its `ca_pem` is the intermediate's certificate.
    pub fn intermediate(&self) -> Pki {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "linkgate test intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a leaf for `names` as `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> Leaf {
        let leaf = self.leaf(names);
        std::fs::write(dir.join(format!("{stem}.pem")), &leaf.cert_pem).expect("write cert");
        std::fs::write(dir.join(format!("{stem}.key")), &leaf.key_pem).expect("write key");
        leaf
    }

    /// Writes the CA's private key (PEM) to `<dir>/ca.key`, for tools that sign as the CA.
    pub fn write_ca_key(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.key");
        std::fs::write(&path, self.issuer.key().serialize_pem()).expect("write CA key");
        path
    }

    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write CA");
        path
    }
}

// ---------------------------------------------------------------- stand-in upstream

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

impl StandIn {
    /// A plain-http stand-in.
    pub async fn plain() -> Self {
        Self::start(None, None).await
    }

    /// A plain-http stand-in that closes a keep-alive connection, without a
    /// word, once it has been idle for `idle` (as upstreams do).
    pub async fn plain_closing_idle_after(idle: Duration) -> Self {
        Self::start(None, Some(idle)).await
    }

    /// An https stand-in presenting `leaf`.
    pub async fn tls(leaf: &Leaf) -> Self {
        Self::start(Some(leaf.acceptor()), None).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>, idle: Option<Duration>) -> Self {
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
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, reqs.clone(), rel.clone(), conn));
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

// ---------------------------------------------------------------- linkgate in-process

/// linkgate running in this process on loopback ports.
pub struct Linkgate {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub live: Arc<linkgate::reload::Live>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    reloader: Option<tokio::task::JoinHandle<()>>,
}

impl Linkgate {
    /// Writes `toml` to `<dir>/linkgate.toml`, loads it and serves it.
    pub async fn start(dir: &Path, toml: &str) -> Self {
        let path = dir.join("linkgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = linkgate::config::Config::load(&path).unwrap_or_else(|e| panic!("config refused: {e}"));
        let listeners = linkgate::server::Listeners::bind(&config).await.expect("bind");
        let https = listeners.https_addr().expect("https addr");
        let http = listeners.http_addr().map(|a| a.expect("http addr"));
        let admin = listeners.admin_addr().map(|a| a.expect("admin addr"));
        let live = linkgate::reload::Live::new(config, linkgate::metrics::Metrics::new()).expect("live");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(linkgate::server::run(live.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Self {
            https,
            http,
            admin,
            live,
            stop: Some(stop),
            task: Some(task),
            reloader: None,
        }
    }

    /// Like [`Linkgate::start`], with the file watcher running (reloads on file changes).
    pub async fn start_watching(dir: &Path, toml: &str) -> Self {
        let mut lg = Self::start(dir, toml).await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lg.reloader = Some(tokio::spawn(linkgate::reload::run(lg.live.clone(), tx, rx)));
        lg
    }

    /// `https://<host>:<port><path>` for a client that resolves `host` to us.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https.port())
    }

    pub fn http_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http.expect("http listener").port())
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// Stops the server and waits for it to finish draining.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(HANG_GUARD, task)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server result");
        }
    }
}

impl Drop for Linkgate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(r) = self.reloader.take() {
            r.abort();
        }
    }
}

/// A `[listen]` section on loopback port 0, with a plain-http listener too.
/// The branded host most tests use.
pub const CLICK: &str = "click.example.test";

/// linkgate serving [`CLICK`] (its certificate from a fresh test PKI) in
/// front of a plain stand-in upstream, with `extra` appended to the config.
pub async fn serve_click(extra: &str) -> (tempfile::TempDir, Pki, StandIn, Linkgate) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let up = StandIn::plain().await;
    let toml = format!(
        "{}{}{}{extra}",
        listen_section(),
        plain_upstream(&up),
        host_section(CLICK, "click")
    );
    let lg = Linkgate::start(dir.path(), &toml).await;
    (dir, pki, up, lg)
}

pub fn listen_section() -> &'static str {
    "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n"
}

/// An `[upstream]` section for a plain stand-in, dialled via `connect_to`
/// while the URL names sendgrid.net.
pub fn plain_upstream(up: &StandIn) -> String {
    format!(
        "[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{}\"\nresponse_timeout = \"2s\"\n",
        up.addr
    )
}

pub fn host_section(name: &str, stem: &str) -> String {
    format!("[[host]]\nname = \"{name}\"\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n")
}

// ---------------------------------------------------------------- clients

/// A rustls client config trusting only `pki`, offering `alpn`.
pub fn client_tls(pki: &Pki, alpn: &[&[u8]]) -> rustls::ClientConfig {
    client_tls_trusting(&pki.ca_der, alpn)
}

/// A client configuration trusting only `root`, offering `alpn`.
pub fn client_tls_trusting(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("add root");
    let mut config = rustls::ClientConfig::builder_with_provider(linkgate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A reqwest client trusting `pki` that resolves each of `hosts` to linkgate.
pub fn client(pki: &Pki, lg: &Linkgate, hosts: &[&str]) -> reqwest::Client {
    client_with(pki, lg, hosts, false)
}

/// Like [`client`], speaking HTTP/2 only (ALPN h2).
pub fn h2_client(pki: &Pki, lg: &Linkgate, hosts: &[&str]) -> reqwest::Client {
    client_with(pki, lg, hosts, true)
}

fn client_with(pki: &Pki, lg: &Linkgate, hosts: &[&str], h2: bool) -> reqwest::Client {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(pki, alpn))
        .tls_info(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HANG_GUARD);
    builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    for host in hosts {
        // reqwest resolves by name only; the URL's port picks the listener.
        builder = builder.resolve(host, lg.https);
    }
    builder.build().expect("client")
}

/// Sends raw bytes over TLS with SNI `sni` and returns everything read until the server closes.
pub async fn raw_tls(pki: &Pki, addr: SocketAddr, sni: &str, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tls.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sends raw bytes over plain TCP and returns everything read until the server closes.
pub async fn raw_plain(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tcp.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// True once the server has closed `s` (EOF or reset), within `within`.
/// Waits until `check` holds, failing the test after [`HANG_GUARD`].
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn closed_by_server<S: tokio::io::AsyncRead + Unpin + ?Sized>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The status code at the start of a raw HTTP/1 response.
pub fn status_of(raw: &str) -> u16 {
    raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// True when the error chain contains a rustls alert `alert`, sent by the peer.
pub fn has_alert(err: &(dyn std::error::Error + 'static), alert: rustls::AlertDescription) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::AlertReceived(a)) = e.downcast_ref::<rustls::Error>() {
            if *a == alert {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if has_alert(inner, alert) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}
