//! `wary-proxy`: the sidecar.
//!
//! * [`identity`]: the workload key and certificate, renewed before it lapses.
//! * [`control`]: the mTLS connection to the control plane.
//! * [`discovery`]: the stream to the control plane: subscribe, apply, ACK/NACK,
//!   reconnect with backoff.
//! * [`state`]: the last good resources, read lock-free by everything else.
//! * [`admin`], [`metrics`]: what operators see.
//!
//! The data path (outbound, inbound, balancing, resilience) joins these modules as it
//! lands; see `shared/DESIGN.md` for the picture.

#![forbid(unsafe_code)]

pub mod admin;
pub mod control;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod state;
