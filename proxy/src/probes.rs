//! Kubelet probes moved to the admin port: the injector rewrites an app container's
//! HTTP and TCP probes to `GET :4191/app-health/<container>/<kind>` (strict mTLS
//! would refuse the kubelet's plaintext on the app port), and hands the originals to
//! the proxy in `WARY_APP_PROBES`; the proxy makes each original probe to the app and
//! answers with its outcome. After Istio's probe rewrite.
//!
//! An HTTP probe succeeds, as the kubelet judges it, on a status from 200 to 399:
//! the answer is then 200, else the app's status (503 when the app cannot be reached);
//! a TCP probe succeeds when the app's port accepts a connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

/// The longest a probe of the app may take: 10 s (the kubelet's own `timeoutSeconds`,
/// 1 s by default, usually ends it first).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One original probe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProbe {
    /// `httpGet` over plain HTTP.
    Http {
        /// The app port.
        port: u16,
        /// The path, e.g. `/healthz`.
        path: String,
        /// Extra request headers, as (name, value).
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// `tcpSocket`.
    Tcp {
        /// The app port.
        port: u16,
    },
}

/// The moved probes of one pod, by admin path.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    ip: Option<IpAddr>,
    probes: HashMap<String, AppProbe>,
}

impl AppProbes {
    /// Parses `WARY_APP_PROBES` (JSON: admin path → probe); the app is at `ip`.
    ///
    /// # Errors
    /// The JSON does not have that shape; the message says where.
    pub fn parse(json: &str, ip: IpAddr) -> Result<Self, String> {
        let probes: HashMap<String, AppProbe> =
            serde_json::from_str(json).map_err(|e| format!("WARY_APP_PROBES is not valid: {e}"))?;
        Ok(Self { ip: Some(ip), probes })
    }

    /// The answer to `GET <path>`, or `None` when no probe moved there.
    pub async fn answer(&self, path: &str) -> Option<(StatusCode, String)> {
        let probe = self.probes.get(path)?;
        let ip = self.ip?;
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, probe_app(ip, probe)).await;
        Some(match outcome {
            Ok(Ok(status)) if (200..400).contains(&status.as_u16()) => {
                (StatusCode::OK, format!("the app answered {status}\n"))
            }
            Ok(Ok(status)) => (status, format!("the app answered {status}\n")),
            Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the app did not answer within {PROBE_TIMEOUT:?}\n"),
            ),
        })
    }
}

async fn probe_app(ip: IpAddr, probe: &AppProbe) -> Result<StatusCode, String> {
    let (port, http) = match probe {
        AppProbe::Tcp { port } => (*port, None),
        AppProbe::Http { port, path, headers } => (*port, Some((path, headers))),
    };
    let addr = SocketAddr::new(ip, port);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to the app at {addr}: {e}"))?;
    let Some((path, headers)) = http else {
        return Ok(StatusCode::OK);
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("the app at {addr}: {e}"))?;
    tokio::spawn(conn);
    let mut request = http::Request::get(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "kube-probe (via wary-proxy)");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("probe {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("the app at {addr} did not answer the probe: {e}"))?;
    Ok(response.status())
}
