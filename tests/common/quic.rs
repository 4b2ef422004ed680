//! An HTTP/3 client of linkgate: quinn and h3 on loopback, trusting the
//! test CA, with the session store kept so that a test can see the
//! tickets a server issued and try 0-RTT with them; and raw HTTP/3 (frames,
//! QPACK literal heads) for what h3's own client would never send.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::NamedGroup;
use rustls_pki_types::{CertificateDer, ServerName};

use super::{Pki, HANG_GUARD};

/// A QUIC client endpoint trusting `pki`, offering ALPN `h3`, whose TLS
/// session store counts the tickets it is given.
pub struct H3Client {
    pub endpoint: quinn::Endpoint,
    pub tickets: Arc<CountingStore>,
}

/// A request's sender on one HTTP/3 connection, with the connection's driver running.
pub struct H3Conn {
    pub quic: quinn::Connection,
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    _driver: tokio::task::JoinHandle<()>,
}

/// What came back for one request.
#[derive(Debug)]
pub struct H3Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl H3Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl H3Client {
    /// A client trusting `pki`; `early_data`: it offers 0-RTT when it holds a ticket.
    pub fn new(pki: &Pki, early_data: bool) -> Self {
        Self::build(pki, early_data, quinn::TransportConfig::default())
    }

    /// A client trusting `pki` whose streams each take at most `window`
    /// bytes before the client reads them (QUIC flow control).
    pub fn with_stream_window(pki: &Pki, window: u32) -> Self {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(window));
        Self::build(pki, false, transport)
    }

    fn build(pki: &Pki, early_data: bool, transport: quinn::TransportConfig) -> Self {
        let tickets = Arc::new(CountingStore::default());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).expect("add root");
        let mut tls = rustls::ClientConfig::builder_with_provider(linkgate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        tls.enable_early_data = early_data;
        tls.resumption = rustls::client::Resumption::store(tickets.clone());
        let quic = QuicClientConfig::try_from(tls).expect("QUIC client config");
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        endpoint.set_default_client_config(config);
        Self { endpoint, tickets }
    }

    /// The QUIC handshake with `addr`, naming `sni`.
    pub async fn handshake(&self, addr: SocketAddr, sni: &str) -> Result<quinn::Connection, quinn::ConnectionError> {
        let connecting = self.endpoint.connect(addr, sni).expect("connect");
        tokio::time::timeout(HANG_GUARD, connecting)
            .await
            .expect("handshake ends")
    }

    /// An HTTP/3 connection to `addr` naming `sni`.
    pub async fn connect(&self, addr: SocketAddr, sni: &str) -> Result<H3Conn, quinn::ConnectionError> {
        let quic = self.handshake(addr, sni).await?;
        Ok(H3Conn::over(quic).await)
    }
}

impl H3Conn {
    /// HTTP/3 on an established QUIC connection.
    pub async fn over(quic: quinn::Connection) -> Self {
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
            .await
            .expect("h3 client");
        let driver = tokio::spawn(async move {
            let _ = driver.wait_idle().await;
        });
        Self {
            quic,
            send,
            _driver: driver,
        }
    }

    /// Sends `GET <uri>` and reads the whole answer.
    pub async fn get(&mut self, uri: &str) -> Result<H3Answer, h3::error::StreamError> {
        let req = http::Request::get(uri).body(()).expect("request");
        self.send_request(req, None).await
    }

    /// Sends `req` with `body` (if any) and reads the whole answer.
    pub async fn send_request(
        &mut self,
        req: http::Request<()>,
        body: Option<Bytes>,
    ) -> Result<H3Answer, h3::error::StreamError> {
        let mut stream = self.send.send_request(req).await?;
        if let Some(body) = body {
            stream.send_data(body).await?;
        }
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        Ok(H3Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body,
        })
    }

    /// The leaf certificate the server presented.
    pub fn peer_leaf(&self) -> CertificateDer<'static> {
        peer_leaf(&self.quic)
    }
}

/// The leaf certificate the server presented on `quic`.
pub fn peer_leaf(quic: &quinn::Connection) -> CertificateDer<'static> {
    let identity = quic.peer_identity().expect("peer identity");
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .expect("a certificate chain");
    chain.first().expect("a leaf").clone()
}

/// rustls's in-memory session store, counting the TLS 1.3 tickets it is given.
#[derive(Debug)]
pub struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicUsize,
    /// The largest `max_early_data_size` a ticket allowed.
    early_data: AtomicUsize,
}

impl Default for CountingStore {
    fn default() -> Self {
        Self {
            inner: ClientSessionMemoryCache::new(32),
            tickets: AtomicUsize::new(0),
            early_data: AtomicUsize::new(0),
        }
    }
}

impl CountingStore {
    /// Tickets received so far.
    pub fn received(&self) -> usize {
        self.tickets.load(Ordering::SeqCst)
    }

    /// The most early data any ticket received allowed (0: none).
    pub fn early_data_allowed(&self) -> usize {
        self.early_data.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.early_data
            .fetch_max(value.max_early_data_size() as usize, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

// ---------------------------------------------------------------- raw HTTP/3, byte by byte

/// A QUIC variable-length integer (RFC 9000 §16).
pub fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=63 => vec![v as u8],
        64..=16383 => ((v as u16) | 0x4000).to_be_bytes().to_vec(),
        16384..=1_073_741_823 => ((v as u32) | 0x8000_0000).to_be_bytes().to_vec(),
        _ => (v | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
    }
}

/// An HTTP/3 frame (RFC 9114 §7.1).
pub fn frame(kind: u64, payload: &[u8]) -> Vec<u8> {
    [varint(kind), varint(payload.len() as u64), payload.to_vec()].concat()
}

/// A QPACK prefixed integer (RFC 9204 §4.1.1): `first` holds the bits
/// above the `bits`-bit prefix.
pub fn qpack_int(out: &mut Vec<u8>, first: u8, bits: u8, mut value: usize) {
    let max = (1usize << bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A HEADERS frame of exactly these fields, in this order, each a literal
/// field line with a literal name, nothing indexed or Huffman-coded: heads
/// h3's own encoder would never write (uppercase names, repeated or late
/// pseudo-header fields).
pub fn raw_headers(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![0x00, 0x00];
    for (name, value) in fields {
        qpack_int(&mut block, 0x20, 3, name.len());
        block.extend_from_slice(name.as_bytes());
        qpack_int(&mut block, 0x00, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    frame(0x01, &block)
}

/// The pseudo-header fields of `GET https://<authority><path>`.
pub fn get_head<'a>(authority: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", path),
    ]
}

/// Sends `bytes` on a new request stream of `quic` and ends it: the
/// answer's bytes as they came (frames, undecoded), or the code the server
/// reset it with.
pub async fn raw_request(quic: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, u64> {
    let (mut send, mut recv) = quic.open_bi().await.expect("request stream");
    // The server may stop the stream before all of it is written.
    if send.write_all(bytes).await.is_ok() {
        let _ = send.finish();
    }
    match tokio::time::timeout(HANG_GUARD, recv.read_to_end(1 << 20))
        .await
        .expect("answered or reset in time")
    {
        Ok(answer) => Ok(answer),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Err(code.into_inner()),
        Err(other) => panic!("neither answered nor reset: {other:?}"),
    }
}
