//! The load itself. Every connection is established first (QUIC handshake
//! and HTTP/3's control streams, all at once), each on a UDP socket of its
//! own as h2load gives each connection a TCP socket; only then does the
//! clock start. For the duration, each connection keeps `streams` requests
//! in flight: `streams` tasks per connection, each sending a GET, reading
//! the answer's head and whole body, and sending the next. A request counts
//! if it ends before the deadline; one still in flight then is finished but
//! not counted. The generator's own CPU time is taken over the same span.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{HeaderValue, USER_AGENT};
use tokio::task::{JoinHandle, JoinSet};

use crate::args::Args;
use crate::cpu::Cpu;

/// A request that takes longer is given up and counted as an error (wrk's
/// `--timeout 10s`, as the benchmark runs it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a connection's handshake (QUIC and HTTP/3 setup) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the connections' CONNECTION_CLOSE is given to go out at the end.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// HTTP/3's error code for a close that is no error (RFC 9114 §8.1).
const H3_NO_ERROR: u32 = 0x100;

const AGENT: &str = concat!("h3load/", env!("CARGO_PKG_VERSION"));

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Connections established (of those asked for; the rest are `errors.connect`).
    pub connections: usize,
    pub streams: usize,
    /// The measured span: requests are counted if they end within it.
    pub seconds: f64,
    /// Answers with a 2xx or 3xx status read whole within the measured span.
    pub requests: u64,
    /// Each counted request's time from sending to its body's end, in µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Body bytes of the counted answers.
    pub body_bytes: u64,
    pub errors: Errors,
    /// CPU time h3load spent from the start of the measurement until its last stream stopped.
    pub cpu: Cpu,
    /// The wall time of that same span.
    pub busy_seconds: f64,
}

/// Requests and connections that failed, by how.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Errors {
    /// Answers with another status than 2xx or 3xx.
    pub status: u64,
    /// Requests whose stream or connection failed (reset, refused, closed).
    pub stream: u64,
    /// Requests with no whole answer within `REQUEST_TIMEOUT`.
    pub timeout: u64,
    /// Connections that could not be established.
    pub connect: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.status + self.stream + self.timeout + self.connect
    }
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start a QUIC connection: {0}")]
    Start(#[from] quinn::ConnectError),
    #[error("QUIC handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("HTTP/3 setup failed: {0}")]
    Http3(#[from] h3::error::ConnectionError),
    #[error("no connection within {CONNECT_TIMEOUT:?}")]
    Timeout,
}

/// One established connection and what keeps it going.
struct Conn {
    endpoint: quinn::Endpoint,
    quic: quinn::Connection,
    send: Sender,
    /// Drives HTTP/3's control stream; ends with the connection.
    driver: JoinHandle<()>,
}

/// Runs the load `args` asks for against `addr`; the first connection
/// failure, if any, is printed on stderr (the rest are only counted).
pub async fn run(args: &Args, client: &quinn::ClientConfig, addr: SocketAddr) -> Outcome {
    let mut errors = Errors::default();
    let conns = connect_all(args, client, addr, &mut errors).await;

    let cpu0 = Cpu::now();
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut workers = JoinSet::new();
    for conn in &conns {
        for _ in 0..args.streams {
            workers.spawn(stream_loop(
                conn.send.clone(),
                conn.quic.clone(),
                args.target.uri.clone(),
                deadline,
            ));
        }
    }
    let mut tally = Tally::default();
    while let Some(done) = workers.join_next().await {
        // A task that panicked has nothing to add (the panic was printed).
        if let Ok(done) = done {
            tally.add(done);
        }
    }
    let busy = start.elapsed();
    let cpu = Cpu::now().since(cpu0);
    let connections = conns.len();
    close(conns).await;

    errors.status += tally.errors.status;
    errors.stream += tally.errors.stream;
    errors.timeout += tally.errors.timeout;
    tally.latencies_us.sort_unstable();
    Outcome {
        connections,
        streams: args.streams,
        seconds: args.duration.as_secs_f64(),
        requests: tally.requests,
        latencies_us: tally.latencies_us,
        body_bytes: tally.body_bytes,
        errors,
        cpu,
        busy_seconds: busy.as_secs_f64(),
    }
}

/// All of `args.connections`, established at once.
async fn connect_all(args: &Args, client: &quinn::ClientConfig, addr: SocketAddr, errors: &mut Errors) -> Vec<Conn> {
    let mut pending = JoinSet::new();
    for _ in 0..args.connections {
        let (client, host) = (client.clone(), args.target.host.clone());
        pending.spawn(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connect(client, addr, host))
                .await
                .unwrap_or(Err(ConnectError::Timeout))
        });
    }
    let mut conns = Vec::with_capacity(args.connections);
    while let Some(done) = pending.join_next().await {
        match done {
            Ok(Ok(conn)) => conns.push(conn),
            Ok(Err(e)) => {
                if errors.connect == 0 {
                    eprintln!("h3load: connection to {addr} failed: {e}");
                }
                errors.connect += 1;
            }
            Err(_) => errors.connect += 1,
        }
    }
    conns
}

/// One connection: its own UDP socket, the QUIC handshake naming `host`, HTTP/3 on it.
async fn connect(client: quinn::ClientConfig, addr: SocketAddr, host: String) -> Result<Conn, ConnectError> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = quinn::Endpoint::client(local).map_err(ConnectError::Socket)?;
    let quic = endpoint.connect_with(client, addr, &host)?.await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone())).await?;
    let driver = tokio::spawn(async move {
        // The connection's end, whatever it is, is seen by the requests.
        let _ = driver.wait_idle().await;
    });
    Ok(Conn {
        endpoint,
        quic,
        send,
        driver,
    })
}

/// Closes every connection (no error) and gives the closes a moment to go out.
async fn close(conns: Vec<Conn>) {
    for conn in &conns {
        conn.quic.close(H3_NO_ERROR.into(), b"done");
    }
    let sent = async {
        for conn in &conns {
            conn.endpoint.wait_idle().await;
        }
    };
    // Unsent closes only make the server wait for its idle timeout.
    let _ = tokio::time::timeout(CLOSE_WAIT, sent).await;
    for conn in conns {
        conn.driver.abort();
    }
}

/// What the streams of a run counted.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    latencies_us: Vec<u32>,
    body_bytes: u64,
    errors: Errors,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        self.latencies_us.extend(other.latencies_us);
        self.body_bytes += other.body_bytes;
        self.errors.status += other.errors.status;
        self.errors.stream += other.errors.stream;
        self.errors.timeout += other.errors.timeout;
    }
}

/// One stream's worth of load: a request at a time until `deadline`. Stops
/// early when its connection is gone (every request would fail at once).
async fn stream_loop(mut send: Sender, quic: quinn::Connection, uri: http::Uri, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let began = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, get(&mut send, &uri)).await;
        let ended = Instant::now();
        if ended > deadline {
            break;
        }
        match result {
            Ok(Ok((status, bytes))) if status.is_success() || status.is_redirection() => {
                tally.requests += 1;
                tally.body_bytes += bytes;
                let micros = ended.duration_since(began).as_micros();
                tally.latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
            Ok(Ok(_)) => tally.errors.status += 1,
            Ok(Err(_)) => {
                tally.errors.stream += 1;
                if quic.close_reason().is_some() {
                    break;
                }
            }
            Err(_) => tally.errors.timeout += 1,
        }
    }
    tally
}

/// `GET uri` on a new stream; the answer's status and its body's length, read whole.
async fn get(send: &mut Sender, uri: &http::Uri) -> Result<(http::StatusCode, u64), h3::error::StreamError> {
    let mut req = http::Request::new(());
    *req.uri_mut() = uri.clone();
    req.headers_mut().insert(USER_AGENT, HeaderValue::from_static(AGENT));
    let mut stream = send.send_request(req).await?;
    stream.finish().await?;
    let status = stream.recv_response().await?.status();
    let mut bytes = 0u64;
    while let Some(mut chunk) = stream.recv_data().await? {
        let n = chunk.remaining();
        chunk.advance(n);
        bytes += n as u64;
    }
    Ok((status, bytes))
}
