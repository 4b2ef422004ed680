//! A stand-in upstream that misbehaves on command, for the interleaving
//! tests. Unlike [`super::StandIn`] (hyper, well-behaved) it reads and writes
//! raw bytes, so it can answer before a body has arrived, close at a chosen
//! moment, stall, send a partial answer or `101`, and it records every byte
//! each connection brought and every request it parsed from them.
//!
//! What a request's target asks for:
//! - `/early?close=MS`: answered at once, before its body is read; the
//!   connection is closed MS ms later (what arrives meanwhile is only
//!   recorded as raw bytes, never parsed as requests); with `&announce`, the
//!   answer says `Connection: close`, as a server that does not read a body
//!   should (RFC 9112 §9.6);
//! - `/big?n=N`: N bytes of [`super::pattern`];
//! - `/stall?ms=MS`: answered after MS ms;
//! - `/101`: `101 Switching Protocols`, then the connection is closed;
//! - `/partial`: a head promising 100 bytes, 10 of them, then close;
//! - anything else: 200 with the body `ok <target> <body length>`, so each
//!   client can tell that the answer it got is the one to its own request.
//!
//! [`Origin::drop_reused`] makes it behave like a keep-alive server whose idle
//! timeout fires just as a request arrives: every request after the first
//! on a connection is read and the connection closed without an answer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A request as the origin parsed it.
#[derive(Debug, Clone)]
pub struct OriginRequest {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// 1 for the first connection the origin accepted, and so on.
    pub conn: usize,
}

impl OriginRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct State {
    requests: Vec<OriginRequest>,
    /// Every byte each connection brought, by connection.
    raw: Vec<Vec<u8>>,
}

pub struct Origin {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    open: Arc<AtomicUsize>,
    drop_reused: Arc<AtomicBool>,
    _stop: oneshot::Sender<()>,
}

impl Origin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let open = Arc::new(AtomicUsize::new(0));
        let drop_reused = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (st, op, dr) = (state.clone(), open.clone(), drop_reused.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let conn = {
                    let mut s = st.lock().expect("lock");
                    s.raw.push(Vec::new());
                    s.raw.len()
                };
                op.fetch_add(1, Ordering::SeqCst);
                let (st, op, dr) = (st.clone(), op.clone(), dr.clone());
                tokio::spawn(async move {
                    serve(stream, conn, &st, &dr).await;
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            state,
            open,
            drop_reused,
            _stop: stop,
        }
    }

    /// Close every reused connection, unanswered, when its next request arrives.
    pub fn drop_reused(&self, on: bool) {
        self.drop_reused.store(on, Ordering::SeqCst);
    }

    /// Every request parsed so far, in arrival order.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.state.lock().expect("lock").requests.clone()
    }

    /// Every byte connection `conn` (1-based) brought.
    pub fn raw(&self, conn: usize) -> Vec<u8> {
        self.state.lock().expect("lock").raw[conn - 1].clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.lock().expect("lock").raw.len()
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// An `[upstream]` section naming sendgrid.net, dialled here.
    pub fn upstream_section(&self, extra: &str) -> String {
        // 3 s unless `extra` sets its own.
        let timeout = if extra.contains("response_timeout") {
            ""
        } else {
            "response_timeout = \"3s\"\n"
        };
        format!(
            "[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{}\"\n{timeout}{extra}",
            self.addr
        )
    }
}

/// Reads into `buf` (recording every byte) until it holds `n` bytes past
/// `start`, or the peer closes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, need: usize, conn: usize, st: &Mutex<State>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < need {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                st.lock().expect("lock").raw[conn - 1].extend_from_slice(&chunk[..n]);
            }
        }
    }
    true
}

/// Reads until `buf` contains `pat`; returns the index just past it.
async fn fill_until(s: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8], conn: usize, st: &Mutex<State>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(i + pat.len());
        }
        let len = buf.len();
        if !fill(s, buf, len + 1, conn, st).await {
            return None;
        }
    }
}

fn query_number(target: &str, key: &str) -> Option<u64> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn answer(s: &mut TcpStream, status: &str, body: &[u8]) -> bool {
    let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    s.write_all(&out).await.is_ok()
}

async fn serve(mut s: TcpStream, conn: usize, st: &Mutex<State>, drop_reused: &AtomicBool) {
    let mut buf = Vec::new();
    let mut served = 0usize;
    loop {
        let Some(end) = fill_until(&mut s, &mut buf, b"\r\n\r\n", conn, st).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_owned();
        let target = first.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut record = OriginRequest {
            method,
            target: target.clone(),
            headers: headers.clone(),
            body: Vec::new(),
            conn,
        };
        if target.starts_with("/early") {
            // Answer without reading the body, then close a while later;
            // whatever arrives meanwhile is the rest of that body.
            st.lock().expect("lock").requests.push(record);
            if target.contains("announce") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nearly")
                    .await;
            } else {
                let _ = answer(&mut s, "200 OK", b"early").await;
            }
            let close = Duration::from_millis(query_number(&target, "close").unwrap_or(0));
            let _ = tokio::time::timeout(close, async {
                let mut sink = Vec::new();
                fill(&mut s, &mut sink, usize::MAX, conn, st).await
            })
            .await;
            return;
        }
        // The body: Content-Length or chunked.
        if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if !fill(&mut s, &mut buf, n, conn, st).await {
                return;
            }
            record.body = buf.drain(..n).collect();
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let Some(line_end) = fill_until(&mut s, &mut buf, b"\r\n", conn, st).await else {
                    return;
                };
                let size_line = String::from_utf8_lossy(&buf[..line_end - 2]).into_owned();
                buf.drain(..line_end);
                let Ok(size) = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16) else {
                    return;
                };
                if !fill(&mut s, &mut buf, size + 2, conn, st).await {
                    return;
                }
                record.body.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        st.lock().expect("lock").requests.push(record.clone());
        served += 1;
        if served > 1 && drop_reused.load(Ordering::SeqCst) {
            // The keep-alive timeout fired as the request arrived.
            return;
        }
        let ok = match target.split('?').next().unwrap_or_default() {
            "/big" => {
                let n = query_number(&target, "n").unwrap_or(1024) as usize;
                answer(&mut s, "200 OK", &super::pattern(n)).await
            }
            "/stall" => {
                tokio::time::sleep(Duration::from_millis(query_number(&target, "ms").unwrap_or(0))).await;
                answer(
                    &mut s,
                    "200 OK",
                    format!("ok {target} {}", record.body.len()).as_bytes(),
                )
                .await
            }
            "/101" => {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x-tunnel\r\n\r\n")
                    .await;
                return;
            }
            "/partial" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                return;
            }
            _ => {
                answer(
                    &mut s,
                    "200 OK",
                    format!("ok {target} {}", record.body.len()).as_bytes(),
                )
                .await
            }
        };
        if !ok {
            return;
        }
    }
}
