//! Connections to peer proxies: one multiplexed HTTP/2 connection over mTLS per
//! endpoint (fallacy 7: transport costs), opened on first use and replaced when it
//! closes.
//!
//! The server's certificate must lead to the trust bundle and name the identity the
//! control plane published for the endpoint; rustls checks both in the handshake
//! (see `wary_certs::tls`). A failed handshake is counted by reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use wary_certs::SpiffeId;
use wary_certs::credentials::Credentials;
use wary_certs::tls::{ALPN_H2, HandshakeFailure, client_config, server_name};

use crate::http::Body;
use crate::metrics as m;

/// Why a connection to a peer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed or timed out (the peer is down or unreachable).
    #[error("cannot connect to {addr}: {reason}")]
    Tcp {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed.
    #[error("TLS to {addr} failed ({reason}); expected {expected}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// Why, as a metric label.
        reason: HandshakeFailure,
        /// The identity expected.
        expected: SpiffeId,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 with {addr} failed: {reason}")]
    Http2 {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// Pooled HTTP/2 connections to peer proxies, by address and expected identity.
pub struct PeerPool {
    connector: TlsConnector,
    connect_timeout: Duration,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
}

/// One peer's connection, behind an async lock so concurrent callers wait for a single
/// connect instead of each opening their own.
type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// A pooled connection.
struct Conn {
    /// The identity the peer proved.
    identity: SpiffeId,
    sender: SendRequest<Body>,
    /// When a request last took it.
    used: tokio::time::Instant,
    /// Closed after this long unused.
    idle: Duration,
}

/// How long a pooled connection may sit unused before it is closed, when the service's
/// policy sets none: 1 h (`TrafficPolicy.timeouts.idle`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl PeerPool {
    /// A pool presenting `creds` and verifying peers against its bundle; TCP + TLS
    /// connects time out after `connect_timeout` (default 1 s, Linkerd).
    pub fn new(creds: Arc<Credentials>, connect_timeout: Duration) -> Self {
        let connector = TlsConnector::from(client_config(&creds, &[ALPN_H2]));
        Self {
            connector,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// A sender on a ready connection to `addr` that presents `identity`, opening one if
    /// needed (TCP and TLS within `connect_timeout`, or the pool's default). The
    /// connection is closed once unused for `idle` ([`DEFAULT_IDLE_TIMEOUT`] when
    /// `None`; see [`PeerPool::close_idle`]). Concurrent callers for one peer wait for
    /// a single connect.
    ///
    /// # Errors
    /// [`ConnectError`] when TCP, TLS or HTTP/2 fails.
    pub async fn get(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Option<Duration>,
        idle: Option<Duration>,
    ) -> Result<SendRequest<Body>, ConnectError> {
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            match conns.get(&addr) {
                Some(slot) => slot.clone(),
                None => conns.entry(addr).or_default().clone(),
            }
        };
        let mut slot = slot.lock().await;
        let idle = idle.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if let Some(conn) = slot.as_mut()
            && conn.identity == *identity
            && !conn.sender.is_closed()
            && conn.sender.is_ready()
        {
            conn.used = tokio::time::Instant::now();
            conn.idle = idle;
            return Ok(conn.sender.clone());
        }
        let timeout = connect_timeout.unwrap_or(self.connect_timeout);
        let sender = self.connect(addr, identity, timeout).await?;
        *slot = Some(Conn {
            identity: identity.clone(),
            sender: sender.clone(),
            used: tokio::time::Instant::now(),
            idle,
        });
        self.count();
        Ok(sender)
    }

    /// Updates the pooled-connections gauge.
    fn count(&self) {
        let n = self.conns.lock().unwrap_or_else(|e| e.into_inner()).len();
        metrics::gauge!(m::PEER_CONNECTIONS).set(n as f64);
    }

    /// Forgets connections unused for longer than their idle timeout; each closes once
    /// its last request (which holds its own handle) ends. Called periodically.
    pub fn close_idle(&self) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, slot| {
            // A slot being connected or used right now is not idle.
            let Ok(conn) = slot.try_lock() else { return true };
            conn.as_ref().is_none_or(|c| c.used.elapsed() < c.idle)
        });
        self.count();
    }

    /// Closes and forgets connections to peers not in `current` (after a discovery
    /// update), so the pool follows the mesh's size.
    pub fn retain(&self, current: &std::collections::HashSet<SocketAddr>) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|addr, _| current.contains(addr));
        self.count();
    }

    /// Forgets the connection to `addr` (after it failed), so the next request opens a
    /// new one.
    pub fn evict(&self, addr: SocketAddr) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
        self.count();
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
    ) -> Result<SendRequest<Body>, ConnectError> {
        let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Tcp {
                addr,
                reason: format!("timed out after {connect_timeout:?}"),
            })?
            .map_err(|e| ConnectError::Tcp {
                addr,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = server_name(identity).map_err(|e| ConnectError::Http2 {
            addr,
            reason: e.to_string(),
        })?;
        let tls = match tokio::time::timeout(connect_timeout, self.connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = HandshakeFailure::classify(&e);
                metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => reason.as_str())
                    .increment(1);
                tracing::warn!(%addr, expected = %identity, %reason, error = %e, "refused a peer's TLS");
                return Err(ConnectError::Tls {
                    addr,
                    reason,
                    expected: identity.clone(),
                });
            }
            Err(_) => {
                return Err(ConnectError::Tcp {
                    addr,
                    reason: format!("TLS handshake timed out after {connect_timeout:?}"),
                });
            }
        };
        metrics::counter!(m::TLS_HANDSHAKES, "direction" => "outbound").increment(1);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(crate::http::H2_MAX_RESPONSE_HEADER_LIST_SIZE)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ConnectError::Http2 {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "peer connection ended");
            }
        });
        Ok(sender)
    }
}
