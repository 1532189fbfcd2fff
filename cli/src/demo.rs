//! The quickstart's demo apps: plain HTTP services that know nothing of the mesh. They
//! reach other services through `HTTP_PROXY` (their proxy's outbound listener), as any
//! app would.
//!
//! * `wary demo-app backend`: answers `GET /api/work` after `--delay-ms`, failing a
//!   `--fail-ratio` of requests with 503.
//! * `wary demo-app frontend`: answers `GET /` by calling the backend.
//! * `wary demo-load`: calls a URL `--rate` times a second, forever.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What a demo app plays.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Role {
    /// Calls the backend for each request.
    Frontend,
    /// Does the work.
    Backend,
}

/// `wary demo-app`.
#[derive(Debug, clap::Args)]
pub struct AppArgs {
    /// What to play.
    role: Role,
    /// Where to listen; `wary up` sets WARY_LISTEN to the workload's address and port.
    #[arg(long, env = "WARY_LISTEN")]
    listen: SocketAddr,
    /// The name in answers; `wary up` sets WARY_WORKLOAD_NAME.
    #[arg(long, env = "WARY_WORKLOAD_NAME", default_value = "demo")]
    name: String,
    /// Backend: extra time before each answer, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Backend: the fraction of requests answered with 503, 0.0–1.0.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// Frontend: the backend URL it calls.
    #[arg(long, default_value = "http://backend.default:9090/api/work")]
    backend: Uri,
}

/// `wary demo-load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The URL to call.
    #[arg(long, default_value = "http://frontend.default:8080/")]
    url: Uri,
    /// Requests per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r
}

/// A client that sends every request to the proxy named by `HTTP_PROXY`.
fn proxied_client() -> anyhow::Result<Client<ToProxy, Empty<Bytes>>> {
    let proxy = std::env::var("HTTP_PROXY").or_else(|_| std::env::var("http_proxy"))?;
    let proxy: Uri = proxy.parse()?;
    let addr: SocketAddr = proxy
        .authority()
        .ok_or_else(|| anyhow::anyhow!("HTTP_PROXY {proxy} has no host:port"))?
        .as_str()
        .parse()?;
    Ok(Client::builder(TokioExecutor::new()).build(ToProxy(addr)))
}

/// Runs a demo app until the process is stopped.
pub async fn app(args: AppArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let client = match args.role {
        Role::Frontend => Some(proxied_client()?),
        Role::Backend => None,
    };
    let args = Arc::new(args);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (args, client) = (args.clone(), client.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (args, client) = (args.clone(), client.clone());
                async move {
                    Ok::<_, Infallible>(match (&client, req.uri().path()) {
                        (Some(client), _) => frontend(&args, client).await,
                        (None, "/api/work") => backend(&args, req.headers().get("wary-client-id")).await,
                        (None, other) => text(StatusCode::NOT_FOUND, format!("{}: no page {other}\n", args.name)),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The backend's answer names the caller the mesh verified (`wary-client-id`, set by
/// the inbound proxy from the peer's certificate).
async fn backend(args: &AppArgs, caller: Option<&http::HeaderValue>) -> Response<Body> {
    let caller = caller
        .and_then(|v| v.to_str().ok())
        .unwrap_or("an unauthenticated client")
        .to_string();
    if args.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    }
    if rand::random::<f64>() < args.fail_ratio {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} failed, as it does\n", args.name),
        );
    }
    text(StatusCode::OK, format!("work done by {} for {caller}\n", args.name))
}

async fn frontend(args: &AppArgs, client: &Client<ToProxy, Empty<Bytes>>) -> Response<Body> {
    let call = tokio::time::timeout(Duration::from_secs(10), client.get(args.backend.clone()));
    match call.await {
        Ok(Ok(response)) if response.status() == StatusCode::OK => {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            text(
                StatusCode::OK,
                format!("{} called the backend: {}", args.name, String::from_utf8_lossy(&body)),
            )
        }
        Ok(Ok(response)) => text(
            StatusCode::BAD_GATEWAY,
            format!("{}: the backend answered {}\n", args.name, response.status()),
        ),
        Ok(Err(e)) => text(
            StatusCode::BAD_GATEWAY,
            format!("{}: the backend call failed: {e}\n", args.name),
        ),
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{}: the backend took over 10 s\n", args.name),
        ),
    }
}

/// Calls `args.url` `args.rate` times a second until stopped; prints a summary line
/// every 10 s.
pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let client = proxied_client()?;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (client, uri, ok, failed) = (client.clone(), args.url.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await;
                    let counter = match answer {
                        Ok(Ok(r)) if r.status() == StatusCode::OK => ok,
                        _ => failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                });
            }
            _ = report.tick() => {
                println!("ok={} failed={}", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            }
        }
    }
}

/// Connects every request to the proxy, whatever its URI names (as `HTTP_PROXY`
/// clients do); the proxy reads the destination from the `Host` header.
#[derive(Clone)]
struct ToProxy(SocketAddr);

impl tower::Service<Uri> for ToProxy {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move { tokio::net::TcpStream::connect(addr).await.map(TokioIo::new) })
    }
}
