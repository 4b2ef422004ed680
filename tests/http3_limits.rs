//! HTTP/3 under the connection limits: QUIC connections hold slots of
//! `limits.max_connections` (shared with TCP), and once half the handshake
//! budget is in use a client whose address is not validated yet is sent a
//! QUIC Retry before any handshake work; seen on the wire by a UDP relay
//! between client and server.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::quic::H3Client;
use common::*;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

/// `[listen]` with HTTP/3 on a loopback UDP port of its own.
fn listen_http3() -> &'static str {
    "[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n"
}

/// QUIC connections count toward `limits.max_connections`, shared with
/// TCP: once every slot is taken the next QUIC connection is refused at
/// once (CONNECTION_REFUSED; QUIC has no backlog to wait in) and counted.
/// Each TCP worker holds one slot while it waits to accept, so the test
/// allows for those: `workers + 2` slots, and more QUIC connections than
/// that are tried.
#[tokio::test]
async fn quic_connections_count_toward_max_connections() {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let max = workers + 2;
    let Served {
        dir: _dir, pki, up: _up, lg, ..
    } = Setup::new()
        .listen(listen_http3())
        .host(CLICK)
        .admin()
        .limits(&format!(
            "max_connections = {max}\nmax_handshakes = {max}\nconnections_per_address = {max}\nhandshakes_per_address = {max}\n"
        ))
        .start()
        .await;
    let client = H3Client::new(&pki, false);
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..=max {
        match client.connect(lg.http3.expect("http3 socket"), CLICK).await {
            Ok(mut conn) => {
                // Served: the slot is held by a connection that works.
                assert_eq!(
                    conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
                    200
                );
                open.push(conn);
            }
            Err(quinn::ConnectionError::ConnectionClosed(close)) => {
                assert_eq!(
                    close.error_code,
                    quinn::TransportErrorCode::CONNECTION_REFUSED,
                    "{close:?}"
                );
                refused += 1;
            }
            Err(other) => panic!("neither served nor refused: {other:?}"),
        }
    }
    assert!(!open.is_empty() && open.len() <= max, "{} served", open.len());
    assert!(refused >= 1, "with every slot taken a QUIC connection is refused");
    let counted = metric(
        lg.admin.expect("admin"),
        "linkgate_connections_refused_total{reason=\"max_connections\"}",
    )
    .await;
    assert_eq!(counted, Some(refused as f64));

    // A slot given back is taken again.
    let quic = open.pop().expect("one open").quic;
    quic.close(0u32.into(), b"done");
    drop(open);
    wait_for("a slot given back", async || {
        client.connect(lg.http3.expect("http3 socket"), CLICK).await.is_ok()
    })
    .await;
    lg.stop().await;
}

/// A UDP relay on loopback between one client and `server`: what it saw
/// of the server's datagrams, and whether it passes them on.
struct Relay {
    addr: SocketAddr,
    /// A datagram from the server has arrived.
    answered: Arc<Notify>,
    /// A QUIC v1 Retry packet came from the server (long header, type 3).
    saw_retry: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// `to_client`: false makes a client whose handshake never completes
    /// (what it sends reaches the server; nothing comes back).
    async fn start(server: SocketAddr, to_client: bool) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind relay");
        let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind relay");
        back.connect(server).await.expect("connect relay");
        let addr = front.local_addr().expect("addr");
        let (answered, saw_retry) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
        let (notify, retry) = (answered.clone(), saw_retry.clone());
        let task = tokio::spawn(async move {
            let (mut up, mut down) = ([0u8; 2048], [0u8; 2048]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let _ = back.send(&up[..n]).await;
                    }
                    Ok(n) = back.recv(&mut down) => {
                        if down[0] & 0xf0 == 0xf0 {
                            retry.store(true, Ordering::SeqCst);
                        }
                        notify.notify_one();
                        if let (true, Some(client)) = (to_client, client) {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            answered,
            saw_retry,
            task,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Unloaded, a new client is served without a Retry; with half the
/// handshake budget (here one of two) held by a handshake that never
/// completes, the next client is sent a Retry first, and is then served:
/// the QUIC address validation of RFC 9000 §8.1, under load only.
#[tokio::test]
async fn a_retry_is_sent_once_half_the_handshake_budget_is_in_use() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .listen(listen_http3())
        .host(CLICK)
        .limits("max_handshakes = 2\nhandshakes_per_address = 2\nhandshake_timeout = \"3s\"\n")
        .start()
        .await;
    let server = lg.http3.expect("http3 socket");

    let quiet = Relay::start(server, true).await;
    let client = H3Client::new(&pki, false);
    let mut conn = client.connect(quiet.addr, CLICK).await.expect("served");
    assert_eq!(
        conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    assert!(!quiet.saw_retry.load(Ordering::SeqCst), "no Retry without load");
    drop(conn);

    // A handshake the server has begun (it answered) and that never completes.
    let stalled = Relay::start(server, false).await;
    let stuck = H3Client::new(&pki, false);
    // Not awaited: quinn's endpoint drives it (and resends its Initial) meanwhile.
    let connecting = stuck.endpoint.connect(stalled.addr, CLICK).expect("connect");
    tokio::time::timeout(HANG_GUARD, stalled.answered.notified())
        .await
        .expect("the server began the handshake");

    let loaded = Relay::start(server, true).await;
    let fresh = H3Client::new(&pki, false);
    let mut conn = fresh.connect(loaded.addr, CLICK).await.expect("served after the Retry");
    assert!(loaded.saw_retry.load(Ordering::SeqCst), "a Retry under load");
    assert_eq!(
        conn.get(&format!("https://{CLICK}/")).await.expect("answer").status,
        200
    );
    assert_eq!(up.received().len(), 2);
    drop((connecting, stalled));
    lg.stop().await;
}

/// h3 buffers a frame other than DATA whole before decoding it: a request
/// stream announcing a HEADERS frame of 4 MiB (far over
/// `max_header_bytes`) and then feeding it is stopped from the frame's
/// head (STOP_SENDING, H3_EXCESSIVE_LOAD), before any of it is buffered;
/// nothing is forwarded, and the connection goes on serving.
#[tokio::test]
async fn a_request_head_announced_far_over_max_header_bytes_is_stopped_before_it_is_buffered() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = Setup::new()
        .listen(listen_http3())
        .host(CLICK)
        .limits("max_header_bytes = 4096\n")
        .start()
        .await;
    let client = H3Client::new(&pki, false);
    let quic = client
        .handshake(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("handshake");
    let mut h3 = common::quic::H3Conn::over(quic.clone()).await;
    let (mut send, _recv) = quic.open_bi().await.expect("stream");
    // HEADERS (type 0x01), length 4 MiB as a four-byte variable-length integer.
    send.write_all(&[0x01, 0x80, 0x40, 0x00, 0x00])
        .await
        .expect("frame head");
    // What the client goes on sending while it is allowed to.
    let chunk = vec![b'a'; 16 * 1024];
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Err(e) = send.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
    .expect("the stream is stopped in time");
    assert!(
        matches!(stopped, quinn::WriteError::Stopped(code) if u64::from(code) == 0x107),
        "H3_EXCESSIVE_LOAD: {stopped:?}"
    );
    // The connection still serves requests.
    let answer = h3
        .get(&format!("https://{CLICK}/ls/click?upn=after"))
        .await
        .expect("answer");
    assert_eq!(answer.status, 200);
    let received = up.received();
    assert_eq!(received.len(), 1, "only the request after: {received:?}");
    lg.stop().await;
}

/// What a client can make linkgate hold of request bodies it has not read
/// is bounded per connection, as over HTTP/2: the connection's streams wait
/// for its one upstream slot (`upstream_per_connection = 1`, taken by a
/// request whose upstream never answers), and the client writes large
/// bodies on 16 streams at once. quinn's defaults took 1.25 MB on each
/// stream, with no bound for the connection (12 MB here); QUIC's flow
/// control now stops the client after about a megabyte in all, and other
/// clients are served meanwhile.
#[tokio::test]
async fn request_bodies_a_client_sends_ahead_are_bounded_per_connection() {
    // An upstream that accepts and never reads or answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            kept.push(sock);
        }
    });
    let Served { dir: _dir, pki, lg, .. } = Setup::new()
        .listen(listen_http3())
        .host(CLICK)
        .limits("upstream_per_connection = 1\n")
        .upstream(move |_| {
            format!("[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{silent_addr}\"\nresponse_timeout = \"30s\"\n")
        })
        .start()
        .await;
    let addr = lg.http3.expect("http3 socket");
    let client = H3Client::new(&pki, false);
    let quic = client.handshake(addr, CLICK).await.expect("handshake");
    let _h3 = common::quic::H3Conn::over(quic.clone()).await;
    let post = |length: &str| {
        let mut head = common::quic::get_head(CLICK, "/wf/upload");
        head[0] = (":method", "POST");
        let mut fields: Vec<(&str, String)> = head.into_iter().map(|(n, v)| (n, v.to_owned())).collect();
        fields.push(("content-length", length.to_owned()));
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        common::quic::raw_headers(&fields)
    };
    // The request that takes the slot: its body whole, its answer never comes.
    let (mut first, _first_recv) = quic.open_bi().await.expect("stream");
    first.write_all(&post("1")).await.expect("head");
    first.write_all(&common::quic::frame(0x00, b"x")).await.expect("body");
    first.finish().expect("finish");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // 16 more, each announcing 8 MiB and writing it as fast as allowed.
    const BODY: u64 = 8 << 20;
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let (mut send, recv) = quic.open_bi().await.expect("stream");
        let written = written.clone();
        let head = [
            post(&BODY.to_string()),
            common::quic::varint(0x00),
            common::quic::varint(BODY),
        ]
        .concat();
        writers.push(tokio::spawn(async move {
            let _recv = recv;
            if send.write_all(&head).await.is_err() {
                return;
            }
            let chunk = vec![b'b'; 16 * 1024];
            let mut left = BODY as usize;
            while left > 0 {
                let n = chunk.len().min(left);
                if send.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
                written.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    // Until the client is held back: no progress for 2 s.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        assert!(now < 64 << 20, "the client was never held back: {now} bytes taken");
    }
    assert!(last > 0, "some body bytes were taken");
    assert!(
        last < 4 << 20,
        "{last} body bytes taken from one connection whose requests wait for an upstream slot"
    );

    // Another client is served meanwhile (its request waits for no one's slot: it is refused early).
    let mut other = client.connect(addr, CLICK).await.expect("second connection");
    let answer = other
        .get(&format!("https://{}/ls/click", "other.example"))
        .await
        .expect("answer");
    assert_eq!(answer.status, 421, "served while the first client is held back");
    for w in writers {
        w.abort();
    }
    held.abort();
    lg.stop().await;
}
