//! HTTP/1 header-name case, kept end to end.
//!
//! HTTP/1 header names are case-insensitive (RFC 9110 §5.1), but clients and servers
//! that compare them case-sensitively exist (linkerd2#2878, #3964), and HTTP/2 carries
//! only lower case (RFC 9113 §8.2.2). So the case an HTTP/1 peer wrote travels beside
//! the message:
//!
//! * a [`CaseTap`] on each HTTP/1 connection reads every message head as it is read
//!   (with `httparse`, following each body's framing to find the next head; on a client
//!   connection it follows the requests written too, since a `HEAD`'s response has no
//!   body) and notes the original spellings of any name not all in lower case;
//! * across the mTLS hop they travel as one mesh header, [`HEADER_CASE`], stripped at
//!   both edges;
//! * where a message is written as HTTP/1 again, [`restore`] hands hyper the spellings
//!   in the form its encoder uses (its `HeaderCaseMap`, made the only way hyper allows:
//!   by its own parser, on a head made of the spellings; cached per thread).
//!
//! A message whose names are all lower case costs its head parse, an atomic add and,
//! on a client connection, the parse of its request head and one extension: no entry,
//! no header, no lookup. Envoy keeps case the same way in spirit (its `preserve_case`
//! stateful formatter); Linkerd does not keep it.
//!
//! The spellings only ever re-case names the message has (hyper consults them per name
//! present); the n-th spelling of a name goes with its n-th value, so repeated names
//! keep their order. Where the tap cannot follow a connection it stops, and the rest of
//! the connection's names go out in lower case, as before: case is best effort, never a
//! reason to fail a request. It stops after an upgrade or a response read until the
//! connection closes (as HTTP allows), and, counted in
//! `wary_proxy_header_case_lost_total`, on a head it cannot parse, one split across
//! reads over 64 KiB, more than 64 requests read ahead, or a message hyper delivered
//! other than the tap read it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

mod follow;
mod restore;
mod tap;

pub use restore::restore;
pub use tap::{CaseSource, CaseTap, TapConnector, TappedConn};

/// Between proxies: the original spellings of an HTTP/1 message's header names that
/// were not all lower case, comma-separated, in the order they came (every occurrence
/// of such a name, so the n-th spelling goes with the n-th value). Absent when every
/// name was lower case.
pub const HEADER_CASE: HeaderName = HeaderName::from_static("wary-header-case");

/// The largest head split across reads that the tap follows: 64 KiB, the most a header
/// block may be between proxies ([`crate::http::MAX_HEADER_LIST_SIZE`]).
const MAX_HEAD: usize = 64 * 1024;

/// Headers per head the tap parses: 100, hyper's own limit.
const MAX_HEADERS: usize = 100;

/// Heads read ahead of the proxy (pipelined requests) with spellings kept: 64. More
/// stop the tap, so a client cannot grow the queue.
const MAX_QUEUED: usize = 64;

/// The longest [`HEADER_CASE`] value: 4 KiB. A message with more cased names than fit
/// goes out in lower case; it bounds what a peer can make a proxy cache.
const MAX_SPELLINGS: usize = 4096;

/// Whether taps read heads: the proxy's `--header-case` (`preserve`, the default, or
/// `lower`), set once at start, for the whole process (as its crypto provider is).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns case keeping on or off: off, a [`CaseTap`] passes bytes without reading them,
/// [`restore`] restores nothing, and every name goes out in lower case.
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

/// Why a tap stopped part-way, as `wary_proxy_header_case_lost_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lost {
    /// hyper delivered a message other than the one the tap read.
    Mismatch,
    /// A head the tap could not parse (hyper refuses it too), or a response to no
    /// request the tap saw written.
    Unreadable,
    /// A head split across reads, over [`MAX_HEAD`].
    TooLarge,
    /// More than [`MAX_QUEUED`] heads read ahead.
    QueueFull,
}

impl Lost {
    fn label(self) -> &'static str {
        match self {
            Lost::Mismatch => "mismatch",
            Lost::Unreadable => "unreadable",
            Lost::TooLarge => "too_large",
            Lost::QueueFull => "queue_full",
        }
    }
}

/// What the tap saw for one message with a name not all in lower case.
struct Entry {
    /// The message's number on its connection, from 0 (requests only).
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

/// What one connection's tap saw, for the proxy to take message by message.
///
/// A server connection's requests may be read ahead (pipelining), so they queue, each
/// with its number; a client connection carries one exchange at a time, so it keeps
/// only its latest response's, and a response the proxy never looked at (a cancelled
/// request) cannot shift the next one's.
#[derive(Default)]
pub struct CaseLog {
    /// Entries held; 0 lets a consumer skip the lock.
    queued: AtomicUsize,
    /// Requests taken by the proxy so far: the next one's number.
    taken: AtomicU64,
    /// A message did not match: the tap stops at its next head.
    lost: AtomicBool,
    entries: Mutex<VecDeque<Entry>>,
}

impl CaseLog {
    /// The spellings of the connection's next request, as [`HEADER_CASE`]'s value;
    /// `None` when every name was lower case or the tap lost the connection. Call it
    /// once for every request hyper delivers, in order.
    fn take_request(&self, method: &Method, headers: &HeaderMap) -> Option<HeaderValue> {
        let seq = self.taken.fetch_add(1, Ordering::Relaxed);
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        while entries.front().is_some_and(|e| e.seq < seq) {
            entries.pop_front();
        }
        let entry = entries
            .front()
            .is_some_and(|e| e.seq == seq)
            .then(|| entries.pop_front());
        self.queued.store(entries.len(), Ordering::Release);
        drop(entries);
        self.check(
            entry??,
            |start| matches!(start, Start::Method(m) if m == method),
            headers,
        )
    }

    /// As [`CaseLog::take_request`], for a client connection's latest final response.
    fn take_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<HeaderValue> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.pop_front();
        entries.clear();
        self.queued.store(0, Ordering::Release);
        drop(entries);
        self.check(entry?, |start| *start == Start::Status(status.as_u16()), headers)
    }

    /// `entry`'s spellings if it is the message hyper delivered: the same start line,
    /// as many header lines, every spelled name present. Else the connection is lost.
    fn check(&self, entry: Entry, same: impl Fn(&Start) -> bool, headers: &HeaderMap) -> Option<HeaderValue> {
        let matches = same(&entry.start)
            && entry.lines == headers.len()
            && entry
                .spellings
                .as_bytes()
                .split(|b| *b == b',')
                .all(|name| HeaderName::from_bytes(name).is_ok_and(|n| headers.contains_key(n)));
        if matches {
            return Some(entry.spellings);
        }
        self.lose(Lost::Mismatch);
        None
    }

    /// Notes one message the tap read: `entry` for one with cased names, `None` for one
    /// all in lower case. `false` when the queue is full.
    fn note(&self, role: Role, entry: Option<Entry>) -> bool {
        match role {
            Role::Requests => {
                let Some(entry) = entry else { return true };
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                if entries.len() >= MAX_QUEUED {
                    return false;
                }
                entries.push_back(entry);
                self.queued.store(entries.len(), Ordering::Release);
            }
            Role::Responses => {
                // Only the latest counts; a lower-case one clears what an earlier left.
                if entry.is_none() && self.queued.load(Ordering::Acquire) == 0 {
                    return true;
                }
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                entries.clear();
                entries.extend(entry);
                self.queued.store(entries.len(), Ordering::Release);
            }
        }
        true
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops the connection's tap. After a mismatch nothing queued is trusted; after
    /// anything else, what was queued before still holds.
    fn lose(&self, why: Lost) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            metrics::counter!(crate::metrics::HEADER_CASE_LOST, "reason" => why.label()).increment(1);
        }
        if why == Lost::Mismatch {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.clear();
            self.queued.store(0, Ordering::Release);
        }
    }
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

/// The spellings of `response`'s header names, from its connection's tap; `None` when
/// all were lower case, or the response did not come through a tapped connection.
pub fn take_response_case<B>(response: &mut http::Response<B>) -> Option<HeaderValue> {
    let source = response.extensions_mut().remove::<CaseSource>()?;
    source.0.take_response(response.status(), response.headers())
}

/// Gives a message this proxy writes as HTTP/1 (its `extensions`) the spellings `case`;
/// a malformed list restores nothing.
pub async fn restore_into(extensions: &mut http::Extensions, case: &HeaderValue) {
    if let Some(restored) = restore(case).await {
        extensions.extend(restored);
    }
}

#[cfg(test)]
mod tests {
    use super::follow::{Follow, State};
    use super::*;
    use bytes::Bytes;

    fn feed(follow: &mut Follow, log: &CaseLog, chunks: &[&[u8]]) {
        for chunk in chunks {
            follow.read(chunk, log, None);
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
        let mut f = Follow::new(Role::Requests, true);
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
            let mut f = Follow::new(Role::Requests, true);
            for chunk in stream.chunks(split) {
                f.read(chunk, &log, None);
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
    fn a_different_message_gets_nothing_and_stops_the_tap() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        feed(&mut f, &log, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]);
        // hyper delivered another header count: not the head the tap read.
        assert_eq!(
            log.take_request(&Method::GET, &headers(&[("host", "a"), ("x", "1")])),
            None
        );
        assert_eq!(log.queued.load(Ordering::Relaxed), 0);
        feed(&mut f, &log, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]);
        assert_eq!(f.state, State::Off);
        // The same count, but a spelled name hyper did not deliver.
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        feed(&mut f, &log, &[b"GET / HTTP/1.1\r\nX-Other: a\r\n\r\n"]);
        assert_eq!(log.take_request(&Method::GET, &headers(&[("host", "a")])), None);
        assert!(log.is_lost());
    }

    /// A client connection's two sides: what it wrote, what it read.
    struct Client {
        log: CaseLog,
        read: Follow,
        written: Follow,
    }

    impl Client {
        fn new() -> Self {
            Self {
                log: CaseLog::default(),
                read: Follow::new(Role::Responses, true),
                written: Follow::new(Role::Requests, false),
            }
        }
        fn write(&mut self, bytes: &[u8]) {
            self.written.read(bytes, &self.log, None);
        }
        fn receive(&mut self, bytes: &[u8]) {
            self.read.read(bytes, &self.log, Some(&mut self.written));
        }
    }

    #[test]
    fn responses_skip_interim_and_head_bodies() {
        let mut c = Client::new();
        c.write(b"HEAD / HTTP/1.1\r\n\r\n");
        c.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(c.read.state, State::Head);
        let first = headers(&[("content-length", "10")]);
        assert_eq!(c.log.take_response(StatusCode::OK, &first).unwrap(), "Content-Length");
        c.write(b"GET / HTTP/1.1\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(c.read.state, State::Head);
        let second = headers(&[("x-a", "1"), ("content-length", "2")]);
        assert_eq!(c.log.take_response(StatusCode::OK, &second).unwrap(), "X-A");
        // A body read until close: the rest is not followed.
        c.write(b"GET / HTTP/1.1\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nHTTP/1.1 200 OK\r\n");
        assert_eq!(c.read.state, State::Off);
    }

    #[test]
    fn an_early_answer_does_not_hide_the_next_head_request() {
        // The server answers before the request's body is written; the body (which
        // starts like a HEAD request) follows, then a real HEAD.
        let mut c = Client::new();
        c.write(b"POST /upload HTTP/1.1\r\ncontent-length: 20\r\n\r\n");
        c.receive(b"HTTP/1.1 413 Payload Too Large\r\nX-Why: big\r\ncontent-length: 0\r\n\r\n");
        c.write(b"HEAD / HTTP/1.1\r\n\r\n1");
        let early = headers(&[("x-why", "big"), ("content-length", "0")]);
        assert_eq!(
            c.log.take_response(StatusCode::PAYLOAD_TOO_LARGE, &early).unwrap(),
            "X-Why"
        );
        c.write(b"HEAD /real HTTP/1.1\r\nhost: a\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n");
        c.write(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nX-Next: 1\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(c.read.state, State::Head);
        let next = headers(&[("x-next", "1"), ("content-length", "2")]);
        assert_eq!(c.log.take_response(StatusCode::OK, &next).unwrap(), "X-Next");
        // A response to no request written: the tap stops.
        c.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(c.read.state, State::Off);
    }

    #[test]
    fn a_response_never_taken_does_not_shift_the_next() {
        let mut c = Client::new();
        c.write(b"GET /a HTTP/1.1\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nX-First: 1\r\ncontent-length: 0\r\n\r\n");
        // Its request was cancelled: nobody takes it. The next is all lower case.
        c.write(b"GET /b HTTP/1.1\r\n\r\n");
        c.receive(b"HTTP/1.1 200 OK\r\nx-first: 1\r\ncontent-length: 0\r\n\r\n");
        let second = headers(&[("x-first", "1"), ("content-length", "0")]);
        assert_eq!(c.log.take_response(StatusCode::OK, &second), None);
        assert!(!c.log.is_lost());
    }

    #[test]
    fn many_names_of_one_length_cost_one_pass() {
        // 99 lower-case names that differ only in their last byte, and one cased.
        let mut head = b"GET / HTTP/1.1\r\nX-Cased: 1\r\n".to_vec();
        for i in 0..99u8 {
            head.extend_from_slice(&[b'a'; 300]);
            head.extend_from_slice(format!("{i:02}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        f.read(&head, &log, None);
        assert_eq!(f.state, State::Head);
        assert_eq!(log.entries.lock().unwrap()[0].spellings, "X-Cased");
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
            // Chunked framing hyper refuses: a bare LF after a size or a chunk's data.
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n",
        ] {
            let log = CaseLog::default();
            let mut f = Follow::new(Role::Requests, true);
            f.read(stream, &log, None);
            assert_eq!(f.state, State::Off, "{}", String::from_utf8_lossy(stream));
        }
        // A head larger than the tap follows.
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        let big = vec![b'a'; 1024];
        f.read(b"GET / HTTP/1.1\r\nX: ", &log, None);
        for _ in 0..70 {
            f.read(&big, &log, None);
        }
        assert_eq!(f.state, State::Off);
        assert!(f.head.capacity() <= 2 * MAX_HEAD);
    }

    #[test]
    fn a_trailer_section_ends_where_hyper_ends_it() {
        // After the last chunk, a bare LF starts a trailer line that runs to the next
        // CRLF, as hyper reads it: the "request" inside is trailers, not a message.
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        f.read(
            b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\n\
GET /x HTTP/1.1\r\nHOST: a\r\nX-VICTIM: 1\r\n\r\nGET /v1 HTTP/1.1\r\nhost: a\r\nx-victim: 1\r\n\r\n",
            &log,
            None,
        );
        assert_eq!(f.state, State::Head);
        let first = headers(&[("transfer-encoding", "chunked")]);
        assert_eq!(log.take_request(&Method::POST, &first), None);
        let second = headers(&[("host", "a"), ("x-victim", "1")]);
        assert_eq!(log.take_request(&Method::GET, &second), None);
        assert!(!log.is_lost());
    }

    #[test]
    fn a_pipelining_client_cannot_grow_the_queue() {
        let log = CaseLog::default();
        let mut f = Follow::new(Role::Requests, true);
        for _ in 0..MAX_QUEUED + 10 {
            f.read(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &log, None);
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
        // A client's spelling of a proxy header is not the app's to see.
        let proxied = written(headers(&[("wary-client-id", "spiffe://a")]), "WARY-CLIENT-ID,X-A").await;
        assert_eq!(proxied, "GET / HTTP/1.1\r\nwary-client-id: spiffe://a\r\n\r\n");
    }
}
