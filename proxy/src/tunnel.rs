//! Byte streams the proxy carries without reading them: opaque TCP (an HTTP `CONNECT`
//! from the app) and HTTP/1.1 `Upgrade` (WebSocket and friends).
//!
//! ```text
//! app ─CONNECT host:port─▶ outbound ─h2 CONNECT, wary-orig-proto: tcp─▶ inbound ─TCP─▶ app port
//! app ─GET + Upgrade─────▶ outbound ─h2 CONNECT, wary-orig-proto: h1-upgrade,
//!                                    the request head in headers──────▶ inbound ─GET + Upgrade─▶ app
//!     ◀──────────── 101 ◀─ 200 + wary-upgrade: <protocol> ◀──────────────────────── 101 ◀─┘
//! ```
//!
//! Between proxies every tunnel is one HTTP/2 `CONNECT` stream (RFC 9113 §8.5) on the
//! pooled mTLS connection, so it shares that connection's flow control: a slow reader
//! slows the writer instead of filling a buffer. A half-close (one side's FIN) travels
//! as the stream's END_STREAM and the other direction carries on, as TCP allows.

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::Body;

/// The protocol an HTTP/1.1 request asks to switch to (its `Upgrade` value), when it
/// asks properly: `Connection: upgrade` names the header (RFC 9110 §7.8), there is no
/// body to carry first, and the protocol is WebSocket (RFC 6455), the one upgrade the
/// mesh carries. `None` for anything else, which is then proxied as a plain request
/// (the `Upgrade` header is hop-by-hop and goes, and a server may ignore it).
pub fn upgrade_protocol<B: hyper::body::Body>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !req.body().is_end_stream() {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let protocol = req.headers().get(header::UPGRADE)?;
    // After any other switch, h2c above all (h2c smuggling), later requests would ride
    // one tunnel past per-request authorization, balancing and metrics.
    is_websocket(protocol).then(|| protocol.clone())
}

/// Whether an `Upgrade` value asks for WebSocket and nothing else.
pub fn is_websocket(protocol: &HeaderValue) -> bool {
    protocol.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
}

/// Adds `Connection: upgrade` and `Upgrade: <protocol>` to an HTTP/1.1 message.
pub fn ask_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Carries bytes both ways between the app's side (`downstream`, once its HTTP upgrade
/// completes) and `upstream` until both directions have ended; `held` (the balancer's
/// in-flight mark, for one) lives as long as the tunnel.
pub fn spawn_bridge<U, H>(downstream: OnUpgrade, upstream: U, what: String, held: H)
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    tokio::spawn(async move {
        let _held = held;
        let downstream = match downstream.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(%what, error = %e, "the client left before its tunnel opened");
                return;
            }
        };
        bridge(TokioIo::new(downstream), upstream, &what).await;
    });
}

/// As [`spawn_bridge`], when both sides are upgraded HTTP connections (a peer's
/// `CONNECT` stream, an app's `101`).
pub fn spawn_joined<H>(downstream: OnUpgrade, upstream: OnUpgrade, what: String, held: H)
where
    H: Send + 'static,
{
    tokio::spawn(async move {
        let _held = held;
        match (downstream.await, upstream.await) {
            (Ok(down), Ok(up)) => bridge(TokioIo::new(down), TokioIo::new(up), &what).await,
            (Err(e), _) | (_, Err(e)) => tracing::debug!(%what, error = %e, "a tunnel's side left before it opened"),
        }
    });
}

/// Copies both ways between `downstream` (the app's side) and `upstream` until both
/// directions have ended.
pub async fn bridge<D, U>(mut downstream: D, mut upstream: U, what: &str)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    metrics::counter!(crate::metrics::TCP_STREAMS).increment(1);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => {
            metrics::counter!(crate::metrics::TCP_BYTES, "flow" => "to_server").increment(sent);
            metrics::counter!(crate::metrics::TCP_BYTES, "flow" => "to_client").increment(received);
            tracing::debug!(what, sent, received, "tunnel closed");
        }
        Err(e) => tracing::debug!(what, error = %e, "tunnel ended with an error"),
    }
}

/// A response body read from a byte stream until it ends (or fails: a tunnel has no
/// other way to say it is done). A task reads ahead by at most four chunks, so a slow
/// reader holds back the stream rather than filling memory.
pub fn body_from<R>(io: R) -> Body
where
    R: AsyncRead + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut chunks = std::pin::pin!(tokio_util::io::ReaderStream::new(io));
        while let Some(Ok(chunk)) = chunks.next().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let frames =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, crate::http::BoxError>(Frame::data(b)));
    BodyExt::boxed(StreamBody::new(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<http_body_util::Empty<Bytes>> {
        let mut r = Request::builder().uri("/chat");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(http_body_util::Empty::new()).unwrap()
    }

    #[test]
    fn an_upgrade_needs_the_connection_token_and_the_header() {
        let ws = req(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(upgrade_protocol(&ws).unwrap(), "websocket");
        assert!(upgrade_protocol(&req(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_protocol(&req(&[("connection", "upgrade")])).is_none());
        let h2c = req(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")]);
        assert!(upgrade_protocol(&h2c).is_none());
        let other = req(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]);
        assert!(upgrade_protocol(&other).is_none());
        assert!(upgrade_protocol(&req(&[("connection", "upgrade"), ("upgrade", "TLS/1.2")])).is_none());
        assert!(upgrade_protocol(&req(&[("connection", "upgrade"), ("upgrade", "WebSocket")])).is_some());
    }
}
