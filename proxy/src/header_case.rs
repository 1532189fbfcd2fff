//! HTTP/1 header-name case, kept end to end.
//!
//! HTTP/1 header names are case-insensitive (RFC 9110 §5.1), but clients and servers
//! that compare them case-sensitively exist (linkerd2#2878, #3964), and HTTP/2 carries
//! only lower case (RFC 9113 §8.2.2). So the case an HTTP/1 app wrote travels beside
//! the message: a [`CaseTap`] on each HTTP/1 connection reads every message head as it
//! is read (with `httparse`, following each body's framing to find the next head) and
//! notes the original spellings of any header name that is not all lower case; across
//! the mTLS hop they travel as one mesh header, [`HEADER_CASE`], stripped at both
//! edges; and where a message is written as HTTP/1 again, [`restore`] hands hyper the
//! spellings in the form its encoder uses (its `HeaderCaseMap`, filled the only way
//! hyper allows: by its own parser, on a head made of the spellings, cached).
//!
//! A message whose names are all lower case costs one head parse on read and nothing
//! else: no entry, no header, no lookup. Envoy keeps case the same way in spirit (its
//! `preserve_case` stateful formatter); Linkerd does not keep it.
//!
//! The spellings only ever re-case names the message has (hyper consults them per
//! name present); the n-th spelling of a name goes with its n-th value, so repeated
//! names keep their order. Where the tap cannot follow a connection (an upgrade, a
//! body read until close, a head it cannot parse, a message whose header count differs
//! from what hyper delivered), it stops for that connection and names go out in lower
//! case, as before: case is best effort, never a reason to fail a request.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Between proxies: the original spellings of an HTTP/1 message's header names that
/// were not all lower case, comma-separated, in the order they came (every occurrence
/// of such a name, so the n-th spelling goes with the n-th value). Absent when every
/// name was lower case.
pub const HEADER_CASE: HeaderName = HeaderName::from_static("wary-header-case");

/// The largest head the tap follows: 64 KiB, the most a header block may be between
/// proxies ([`crate::http::MAX_HEADER_LIST_SIZE`]). A larger one stops the tap.
const MAX_HEAD: usize = 64 * 1024;

/// Headers per head the tap parses: 100, hyper's own limit.
const MAX_HEADERS: usize = 100;

/// Heads read ahead of the proxy (pipelined requests) with spellings kept: 64. More
/// stop the tap, so a client cannot grow the queue.
const MAX_QUEUED: usize = 64;

/// The spellings that restored case are cached by their [`HEADER_CASE`] value, at most
/// this many (then the cache starts over): 1,024.
const MAX_CACHED: usize = 1024;

/// Whether taps read heads: the proxy's `--header-case` (`preserve`, the default, or
/// `lower`), set once at start.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns case keeping on or off for connections tapped from now on; off, a
/// [`CaseTap`] passes bytes without reading them and every name goes out in lower case.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Which messages a connection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server's connection: it reads requests.
    Requests,
    /// A client's connection: it reads responses.
    Responses,
}

/// What the tap saw for one message with a name not all in lower case.
struct Entry {
    /// The message's number on its connection (final responses only), from 0.
    seq: u64,
    /// The request's method or the response's status, to check it is the same message.
    start: Start,
    /// Header lines in the head, to check hyper delivered the same set.
    lines: usize,
    spellings: HeaderValue,
}

#[derive(PartialEq, Eq)]
enum Start {
    Method(Method),
    Status(u16),
}

/// What one connection's tap saw, for the proxy to take message by message, in order.
#[derive(Default)]
pub struct CaseLog {
    /// Entries queued; 0 lets a consumer skip the lock.
    queued: AtomicUsize,
    /// Messages taken by the proxy so far: the next one's number.
    taken: AtomicU64,
    entries: Mutex<VecDeque<Entry>>,
}

impl CaseLog {
    /// The spellings of the connection's next request, as [`HEADER_CASE`]'s value;
    /// `None` when every name was lower case or the tap lost the connection. Call it
    /// once for every request hyper delivers, in order.
    pub fn take_request(&self, method: &Method, headers: &HeaderMap) -> Option<HeaderValue> {
        self.take(|start| matches!(start, Start::Method(m) if m == method), headers)
    }

    /// As [`CaseLog::take_request`], for a client connection's next final response.
    pub fn take_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<HeaderValue> {
        self.take(|start| *start == Start::Status(status.as_u16()), headers)
    }

    fn take(&self, same: impl Fn(&Start) -> bool, headers: &HeaderMap) -> Option<HeaderValue> {
        let seq = self.taken.fetch_add(1, Ordering::Relaxed);
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        while entries.front().is_some_and(|e| e.seq < seq) {
            entries.pop_front();
        }
        let entry = entries.front().filter(|e| e.seq == seq)?;
        let found = (same(&entry.start) && entry.lines == headers.len()).then(|| entry.spellings.clone());
        entries.pop_front();
        self.queued.store(entries.len(), Ordering::Release);
        found
    }

    fn push(&self, entry: Entry) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_QUEUED {
            return false;
        }
        entries.push_back(entry);
        self.queued.store(entries.len(), Ordering::Release);
        true
    }
}

/// An HTTP/1 connection whose message heads are read for their header-name case as
/// bytes pass; see the [module](self) docs. Reads and writes are the inner stream's.
pub struct CaseTap<T> {
    inner: T,
    follow: Follow,
    log: Arc<CaseLog>,
}

impl<T> CaseTap<T> {
    /// Taps `inner`, which reads messages of `role`.
    pub fn new(inner: T, role: Role) -> Self {
        let mut follow = Follow::new(role);
        if !ENABLED.load(Ordering::Relaxed) {
            follow.state = State::Off;
        }
        Self {
            inner,
            follow,
            log: Arc::default(),
        }
    }

    /// Where the proxy takes what the tap saw.
    pub fn log(&self) -> Arc<CaseLog> {
        self.log.clone()
    }

    /// The tapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
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
            this.follow.read(&buf.filled()[before..], &this.log);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CaseTap<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.follow.wrote(&buf[..n]);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
        {
            this.follow.wrote(&first[..n.min(first.len())]);
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

/// A client connection to an HTTP/1 server, tapped for the case of its responses'
/// header names. Each response carries the connection's [`CaseSource`].
pub struct TappedConn(TokioIo<CaseTap<TcpStream>>);

/// In each response's extensions from a [`TapConnector`]'s connection: where its
/// header-name spellings are; see [`take_response_case`].
#[derive(Clone)]
pub struct CaseSource(Arc<CaseLog>);

impl CaseSource {
    /// For responses read on the connection `log` taps.
    pub fn new(log: Arc<CaseLog>) -> Self {
        Self(log)
    }
}

/// The spellings of `response`'s header names, from its connection's tap; `None` when
/// all were lower case, or the response did not come through a [`TapConnector`].
/// Call it once for every response from such a connection.
pub fn take_response_case<B>(response: &mut http::Response<B>) -> Option<HeaderValue> {
    let source = response.extensions_mut().remove::<CaseSource>()?;
    source.0.take_response(response.status(), response.headers())
}

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
        tap.get_ref().connected().extra(CaseSource(tap.log()))
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

/// Where the tap is in the byte stream.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// In (or before) a message head.
    Head,
    /// In a body of known length: bytes left.
    Length(u64),
    /// In a chunk-size line (RFC 9112 §7.1): the size so far.
    ChunkSize { size: u64, ext: bool },
    /// In a chunk's data: bytes left.
    ChunkData(u64),
    /// In the CRLF after a chunk's data.
    ChunkEnd,
    /// In the trailer section; whether the current line is empty so far.
    Trailers { empty: bool },
    /// Lost: the rest of the connection is not followed.
    Off,
}

/// Follows HTTP/1 message framing (RFC 9112 §6.3) over the bytes read.
struct Follow {
    role: Role,
    state: State,
    /// A head split across reads.
    head: Vec<u8>,
    /// Final messages seen.
    seen: u64,
    /// Responses: whether the request being answered is a `HEAD` (no body follows).
    head_request: bool,
    /// Responses: the next bytes written start a request.
    request_next: bool,
}

impl Follow {
    fn new(role: Role) -> Self {
        Self {
            role,
            state: State::Head,
            head: Vec::new(),
            seen: 0,
            head_request: false,
            request_next: true,
        }
    }

    fn on(&self) -> bool {
        self.state != State::Off
    }

    /// Bytes written: on a client's connection, the start of each request says whether
    /// it is a `HEAD`, whose response has no body.
    fn wrote(&mut self, bytes: &[u8]) {
        if self.role == Role::Responses && self.request_next && !bytes.is_empty() {
            self.head_request = bytes.starts_with(b"HEAD ");
            self.request_next = false;
        }
    }

    fn read(&mut self, mut bytes: &[u8], log: &CaseLog) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => bytes = self.read_head(bytes, log),
                State::Length(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Length(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkSize { size, ext } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match b {
                        b'\n' if size == 0 => State::Trailers { empty: true },
                        b'\n' => State::ChunkData(size),
                        b'\r' => State::ChunkSize { size, ext: true },
                        _ if ext => State::ChunkSize { size, ext },
                        b';' | b' ' | b'\t' => State::ChunkSize { size, ext: true },
                        _ => match (b as char).to_digit(16) {
                            Some(d) if size >> 60 == 0 => State::ChunkSize {
                                size: size << 4 | u64::from(d),
                                ext,
                            },
                            _ => State::Off,
                        },
                    };
                }
                State::ChunkEnd => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b == b'\n' {
                        self.state = State::ChunkSize { size: 0, ext: false };
                    }
                }
                State::Trailers { empty } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match b {
                        b'\n' if empty => State::Head,
                        b'\n' => State::Trailers { empty: true },
                        b'\r' => State::Trailers { empty },
                        _ => State::Trailers { empty: false },
                    };
                }
            }
        }
    }

    /// Reads head bytes; returns the bytes after the head, if it ended here.
    fn read_head<'a>(&mut self, bytes: &'a [u8], log: &CaseLog) -> &'a [u8] {
        if self.head.is_empty() {
            // Empty lines before a request line are ignored (RFC 9112 §2.2).
            let start = bytes
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(bytes.len());
            let bytes = &bytes[start..];
            if bytes.is_empty() {
                return bytes;
            }
            // The usual case: the whole head in one read, parsed where it lies.
            return match self.parse(bytes, log) {
                Some(n) => &bytes[n..],
                None if self.on() => self.keep(bytes),
                None => &[],
            };
        }
        let before = self.head.len();
        let scan_from = before.saturating_sub(3);
        if before + bytes.len() > MAX_HEAD {
            self.lose();
            return &[];
        }
        self.head.extend_from_slice(bytes);
        if !ends_head(&self.head, scan_from) {
            return &[];
        }
        let head = std::mem::take(&mut self.head);
        match self.parse(&head, log) {
            Some(n) => &bytes[n.saturating_sub(before).min(bytes.len())..],
            None => {
                if self.on() {
                    self.head = head;
                }
                &[]
            }
        }
    }

    fn keep<'a>(&mut self, bytes: &[u8]) -> &'a [u8] {
        if bytes.len() > MAX_HEAD {
            self.lose();
        } else {
            self.head.extend_from_slice(bytes);
        }
        &[]
    }

    fn lose(&mut self) {
        self.state = State::Off;
        self.head = Vec::new();
    }

    /// Parses one complete head: its length, or `None` when it is not complete yet
    /// (or, with the tap off, unreadable).
    fn parse(&mut self, bytes: &[u8], log: &CaseLog) -> Option<usize> {
        // Uninitialized: zeroing 100 headers would cost more than parsing a short head.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let config = httparse::ParserConfig::default();
        let (len, start, headers) = match self.role {
            Role::Requests => {
                let mut req = httparse::Request::new(&mut []);
                match config.parse_request_with_uninit_headers(&mut req, bytes, &mut headers) {
                    Ok(httparse::Status::Complete(len)) => {
                        let method = req.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok());
                        let Some(method) = method else {
                            self.lose();
                            return None;
                        };
                        (len, Start::Method(method), req.headers)
                    }
                    Ok(httparse::Status::Partial) => return None,
                    Err(_) => {
                        self.lose();
                        return None;
                    }
                }
            }
            Role::Responses => {
                let mut res = httparse::Response::new(&mut []);
                match config.parse_response_with_uninit_headers(&mut res, bytes, &mut headers) {
                    Ok(httparse::Status::Complete(len)) => (len, Start::Status(res.code.unwrap_or(0)), res.headers),
                    Ok(httparse::Status::Partial) => return None,
                    Err(_) => {
                        self.lose();
                        return None;
                    }
                }
            }
        };
        let headers: &[httparse::Header<'_>] = headers;
        if let Start::Status(code) = start
            && (100..200).contains(&code)
            && code != 101
        {
            // An interim response: hyper does not deliver it, the final one follows.
            return Some(len);
        }
        self.state = self.framing(&start, headers);
        let seq = self.seen;
        self.seen += 1;
        if self.role == Role::Responses {
            self.request_next = true;
        }
        if let Some(spellings) = spellings(headers)
            && !log.push(Entry {
                seq,
                start,
                lines: headers.len(),
                spellings,
            })
        {
            self.lose();
        }
        Some(len)
    }

    /// What follows a head (RFC 9112 §6.3); anything the tap cannot follow stops it.
    fn framing(&self, start: &Start, headers: &[httparse::Header<'_>]) -> State {
        match start {
            Start::Method(m) if m == Method::CONNECT => return State::Off,
            Start::Status(101) => return State::Off,
            Start::Status(code) if self.head_request || *code == 204 || *code == 304 => return State::Head,
            _ => {}
        }
        let mut length: Option<u64> = None;
        let mut chunked = None;
        for header in headers {
            if header.name.eq_ignore_ascii_case("upgrade") && self.role == Role::Requests {
                return State::Off;
            }
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = header.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if header.name.eq_ignore_ascii_case("content-length") {
                let parsed = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                match (parsed, length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => return State::Off,
                }
            }
        }
        match (chunked, length) {
            (Some(true), _) => State::ChunkSize { size: 0, ext: false },
            // Not chunked last: a request is refused, a response read until close.
            (Some(false), _) => State::Off,
            (None, Some(0)) => State::Head,
            (None, Some(n)) => State::Length(n),
            (None, None) if self.role == Role::Requests => State::Head,
            // A response without a length is read until the connection closes.
            (None, None) => State::Off,
        }
    }
}

/// Whether `bytes` holds a blank line ending a head (`\n\n` or `\n\r\n`), searching
/// from `from`: one pass, so a head split over many reads is not parsed over and over.
fn ends_head(bytes: &[u8], from: usize) -> bool {
    let tail = &bytes[from..];
    tail.iter().enumerate().any(|(i, b)| {
        *b == b'\n'
            && matches!(
                tail.get(i + 1..(i + 3).min(tail.len())),
                Some([b'\n', ..] | [b'\r', b'\n'])
            )
    })
}

/// [`HEADER_CASE`]'s value for a head: every spelling of each name written other than
/// in lower case, in order; `None` when all are lower case (the fast path: one pass
/// over the names).
fn spellings(headers: &[httparse::Header<'_>]) -> Option<HeaderValue> {
    let cased = |name: &str| name.bytes().any(|b| b.is_ascii_uppercase());
    if !headers.iter().any(|h| cased(h.name)) {
        return None;
    }
    let mut value = BytesMut::new();
    for (i, header) in headers.iter().enumerate() {
        let name = header.name;
        // Every occurrence of a name with some cased spelling, so positions line up.
        let listed = cased(name)
            || headers[..i]
                .iter()
                .chain(&headers[i + 1..])
                .any(|o| o.name.eq_ignore_ascii_case(name) && cased(o.name));
        if listed {
            if !value.is_empty() {
                value.put_u8(b',');
            }
            value.put_slice(name.as_bytes());
        }
    }
    HeaderValue::from_maybe_shared(value.freeze()).ok()
}

/// A message's spellings ([`HEADER_CASE`]'s value), in its extensions from where it
/// was read to where it is written.
#[derive(Clone, Debug)]
pub struct Spellings(pub HeaderValue);

/// Notes the spellings of `req`, just delivered by hyper on the connection `log`
/// taps, in its extensions as [`Spellings`]. Call it for every request, in order.
pub fn note_request<B>(log: &CaseLog, req: &mut http::Request<B>) {
    if req.version() == http::Version::HTTP_2 {
        return;
    }
    if let Some(case) = log.take_request(req.method(), req.headers()) {
        req.extensions_mut().insert(Spellings(case));
    }
}

/// Gives a response the spellings `case`: restored for hyper when this proxy writes
/// it as HTTP/1 (`h1`), else as [`HEADER_CASE`] for the peer proxy that will.
pub async fn attach<B>(response: &mut http::Response<B>, case: HeaderValue, h1: bool) {
    if h1 {
        if let Some(restored) = restore(&case).await {
            response.extensions_mut().extend(restored);
        }
    } else {
        response.headers_mut().insert(HEADER_CASE, case);
    }
}

/// Extensions that make hyper's HTTP/1 encoder write `headers`' names as `spellings`
/// ([`HEADER_CASE`]'s value) says; `None` when the value is malformed (a spelling
/// that is not a header name). Names the message lacks are ignored by hyper.
pub async fn restore(spellings: &HeaderValue) -> Option<Extensions> {
    static CACHE: Mutex<Option<HashMap<HeaderValue, Extensions>>> = Mutex::new(None);
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = cache.as_ref().and_then(|c| c.get(spellings)) {
            return Some(found.clone());
        }
    }
    let made = case_map(spellings).await?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(spellings.clone(), made.clone());
    Some(made)
}

/// hyper's `HeaderCaseMap` for `spellings`, made by hyper's own HTTP/1 parser (with
/// `preserve_header_case`) reading a head of those names: hyper does not export the
/// type, and its encoder uses it from a message's extensions.
async fn case_map(spellings: &HeaderValue) -> Option<Extensions> {
    let names: Vec<&[u8]> = spellings.as_bytes().split(|b| *b == b',').collect();
    if names.iter().any(|n| HeaderName::from_bytes(n).is_err()) {
        return None;
    }
    // A length first (hyper ignores one after a Transfer-Encoding), a
    // Transfer-Encoding last and chunked (hyper refuses others in a request).
    let rank = |n: &[u8]| {
        if n.eq_ignore_ascii_case(b"content-length") {
            0
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            2
        } else {
            1
        }
    };
    let mut ordered = names.clone();
    ordered.sort_by_key(|n| rank(n));
    let mut head = BytesMut::from(&b"POST / HTTP/1.1\r\n"[..]);
    let mut chunked = false;
    for name in ordered {
        head.put_slice(name);
        head.put_slice(match rank(name) {
            0 => b": 0\r\n",
            2 => {
                chunked = true;
                b": chunked\r\n"
            }
            _ => b": x\r\n",
        });
    }
    head.put_slice(if chunked { b"\r\n0\r\n\r\n" } else { b"\r\n" });
    let (mut client, server) = tokio::io::duplex(head.len() + 4096);
    let got = Arc::new(Mutex::new(None));
    let service = {
        let got = got.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            *got.lock().unwrap_or_else(|e| e.into_inner()) = Some(req.into_parts().0.extensions);
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            )))
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    // Everything is in memory: the write fits the pipe, and the connection (not kept
    // alive) ends once it has answered.
    // A second bounds it all the same: case is never worth a stalled request.
    let parsed = async {
        client.write_all(&head).await.ok()?;
        connection.await.ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(1), parsed)
        .await
        .ok()??;
    let mut extensions = got.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    // Only the case map is wanted: not the parse's other findings.
    extensions.remove::<hyper::upgrade::OnUpgrade>();
    Some(extensions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(follow: &mut Follow, log: &CaseLog, chunks: &[&[u8]]) {
        for chunk in chunks {
            follow.read(chunk, log);
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn lower_case_heads_queue_nothing() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests);
        feed(&mut f, &log, &[b"GET / HTTP/1.1\r\nhost: a\r\nx-y: 1\r\n\r\n"]);
        assert_eq!(f.state, State::Head);
        assert_eq!(log.queued.load(Ordering::Relaxed), 0);
        assert_eq!(
            log.take_request(&Method::GET, &headers(&[("host", "a"), ("x-y", "1")])),
            None
        );
    }

    #[test]
    fn spellings_follow_bodies_and_pipelining_byte_by_byte() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nHELLO\
POST /b HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: chunked\r\nX-Bread: 1\r\nx-bread: 2\r\n\r\n\
5;ext=1\r\nGET /\r\n0\r\nTrailer-X: 1\r\n\r\n\r\n\
GET /c HTTP/1.1\r\nhost: a\r\n\r\n\
GET /d HTTP/1.1\r\nACCEPT: */*\r\n\r\n";
        for split in [1, 3, 7, stream.len()] {
            let log = CaseLog::default();
            let mut f = Follow::new(Role::Requests);
            for chunk in stream.chunks(split) {
                f.read(chunk, &log);
            }
            assert_eq!(f.state, State::Head, "split {split}");
            let first = headers(&[("host", "a"), ("content-length", "5")]);
            assert_eq!(log.take_request(&Method::POST, &first).unwrap(), "Host,Content-Length");
            let second = headers(&[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("x-bread", "1"),
                ("x-bread", "2"),
            ]);
            assert_eq!(
                log.take_request(&Method::POST, &second).unwrap(),
                "Transfer-Encoding,X-Bread,x-bread"
            );
            assert_eq!(log.take_request(&Method::GET, &headers(&[("host", "a")])), None);
            assert_eq!(
                log.take_request(&Method::GET, &headers(&[("accept", "*/*")])).unwrap(),
                "ACCEPT"
            );
        }
    }

    #[test]
    fn a_different_message_gets_nothing() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests);
        feed(&mut f, &log, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]);
        // hyper delivered another header count: not the head the tap read.
        assert_eq!(
            log.take_request(&Method::GET, &headers(&[("host", "a"), ("x", "1")])),
            None
        );
        assert_eq!(log.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn responses_skip_interim_and_head_bodies() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Responses);
        f.wrote(b"HEAD / HTTP/1.1\r\n\r\n");
        feed(
            &mut f,
            &log,
            &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"],
        );
        assert_eq!(f.state, State::Head);
        f.wrote(b"GET / HTTP/1.1\r\n\r\n");
        feed(
            &mut f,
            &log,
            &[b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 2\r\n\r\nok"],
        );
        assert_eq!(f.state, State::Head);
        let first = headers(&[("content-length", "10")]);
        assert_eq!(log.take_response(StatusCode::OK, &first).unwrap(), "Content-Length");
        let second = headers(&[("x-a", "1"), ("content-length", "2")]);
        assert_eq!(log.take_response(StatusCode::OK, &second).unwrap(), "X-A");
        // A body read until close: the rest is not followed.
        feed(&mut f, &log, &[b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nHTTP/1.1 200 OK\r\n"]);
        assert_eq!(f.state, State::Off);
    }

    #[test]
    fn what_cannot_be_followed_stops_the_tap() {
        for stream in [
            &b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x00\x10garbage\r\n\r\n",
        ] {
            let log = CaseLog::default();
            let mut f = Follow::new(Role::Requests);
            f.read(stream, &log);
            assert_eq!(f.state, State::Off, "{}", String::from_utf8_lossy(stream));
        }
        // A head larger than the tap follows.
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests);
        let big = vec![b'a'; 1024];
        f.read(b"GET / HTTP/1.1\r\nX: ", &log);
        for _ in 0..70 {
            f.read(&big, &log);
        }
        assert_eq!(f.state, State::Off);
        assert!(f.head.capacity() <= 2 * MAX_HEAD);
    }

    #[test]
    fn a_pipelining_client_cannot_grow_the_queue() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests);
        for _ in 0..MAX_QUEUED + 10 {
            f.read(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &log);
        }
        assert_eq!(f.state, State::Off);
        assert_eq!(log.entries.lock().unwrap().len(), MAX_QUEUED);
    }

    /// What hyper's HTTP/1 client writes for `headers` with `spellings` restored.
    async fn written(headers: HeaderMap, spellings: &str) -> String {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::new(http_body_util::Empty::<Bytes>::new());
        *req.headers_mut() = headers;
        req.extensions_mut()
            .extend(restore(&HeaderValue::from_str(spellings).unwrap()).await.unwrap());
        tokio::spawn(async move { sender.send_request(req).await });
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut byte)
                .await
                .unwrap();
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn restore_makes_hyper_write_the_spellings() {
        let map = headers(&[
            ("host", "a"),
            ("x-bread", "1"),
            ("x-bread", "2"),
            ("x-bread", "3"),
            ("content-length", "0"),
            ("accept", "*/*"),
        ]);
        let head = written(
            map,
            "Host,X-Bread,x-BREAD,Content-Length,Transfer-Encoding,Upgrade,Connection,Expect,Not-Here",
        )
        .await;
        assert_eq!(
            head,
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bread: 1\r\nx-BREAD: 2\r\nx-bread: 3\r\nContent-Length: 0\r\naccept: */*\r\n\r\n"
        );
        // Again, from the cache.
        let again = written(
            headers(&[("x-bread", "1")]),
            "Host,X-Bread,x-BREAD,Content-Length,Transfer-Encoding,Upgrade,Connection,Expect,Not-Here",
        )
        .await;
        assert_eq!(again, "GET / HTTP/1.1\r\nX-Bread: 1\r\n\r\n");
        assert!(restore(&HeaderValue::from_static("Good,Bad Name")).await.is_none());
        assert!(restore(&HeaderValue::from_static("Good,,")).await.is_none());
        assert!(restore(&HeaderValue::from_static("Good,X:Injected")).await.is_none());
    }
}
