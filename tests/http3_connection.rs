//! HTTP/3 connection errors a client commits on its unidirectional
//! streams (RFC 9114 §6.2, §7.2; RFC 9204 §4), each closing the connection
//! with the error code the RFCs give, as HTTP/2 answers a connection
//! error with GOAWAY; and what bounds those streams: the client's QPACK
//! streams are read and their data discarded, streams of unknown types are
//! stopped at once, a client has at most 8 open. Written byte by byte over
//! quinn, with no HTTP/3 client (which would open streams of its own).

mod common;

use std::future::Future;
use std::task::{Context, Poll, Waker};

use common::quic::{frame, get_head, raw_headers, raw_request, varint, H3Client};
use common::*;

const H3_STREAM_CREATION_ERROR: u64 = 0x103;
const H3_CLOSED_CRITICAL_STREAM: u64 = 0x104;
const H3_EXCESSIVE_LOAD: u64 = 0x107;
const H3_ID_ERROR: u64 = 0x108;
const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;
const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
const QPACK_DECODER_STREAM_ERROR: u64 = 0x202;

/// Stream types (RFC 9114 §6.2, RFC 9204 §4.2).
const CONTROL: u8 = 0x00;
const PUSH: u8 = 0x01;
const ENCODER: u8 = 0x02;
const DECODER: u8 = 0x03;

async fn serve() -> Served {
    Setup::new()
        .listen("[listen]\nhttps = \"127.0.0.1:0\"\nhttp3 = \"127.0.0.1:0\"\n")
        .host(CLICK)
        .start()
        .await
}

/// A control stream's start: its type and an empty SETTINGS frame.
fn control() -> Vec<u8> {
    [vec![CONTROL], frame(0x04, &[])].concat()
}

/// Opens a unidirectional stream and writes `bytes` on it, leaving it open
/// (dropping a quinn stream would finish it).
async fn uni(quic: &quinn::Connection, bytes: &[u8]) -> quinn::SendStream {
    let mut stream = quic.open_uni().await.expect("stream");
    let _ = stream.write_all(bytes).await;
    stream
}

/// The application error code the server closed `quic` with.
async fn closed_with(quic: &quinn::Connection) -> Result<u64, quinn::ConnectionError> {
    match tokio::time::timeout(HANG_GUARD, quic.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => Ok(close.error_code.into_inner()),
        Ok(other) => Err(other),
        Err(_) => panic!("the connection was not closed"),
    }
}

#[tokio::test]
async fn qpack_and_control_stream_errors_close_the_connection_with_their_code() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve().await;
    let addr = lg.http3.expect("http3 socket");
    let client = H3Client::new(&pki, false);
    let gib = [0xc0, 0, 0, 0, 0x40, 0, 0, 0];
    let cases: Vec<(&str, Vec<Vec<u8>>, u64)> = vec![
        (
            "QPACK encoder: a table capacity of 4096 where 0 is allowed (RFC 9204 §4.3.1)",
            vec![vec![ENCODER, 0x3f, 0xe1, 0x1f]],
            QPACK_ENCODER_STREAM_ERROR,
        ),
        (
            "QPACK encoder: an insert into a table of capacity 0",
            vec![vec![ENCODER, 0x43, b'a', b'b', b'c', 0x01, b'x']],
            QPACK_ENCODER_STREAM_ERROR,
        ),
        (
            "QPACK decoder: Insert Count Increment 0 (RFC 9204 §4.4.3)",
            vec![vec![DECODER, 0x00]],
            QPACK_DECODER_STREAM_ERROR,
        ),
        (
            "QPACK decoder: a Section Acknowledgment of nothing (RFC 9204 §4.4.1)",
            vec![vec![DECODER, 0x84]],
            QPACK_DECODER_STREAM_ERROR,
        ),
        (
            "CANCEL_PUSH for a push never promised (RFC 9114 §7.2.3)",
            vec![[control(), frame(0x03, &[0x00])].concat()],
            H3_ID_ERROR,
        ),
        (
            "MAX_PUSH_ID going down (RFC 9114 §7.2.7)",
            vec![[control(), frame(0x0d, &[10]), frame(0x0d, &[5])].concat()],
            H3_ID_ERROR,
        ),
        (
            "a push stream from the client (RFC 9114 §6.2.2)",
            vec![vec![PUSH, 0x00]],
            H3_STREAM_CREATION_ERROR,
        ),
        (
            "a second QPACK encoder stream (RFC 9204 §4.2)",
            vec![vec![ENCODER], vec![ENCODER]],
            H3_STREAM_CREATION_ERROR,
        ),
        (
            "a reserved frame on the control stream announcing 1 GiB (h3 would buffer it whole)",
            vec![[control(), vec![0x21], gib.to_vec(), vec![b'x'; 4096]].concat()],
            H3_EXCESSIVE_LOAD,
        ),
    ];
    for (what, streams, code) in cases {
        let quic = client.handshake(addr, CLICK).await.expect("handshake");
        let mut open = Vec::new();
        for bytes in &streams {
            open.push(uni(&quic, bytes).await);
        }
        assert_eq!(closed_with(&quic).await, Ok(code), "{what}");
        drop(open);
    }
    // A request head that refers to the dynamic table linkgate never
    // allowed (Required Insert Count 1): h3's own check (RFC 9204 §2.2.3).
    let quic = client.handshake(addr, CLICK).await.expect("handshake");
    let (mut send, _recv) = quic.open_bi().await.expect("stream");
    send.write_all(&frame(0x01, &[0x02, 0x00, 0x80])).await.expect("head");
    assert_eq!(
        closed_with(&quic).await,
        Ok(QPACK_DECOMPRESSION_FAILED),
        "a dynamic reference"
    );
    // The end of a QPACK stream is the end of the connection (RFC 9204 §4.2).
    let quic = client.handshake(addr, CLICK).await.expect("handshake");
    let mut encoder = uni(&quic, &[ENCODER]).await;
    encoder.finish().expect("finish");
    assert_eq!(
        closed_with(&quic).await,
        Ok(H3_CLOSED_CRITICAL_STREAM),
        "encoder stream closed"
    );
    // Every case above was refused before anything was forwarded; a client
    // that commits none is served.
    let quic = client.handshake(addr, CLICK).await.expect("handshake");
    let _control = uni(&quic, &control()).await;
    let answer = raw_request(&quic, &raw_headers(&get_head(CLICK, "/served"))).await;
    assert!(answer.is_ok_and(|a| !a.is_empty()));
    let targets: Vec<_> = up.received().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/served"]);
    lg.stop().await;
}

/// What a client sends on its QPACK streams is read and discarded (more
/// than a stream's flow-control window, which would stall the client if
/// it were kept unread); streams of unknown types, many more than may be
/// open at once, are each stopped at once and their slot given back; a
/// client can have no more than 8 unidirectional streams open. The
/// connection serves throughout.
#[tokio::test]
async fn unidirectional_streams_are_bounded_and_their_data_not_kept() {
    let Served {
        dir: _dir, pki, up, lg, ..
    } = serve().await;
    let client = H3Client::new(&pki, false);
    let quic = client
        .handshake(lg.http3.expect("http3 socket"), CLICK)
        .await
        .expect("handshake");
    let _control = uni(&quic, &control()).await;
    // 4 MiB of Set Dynamic Table Capacity 0, 1 MiB of Stream Cancellations:
    // both allowed, both more than quinn's 1.25 MB stream window.
    let mut encoder = uni(&quic, &[ENCODER]).await;
    let mut decoder = uni(&quic, &[DECODER]).await;
    let (zeros, cancels) = (vec![0x20; 1 << 20], vec![0x41; 1 << 20]);
    tokio::time::timeout(HANG_GUARD, async {
        for _ in 0..4 {
            encoder.write_all(&zeros).await.expect("encoder instructions read");
        }
        decoder.write_all(&cancels).await.expect("decoder instructions read");
    })
    .await
    .expect("read, not left to fill the window");

    // Unknown types (GREASE, RFC 9114 §6.2.3), 40 of them one after
    // another where 8 may be open at once: each stopped, then reset by
    // this client as quinn's peer expects, which gives its slot back.
    for i in 0..40u64 {
        let kind = 0x1f * i + 0x21;
        let mut stream = uni(&quic, &[varint(kind), vec![b'x'; 64 * 1024]].concat()).await;
        let stopped = tokio::time::timeout(HANG_GUARD, stream.stopped())
            .await
            .expect("stopped in time");
        assert_eq!(
            stopped.map(|code| code.map(quinn::VarInt::into_inner)),
            Ok(Some(H3_STREAM_CREATION_ERROR)),
            "stream type {kind:#x}"
        );
        let _ = stream.reset(0u32.into());
    }
    let answer = raw_request(&quic, &raw_headers(&get_head(CLICK, "/after"))).await;
    assert!(answer.is_ok_and(|a| !a.is_empty()), "still served");
    assert_eq!(up.received().len(), 1);

    // Three are open (control, encoder, decoder): at most five more may be.
    let mut more = Vec::new();
    while let Some(stream) = open_now(&quic) {
        more.push(stream);
        assert!(
            more.len() <= 5,
            "{} unidirectional streams open at once",
            3 + more.len()
        );
    }
    assert_eq!(quic.close_reason(), None, "the connection was not closed");
    lg.stop().await;
}

/// A unidirectional stream if one may be opened now, without waiting for
/// the server to allow more.
fn open_now(quic: &quinn::Connection) -> Option<quinn::SendStream> {
    let mut opening = std::pin::pin!(quic.open_uni());
    match opening.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(stream) => Some(stream.expect("open")),
        Poll::Pending => None,
    }
}
