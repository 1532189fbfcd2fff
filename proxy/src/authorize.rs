//! Inbound authorization: may this client make this request to this workload?
//!
//! After Istio's `AuthorizationPolicy` evaluation:
//!
//! 1. any DENY policy that matches → denied, naming it;
//! 2. else, if the workload has ALLOW policies → allowed only if one matches;
//! 3. else the mesh's default inbound policy (`all-authenticated` by default).
//!
//! A policy matches when any of its rules does; a rule when some `from` and some `to`
//! match (an empty list matches everything); a `from`/`to` when each of its non-empty
//! lists matches and none of its `not_*` lists does. Values may carry one `*` at the
//! start or the end, or be `*` alone.
//!
//! An opaque TCP stream has no method or path. As in Istio, an operation that asks
//! about them never lets such a stream in through an ALLOW policy, while a DENY
//! policy's operation matches on its other fields alone: both err on the side of
//! refusing.

use wary_certs::SpiffeId;
use wary_proto::discovery::authorization::Action;
use wary_proto::discovery::{Authorization, DefaultInboundPolicy, InboundPolicy, Operation, Source};

/// The request, as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified client identity; `None` for plaintext (permissive mode).
    pub client: Option<&'a SpiffeId>,
    /// The HTTP method and path (without the query), e.g. `("GET", "/orders")`;
    /// `None` for an opaque TCP stream, which has neither.
    pub http: Option<(&'a str, &'a str)>,
    /// The app port.
    pub port: u16,
    /// Whether the request came in plaintext on a permissive port: the default
    /// `all-authenticated` then lets it in, as an unauthenticated client (that is what
    /// permissive means); policies naming identities still do not match it, and the
    /// default `deny` still refuses it (after Istio's PERMISSIVE PeerAuthentication).
    pub permissive: bool,
}

/// The verdict and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named policy, or by the default (`None`).
    Allow(Option<String>),
    /// Denied, and why.
    Deny(DeniedBy),
}

/// What denied a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeniedBy {
    /// A DENY policy that matched, `<name>.<namespace>`.
    Policy(String),
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
    /// The mesh's default inbound policy (`deny`, or `all-authenticated` for a client
    /// without a certificate).
    Default(&'static str),
}

impl std::fmt::Display for DeniedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeniedBy::Policy(p) => f.write_str(p),
            DeniedBy::NoAllowMatched => f.write_str("no ALLOW policy matched"),
            DeniedBy::Default(d) => write!(f, "the default inbound policy ({d})"),
        }
    }
}

impl Decision {
    /// A bounded label for metrics: the deciding policy's name, or `default`.
    pub fn policy_label(&self) -> &str {
        match self {
            Decision::Allow(Some(p)) | Decision::Deny(DeniedBy::Policy(p)) => p,
            _ => "default",
        }
    }
}

/// Decides `req` against the workload's inbound policy.
pub fn authorize(policy: &InboundPolicy, req: &Request<'_>) -> Decision {
    let action = |a: &Authorization| Action::try_from(a.action).ok();
    if let Some(deny) = policy
        .authorizations
        .iter()
        .find(|a| action(a) == Some(Action::Deny) && matches(a, req, Action::Deny))
    {
        return Decision::Deny(DeniedBy::Policy(deny.name.clone()));
    }
    let mut allows = policy
        .authorizations
        .iter()
        .filter(|a| action(a) == Some(Action::Allow))
        .peekable();
    if allows.peek().is_some() {
        return match allows.find(|a| matches(a, req, Action::Allow)) {
            Some(a) => Decision::Allow(Some(a.name.clone())),
            None => Decision::Deny(DeniedBy::NoAllowMatched),
        };
    }
    match DefaultInboundPolicy::try_from(policy.default_policy) {
        Ok(DefaultInboundPolicy::AllUnauthenticated) => Decision::Allow(None),
        Ok(DefaultInboundPolicy::AllAuthenticated) if req.client.is_some() || req.permissive => Decision::Allow(None),
        Ok(DefaultInboundPolicy::AllAuthenticated) => Decision::Deny(DeniedBy::Default("all-authenticated")),
        _ => Decision::Deny(DeniedBy::Default("deny")),
    }
}

fn matches(a: &Authorization, req: &Request<'_>, action: Action) -> bool {
    a.rules.iter().any(|rule| {
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req.client)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req, action)))
    })
}

fn source_matches(s: &Source, client: Option<&SpiffeId>) -> bool {
    let Some(id) = client else {
        // An unauthenticated client matches only a source that asks nothing of it.
        return s.principals.is_empty() && s.namespaces.is_empty() && s.service_accounts.is_empty();
    };
    // The principal and `<namespace>/<service account>` are matched as the joined
    // parts, without building them: this runs for every policy on every request.
    let principal = [
        "spiffe://",
        id.trust_domain().as_str(),
        "/ns/",
        id.namespace(),
        "/sa/",
        id.service_account(),
    ];
    let sa = [id.namespace(), "/", id.service_account()];
    let any = |patterns: &[String], parts: &[&str]| patterns.iter().any(|p| glob_parts(p, parts));
    (s.principals.is_empty() || any(&s.principals, &principal))
        && all_or_any(&s.namespaces, id.namespace())
        && (s.service_accounts.is_empty() || any(&s.service_accounts, &sa))
        && !any(&s.not_principals, &principal)
        && !s.not_namespaces.iter().any(|p| glob(p, id.namespace()))
}

/// [`glob`] against the concatenation of `parts`.
fn glob_parts(pattern: &str, parts: &[&str]) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        parts_start_with(parts, prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        parts_end_with(parts, suffix)
    } else {
        pattern.len() == parts.iter().map(|p| p.len()).sum::<usize>() && parts_start_with(parts, pattern)
    }
}

/// Whether the concatenation of `parts` starts with `want`.
fn parts_start_with(parts: &[&str], mut want: &str) -> bool {
    for part in parts {
        if want.len() <= part.len() {
            return part.starts_with(want);
        }
        match want.strip_prefix(part) {
            Some(rest) => want = rest,
            None => return false,
        }
    }
    want.is_empty()
}

/// Whether the concatenation of `parts` ends with `want`.
fn parts_end_with(parts: &[&str], mut want: &str) -> bool {
    for part in parts.iter().rev() {
        if want.len() <= part.len() {
            return part.ends_with(want);
        }
        match want.strip_suffix(part) {
            Some(rest) => want = rest,
            None => return false,
        }
    }
    want.is_empty()
}

fn operation_matches(o: &Operation, req: &Request<'_>, action: Action) -> bool {
    let port = o.ports.is_empty() || o.ports.contains(&u32::from(req.port));
    match req.http {
        Some((method, path)) => {
            port && (o.methods.is_empty() || o.methods.iter().any(|p| method_glob(p, method)))
                && all_or_any(&o.paths, path)
                && !o.not_methods.iter().any(|p| method_glob(p, method))
                && !o.not_paths.iter().any(|p| glob(p, path))
        }
        None => {
            let asks_http =
                !(o.methods.is_empty() && o.paths.is_empty() && o.not_methods.is_empty() && o.not_paths.is_empty());
            port && (!asks_http || action == Action::Deny)
        }
    }
}

/// An empty list matches everything; otherwise some pattern must match.
fn all_or_any(patterns: &[String], value: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| glob(p, value))
}

/// As [`glob`], for a method, ignoring ASCII case: methods are case-sensitive
/// (RFC 9110 §9.1), but many servers upper-case them (Werkzeug, for one), so a DENY of
/// `DELETE` must also hold against `delete`.
fn method_glob(pattern: &str, method: &str) -> bool {
    let eq = |a: Option<&str>, b: &str| a.is_some_and(|a| a.eq_ignore_ascii_case(b));
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        eq(method.get(..prefix.len()), prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        eq(
            method.len().checked_sub(suffix.len()).and_then(|i| method.get(i..)),
            suffix,
        )
    } else {
        method.eq_ignore_ascii_case(pattern)
    }
}

/// `*`, `prefix*`, `*suffix`, or an exact value.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wary_proto::discovery::Rule;

    #[test]
    fn methods_match_whatever_their_case() {
        for (pattern, method, matches) in [
            ("DELETE", "delete", true),
            ("DELETE", "Delete", true),
            ("DEL*", "delete", true),
            ("*ETE", "delete", true),
            ("*", "purge", true),
            ("GET", "GETX", false),
            ("*LONGER", "GET", false),
        ] {
            assert_eq!(method_glob(pattern, method), matches, "{pattern} {method}");
        }
    }

    fn policy(authorizations: Vec<Authorization>, default: DefaultInboundPolicy) -> InboundPolicy {
        InboundPolicy {
            default_policy: default as i32,
            authorizations,
            ..Default::default()
        }
    }

    fn authz(name: &str, action: Action, principals: &[&str], paths: &[&str]) -> Authorization {
        Authorization {
            name: name.into(),
            action: action as i32,
            rules: vec![Rule {
                from: vec![Source {
                    principals: principals.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }],
                to: vec![Operation {
                    paths: paths.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }],
            }],
        }
    }

    fn req<'a>(client: Option<&'a SpiffeId>, path: &'a str) -> Request<'a> {
        Request {
            client,
            http: Some(("GET", path)),
            port: 8080,
            permissive: false,
        }
    }

    #[test]
    fn matching_joined_parts_agrees_with_matching_the_joined_string() {
        let parts = ["spiffe://", "cluster.local", "/ns/", "default", "/sa/", "web"];
        let joined = parts.concat();
        let patterns = [
            "*",
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/we",
            "spiffe://cluster.local/ns/default/sa/webb",
            "spiffe://cluster.local/ns/default/*",
            "spiffe://cluster.local/ns/defaulx/*",
            "spiffe://cluster.local/*",
            "spiffe://*",
            "spiffe:*",
            "*/sa/web",
            "*web",
            "*eb",
            "*/sa/db",
            "*default/sa/web",
            "*xspiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra*",
            "",
        ];
        for p in patterns {
            assert_eq!(glob_parts(p, &parts), glob(p, &joined), "{p:?}");
        }
        assert!(glob_parts("default/web", &["default", "/", "web"]));
        assert!(!glob_parts("default/we", &["default", "/", "web"]));
    }

    #[test]
    fn deny_wins_allow_must_match_and_defaults_apply() {
        let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let db: SpiffeId = "spiffe://cluster.local/ns/default/sa/db".parse().unwrap();
        let p = policy(
            vec![
                authz(
                    "web-api.default",
                    Action::Allow,
                    &["spiffe://cluster.local/ns/default/sa/web"],
                    &["/api/*"],
                ),
                authz("no-admin.default", Action::Deny, &["*"], &["/api/admin*"]),
            ],
            DefaultInboundPolicy::AllAuthenticated,
        );
        assert_eq!(
            authorize(&p, &req(Some(&web), "/api/orders")),
            Decision::Allow(Some("web-api.default".into()))
        );
        assert_eq!(
            authorize(&p, &req(Some(&web), "/api/admin/users")),
            Decision::Deny(DeniedBy::Policy("no-admin.default".into()))
        );
        assert_eq!(
            authorize(&p, &req(Some(&db), "/api/orders")),
            Decision::Deny(DeniedBy::NoAllowMatched)
        );
        assert_eq!(
            authorize(&p, &req(None, "/api/orders")),
            Decision::Deny(DeniedBy::NoAllowMatched)
        );

        let open = policy(vec![], DefaultInboundPolicy::AllAuthenticated);
        assert_eq!(authorize(&open, &req(Some(&db), "/")), Decision::Allow(None));
        assert_eq!(
            authorize(&open, &req(None, "/")),
            Decision::Deny(DeniedBy::Default("all-authenticated"))
        );
        // Plaintext on a permissive port passes all-authenticated, and nothing else.
        let plaintext = Request {
            permissive: true,
            ..req(None, "/")
        };
        assert_eq!(authorize(&open, &plaintext), Decision::Allow(None));
        assert_eq!(authorize(&p, &plaintext), Decision::Deny(DeniedBy::NoAllowMatched));
        let closed = policy(vec![], DefaultInboundPolicy::Deny);
        assert_eq!(
            authorize(&closed, &plaintext),
            Decision::Deny(DeniedBy::Default("deny"))
        );
        assert_eq!(
            authorize(&closed, &req(Some(&web), "/")),
            Decision::Deny(DeniedBy::Default("deny"))
        );
        let anyone = policy(vec![], DefaultInboundPolicy::AllUnauthenticated);
        assert_eq!(authorize(&anyone, &req(None, "/")), Decision::Allow(None));
    }

    #[test]
    fn an_opaque_stream_is_never_let_in_by_http_fields_and_is_denied_by_them() {
        let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let tcp = Request {
            client: Some(&web),
            http: None,
            port: 8080,
            permissive: false,
        };
        let by_path = policy(
            vec![authz("api.default", Action::Allow, &["*"], &["/api/*"])],
            DefaultInboundPolicy::AllAuthenticated,
        );
        assert_eq!(authorize(&by_path, &tcp), Decision::Deny(DeniedBy::NoAllowMatched));
        let by_client = policy(
            vec![authz("web.default", Action::Allow, &["*/sa/web"], &[])],
            DefaultInboundPolicy::Deny,
        );
        assert_eq!(authorize(&by_client, &tcp), Decision::Allow(Some("web.default".into())));
        let deny_admin = policy(
            vec![authz("no-admin.default", Action::Deny, &["*"], &["/admin*"])],
            DefaultInboundPolicy::AllAuthenticated,
        );
        assert_eq!(
            authorize(&deny_admin, &tcp),
            Decision::Deny(DeniedBy::Policy("no-admin.default".into()))
        );
    }

    #[test]
    fn sources_match_namespaces_service_accounts_and_negations() {
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let s = Source {
            namespaces: vec!["shop".into()],
            service_accounts: vec!["shop/*".into()],
            not_principals: vec!["*/sa/db".into()],
            ..Default::default()
        };
        assert!(source_matches(&s, Some(&web)));
        let db: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        assert!(!source_matches(&s, Some(&db)));
        assert!(!source_matches(&s, None));
        assert!(glob("*", "x") && glob("/api/*", "/api/v1") && glob("*.css", "a.css") && !glob("/a", "/ab"));
    }
}
