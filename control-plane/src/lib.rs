//! `wary-control-plane`: reads topology and policy, computes per-proxy resources, and
//! serves them on an incremental discovery stream with ACK/NACK.
//!
//! Read top to bottom, the modules follow the data:
//!
//! * [`policy`], [`local`], [`duration`]: the documents users write (CRD types and
//!   local-only `Service`/`Workload`).
//! * [`source`]: reads a directory of them, with file/line errors and per-file last good.
//! * [`resources`]: cross-document checks, then `Service`/`Endpoints`/`InboundPolicy`.
//! * [`snapshot`]: the resources with content-hash versions.
//! * [`config_watch`]: re-reads the directory on change (debounced) and publishes.
//! * [`kubernetes`]: the same documents from the cluster's watchers (`--kubernetes`).
//! * [`discovery`]: the gRPC stream: subscriptions, deltas, ACK/NACK per proxy.
//! * [`ca_store`], [`tokens`], [`identity`]: the mesh CA on disk and its rotation, join
//!   tokens, and `Identity.Certify`.
//! * [`tls_listener`]: TLS 1.3 in front of the gRPC server.
//! * [`admin`], [`metrics`]: what operators see.
//! * [`inject`], [`webhook`]: sidecar injection, offline (`wary inject`) and as the
//!   mutating admission webhook.

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca_store;
pub mod config_watch;
pub mod discovery;
pub mod duration;
pub mod identity;
pub mod inject;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod policy_status;
pub mod resources;
pub mod snapshot;
pub mod source;
pub mod tls_listener;
pub mod tokens;
pub mod webhook;
