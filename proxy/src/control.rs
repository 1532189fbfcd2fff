//! The connection to the control plane: gRPC over TLS 1.3, checking that the server is
//! the control plane's identity, and presenting this proxy's mesh certificate once it
//! has one (the credentials are read at each handshake, so a renewed certificate is used
//! by the next connection).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use wary_certs::SpiffeId;
use wary_certs::credentials::Credentials;
use wary_certs::tls::{ALPN_H2, HandshakeFailure, client_config, server_name};

/// Where the control plane is and who it must be.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// Its address as a URL, e.g. `https://127.0.0.1:8086` (`http://` is accepted and
    /// means the same: the connection is TLS either way).
    pub url: String,
    /// The identity its certificate must carry,
    /// `spiffe://<trust-domain>/ns/wary-system/sa/wary-control-plane`.
    pub identity: SpiffeId,
    /// TCP + TLS connect timeout; default 1 s.
    pub connect_timeout: Duration,
}

impl ControlPlane {
    /// Checks that `url` is `http(s)://host:port`, so a typo fails at start-up rather
    /// than in an endless reconnect loop.
    ///
    /// # Errors
    /// A message naming the URL and the expected shape.
    pub fn validate_url(url: &str) -> Result<(), String> {
        let bad = |why: &str| {
            format!("--control-plane {url:?}: {why}; expected https://HOST:PORT, e.g. https://127.0.0.1:8086")
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("https" | "http") => {}
            _ => return Err(bad("the scheme must be https")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        Ok(())
    }

    /// The control plane at `url`, which must present `identity`.
    pub fn new(url: impl Into<String>, identity: SpiffeId) -> Self {
        Self {
            url: url.into(),
            identity,
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// Connects a gRPC channel over mTLS with `creds`.
    ///
    /// # Errors
    /// A message naming the URL and the cause (refused, timeout, handshake failure with
    /// its reason).
    pub async fn connect(&self, creds: &Arc<Credentials>) -> Result<Channel, String> {
        // tonic must not try TLS itself: hand it an http:// URI and do TLS here.
        let plain = self.url.replacen("https://", "http://", 1);
        let endpoint = Endpoint::from_shared(plain)
            .map_err(|e| format!("control plane URL {:?} is invalid: {e}", self.url))?
            .connect_timeout(self.connect_timeout)
            // Notice a control plane that vanished without closing (the network fails).
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let connector = TlsConnector::from(client_config(creds, &[ALPN_H2]));
        let name = server_name(&self.identity).map_err(|e| format!("control plane identity: {e}"))?;
        let identity = self.identity.clone();
        endpoint
            .connect_with_connector(tower::service_fn(move |uri: Uri| {
                let (connector, name, identity) = (connector.clone(), name.clone(), identity.clone());
                async move {
                    let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
                    let port = uri.port_u16().unwrap_or(8086);
                    let tcp = TcpStream::connect((host, port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let tls = connector.connect(name, tcp).await.map_err(|e| {
                        let reason = HandshakeFailure::classify(&e);
                        metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "direction" => "control_plane", "reason" => reason.as_str()).increment(1);
                        std::io::Error::other(format!(
                            "TLS handshake with the control plane failed ({reason}): {e}; it must present {identity} from the trust bundle"
                        ))
                    })?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| format!("cannot connect to the control plane at {}: {}", self.url, causes(&e)))
    }
}

/// An error and its causes, `a: b: c` (tonic's own message is only "transport error").
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
