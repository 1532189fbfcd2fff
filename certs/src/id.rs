//! Trust domains and SPIFFE IDs.

use std::fmt;
use std::str::FromStr;

/// Why a trust domain or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The trust domain is empty, too long or has characters SPIFFE does not allow.
    #[error("invalid trust domain {0:?}: use lower-case letters, digits, '.', '-' and '_' (e.g. cluster.local)")]
    TrustDomain(String),
    /// The string is not `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[error("invalid SPIFFE ID {id:?}: {reason}; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    SpiffeId {
        /// The string given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A namespace or service-account name is not a Kubernetes DNS label.
    #[error(
        "invalid {what} {value:?}: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
    )]
    Name {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The value given.
        value: String,
    },
}

/// A SPIFFE trust domain, e.g. `cluster.local`. At most 255 bytes of `[a-z0-9._-]`
/// (SPIFFE-ID §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name.
    ///
    /// # Errors
    /// [`IdentityError::TrustDomain`] when it is empty, longer than 255 bytes, or has a
    /// character outside `[a-z0-9._-]`.
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(IdentityError::TrustDomain(name.to_string()))
        }
    }

    /// The trust domain's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    /// `cluster.local`, as Istio and Linkerd default.
    fn default() -> Self {
        Self("cluster.local".to_string())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload's identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts.
    ///
    /// # Errors
    /// [`IdentityError::Name`] when the namespace or service account is not a
    /// Kubernetes DNS label (RFC 1123, at most 63 bytes).
    pub fn new(trust_domain: TrustDomain, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        check_label("namespace", namespace)?;
        check_label("service account", service_account)?;
        Ok(Self {
            trust_domain,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The DNS-like form the CA also writes into each certificate (as a DNS SAN), so a
    /// client can ask rustls to check the server's identity by name:
    /// `<sa>.<ns>.serviceaccount.identity.<trust-domain>` (Linkerd's shape).
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.serviceaccount.identity.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let bad = |reason| IdentityError::SpiffeId {
            id: id.to_string(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("missing spiffe:// scheme"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        let trust_domain = TrustDomain::new(td).map_err(|_| bad("invalid trust domain"))?;
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                SpiffeId::new(trust_domain, ns, sa).map_err(|_| bad("invalid namespace or service account"))
            }
            _ => Err(bad("path is not /ns/<namespace>/sa/<service-account>")),
        }
    }
}

/// Checks a Kubernetes DNS label (RFC 1123): 1–63 of `[a-z0-9-]`, alphanumeric at both
/// ends.
///
/// # Errors
/// [`IdentityError::Name`] naming `what` when the value is not such a label.
pub fn check_label(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let b = value.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum);
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Name {
            what,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn spiffe_id_refuses_bad_shapes() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be refused");
        }
    }
}
