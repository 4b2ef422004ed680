//! The server side of a client's TLS connection, on rustls's unbuffered
//! API: the buffers for TLS records coming in and going out are ours, and a
//! connection that is waiting for its client holds none of them.
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB read
//! buffer for a connection's whole life, a third of what an idle connection
//! costs. Here the received bytes live in a buffer that is freed whenever it
//! is empty and the socket has nothing more, and the bytes to send in one
//! that is freed once they are written.
//!
//! [`Hello::read`] reads the ClientHello (so that the server can refuse an
//! unknown name, or answer an ACME TLS-ALPN-01 challenge, before choosing a
//! configuration); [`Hello::handshake`] hands the same bytes to the chosen
//! configuration and completes the handshake into a [`TlsStream`].

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::server::{Acceptor, ServerConfig, ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

/// Room made for each read from the socket (rustls's buffered connection
/// reads 4 KiB at a time too).
const READ_SIZE: usize = 4096;

/// Received TLS data held unprocessed at most: a handshake message that
/// spans records (rustls allows 64 KiB) and one full record.
const MAX_RECEIVED: usize = 0x1_0000 + 0x4800;

/// Plaintext taken per write: four full records.
const MAX_WRITE: usize = 4 * 0x4000;

/// Room reserved per record when encrypting: header, explicit nonce (TLS
/// 1.2), content type (TLS 1.3) and tag. rustls asks for more if needed.
const RECORD_OVERHEAD: usize = 32;

/// A ClientHello read from a new connection, with the bytes that carried it.
pub struct Hello {
    io: TcpStream,
    received: BytesMut,
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
}

impl Hello {
    /// Reads from `io` until a whole ClientHello has arrived. Input that is
    /// not a ClientHello is answered with the alert rustls chose, and is an
    /// error.
    pub async fn read(mut io: TcpStream) -> io::Result<Self> {
        let mut acceptor = Acceptor::default();
        let mut received = BytesMut::new();
        loop {
            if received.len() >= MAX_RECEIVED {
                return Err(invalid_data("ClientHello too large"));
            }
            received.reserve(READ_SIZE);
            let start = received.len();
            if io.read_buf(&mut received).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut new = &received[start..];
            while !new.is_empty() {
                acceptor.read_tls(&mut new)?;
            }
            match acceptor.accept() {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    let sni = hello.server_name().map(str::to_owned);
                    let alpn = hello
                        .alpn()
                        .map(|offered| offered.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default();
                    return Ok(Self {
                        io,
                        received,
                        sni,
                        alpn,
                    });
                }
                Err((e, mut alert)) => {
                    let mut bytes = Vec::new();
                    let _ = alert.write_all(&mut bytes);
                    let _ = io.write_all(&bytes).await;
                    return Err(invalid_data(e));
                }
            }
        }
    }

    /// The name the client asked for (SNI), if any.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Whether the client offered this ALPN protocol.
    pub fn offers_alpn(&self, protocol: &[u8]) -> bool {
        self.alpn.iter().any(|p| p == protocol)
    }

    /// The connection, for answering without TLS (an alert written by hand).
    pub fn into_io(self) -> TcpStream {
        self.io
    }

    /// Completes the handshake with `config`, starting from the ClientHello
    /// already read.
    pub async fn handshake(self, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut tls = TlsStream {
            io: self.io,
            conn,
            received: self.received,
            plaintext: BytesMut::new(),
            outgoing: Vec::new(),
            sent: 0,
            read_closed: false,
            close_notify_queued: false,
        };
        poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }
}

/// A server TLS connection over TCP, after its handshake.
pub struct TlsStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes read from the socket and not yet processed.
    received: BytesMut,
    /// Decrypted bytes not yet read by the caller (when a record did not fit
    /// the caller's buffer).
    plaintext: BytesMut,
    /// TLS bytes to send; `outgoing[..sent]` has been written.
    outgoing: Vec<u8>,
    sent: usize,
    /// The client sent close_notify or closed its side of the socket.
    read_closed: bool,
    close_notify_queued: bool,
}

/// What running the TLS state machine led to.
enum Progress {
    /// Plaintext was delivered.
    Data,
    /// The data (or close_notify) asked for was encrypted into `outgoing`.
    Written,
    /// More input from the client is needed.
    NeedsInput,
    /// The TLS session is closed (the client sent close_notify).
    Closed,
}

/// What [`TlsStream::advance`] is run for.
enum Goal<'a, 'b, 'c> {
    /// Plaintext, delivered to this buffer as far as it fits (or kept).
    Read(Option<&'a mut ReadBuf<'b>>),
    /// Writing this data, or close_notify for `None`.
    Write(Option<&'c [u8]>),
}

impl TlsStream {
    /// The protocol chosen by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The TLS version negotiated.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// True when the handshake resumed an earlier session (a returning
    /// client with a ticket) rather than proving the certificate anew.
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Bytes this connection holds in buffers of its own (received and not
    /// yet processed, decrypted and not yet read, to be sent).
    pub fn buffered(&self) -> usize {
        self.received.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let progress = match self.advance(Goal::Read(None)) {
                Ok(progress) => progress,
                Err(e) => {
                    // The alert rustls queued, if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            };
            // Each flight goes out before waiting for the client's next.
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                if self.received.is_empty() {
                    self.received = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Progress::Closed = progress {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if ready!(self.poll_receive(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs the TLS state machine over the received bytes until it needs
    /// more input, sees close_notify, or reaches `goal`: plaintext delivered,
    /// or the data to write encrypted. Decrypted bytes go to the read
    /// buffer as far as they fit, the rest (and all of it when writing) to
    /// `self.plaintext`; TLS records to send are added to `self.outgoing`.
    fn advance(&mut self, mut goal: Goal<'_, '_, '_>) -> io::Result<Progress> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.received);
            let step = match state {
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut step = Step::Continue;
                    while let Some(record) = traffic.next_record() {
                        match (record, &mut goal) {
                            // An empty record delivers nothing: go on (a read of 0 bytes would mean EOF).
                            (Ok(record), Goal::Read(out)) => {
                                if deliver(record.payload, out, &mut self.plaintext) {
                                    step = Step::Done(Ok(Progress::Data));
                                }
                            }
                            (Ok(record), Goal::Write(_)) => self.plaintext.extend_from_slice(record.payload),
                            (Err(e), _) => step = Step::Failed(e),
                        }
                    }
                    step
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => match encode_into(&mut encode, &mut self.outgoing) {
                    Ok(()) => Step::Continue,
                    Err(e) => Step::Done(Err(e)),
                },
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // Sent in order with everything else in `outgoing`.
                    transmit.done();
                    Step::Continue
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match goal {
                    Goal::Write(data) => {
                        Step::Done(encrypt_into(&mut traffic, data, &mut self.outgoing).map(|()| Progress::Written))
                    }
                    Goal::Read(_) => Step::Done(Ok(Progress::NeedsInput)),
                },
                Ok(ConnectionState::BlockedHandshake) => Step::Done(Ok(Progress::NeedsInput)),
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    match goal {
                        // Writing may go on after the client's close_notify.
                        Goal::Write(_) => Step::Continue,
                        Goal::Read(_) => Step::Done(Ok(Progress::Closed)),
                    }
                }
                Ok(ConnectionState::Closed) => Step::Done(Ok(Progress::Closed)),
                // Early data is not enabled, and no other state is known.
                Ok(other) => Step::Failed(rustls::Error::General(format!("unexpected TLS state {other:?}"))),
                Err(e) => Step::Failed(e),
            };
            self.received.advance(discard);
            match step {
                Step::Done(result) => return result,
                Step::Continue => {}
                Step::Failed(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Encrypts `data` (close_notify for `None`) into `outgoing`, handling
    /// what the client sent meanwhile.
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        match self.advance(Goal::Write(data))? {
            Progress::Written => Ok(()),
            Progress::Closed => Err(io::ErrorKind::BrokenPipe.into()),
            Progress::Data | Progress::NeedsInput => Err(invalid_data("TLS connection not ready for data")),
        }
    }

    /// After a TLS error: takes the alert rustls queued into `outgoing`.
    fn fail(&mut self, error: rustls::Error) -> io::Error {
        // rustls hands out what it queued before repeating the error.
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.received);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(&mut encode, &mut self.outgoing).is_ok(),
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    true
                }
                _ => false,
            };
            self.received.advance(discard);
            if !more {
                break;
            }
        }
        invalid_data(error)
    }

    /// Reads more TLS bytes from the socket. `Ok(0)` is the end of the stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.received.len() >= MAX_RECEIVED {
            return Poll::Ready(Err(invalid_data("TLS record or handshake message too large")));
        }
        self.received.reserve(READ_SIZE);
        let read = poll_read_buf(Pin::new(&mut self.io), cx, &mut self.received);
        if read.is_pending() && self.received.is_empty() {
            // Waiting for the client: hold no buffer meanwhile.
            self.received = BytesMut::new();
        }
        read
    }

    /// Writes `outgoing` to the socket; once all of it is written, frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// What to do after one TLS state: return, go on to the next, or fail
/// (after taking the alert rustls queued).
enum Step<T> {
    Done(io::Result<T>),
    Continue,
    Failed(rustls::Error),
}

/// Copies a decrypted record to `out` as far as it fits, the rest to
/// `rest`. True if the record was not empty.
fn deliver(payload: &[u8], out: &mut Option<&mut ReadBuf<'_>>, rest: &mut BytesMut) -> bool {
    let mut left = payload;
    if let Some(out) = out.as_deref_mut() {
        let n = left.len().min(out.remaining());
        out.put_slice(&left[..n]);
        left = &left[n..];
    }
    rest.extend_from_slice(left);
    !payload.is_empty()
}

/// Appends a TLS message rustls prepared (handshake, alert, key update) to `outgoing`.
fn encode_into(encode: &mut EncodeTlsData<'_, ServerConnectionData>, outgoing: &mut Vec<u8>) -> io::Result<()> {
    append_sized(outgoing, 0, |room| match encode.encode(room) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => Err(Ok(required_size)),
        Err(e) => Err(Err(e.to_string())),
    })
}

/// Encrypts `data` (or, for close_notify, nothing) into `outgoing`.
fn encrypt_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    data: Option<&[u8]>,
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    let len = data.map_or(0, <[u8]>::len);
    let room = len + (len.div_ceil(0x4000) + 1) * RECORD_OVERHEAD;
    append_sized(outgoing, room, |room| {
        let written = match data {
            Some(data) => traffic.encrypt(data, room),
            None => traffic.queue_close_notify(room),
        };
        match written {
            Ok(n) => Ok(n),
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => Err(Ok(required_size)),
            Err(e) => Err(Err(e.to_string())),
        }
    })
}

/// Gives `write` `room` bytes at the end of `outgoing` and keeps what it
/// wrote; when it answers that it needs more (`Err(Ok(size))`), tries again
/// with that much.
fn append_sized(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Result<usize, String>>,
) -> io::Result<()> {
    let start = outgoing.len();
    loop {
        outgoing.resize(start + room, 0);
        match write(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(Ok(needed)) if needed > room => room = needed,
            Err(Ok(needed)) => {
                outgoing.truncate(start);
                return Err(io::Error::other(format!("TLS output does not fit {needed} bytes")));
            }
            Err(Err(e)) => {
                outgoing.truncate(start);
                return Err(io::Error::other(e));
            }
        }
    }
}

fn invalid_data(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            // Nothing fits: done at once, as a socket would be, without reading or decrypting.
            return Poll::Ready(Ok(()));
        }
        if !this.plaintext.is_empty() {
            let n = this.plaintext.len().min(buf.remaining());
            buf.put_slice(&this.plaintext[..n]);
            this.plaintext.advance(n);
            if this.plaintext.is_empty() {
                this.plaintext = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.advance(Goal::Read(Some(buf))) {
                Ok(Progress::Data | Progress::Written) => return Poll::Ready(Ok(())),
                Ok(Progress::Closed) => {
                    this.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(Progress::NeedsInput) => {}
                Err(e) => {
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            }
            // What the TLS layer owes the client (a key update answer) goes
            // out without waiting for the application to write.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if ready!(this.poll_receive(cx))? == 0 {
                // The client closed the socket without close_notify: the end
                // of the stream (HTTP's own framing tells a cut-off message).
                this.read_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one write's worth waits in `outgoing`.
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        this.encrypt(Some(data))?;
        // Sent now if the socket takes it, otherwise by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            // Best effort: a connection whose TLS session already failed closes without it.
            let _ = this.encrypt(None);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server TLS stream and the client at the other end, on loopback.
    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = ServerConfig::builder_with_provider(crate::tls::server_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .expect("client handshake")
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            let hello = Hello::read(tcp).await.expect("ClientHello");
            assert_eq!(hello.server_name(), Some("a.test"));
            hello.handshake(Arc::new(server)).await.expect("server handshake")
        };
        let (server, client) = tokio::join!(accept, connect);
        (server, client)
    }

    /// Polls a read once; true if it is waiting for the client.
    async fn read_would_wait(tls: &mut TlsStream) -> bool {
        let mut byte = [0u8; 1];
        poll_fn(|cx| {
            Poll::Ready(
                Pin::new(&mut *tls)
                    .poll_read(cx, &mut ReadBuf::new(&mut byte))
                    .is_pending(),
            )
        })
        .await
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_client_holds_no_buffers() {
        let (mut server, mut client) = pair().await;
        assert_eq!(server.buffered(), 0, "after the handshake");
        client.write_all(b"hello").await.expect("write");
        client.flush().await.expect("flush");
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        assert!(read_would_wait(&mut server).await);
        assert_eq!(server.buffered(), 0, "waiting for the next request");
        // An answer larger than a record, and a request larger than the read buffer.
        let answer = vec![7u8; 100_000];
        server.write_all(&answer).await.expect("write");
        server.flush().await.expect("flush");
        assert_eq!(server.buffered(), 0, "after the answer was sent");
        let mut back = vec![0u8; answer.len()];
        client.read_exact(&mut back).await.expect("client read");
        assert!(back == answer);
        let upload = vec![9u8; 50_000];
        client.write_all(&upload).await.expect("upload");
        client.flush().await.expect("flush");
        let mut received = vec![0u8; upload.len()];
        server.read_exact(&mut received).await.expect("read upload");
        assert!(received == upload);
        assert!(read_would_wait(&mut server).await);
        assert_eq!(server.buffered(), 0, "waiting again");
    }
}
