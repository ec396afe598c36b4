//! gatehouse: a reverse-proxy sidecar that applies a TOML-configured middleware chain in
//! front of any service.
//!
//! Layers, bottom to top, each importing only from below: [`config`] (the file's schema,
//! knowing no middleware), [`protocol`] (each HTTP version's codec and its downstream and
//! upstream drivers), [`json`], [`grpc`] and [`metrics`]; [`pool`] (connections to the app
//! and side services, and every outbound request); [`redis_link`] (connections to a Redis
//! server, Sentinel or Cluster, for every Redis user); [`trace`] (trace context, the span
//! exporter); [`chain`] (the middleware trait, the request context, gatehouse's own
//! answers); [`middleware`] (one file per TOML `type`); [`audit`]; [`proxy`] (one request's
//! path, start to record); [`server`], [`admin`] and [`explain`] (one request through the
//! chain in-process, and policy tests) and [`inject`] (Kubernetes YAML with gatehouse
//! added as a sidecar).

pub mod admin;
pub mod audit;
pub mod chain;
pub mod config;
pub mod explain;
pub mod grpc;
pub mod inject;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod redis_link;
pub mod server;
pub mod trace;

/// A config file with gatehouse's middleware types.
pub type Config = config::Config<middleware::Spec>;
