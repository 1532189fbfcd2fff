//! Wary's control-plane API, generated from `proto/wary/discovery/v1/*.proto`.
//!
//! * [`discovery`]: the `Discovery.Stream` service, its requests and responses, and the
//!   resources it carries ([`discovery::Service`], [`discovery::Endpoints`],
//!   [`discovery::InboundPolicy`]).
//! * [`identity`]: the `Identity.Certify` service: a CSR and a proof in, a workload
//!   certificate and the trust bundle out.
//! * [`TypedResource`]: the link between a resource message and its `type_url`, and
//!   packing into and out of `google.protobuf.Any`.
//!
//! The `.proto` files are the documentation of every field: units, defaults, and
//! where each default comes from.

#![forbid(unsafe_code)]

/// The discovery protocol, version 1 (package `wary.discovery.v1`).
pub mod discovery {
    #![allow(missing_docs, clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("wary.discovery.v1");
}

/// Workload certificates, version 1 (package `wary.identity.v1`).
pub mod identity {
    #![allow(missing_docs, clippy::doc_lazy_continuation)]
    tonic::include_proto!("wary.identity.v1");
}

use prost::Message;

/// The prefix of every type URL, as in `google.protobuf.Any`.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// The wildcard resource name: subscribes to every resource of a type.
pub const WILDCARD: &str = "*";

/// A resource message that travels in a `Resource.resource` `Any`.
pub trait TypedResource: Message + Default + Sized {
    /// The full type URL, e.g. `type.googleapis.com/wary.discovery.v1.Service`.
    const TYPE_URL: &'static str;
    /// A short lower-case name for logs and metric labels, e.g. `service`.
    const KIND: &'static str;

    /// Packs the message into an `Any` with its type URL.
    fn to_any(&self) -> prost_types::Any {
        prost_types::Any {
            type_url: Self::TYPE_URL.to_string(),
            value: self.encode_to_vec(),
        }
    }

    /// Unpacks a message from an `Any`.
    ///
    /// # Errors
    /// [`DecodeError::WrongType`] when the `Any` holds another type,
    /// [`DecodeError::Malformed`] when its bytes do not decode.
    fn from_any(any: &prost_types::Any) -> Result<Self, DecodeError> {
        if any.type_url != Self::TYPE_URL {
            return Err(DecodeError::WrongType {
                expected: Self::TYPE_URL,
                found: any.type_url.clone(),
            });
        }
        Self::decode(any.value.as_slice()).map_err(DecodeError::Malformed)
    }
}

/// Why an `Any` could not be unpacked into a resource.
#[derive(Debug)]
pub enum DecodeError {
    /// The `Any` carries a different type than the one asked for.
    WrongType {
        /// The type URL asked for.
        expected: &'static str,
        /// The type URL the `Any` carries.
        found: String,
    },
    /// The bytes are not a valid encoding of the message.
    Malformed(prost::DecodeError),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::WrongType { expected, found } => {
                write!(f, "resource has type {found:?}, expected {expected:?}")
            }
            DecodeError::Malformed(e) => write!(f, "resource does not decode: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

macro_rules! typed {
    ($ty:ident, $kind:literal) => {
        impl TypedResource for discovery::$ty {
            const TYPE_URL: &'static str = concat!("type.googleapis.com/wary.discovery.v1.", stringify!($ty));
            const KIND: &'static str = $kind;
        }
    };
}

typed!(Service, "service");
typed!(Endpoints, "endpoints");
typed!(InboundPolicy, "inbound_policy");

/// The short kind (`service`, `endpoints`, `inbound_policy`) of a known type URL, for
/// logs and bounded metric labels; `unknown` for anything else.
pub fn kind_of(type_url: &str) -> &'static str {
    match type_url {
        <discovery::Service as TypedResource>::TYPE_URL => discovery::Service::KIND,
        <discovery::Endpoints as TypedResource>::TYPE_URL => discovery::Endpoints::KIND,
        <discovery::InboundPolicy as TypedResource>::TYPE_URL => discovery::InboundPolicy::KIND,
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_round_trip_and_wrong_type() {
        let svc = discovery::Service {
            name: "orders".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        let any = svc.to_any();
        assert_eq!(any.type_url, "type.googleapis.com/wary.discovery.v1.Service");
        assert_eq!(discovery::Service::from_any(&any).unwrap(), svc);
        let err = discovery::Endpoints::from_any(&any).unwrap_err();
        assert!(err.to_string().contains("wary.discovery.v1.Service"), "{err}");
        assert_eq!(kind_of(&any.type_url), "service");
        assert_eq!(kind_of("type.googleapis.com/other"), "unknown");
    }
}
