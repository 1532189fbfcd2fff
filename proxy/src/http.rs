//! HTTP details shared by the outbound and inbound sides: the body type, the headers
//! the mesh adds between proxies, hop-by-hop header removal, and the errors the proxy
//! itself answers with.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// Why a body the proxy carries failed: hyper's error, or one the proxy raised (a
/// trailer block over [`MAX_TRAILER_LIST_SIZE`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: a peer's streamed body, or a small one it made.
pub type Body = BoxBody<Bytes, BoxError>;

/// Set by the inbound proxy for the app: the client's verified SPIFFE ID. Removed from
/// anything else that sets it (an app, a peer), so the app can trust it.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("wary-client-id");

/// Between proxies: the app port the request is for on the peer's workload.
pub const DST_PORT: HeaderName = HeaderName::from_static("wary-dst-port");

/// Between proxies: the protocol the client spoke, restored on the far side: `h1`,
/// `h2`, `tcp` (an opaque stream, in a `CONNECT`) or `h1-upgrade` (an HTTP/1.1
/// `Upgrade` request, in a `CONNECT`).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("wary-orig-proto");

/// Between proxies, on an `h1-upgrade` `CONNECT`: the protocol asked for (the
/// `Upgrade` value, e.g. `websocket`); on its 200 answer, the protocol the app switched
/// to. An answer without it means the app declined.
pub const UPGRADE: HeaderName = HeaderName::from_static("wary-upgrade");

/// Between proxies, on an `h1-upgrade` `CONNECT`: the original method and path (with
/// query), which a `CONNECT` has no place for.
pub const METHOD: HeaderName = HeaderName::from_static("wary-method");
/// See [`METHOD`].
pub const PATH: HeaderName = HeaderName::from_static("wary-path");

/// On responses to the app: how many attempts the request took (retries + 1).
pub const ATTEMPTS: HeaderName = HeaderName::from_static("wary-attempts");

/// On responses the proxy generated itself: a short machine-readable cause, e.g.
/// `no-endpoints`, `connect-failed`, `tls-wrong_identity`.
pub const ERROR: HeaderName = HeaderName::from_static("wary-error");

/// Headers that belong to one hop and must not be forwarded (RFC 9110 §7.6.1), plus
/// `Proxy-Connection` (a non-standard one clients still send).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names. A `TE:
/// trailers` survives as exactly that (gRPC needs it, and HTTP/2 allows no other TE).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes the headers only proxies may set, so nothing outside can forge them.
pub fn strip_mesh_headers(headers: &mut HeaderMap) {
    for name in MESH_HEADERS {
        headers.remove(name);
    }
    // `wary_client_id` reaches CGI- and WSGI-style apps as the same variable as
    // `wary-client-id`: such look-alikes go too.
    if headers.keys().any(|k| k.as_str().contains('_')) {
        let lookalikes: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .filter(|k| {
                let dashed = k.as_str().replace('_', "-");
                MESH_HEADERS.iter().any(|m| m.as_str() == dashed)
            })
            .cloned()
            .collect();
        for name in lookalikes {
            headers.remove(name);
        }
    }
}

/// Removes every `wary-` header (and `wary_` look-alike) from a request the app is
/// about to receive: the app then sees only what its own inbound proxy adds after
/// this (`wary-client-id`), whatever a client, a peer or a tunnel sent.
pub fn strip_wary_headers(headers: &mut HeaderMap) {
    let wary = |k: &HeaderName| k.as_str().starts_with("wary-") || k.as_str().starts_with("wary_");
    if !headers.keys().any(wary) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| wary(k)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The headers only proxies may set.
const MESH_HEADERS: [HeaderName; 7] = [
    CLIENT_ID,
    DST_PORT,
    ORIG_PROTO,
    UPGRADE,
    METHOD,
    PATH,
    crate::header_case::HEADER_CASE,
];

/// A request body for the app whose trailers lose every `wary-` header (as
/// [`strip_wary_headers`]), so a client cannot forge one there either, and which fails
/// when they are over [`MAX_TRAILER_LIST_SIZE`] — or, for an HTTP/1 app, when one is
/// not among the `declared` names (the request's `Trailer` header): hyper's HTTP/1
/// encoder would drop it without a word.
pub fn body_for_app<B>(body: B, declared: Option<Vec<HeaderName>>) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    TrailerGuard {
        inner: body,
        grpc: false,
        declared,
    }
    .map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            strip_wary_headers(&mut trailers);
            hyper::body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    })
    .boxed()
}

/// The largest trailer block the mesh carries, as HTTP/2 counts it (names, values and
/// 32 bytes a field, RFC 9113 §6.5.2): 128 KiB, room for a gRPC status with 64 KiB of
/// rich details (`grpc-status-details-bin`) and any other `-bin` metadata. A larger
/// block fails the message loudly (a gRPC call gets `grpc-status` 13 naming the size
/// and this limit; anything else a reset stream), never arrives cut short.
pub const MAX_TRAILER_LIST_SIZE: usize = 128 * 1024;

/// What the proxy's HTTP/2 clients (to peer proxies, to the app) decode in one
/// response header block: 1 MiB, eight times [`MAX_TRAILER_LIST_SIZE`].
///
/// Why larger than what the mesh carries: the h2 crate (0.4.20) delivers a *trailer*
/// block over its limit silently cut short (the fields past the limit are dropped and
/// nothing says so), where a header block over it fails the stream; and it closes the
/// whole connection when a block takes more CONTINUATION frames than a quarter over the
/// limit needs. Decoding well past the limit lets the proxy see an oversized block at
/// its size, or at least the 1 MiB h2 kept of it, and fail that one message with a
/// reason instead of letting it arrive altered or taking other streams down. What is
/// left: a single field over about 1 MiB is dropped by h2 before the proxy sees it.
/// The cost is memory: an answer may hold up to 1 MiB of decoded headers while the
/// proxy relays it; only streams the proxy opened can carry one.
pub const H2_MAX_RESPONSE_HEADER_LIST_SIZE: u32 = 8 * MAX_TRAILER_LIST_SIZE as u32;

/// What the proxy's HTTP/2 servers (for peers, for the app) decode in one request
/// header block: 256 KiB, twice [`MAX_TRAILER_LIST_SIZE`], so a request's trailers over
/// the limit are seen and fail the request, for the reason given at
/// [`H2_MAX_RESPONSE_HEADER_LIST_SIZE`]; smaller, since a client opens as many streams
/// as the server allows (200), each holding its block. Request headers are still
/// refused over [`MAX_HEADER_LIST_SIZE`] by the proxy itself (431).
pub const H2_MAX_REQUEST_HEADER_LIST_SIZE: u32 = 2 * MAX_TRAILER_LIST_SIZE as u32;

/// A body whose trailer block is held to [`MAX_TRAILER_LIST_SIZE`]: over it, a gRPC
/// response's trailers become `grpc-status: 13` saying so, and any other body fails.
pub struct TrailerGuard<B> {
    inner: B,
    grpc: bool,
    /// For an HTTP/1 hop: the trailer names the message declared; others fail it.
    declared: Option<Vec<HeaderName>>,
}

/// Trailers an HTTP/1 hop cannot carry: not declared in the message's `Trailer` header.
#[derive(Debug, thiserror::Error)]
#[error(
    "the trailer {name} is not declared in the message's Trailer header, and HTTP/1 carries only declared \
     trailers: name it there (Trailer: {name})"
)]
pub struct UndeclaredTrailer {
    /// The first undeclared name.
    pub name: HeaderName,
}

/// The names a message's `Trailer` header declares (RFC 9110 §6.6.2).
pub fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// A trailer block over [`MAX_TRAILER_LIST_SIZE`].
#[derive(Debug, thiserror::Error)]
#[error(
    "the trailers take at least {size} bytes; the mesh carries at most {MAX_TRAILER_LIST_SIZE}: send large details in \
     the body"
)]
pub struct TrailersTooLarge {
    /// Their size as HTTP/2 counts it, or as much of it as was decoded.
    pub size: usize,
}

impl<B> hyper::body::Body for TrailerGuard<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let frame = match std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return std::task::Poll::Ready(Some(Err(e.into()))),
            None => return std::task::Poll::Ready(None),
        };
        let Some(trailers) = frame.trailers_ref() else {
            return std::task::Poll::Ready(Some(Ok(frame)));
        };
        if let Some(declared) = &self.declared
            && let Some(name) = trailers
                .keys()
                .find(|k| !declared.contains(k) && !k.as_str().starts_with("wary-") && !k.as_str().starts_with("wary_"))
        {
            let undeclared = UndeclaredTrailer { name: name.clone() };
            tracing::info!(error = %undeclared, "failed a message whose trailers HTTP/1 cannot carry");
            return std::task::Poll::Ready(Some(Err(undeclared.into())));
        }
        let size = header_list_size(trailers);
        if size <= MAX_TRAILER_LIST_SIZE {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        let too_large = TrailersTooLarge { size };
        tracing::info!(error = %too_large, "failed a message whose trailers are too large");
        if self.grpc {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(13));
            if let Ok(message) = HeaderValue::from_str(&grpc_message(&too_large.to_string())) {
                trailers.insert("grpc-message", message);
            }
            trailers.insert(ERROR, HeaderValue::from_static("trailers-too-large"));
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))));
        }
        std::task::Poll::Ready(Some(Err(too_large.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The refusal of a request whose headers are over what the mesh carries between
/// proxies ([`MAX_HEADER_LIST_SIZE`]): 431 `headers-too-large` naming the size, or
/// `None` to go on.
pub fn refuse_large_headers(headers: &HeaderMap) -> Option<Response<Body>> {
    let size = header_list_size(headers);
    (size > MAX_HEADER_LIST_SIZE as usize).then(|| {
        error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            format!(
                "the request's headers take {size} bytes; the mesh carries at most {MAX_HEADER_LIST_SIZE} bytes: \
                 move large values into the body"
            ),
        )
    })
}

/// The size of a header block as HTTP/2 counts it against SETTINGS_MAX_HEADER_LIST_SIZE:
/// each field's name and value plus 32 bytes (RFC 9113 §6.5.2).
pub fn header_list_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum()
}

/// The path as authorization must see it (after Istio's default normalization):
/// percent-encoded unreserved characters decoded, `.` and `..` segments resolved
/// (RFC 3986 §5.2.4), runs of `/` merged. `Err` for a path no app should be asked to
/// interpret: an encoded `/` or `\`, or `..` above the root.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    let needs = path.contains('%') || path.contains("//") || path.contains("/.") || path.contains('\\');
    if !needs {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    // Bytes, not chars: a UTF-8 path stays UTF-8.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3).ok_or("a truncated percent-encoding")?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| "an invalid percent-encoding")?;
            match byte {
                b'/' | b'\\' => return Err("an encoded '/' or '\\'"),
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => decoded.push(b),
                _ => {
                    decoded.push(b'%');
                    decoded.extend_from_slice(hex.to_ascii_uppercase().as_bytes());
                }
            }
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| "bytes that are not UTF-8")?;
    if decoded.contains('\\') {
        return Err("a '\\' in the path");
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').skip(1) {
        // `..;x` is `..` to Tomcat, Jetty and Spring, which drop path parameters before
        // resolving dot segments: `/public/..;/admin` would pass a rule for `/public/*`
        // and serve `/admin`.
        let bare = segment.split(';').next().unwrap_or(segment);
        let encoded_semicolon = segment.to_ascii_lowercase().contains("%3b");
        if (segment.contains(';') || encoded_semicolon) && matches!(bare.split("%3").next(), Some("." | "..")) {
            return Err("a dot segment with path parameters ('..;'), which some servers resolve as '..'");
        }
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("'..' above the root");
                }
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// A response from upstream, ready to relay downstream: hop-by-hop headers and the
/// mesh's own headers removed, the body streamed through untouched.
pub fn relay(response: Response<hyper::body::Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_mesh_headers(&mut parts.headers);
    let grpc = is_grpc(&parts.headers);
    let guard = TrailerGuard {
        inner: body,
        grpc,
        declared: None,
    };
    Response::from_parts(parts, guard.boxed())
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// The largest header block (headers or trailers, HPACK-decoded) accepted on an
/// HTTP/2 connection: 64 KiB. hyper's default, 16 KiB, cuts off gRPC errors whose
/// trailers carry rich details; Envoy accepts 60 KiB by default. Per stream, so a
/// hostile peer is still bounded.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// How long a request that says `Expect: 100-continue` keeps its body back while the
/// server may still refuse it: 250 ms, a quarter of the 1 s curl and Go's `net/http`
/// allow a server before they send the body anyway.
///
/// The proxy cannot relay the server's `100 Continue` across the mesh (hyper carries no
/// informational responses over HTTP/2), so it holds the client's body until the server
/// answers — then the body is never sent, as the client intended — or this much time
/// has passed. Envoy answers `100` itself at once instead, which makes every client
/// upload even to a server that will refuse; the cost here is at most 250 ms on an
/// upload the server accepts.
pub const EXPECT_CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// A request body that is not read until a wait ([`EXPECT_CONTINUE_WAIT`] by default)
/// has passed; the client is sent `100 Continue` only when the body is first read.
pub struct ExpectContinue<B> {
    inner: B,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> ExpectContinue<B> {
    /// Holds back `inner` for `wait`.
    pub fn new(inner: B, wait: std::time::Duration) -> Self {
        Self {
            inner,
            wait: Some(Box::pin(tokio::time::sleep(wait))),
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for ExpectContinue<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if let Some(wait) = self.wait.as_mut() {
            std::task::ready!(std::future::Future::poll(wait.as_mut(), cx));
            self.wait = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a request asks `Expect: 100-continue` (RFC 9110 §10.1.1) and has a body.
pub fn expects_continue<B: hyper::body::Body>(req: &http::Request<B>) -> bool {
    !req.body().is_end_stream()
        && req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A request body, held back for `wait` per [`ExpectContinue`] when the client asked
/// to wait for the server (`Some`).
pub fn gate_body<B>(wait: Option<std::time::Duration>, body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    match wait {
        Some(wait) => ExpectContinue::new(body, wait).map_err(Into::into).boxed(),
        None => body.map_err(Into::into).boxed(),
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The client's deadline from its `grpc-timeout` header (gRPC over HTTP/2: up to 8
/// digits and a unit, `H` `M` `S` `m` `u` `n`); `None` when absent or malformed.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration as D;
    Some(match unit {
        "H" => D::from_secs(n * 3600),
        "M" => D::from_secs(n * 60),
        "S" => D::from_secs(n),
        "m" => D::from_millis(n),
        "u" => D::from_micros(n),
        "n" => D::from_nanos(n),
        _ => return None,
    })
}

/// An error the proxy generated: for a gRPC call, HTTP 200 with the `grpc-status`
/// matching `status` (503 → UNAVAILABLE, 504 → DEADLINE_EXCEEDED, 403 →
/// PERMISSION_DENIED, an overloaded service → RESOURCE_EXHAUSTED; after Linkerd);
/// otherwise [`error_response`].
pub fn proxy_error(grpc: bool, status: StatusCode, cause: &'static str, message: String) -> Response<Body> {
    if !grpc {
        return error_response(status, cause, message);
    }
    let code = match (status, cause) {
        (_, "overloaded") => 8,
        (StatusCode::GATEWAY_TIMEOUT, _) => 4,
        (StatusCode::FORBIDDEN, _) => 7,
        (StatusCode::BAD_REQUEST, _) => 3,
        _ => 14,
    };
    grpc_error(code, cause, message)
}

/// A small body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A response the proxy generated: `status`, a `wary-error: <cause>` header, and a body
/// of one line saying what the mesh saw.
pub fn error_response(status: StatusCode, cause: &'static str, message: String) -> Response<Body> {
    tracing::debug!(%status, cause, %message, "answering with an error");
    let mut response = Response::new(full(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(ERROR, HeaderValue::from_static(cause));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error the proxy generated for a gRPC call: HTTP 200 with `grpc-status` (a gRPC
/// code, e.g. 7 PERMISSION_DENIED, 14 UNAVAILABLE) and `grpc-message`, as Linkerd does,
/// plus the `wary-error` cause.
pub fn grpc_error(code: u32, cause: &'static str, message: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&grpc_message(&message)) {
        headers.insert("grpc-message", v);
    }
    headers.insert(ERROR, HeaderValue::from_static(cause));
    response
}

/// `message` as a `grpc-message` value: percent-encoded as the gRPC over HTTP/2 spec
/// asks, kept to safe bytes.
fn grpc_message(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect::<String>()
        .replace('%', "%25")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_authorization_sees_them() {
        for (raw, want) in [
            ("/secret.txt", "/secret.txt"),
            ("//secret.txt", "/secret.txt"),
            ("/./secret.txt", "/secret.txt"),
            ("/x/../secret.txt", "/secret.txt"),
            ("/%73ecret.txt", "/secret.txt"),
            ("/a//b/", "/a/b/"),
            ("/a/%20b", "/a/%20b"),
            ("/", "/"),
            ("/café//x", "/café/x"),
            ("/shop;jsessionid=1/cart", "/shop;jsessionid=1/cart"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
        for bad in [
            "/%2fsecret.txt",
            "/a%5Cb",
            "/../etc/passwd",
            "/%zz",
            "/a\\b",
            "/public/..;/admin",
            "/public/..;jsessionid=1/admin",
            "/public/.;/admin",
            "/public/%2e%2e;/admin",
            "/public/..%3B/admin",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_app_gets_no_wary_header_it_did_not_get_from_its_proxy() {
        let mut h = HeaderMap::new();
        for name in [
            "wary-client-id",
            "wary-error",
            "wary-attempts",
            "wary-anything",
            "wary_x",
            "x-kept",
        ] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        strip_wary_headers(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn lookalike_mesh_headers_go_too() {
        let mut h = HeaderMap::new();
        h.insert("wary_client_id", HeaderValue::from_static("spiffe://x/ns/a/sa/admin"));
        h.insert("x_kept", HeaderValue::from_static("1"));
        strip_mesh_headers(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
