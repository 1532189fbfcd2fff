//! The tap on an HTTP/1 connection, and hyper's HTTP connector with its connections
//! tapped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::follow::{Follow, State};
use super::{CaseLog, ENABLED, Role};

/// An HTTP/1 connection whose message heads are read for their header-name case as
/// bytes pass; see the [module](super) docs. Reads and writes are the inner stream's.
pub struct CaseTap<T> {
    inner: T,
    /// The messages read.
    follow: Follow,
    /// On a client connection: the requests written, for which responses have no body.
    requests: Option<Follow>,
    log: Arc<CaseLog>,
}

impl<T> CaseTap<T> {
    /// Taps `inner`, which reads messages of `role`. With `--header-case lower` the tap
    /// reads nothing.
    pub fn new(inner: T, role: Role) -> Self {
        let mut follow = Follow::new(role, true);
        let mut requests = (role == Role::Responses).then(|| Follow::new(Role::Requests, false));
        if !ENABLED.load(Ordering::Relaxed) {
            follow.state = State::Off;
            requests = None;
        }
        Self {
            inner,
            follow,
            requests,
            log: Arc::default(),
        }
    }

    /// Where the proxy takes what the tap saw.
    pub fn log(&self) -> Arc<CaseLog> {
        self.log.clone()
    }

    /// Bytes written: a client connection follows its requests.
    fn wrote(&mut self, bytes: &[u8]) {
        if let Some(requests) = self.requests.as_mut()
            && requests.on()
        {
            requests.read(bytes, &self.log, None);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CaseTap<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && this.follow.on()
        {
            this.follow
                .read(&buf.filled()[before..], &this.log, this.requests.as_mut());
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CaseTap<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote(&buf[..n]);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = polled {
            // Every byte written, across the slices, in order.
            for buf in bufs {
                if n == 0 {
                    break;
                }
                let taken = n.min(buf.len());
                self.wrote(&buf[..taken]);
                n -= taken;
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// In each response's extensions from a tapped client connection: where its
/// header-name spellings are; see [`super::take_response_case`].
#[derive(Clone)]
pub struct CaseSource(pub(super) Arc<CaseLog>);

impl CaseSource {
    /// For responses read on the connection `log` taps.
    pub fn new(log: Arc<CaseLog>) -> Self {
        Self(log)
    }
}

/// A client connection to an HTTP/1 server, tapped for the case of its responses'
/// header names. Each response carries the connection's [`CaseSource`].
pub struct TappedConn(TokioIo<CaseTap<TcpStream>>);

/// hyper's HTTP connector, with each connection tapped: see [`TappedConn`].
#[derive(Clone)]
pub struct TapConnector(pub HttpConnector);

impl tower::Service<http::Uri> for TapConnector {
    type Response = TappedConn;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<TappedConn, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TappedConn(TokioIo::new(CaseTap::new(tcp, Role::Responses))))
        })
    }
}

impl Connection for TappedConn {
    fn connected(&self) -> Connected {
        let tap = self.0.inner();
        tap.inner.connected().extra(CaseSource(tap.log()))
    }
}

impl hyper::rt::Read for TappedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TappedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
