//! A Kubernetes API server that answers from recorded objects, for the control plane's
//! real `kube` client: lists (`GET <collection>`), watches (`?watch=true`, one JSON
//! event a line), a Secret's get and create, and TokenReviews. The test changes the
//! objects with [`FakeApi::apply`] and [`FakeApi::delete`] (sent to open watches as
//! MODIFIED/ADDED and DELETED), or behind the watchers' backs with
//! [`FakeApi::set_quietly`], then ends every watch with 410 Gone
//! ([`FakeApi::expire_watches`]) so they relist, as after an etcd compaction.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The collections the control plane watches: path, and the kind of their lists.
pub const COLLECTIONS: [(&str, &str); 7] = [
    ("/api/v1/services", "ServiceList"),
    ("/api/v1/pods", "PodList"),
    ("/api/v1/namespaces", "NamespaceList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
    ("/apis/policy.wary.io/v1alpha1/trafficpolicies", "TrafficPolicyList"),
    (
        "/apis/policy.wary.io/v1alpha1/authorizationpolicies",
        "AuthorizationPolicyList",
    ),
    ("/apis/policy.wary.io/v1alpha1/meshconfigs", "MeshConfigList"),
];

/// Where a watch's events go: its response body.
type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Objects by collection path, then `namespace/name`.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    watches: Vec<(String, WatchSender)>,
    /// Secrets by `namespace/name`.
    secrets: BTreeMap<String, Value>,
    /// Token → (username, pod name, audiences) for TokenReview.
    tokens: HashMap<String, (String, String, Vec<String>)>,
    /// Requests seen: `METHOD path`.
    log: Vec<String>,
    /// The next Secret GET answers 404 whatever exists (another replica's create is
    /// not visible yet: the race two replicas starting together run).
    miss_next_secret_get: bool,
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    /// Where it listens (plain HTTP on loopback).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    kubeconfig: tempfile::NamedTempFile,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().expect("an object has a name")
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApi {
    /// Starts serving `objects` (each placed in its collection by `apiVersion` and
    /// `kind`).
    pub async fn start(objects: &[Value]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        {
            let mut s = state.lock().unwrap();
            for (path, _) in COLLECTIONS {
                s.objects.insert(path.to_string(), BTreeMap::new());
            }
        }
        let api_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = api_state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        let mut kubeconfig = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write;
        write!(
            kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
             users: [{{name: fake, user: {{token: fake-admin}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: wary-system}}}}]\n\
             current-context: fake\n"
        )
        .unwrap();
        let api = Self {
            addr,
            state,
            kubeconfig,
            task,
        };
        for o in objects {
            api.set_quietly(o.clone());
        }
        api
    }

    /// The kubeconfig file pointing at this server (give it as `KUBECONFIG`).
    pub fn kubeconfig(&self) -> &std::path::Path {
        self.kubeconfig.path()
    }

    /// Accepts `token` in TokenReviews as service account `namespace/sa`, bound to pod
    /// `pod`, for `audiences`.
    pub fn accept_token(&self, token: &str, namespace: &str, sa: &str, pod: &str, audiences: &[&str]) {
        self.state.lock().unwrap().tokens.insert(
            token.to_string(),
            (
                format!("system:serviceaccount:{namespace}:{sa}"),
                pod.to_string(),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    /// Makes the next Secret GET answer 404 even if the Secret exists, as when another
    /// replica creates it a moment after this one looked.
    pub fn miss_next_secret_get(&self) {
        self.state.lock().unwrap().miss_next_secret_get = true;
    }

    /// Requests seen so far, `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// A Secret the control plane stored.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .secrets
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    fn collection(object: &Value) -> &'static str {
        let kind = object["kind"].as_str().expect("kind");
        let list = format!("{kind}List");
        COLLECTIONS
            .iter()
            .find(|(_, l)| *l == list)
            .map(|(p, _)| *p)
            .unwrap_or_else(|| panic!("no collection for kind {kind}"))
    }

    fn store(&self, mut object: Value) -> (&'static str, Value, bool) {
        let path = Self::collection(&object);
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        object["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
        let existed = s
            .objects
            .get_mut(path)
            .unwrap()
            .insert(key_of(&object), object.clone())
            .is_some();
        (path, object, existed)
    }

    /// Creates or replaces an object without telling any watch (a change the watchers
    /// only see when they relist).
    pub fn set_quietly(&self, object: Value) {
        self.store(object);
    }

    /// Removes an object without telling any watch.
    pub fn delete_quietly(&self, kind_of: &Value) {
        let path = Self::collection(kind_of);
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        s.objects.get_mut(path).unwrap().remove(&key_of(kind_of));
    }

    /// Creates or replaces an object, sending ADDED or MODIFIED to open watches.
    pub fn apply(&self, object: Value) {
        let (path, object, existed) = self.store(object);
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        self.send(path, &json!({"type": kind, "object": object}));
    }

    /// Deletes an object (matched by kind, namespace and name), sending DELETED.
    pub fn delete(&self, object: &Value) {
        let path = Self::collection(object);
        let removed = {
            let mut s = self.state.lock().unwrap();
            s.resource_version += 1;
            let rv = s.resource_version;
            s.objects.get_mut(path).unwrap().remove(&key_of(object)).map(|mut o| {
                o["metadata"]["resourceVersion"] = rv.to_string().into();
                o
            })
        };
        let removed = removed.expect("deleting an object that exists");
        self.send(path, &json!({"type": "DELETED", "object": removed}));
    }

    /// Ends every open watch with `410 Gone` (resource version too old): the watchers
    /// list again.
    pub fn expire_watches(&self) {
        let mut s = self.state.lock().unwrap();
        let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        for (_, tx) in s.watches.drain(..) {
            let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{gone}\n")))));
        }
    }

    /// Open watches, by collection path.
    pub fn watching(&self) -> Vec<String> {
        let mut s = self.state.lock().unwrap();
        s.watches.retain(|(_, tx)| !tx.is_closed());
        s.watches.iter().map(|(p, _)| p.clone()).collect()
    }

    fn send(&self, path: &str, event: &Value) {
        let mut s = self.state.lock().unwrap();
        let line = Bytes::from(format!("{event}\n"));
        s.watches
            .retain(|(p, tx)| p != path || tx.send(Ok(Frame::data(line.clone()))).is_ok());
    }
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    let (method, path, query) = (
        req.method().clone(),
        req.uri().path().to_string(),
        req.uri().query().unwrap_or_default().to_string(),
    );
    state.lock().unwrap().log.push(format!("{method} {path}"));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");

    if let Some((_, list_kind)) = COLLECTIONS.iter().find(|(p, _)| *p == path) {
        if method != Method::GET {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "read only"),
            );
        }
        let mut s = state.lock().unwrap();
        if watch {
            let (tx, rx) = mpsc::unbounded_channel();
            s.watches.push((path.clone(), tx));
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        let items: Vec<Value> = s.objects[&path].values().cloned().collect();
        let api_version = path
            .strip_prefix("/apis/")
            .map(|p| p.rsplit_once('/').map_or(p, |(gv, _)| gv).to_string())
            .unwrap_or_else(|| "v1".to_string());
        return json_response(
            StatusCode::OK,
            &json!({"apiVersion": api_version, "kind": list_kind,
                    "metadata": {"resourceVersion": s.resource_version.to_string()}, "items": items}),
        );
    }

    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let s = state.lock().unwrap();
        let status_field = match s.tokens.get(token) {
            Some((username, pod, audiences)) => json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {"username": username, "uid": "b4e4c6a0-0000-4000-8000-000000000001",
                         "groups": ["system:serviceaccounts", "system:authenticated"],
                         "extra": {"authentication.kubernetes.io/pod-name": [pod],
                                   "authentication.kubernetes.io/pod-uid": ["6f1c2d3e-0000-4000-8000-000000000002"]}}
            }),
            None => json!({"authenticated": false, "error": "[invalid bearer token, token lookup failed]"}),
        };
        let mut answer = review.clone();
        answer["status"] = status_field;
        return json_response(StatusCode::CREATED, &answer);
    }

    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, tail)) = rest.split_once("/secrets")
    {
        let mut s = state.lock().unwrap();
        let missed = method == Method::GET && std::mem::take(&mut s.miss_next_secret_get);
        return match (method, tail.strip_prefix('/')) {
            (Method::GET, Some(name)) => match s.secrets.get(&format!("{ns}/{name}")).filter(|_| !missed) {
                Some(secret) => json_response(StatusCode::OK, secret),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                ),
            },
            (Method::POST, None) => {
                let mut secret: Value = serde_json::from_slice(&body).unwrap_or_default();
                let key = format!("{ns}/{}", secret["metadata"]["name"].as_str().unwrap_or_default());
                if s.secrets.contains_key(&key) {
                    return json_response(
                        StatusCode::CONFLICT,
                        &status(409, "AlreadyExists", "secret already exists"),
                    );
                }
                s.resource_version += 1;
                secret["metadata"]["resourceVersion"] = s.resource_version.to_string().into();
                s.secrets.insert(key, secret.clone());
                json_response(StatusCode::CREATED, &secret)
            }
            _ => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "not here"),
            ),
        };
    }
    json_response(
        StatusCode::NOT_FOUND,
        &status(404, "NotFound", &format!("the fake API server has no {path}")),
    )
}
