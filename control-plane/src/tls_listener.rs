//! TLS 1.3 in front of the control plane's gRPC server: accepts TCP connections,
//! completes handshakes concurrently (a slow or silent client holds only its own task,
//! for at most [`HANDSHAKE_TIMEOUT`]), and yields the established streams to tonic.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use wary_certs::tls::HandshakeFailure;

use crate::metrics as m;

/// The most TLS handshakes in progress at once: 1024.
pub const MAX_HANDSHAKES: usize = 1024;

/// The longest a client may take to complete its TLS handshake: 10 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Established TLS connections from `listener`, for `Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // A flood of connections that never finish their handshake holds at most
            // MAX_HANDSHAKES tasks; beyond that, new ones are closed at once.
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "overloaded").increment(1);
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        let reason = HandshakeFailure::classify(&e);
                        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => reason.as_str()).increment(1);
                        tracing::info!(%peer, %reason, error = %e, "refused a TLS handshake");
                    }
                    Err(_) => {
                        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
