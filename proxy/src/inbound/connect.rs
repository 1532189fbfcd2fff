//! A peer's `CONNECT` tunnel to an app port not declared opaque. The port's declared
//! protocol decides what may cross, not a guess from the first request:
//!
//! ```text
//! a TLS ClientHello record (16 03 0x, length, type 1: the app's own TLS, e.g. an app's
//! HTTPS_PROXY client)       ─▶ authorized as an opaque stream, carried as bytes
//! an HTTP/1 request head    ─▶ served request by request, each authorized and
//!                              sanitized as a peer's request is, `wary-client-id` set
//!                              by this proxy; the app is dialled on the first request
//!                              that passes, again if it closes its connection
//! anything else, or no head
//! within 30 s               ─▶ 400 `wary-error: not-http` (or closed), counted
//! ```
//!
//! Any token is a method (RFC 9110 §9.1: `PROPFIND`, `PURGE`, `QUERY`, lower case),
//! since hyper parses the requests; upgrades and `CONNECT` inside a tunnel are refused
//! (`as_mesh_request`). A server that speaks first needs its port declared opaque.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{APP_CONNECT_TIMEOUT, Inbound, Origin, Peer, TLS_HANDSHAKE_RECORD};
use crate::detect::Prefixed;
use crate::header_case::{self, CaseLog, CaseSource, CaseTap, Role};
use crate::http::{self as h, Body};
use crate::metrics as m;
use crate::tunnel;

/// How long a tunnel may take to send its first request head (or TLS record): 30 s,
/// hyper's limit for every later head.
const TUNNEL_HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest request head read from a tunnel: 64 KiB, what the mesh carries between
/// proxies ([`h::MAX_HEADER_LIST_SIZE`]); also the tunnel's HTTP/1 read buffer.
const MAX_TUNNEL_HEAD: usize = h::MAX_HEADER_LIST_SIZE as usize;

/// The most header fields a tunnelled request head may have: 100, hyper's own limit.
const MAX_TUNNEL_HEADERS: usize = 100;

/// The largest TLS record (RFC 8446 §5.1: 2^14 bytes of plaintext).
const MAX_TLS_RECORD: u16 = 1 << 14;

/// What a tunnel's first bytes open.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// A TLS handshake record carrying a ClientHello.
    Tls,
    /// A complete HTTP/1 request head.
    Http,
    /// Not decided yet: more bytes are needed.
    NotYet,
    /// Neither: why.
    Neither(String),
}

/// The verdict on a tunnel's first `bytes`. `scanned` is how far an earlier call looked
/// for the end of the head, so a head sent a byte at a time is not parsed again and
/// again: the parser runs on the first KiB, and then only once the head's blank line
/// has arrived.
fn opening(bytes: &[u8], scanned: &mut usize) -> Opening {
    if bytes.first() == Some(&TLS_HANDSHAKE_RECORD) {
        // TLSPlaintext: type 22 (handshake), version 3.x, length, then the handshake
        // message type, 1 for a ClientHello (RFC 8446 §4, §5.1).
        let expected = |i: usize, ok: &dyn Fn(u8) -> bool| bytes.get(i).is_none_or(|b| ok(*b));
        let length = (bytes.len() >= 5).then(|| u16::from_be_bytes([bytes[3], bytes[4]]));
        let plausible = expected(1, &|b| b == 0x03)
            && expected(2, &|b| b <= 0x04)
            && length.is_none_or(|l| (1..=MAX_TLS_RECORD).contains(&l))
            && expected(5, &|b| b == 0x01);
        return match (plausible, bytes.len() >= 6) {
            (true, true) => Opening::Tls,
            (true, false) => Opening::NotYet,
            (false, _) => Opening::Neither("a TLS record that is not a ClientHello".into()),
        };
    }
    // The blank line that ends a head: CRLF CRLF, or bare LFs, which httparse accepts.
    let from = scanned.saturating_sub(3);
    let ended = bytes[from..].windows(3).any(|w| w == b"\n\r\n") || bytes[from..].windows(2).any(|w| w == b"\n\n");
    *scanned = bytes.len();
    if !ended && bytes.len() > 1024 && bytes.len() < MAX_TUNNEL_HEAD {
        return Opening::NotYet;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_TUNNEL_HEADERS];
    match httparse::Request::new(&mut headers).parse(bytes) {
        Ok(httparse::Status::Complete(_)) => Opening::Http,
        Ok(httparse::Status::Partial) if bytes.len() < MAX_TUNNEL_HEAD => Opening::NotYet,
        Ok(httparse::Status::Partial) => Opening::Neither(format!("no request head within {MAX_TUNNEL_HEAD} bytes")),
        Err(e) => Opening::Neither(format!("not an HTTP/1 request ({e})")),
    }
}

/// A tunnel's own HTTP/1 connection to the app, on the requests read from the tunnel,
/// so the app sees one connection per tunnel as the client opened it. Dialled by the
/// first request that passes authorization, and again after the app closes it.
#[derive(Clone)]
pub(super) struct TunnelConn {
    app: SocketAddr,
    sender: Arc<tokio::sync::Mutex<Option<AppConn>>>,
}

/// The tunnel's connection to the app, and what its tap reads of header-name case.
type AppConn = (hyper::client::conn::http1::SendRequest<Body>, Arc<CaseLog>);

impl TunnelConn {
    fn new(app: SocketAddr) -> Self {
        Self {
            app,
            sender: Arc::default(),
        }
    }

    /// Sends `req` (in origin form) to the app on this tunnel's connection.
    pub(super) async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let mut slot = self.sender.lock().await;
        let (sender, case) = match slot.as_mut() {
            Some((sender, case)) if !sender.is_closed() => (sender, case),
            _ => {
                let (sender, case) = slot.insert(self.connect().await?);
                (sender, case)
            }
        };
        sender.ready().await.map_err(|e| crate::control::causes(&e))?;
        let mut response = sender.send_request(req).await.map_err(|e| crate::control::causes(&e))?;
        response.extensions_mut().insert(CaseSource::new(case.clone()));
        Ok(response)
    }

    async fn connect(&self) -> Result<AppConn, String> {
        let tcp = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(self.app))
            .await
            .map_err(|_| format!("no connection within {APP_CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let tcp = CaseTap::new(tcp, Role::Responses);
        let case = tcp.log();
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .map_err(|e| crate::control::causes(&e))?;
        let app = self.app;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%app, error = %e, "a tunnel's app connection ended");
            }
        });
        Ok((sender, case))
    }
}

impl Inbound {
    /// Answers a peer's `CONNECT` to `app`, a port not declared opaque, at once; what
    /// the tunnel carries is judged as it arrives ([`Inbound::carry_tunnel`]).
    pub(super) fn open_tunnel(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        app: SocketAddr,
        peer: &Arc<Peer>,
    ) -> Response<Body> {
        let Some(downstream) = req.extensions_mut().remove::<OnUpgrade>() else {
            return h::error_response(
                http::StatusCode::BAD_REQUEST,
                "bad-connect",
                "this CONNECT cannot be tunnelled".into(),
            );
        };
        spawn_carry_tunnel(self.clone(), downstream, app, peer.clone(), self.drain.track());
        Response::new(h::empty())
    }

    /// Carries one tunnel, as the module says.
    async fn carry_tunnel<D>(self: Arc<Self>, mut io: D, app: SocketAddr, peer: Arc<Peer>)
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let what = app.to_string();
        let mut head = bytes::BytesMut::with_capacity(1024);
        let mut scanned = 0;
        let read = async {
            loop {
                match opening(&head, &mut scanned) {
                    Opening::NotYet => {}
                    decided => return Some(decided),
                }
                match io.read_buf(&mut head).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        };
        let verdict = tokio::time::timeout(TUNNEL_HEAD_TIMEOUT, read).await;
        match verdict {
            Ok(Some(Opening::Tls)) => {
                if self
                    .authorize(peer.id.as_ref(), None, None, app.port(), &http::HeaderMap::new())
                    .is_some()
                {
                    tracing::info!(what, "closed a TLS tunnel: denied");
                    return;
                }
                match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(app)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        tunnel::bridge(Prefixed::new(head.freeze(), io), tcp, &what).await;
                    }
                    _ => tracing::info!(what, "closed a TLS tunnel: the app did not accept"),
                }
            }
            Ok(Some(Opening::Http)) => {
                let conn = TunnelConn::new(app);
                let port = app.port();
                let io = CaseTap::new(Prefixed::new(head.freeze(), io), Role::Requests);
                let case = io.log();
                let service = service_fn(move |mut req: Request<Incoming>| {
                    header_case::note_request(&case, &mut req);
                    req.extensions_mut().insert(conn.clone());
                    self.clone().serve_request(req, peer.clone(), Origin::Tunnel(port))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .max_buf_size(MAX_TUNNEL_HEAD)
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            }
            Ok(Some(Opening::Neither(why))) => refuse(&mut io, &what, &why).await,
            // The peer left.
            Ok(Some(Opening::NotYet) | None) => {}
            Err(_) => {
                metrics::counter!(m::AUTHORIZATIONS, "decision" => "deny", "policy" => "not-http-in-tunnel")
                    .increment(1);
                tracing::info!(
                    what,
                    "closed a tunnel that sent no request head within {TUNNEL_HEAD_TIMEOUT:?}: if the app's server \
                     speaks first, declare its port opaque (appProtocol: tcp)"
                );
            }
        }
    }
}

/// Runs [`Inbound::carry_tunnel`] once the peer's side of the tunnel is open. A plain
/// function, not inside the async request path: the tunnel serves requests that go
/// through that same path, and the compiler proves the task `Send` only from outside it.
fn spawn_carry_tunnel(
    inbound: Arc<Inbound>,
    downstream: OnUpgrade,
    app: SocketAddr,
    peer: Arc<Peer>,
    held: crate::drain::Active,
) {
    tokio::spawn(async move {
        let _held = held;
        match downstream.await {
            Ok(io) => inbound.carry_tunnel(TokioIo::new(io), app, peer).await,
            Err(e) => tracing::debug!(%app, error = %e, "the peer left before its tunnel opened"),
        }
    });
}

/// Answers a tunnel whose bytes are neither TLS nor HTTP/1 with a 400 naming why, and
/// closes it: on a port not declared opaque, only those are carried. Written as bytes:
/// no HTTP connection exists to answer on.
async fn refuse<D: AsyncWrite + Unpin>(io: &mut D, what: &str, why: &str) {
    metrics::counter!(m::AUTHORIZATIONS, "decision" => "deny", "policy" => "not-http-in-tunnel").increment(1);
    tracing::info!(
        what,
        why,
        "closed a tunnel to a port not declared opaque: neither TLS nor HTTP/1"
    );
    let body = format!(
        "a tunnel to {what} carries TLS or HTTP/1 only ({why}): declare the port opaque (appProtocol: tcp) for \
         other protocols\n"
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\n{}: not-http\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: \
         {}\r\nconnection: close\r\n\r\n{body}",
        h::ERROR,
        body.len()
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(bytes: &[u8]) -> Opening {
        opening(bytes, &mut 0)
    }

    #[test]
    fn a_tunnel_opens_with_a_client_hello_or_an_http_head_and_nothing_else() {
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];
        assert_eq!(verdict(&hello), Opening::Tls);
        assert_eq!(verdict(&hello[..3]), Opening::NotYet);
        for head in [
            &b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"[..],
            b"PROPFIND /a HTTP/1.1\r\n\r\n",
            b"purge /a HTTP/1.1\r\n\r\n",
            b"QUERY /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(verdict(head), Opening::Http, "{:?}", String::from_utf8_lossy(head));
        }
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nHost: b\r\n"), Opening::NotYet);
        assert_eq!(verdict(b""), Opening::NotYet);
        for bad in [
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"\x16GET / HTTP/1.1\r\n\r\n",
            &[0x16, 0x03, 0x01, 0x00, 0x10, 0x02],
            &[0x16, 0x03, 0x01, 0x7f, 0xff, 0x01],
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(
                matches!(verdict(bad), Opening::Neither(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_TUNNEL_HEAD));
        assert!(matches!(verdict(huge.as_bytes()), Opening::Neither(_)));
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_parsed_once_it_ends() {
        let head = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(4000));
        let mut scanned = 0;
        for end in 1..head.len() {
            assert_eq!(
                opening(&head.as_bytes()[..end], &mut scanned),
                Opening::NotYet,
                "at {end}"
            );
        }
        assert_eq!(opening(head.as_bytes(), &mut scanned), Opening::Http);
    }
}
