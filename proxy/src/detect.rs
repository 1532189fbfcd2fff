//! What an accepted connection speaks, and where it was going.
//!
//! In transparent mode, iptables redirects the app's connections to the outbound
//! listener; the original destination comes from `SO_ORIGINAL_DST`
//! ([`original_dst`]), and the first bytes tell HTTP from anything else ([`detect`]):
//!
//! ```text
//! port in the opaque list ───────────────────────────────▶ opaque TCP, at once
//! "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (the HTTP/2 preface) ─▶ HTTP
//! "<METHOD> " (GET, POST, ... CONNECT)                    ─▶ HTTP
//! any other byte, end of stream, or silence for 1 s      ─▶ opaque TCP
//! ```
//!
//! A server that speaks first (SMTP, MySQL) would wait out the detection timeout for a
//! client that waits for its greeting: that is what the opaque-ports list is for, and
//! the most common complaint about Linkerd and Istio when it is missing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long detection waits for a client's first bytes before calling the connection
/// opaque: 1 s (the design's default; Linkerd waits 10 s, which stalls every
/// server-speaks-first protocol missing from its list for that long).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Ports opaque by default: protocols where the server speaks first or detection is
/// unreliable. SMTP 25 and 587, MySQL 3306, NATS 4222, 4444 (Galera), PostgreSQL 5432,
/// Redis 6379, Elasticsearch transport 9300, memcached 11211, MongoDB 27017 — Linkerd's
/// default opaque ports plus NATS and MongoDB from Istio's server-first list.
pub const DEFAULT_OPAQUE_PORTS: [u16; 10] = [25, 587, 3306, 4222, 4444, 5432, 6379, 9300, 11211, 27017];

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x or HTTP/2 with prior knowledge.
    Http,
    /// Anything else: carried as bytes.
    Opaque,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The request methods of RFC 9110 §9 and PATCH (RFC 5789), each with its space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// The verdict on the bytes read so far; `None` while they could still go either way.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let mut undecided = false;
    for signature in METHODS.iter().copied().chain([H2_PREFACE]) {
        if bytes.starts_with(signature) {
            return Some(Protocol::Http);
        }
        undecided |= signature.starts_with(bytes);
    }
    (!undecided).then_some(Protocol::Opaque)
}

/// Reads from `io` into `buf` until its first bytes decide the protocol, the stream
/// ends, or `timeout` passes (then: opaque). Every byte read stays in `buf`, to be
/// replayed with [`Prefixed`].
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, buf: &mut BytesMut, timeout: Duration) -> Protocol {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(buf) {
            return protocol;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return Protocol::Opaque,
        }
    }
}

/// Where a redirected connection was going (`SO_ORIGINAL_DST`, set by iptables
/// `REDIRECT`); `None` when it came straight to the listener.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(tcp);
    let original = match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    let original = original.ok()?.as_socket()?;
    (Some(original) != tcp.local_addr().ok()).then_some(original)
}

/// A stream whose first bytes were already read (by [`detect`]): they are replayed
/// before the rest. Writes go straight through.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `prefix`, then `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_everything_else_by_its_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Protocol::Http));
        // Could still be POST, PUT, PATCH or the HTTP/2 preface.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b""), None);
        // A TLS ClientHello, a Redis command, a lowercase method.
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn detection_keeps_every_byte_and_gives_up_on_silence() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PO").await.unwrap();
        let mut buf = BytesMut::new();
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut client, b"ST /x HTTP/1.1\r\n")
                .await
                .unwrap();
            client
        });
        assert_eq!(detect(&mut server, &mut buf, DETECT_TIMEOUT).await, Protocol::Http);
        let _client = writer.await.unwrap();
        let mut replayed = Prefixed::new(buf.freeze(), server);
        let mut first = [0u8; 5];
        replayed.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"POST ");

        let (_silent, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        tokio::time::pause();
        assert_eq!(detect(&mut server, &mut buf, DETECT_TIMEOUT).await, Protocol::Opaque);
    }
}
