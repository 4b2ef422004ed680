//! Closing an HTTP/1 connection that hyper has finished with: TLS
//! close_notify, FIN, then lingering (reading and discarding what the
//! client still sends) where the client may still be sending, so that the
//! kernel does not reset the connection and lose the answers before it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::IDLE_CLOSE_GRACE;

/// A closing HTTP/1 connection goes on reading (and discarding) what the
/// client still sends until the client closes, with at most
/// [`LINGER_QUIET`] between two reads and [`LINGER`] in all, as nginx's
/// `lingering_timeout` and `lingering_time` (whose defaults these are).
const LINGER: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// Closes a connection that hyper has finished with: TLS close_notify, then
/// FIN, then what the client is still sending (the rest of a body nobody
/// waited for, pipelined requests after a refusal) is read and discarded
/// (see [`LINGER`]). Closing a socket with unread input, or receiving more
/// after it closed, makes the kernel send a reset, and a reset throws away
/// what the client has not read yet: it would lose the very answers that
/// came before the close.
pub(super) async fn close<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, linger: Linger) {
    // Boxed: inline, the lingering state (its timers) would be part of
    // every connection's task, parked ones included.
    Box::pin(close_lingering(io, linger)).await;
}

/// Whether a close waits for the client's own (see [`close`]): after an
/// answer, yes; a parked or idle connection has none on its way, and a
/// drain must not wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Linger {
    Yes,
    No,
}

async fn close_lingering<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, linger: Linger) {
    if tokio::time::timeout(IDLE_CLOSE_GRACE, io.shutdown()).await.is_err() || linger == Linger::No {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = vec![0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(LINGER_QUIET, io.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
