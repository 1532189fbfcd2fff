//! Micro-benchmarks of the proxy's per-request work (criterion): endpoint choice (P2C
//! over Peak-EWMA, with its RTT sample), header handling (hop-by-hop and mesh-header
//! stripping, the header-size check, path normalization) and the authorization
//! decision against a workload's inbound policy; and the cost of keeping HTTP/1
//! header-name case (the tap on each HTTP/1 connection, the restored case map).
//! `cargo bench -p wary-proxy`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use wary_certs::SpiffeId;
use wary_proto::discovery::authorization::Action;
use wary_proto::discovery::{Authorization, DefaultInboundPolicy, InboundPolicy, Operation, Rule, Source};
use wary_proxy::authorize::{self, Request};
use wary_proxy::balance::{Balancer, Settings};
use wary_proxy::http as h;

fn endpoint_choice(c: &mut Criterion) {
    for n in [3u16, 100] {
        let balancer = Arc::new(Balancer::default());
        let endpoints: Vec<SocketAddr> = (0..n).map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i))).collect();
        let settings = Settings::default();
        c.bench_function(&format!("p2c_peak_ewma_pick_and_sample_{n}_endpoints"), |b| {
            b.iter(|| {
                let mut pick = balancer.pick(black_box(&endpoints), &settings).unwrap();
                pick.first_byte();
                pick.success();
            });
        });
    }
}

fn typical_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "backend.default:9090"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("content-type", "application/json"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("x-request-id", "7f3c2a9e-5b1d-4c8e-9a2f-0d6b4e1c3a57"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
}

fn header_handling(c: &mut Criterion) {
    let headers = typical_headers();
    c.bench_function("headers_clone_only_baseline", |b| b.iter(|| black_box(headers.clone())));
    c.bench_function("headers_strip_hop_by_hop_and_mesh_and_size", |b| {
        b.iter(|| {
            let mut headers = headers.clone();
            h::strip_hop_by_hop(&mut headers);
            h::strip_mesh_headers(&mut headers);
            black_box(h::header_list_size(&headers))
        });
    });
    c.bench_function("path_normalize_clean", |b| {
        b.iter(|| black_box(h::normalize_path(black_box("/api/v1/orders/42")).is_ok()));
    });
    c.bench_function("path_normalize_dot_segments", |b| {
        b.iter(|| black_box(h::normalize_path(black_box("/api/./v1//orders/../orders/%34%32")).is_ok()));
    });
}

fn policy_lookup(c: &mut Criterion) {
    let rule = |principal: &str, path: &str| Rule {
        from: vec![Source {
            principals: vec![principal.to_string()],
            ..Default::default()
        }],
        to: vec![Operation {
            paths: vec![path.to_string()],
            methods: vec!["GET".into(), "POST".into()],
            ..Default::default()
        }],
    };
    // Ten ALLOW policies and one DENY; the request matches the last ALLOW.
    let mut authorizations: Vec<Authorization> = (0..10)
        .map(|i| Authorization {
            name: format!("allow-{i}.default"),
            action: Action::Allow as i32,
            rules: vec![rule(
                &format!("spiffe://cluster.local/ns/default/sa/client-{i}"),
                "/api/*",
            )],
        })
        .collect();
    authorizations.push(Authorization {
        name: "no-admin.default".into(),
        action: Action::Deny as i32,
        rules: vec![rule("*", "/admin*")],
    });
    let policy = InboundPolicy {
        default_policy: DefaultInboundPolicy::AllAuthenticated as i32,
        authorizations,
        ..Default::default()
    };
    let client: SpiffeId = "spiffe://cluster.local/ns/default/sa/client-9".parse().unwrap();
    let request = Request {
        client: Some(&client),
        http: Some(("GET", "/api/orders/42")),
        port: 8080,
        permissive: false,
    };
    c.bench_function("authorize_11_policies_last_allow_matches", |b| {
        b.iter(|| black_box(authorize::authorize(black_box(&policy), black_box(&request))));
    });
}

/// 64 pipelined HTTP/1 requests, as a client sends them: `mixed` spells the names as
/// curl does (`Host`, `User-Agent`, `Accept`), else all in lower case.
fn requests(mixed: bool) -> Vec<u8> {
    let headers = typical_headers();
    let mut one = String::from("GET /api/v1/orders/42 HTTP/1.1\r\n");
    for (name, value) in &headers {
        let name = if mixed {
            name.as_str()
                .split('-')
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect::<Vec<_>>()
                .join("-")
        } else {
            name.as_str().to_string()
        };
        one.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    one.push_str("\r\n");
    one.repeat(64).into_bytes()
}

/// One HTTP/1 connection served by hyper to its end: `requests` in, a 200 for each
/// out, through the header-case tap (with each request's spellings taken, as the
/// outbound does) when `tapped`.
async fn serve(requests: &[u8], tapped: bool) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt;
    use wary_proxy::header_case::{self, CaseTap, Role};

    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(requests).await.unwrap();
    client.shutdown().await.unwrap();
    let answer = |req: http::Request<hyper::body::Incoming>| {
        black_box(&req);
        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        )))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.half_close(true);
    if tapped {
        let io = CaseTap::new(server, Role::Requests);
        let case = io.log();
        let service = service_fn(move |mut req| {
            header_case::note_request(&case, &mut req);
            answer(req)
        });
        builder.serve_connection(TokioIo::new(io), service).await.unwrap();
    } else {
        builder
            .serve_connection(TokioIo::new(server), service_fn(answer))
            .await
            .unwrap();
    }
}

/// HTTP/1 header-name case: the cost of reading it (the tap's head parse and the
/// spellings) on top of hyper serving the same requests. The all-lower-case case
/// must stay within 2 % of `http1_serve_64_lower_case_untapped`.
fn header_case(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let lower = requests(false);
    let mixed = requests(true);
    c.bench_function("http1_serve_64_lower_case_untapped", |b| {
        b.iter(|| rt.block_on(serve(&lower, false)));
    });
    c.bench_function("http1_serve_64_lower_case_tapped", |b| {
        b.iter(|| rt.block_on(serve(&lower, true)));
    });
    c.bench_function("http1_serve_64_title_case_untapped", |b| {
        b.iter(|| rt.block_on(serve(&mixed, false)));
    });
    c.bench_function("http1_serve_64_title_case_tapped", |b| {
        b.iter(|| rt.block_on(serve(&mixed, true)));
    });
    let spellings = http::HeaderValue::from_static("Host,User-Agent,Accept,Accept-Encoding,Content-Type");
    rt.block_on(wary_proxy::header_case::restore(&spellings));
    c.bench_function("header_case_restore_cached", |b| {
        b.iter(|| rt.block_on(wary_proxy::header_case::restore(black_box(&spellings))));
    });
}

criterion_group!(benches, endpoint_choice, header_handling, policy_lookup, header_case);
criterion_main!(benches);
