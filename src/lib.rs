//! gatehouse: a reverse-proxy sidecar that applies a TOML-configured middleware chain in
//! front of any service.
//!
//! Layout follows the request: [`server`] accepts connections, [`proxy`] carries each
//! request through the [`chain`] of [`middleware`] to the upstream and back, all built
//! from [`config`].

pub mod admin;
pub mod audit;
pub mod chain;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod proxy;
pub mod server;
