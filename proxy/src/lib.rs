//! `wary-proxy`: the sidecar.
//!
//! * [`identity`]: the workload key and certificate, renewed before it lapses.
//! * [`control`]: the mTLS connection to the control plane.
//! * [`discovery`]: the stream to the control plane: subscribe, apply, ACK/NACK,
//!   reconnect with backoff.
//! * [`state`]: the last good resources, read lock-free by everything else.
//! * [`routes`]: the outbound route table and each service's policy, rebuilt on each
//!   discovery update.
//! * [`outbound`]: the app's requests: destination, service, endpoint, and over
//!   [`pool`] (HTTP/2 over mTLS) to the peer proxy; [`detect`] tells protocols apart
//!   and finds a redirected connection's destination (transparent mode); [`tunnel`]
//!   carries opaque TCP and HTTP/1.1 `Upgrade` as HTTP/2 `CONNECT` streams.
//! * [`balance`]: P2C over Peak-EWMA, fed by the time to each response's first byte;
//!   [`outlier`]: circuit breaking per endpoint; [`retry`]: retries within a budget,
//!   replayable bodies, and the per-service bulkhead.
//! * [`authorize`]: AuthorizationPolicy evaluation (DENY wins; ALLOW must match).
//! * [`inbound`]: mTLS from peers, the client's identity for the app, the app's own
//!   protocol. [`http`] holds what both sides share; [`header_case`] keeps HTTP/1
//!   header names' case across the mesh.
//! * [`admin`], [`metrics`], [`access`]: what operators see (and access logs, trace
//!   context); [`drain`]: graceful shutdown.
//! * [`probes`]: kubelet probes moved to the admin port, made to the app.
//! * [`init`]: the pod's iptables rules (`wary-proxy init`), for transparent mode.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod authorize;
pub mod balance;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod header_case;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod probes;
pub mod retry;
pub mod routes;
pub mod state;
pub mod tunnel;
