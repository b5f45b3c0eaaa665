#![forbid(unsafe_code)]
//! vncd: a reconciling controller that leases websocket ports for VM consoles and
//! supervises the proxy processes that serve them.
//!
//! The layout follows the architecture (see docs/ARCHITECTURE.md): [`reconcile`] is the
//! pure decision, [`pool`] picks ports, [`store`] keeps leases, [`supervisor`] owns the
//! proxy processes, [`source`] says what is desired, and [`controller`] runs the loop.

pub mod api;
pub mod cli;
pub mod clock;
pub mod console;
pub mod controller;
pub mod fsutil;
pub mod health;
pub mod http;
pub mod k8s;
pub mod lease;
pub mod manifest;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod proxy;
pub mod reconcile;
pub mod relay;
pub mod runconfig;
pub mod session;
pub mod source;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod task;
pub mod ticket;
