//! Following HTTP/1 message framing (RFC 9112 §6.3) over the bytes of a connection, to
//! read each message head where it starts.

use std::collections::VecDeque;
use std::mem::MaybeUninit;

use bytes::{BufMut, BytesMut};
use http::{HeaderValue, Method};

use super::{CaseLog, Entry, Lost, MAX_HEAD, MAX_HEADERS, MAX_QUEUED, MAX_SPELLINGS, Role, Start};

/// Where a follower is in the byte stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// In (or before) a message head.
    Head,
    /// In a body of known length: bytes left.
    Length(u64),
    /// In a chunk-size line (RFC 9112 §7.1): the size so far, whether white space
    /// followed it, whether an extension began.
    ChunkSize {
        size: u64,
        lws: bool,
        ext: bool,
    },
    /// After a chunk-size line's CR.
    ChunkSizeLf(u64),
    /// In a chunk's data: bytes left.
    ChunkData(u64),
    /// After a chunk's data: its CR, then its LF.
    ChunkCr,
    ChunkLf,
    /// After the last chunk, or a trailer line: a CR ends the message, anything else
    /// starts a trailer line.
    EndCr,
    EndLf,
    /// In a trailer line, and after its CR.
    Trailer,
    TrailerLf,
    /// Lost: the rest of the connection is not followed.
    Off,
}

/// Follows one direction of an HTTP/1 connection: the messages of `role`.
pub(super) struct Follow {
    role: Role,
    pub(super) state: State,
    /// A head split across reads.
    pub(super) head: Vec<u8>,
    /// Final messages seen.
    seen: u64,
    /// Whether heads' spellings are noted (the read side); the write side of a client
    /// connection only records which requests are `HEAD`s.
    spell: bool,
    /// On the write side of a client connection: for each request written and not yet
    /// answered, whether it is a `HEAD` (whose response has no body).
    pub(super) heads: VecDeque<bool>,
}

impl Follow {
    pub(super) fn new(role: Role, spell: bool) -> Self {
        Self {
            role,
            state: State::Head,
            head: Vec::new(),
            seen: 0,
            spell,
            heads: VecDeque::new(),
        }
    }

    pub(super) fn on(&self) -> bool {
        self.state != State::Off
    }

    /// Follows `bytes`, the next on the connection. A response's framing depends on
    /// its request: `requests` follows what was written.
    pub(super) fn read(&mut self, mut bytes: &[u8], log: &CaseLog, mut requests: Option<&mut Follow>) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => bytes = self.read_head(bytes, log, requests.as_deref_mut()),
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
                        State::ChunkCr
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                _ => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = chunked(&self.state, b);
                }
            }
        }
    }

    /// Reads head bytes; returns the bytes after the head, if it ended here.
    fn read_head<'a>(&mut self, bytes: &'a [u8], log: &CaseLog, requests: Option<&mut Follow>) -> &'a [u8] {
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
            return match self.parse(bytes, log, requests) {
                Some(n) => &bytes[n..],
                None if self.on() => self.keep(bytes, log),
                None => &[],
            };
        }
        let before = self.head.len();
        if before + bytes.len() > MAX_HEAD {
            self.lose(log, Lost::TooLarge);
            return &[];
        }
        self.head.extend_from_slice(bytes);
        // Parsed again only once a blank line arrives: a head trickled a byte at a time
        // costs one parse, not one per byte.
        if !ends_head(&self.head, before.saturating_sub(2)) {
            return &[];
        }
        let head = std::mem::take(&mut self.head);
        match self.parse(&head, log, requests) {
            Some(n) => &bytes[n.saturating_sub(before).min(bytes.len())..],
            None => {
                if self.on() {
                    self.head = head;
                }
                &[]
            }
        }
    }

    fn keep<'a>(&mut self, bytes: &[u8], log: &CaseLog) -> &'a [u8] {
        if bytes.len() > MAX_HEAD {
            self.lose(log, Lost::TooLarge);
        } else {
            self.head.extend_from_slice(bytes);
        }
        &[]
    }

    /// Stops following; `why` is counted unless it is what HTTP allows (an upgrade, a
    /// body read until close).
    pub(super) fn lose(&mut self, log: &CaseLog, why: Lost) {
        self.state = State::Off;
        self.head = Vec::new();
        self.heads = VecDeque::new();
        if self.spell {
            log.lose(why);
        }
    }

    /// Parses one complete head: its length, or `None` when it is not complete yet
    /// (or, with the follower off, unreadable).
    fn parse(&mut self, bytes: &[u8], log: &CaseLog, requests: Option<&mut Follow>) -> Option<usize> {
        if self.spell && log.is_lost() {
            self.lose(log, Lost::Mismatch);
            return None;
        }
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
                            self.lose(log, Lost::Unreadable);
                            return None;
                        };
                        (len, Start::Method(method), req.headers)
                    }
                    Ok(httparse::Status::Partial) => return None,
                    Err(_) => {
                        self.lose(log, Lost::Unreadable);
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
                        self.lose(log, Lost::Unreadable);
                        return None;
                    }
                }
            }
        };
        let headers: &[httparse::Header<'_>] = headers;
        let mut head_request = false;
        if let Start::Status(code) = start {
            if (100..200).contains(&code) && code != 101 {
                // An interim response: hyper does not deliver it, the final one follows.
                return Some(len);
            }
            // Which request this answers, from what was written.
            match requests.and_then(|r| r.heads.pop_front()) {
                Some(head) => head_request = head,
                None => {
                    self.lose(log, Lost::Unreadable);
                    return None;
                }
            }
        }
        self.state = self.framing(&start, headers, head_request);
        let seq = self.seen;
        self.seen += 1;
        if !self.spell {
            if self.heads.len() >= MAX_QUEUED {
                self.lose(log, Lost::QueueFull);
            } else {
                self.heads
                    .push_back(matches!(&start, Start::Method(m) if m == Method::HEAD));
            }
            return Some(len);
        }
        let entry = spellings(headers).map(|spellings| Entry {
            seq,
            start,
            lines: headers.len(),
            spellings,
        });
        if !log.note(self.role, entry) {
            self.lose(log, Lost::QueueFull);
        }
        Some(len)
    }

    /// What follows a head (RFC 9112 §6.3); anything the follower cannot follow stops
    /// it (an upgrade, a response read until the connection closes: as HTTP allows).
    fn framing(&self, start: &Start, headers: &[httparse::Header<'_>], head_request: bool) -> State {
        match start {
            Start::Method(m) if m == Method::CONNECT => return State::Off,
            Start::Status(101) => return State::Off,
            Start::Status(code) if head_request || *code == 204 || *code == 304 => return State::Head,
            _ => {}
        }
        let mut length: Option<u64> = None;
        let mut chunked = None;
        for header in headers {
            let name = header.name.as_bytes();
            // A server's connection may switch protocols after it; a client's follows
            // on if the server declines (and its tap stops at a 101 otherwise).
            if self.role == Role::Requests && self.spell && name.eq_ignore_ascii_case(b"upgrade") {
                return State::Off;
            }
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = header.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"content-length") {
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
            (Some(true), _) => State::ChunkSize {
                size: 0,
                lws: false,
                ext: false,
            },
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

/// The state after byte `b` of chunked framing, as hyper's decoder reads it (CRLF line
/// ends only; a bare LF in a trailer line is part of the line): where hyper would fail
/// the message (and close the connection), the follower stops.
fn chunked(state: &State, b: u8) -> State {
    match (state, b) {
        (
            &State::ChunkSize {
                size,
                lws: false,
                ext: false,
            },
            _,
        ) if b.is_ascii_hexdigit() => {
            let digit = u64::from((b as char).to_digit(16).unwrap_or_default());
            match size.checked_mul(16).and_then(|s| s.checked_add(digit)) {
                Some(size) => State::ChunkSize {
                    size,
                    lws: false,
                    ext: false,
                },
                None => State::Off,
            }
        }
        (&State::ChunkSize { size, .. }, b'\r') => State::ChunkSizeLf(size),
        (&State::ChunkSize { ext: true, .. }, b'\n') => State::Off,
        (&State::ChunkSize { size, ext: true, lws }, _) => State::ChunkSize { size, lws, ext: true },
        (&State::ChunkSize { size, .. }, b' ' | b'\t') => State::ChunkSize {
            size,
            lws: true,
            ext: false,
        },
        (&State::ChunkSize { size, lws, .. }, b';') => State::ChunkSize { size, lws, ext: true },
        (&State::ChunkSizeLf(0), b'\n') => State::EndCr,
        (&State::ChunkSizeLf(size), b'\n') => State::ChunkData(size),
        (State::ChunkCr, b'\r') => State::ChunkLf,
        (State::ChunkLf, b'\n') => State::ChunkSize {
            size: 0,
            lws: false,
            ext: false,
        },
        (State::EndCr, b'\r') => State::EndLf,
        (State::EndCr, _) => State::Trailer,
        (State::EndLf, b'\n') => State::Head,
        (State::Trailer, b'\r') => State::TrailerLf,
        (State::Trailer, _) => State::Trailer,
        (State::TrailerLf, b'\n') => State::EndCr,
        _ => State::Off,
    }
}

/// Whether `bytes` holds a blank line ending a head (`\n\n` or `\n\r\n`), searching
/// from `from`: one pass.
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

/// A header name's hash, whatever its case (FNV-1a over the lower-cased bytes).
fn folded_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3)
    })
}

/// [`super::HEADER_CASE`]'s value for a head: every spelling of each name written other
/// than in lower case, in order; `None` when all are lower case (the fast path: one
/// pass over the names), or when the list would exceed [`MAX_SPELLINGS`] bytes.
pub(super) fn spellings(headers: &[httparse::Header<'_>]) -> Option<HeaderValue> {
    let cased = |name: &str| name.bytes().any(|b| b.is_ascii_uppercase());
    if !headers.iter().any(|h| cased(h.name)) {
        return None;
    }
    // Every occurrence of a name with some cased spelling is listed, so positions line
    // up; names are matched by a case-blind hash first, so this stays linear.
    let cased_names: Vec<(u64, &str)> = headers
        .iter()
        .filter(|h| cased(h.name))
        .map(|h| (folded_hash(h.name), h.name))
        .collect();
    let mut value = BytesMut::new();
    for header in headers {
        let name = header.name;
        let listed = cased(name) || {
            let hash = folded_hash(name);
            cased_names
                .iter()
                .any(|(h, n)| *h == hash && n.eq_ignore_ascii_case(name))
        };
        if listed {
            if value.len() + name.len() + 1 > MAX_SPELLINGS {
                return None;
            }
            if !value.is_empty() {
                value.put_u8(b',');
            }
            value.put_slice(name.as_bytes());
        }
    }
    HeaderValue::from_maybe_shared(value.freeze()).ok()
}
