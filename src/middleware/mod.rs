//! One file per middleware, named after its TOML `type`. Each file owns its `Settings`
//! (the keys of its `[[middleware]]` entry) and the [`Middleware`] built from them; the
//! registry below maps `type` names to files, the only place that lists them all.

use std::sync::Arc;

use crate::chain::{Chain, Link, Middleware, Scope};
use crate::config::{deserialize, Entries, KeyPath, MiddlewareEntry, Problem};
use crate::metrics::Metrics;

pub mod api_key;
mod auth;
pub mod basic_auth;
pub mod body_limit;
pub mod cors;
pub mod forward_auth;
pub mod headers;
pub mod ip_filter;
pub mod jwt;
pub mod order;
pub mod rate_limit;
pub mod request_id;
pub mod timing;

/// What every middleware's settings can do besides deserializing.
pub trait Settings: std::fmt::Debug {
    /// Checks that need several keys at once; the key path is relative to the entry.
    fn validate(&self) -> Result<(), Problem> {
        Ok(())
    }
    /// The entry's settings on one line, for `gatehouse check`.
    fn summary(&self) -> String;
    /// The middleware of the entry called `name` (its type, unless named; types whose
    /// state is keyed by name use it: kept across reloads, shared through Redis, labelled
    /// in metrics), with the handles it may need.
    fn build(&self, name: &str, handles: &Handles) -> Box<dyn Middleware>;
}

/// What building a middleware may need besides its settings: handles owned by whoever
/// builds chains (the server for its life, `explain` in-process, a test), never
/// process-wide globals.
pub struct Handles {
    pub metrics: Arc<Metrics>,
    /// Local rate-limit state that outlives a chain, so a reload keeps the counts.
    pub rate_limits: rate_limit::States,
    /// Where background work (JWKS refreshes) runs; `None` builds without any, as `check`
    /// and an offline `explain` do.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Worker threads: per-worker state (connection pools, Redis connections) has one
    /// slot per worker, plus one (the last) for the control thread.
    pub workers: usize,
    /// Middlewares look at their outside state but change nothing there, as
    /// `explain --live` wants: a Redis rate limit reads its bucket without taking from it.
    pub read_only: bool,
}

impl Handles {
    /// Handles for building outside a server: fresh metrics and state, no background work.
    pub fn offline() -> Handles {
        Handles {
            metrics: Arc::default(),
            rate_limits: rate_limit::States::default(),
            runtime: None,
            workers: 1,
            read_only: false,
        }
    }
}

/// Declares the registry: TOML `type` name → module, in one place.
macro_rules! registry {
    ($($name:literal => $variant:ident($module:ident)),* $(,)?) => {
        /// A middleware entry's settings, by type.
        #[derive(Debug)]
        pub enum Spec {
            $($variant($module::Settings),)*
        }

        impl Entries for Spec {
            const TYPES: &'static [&'static str] = &[$($name),*];

            fn parse(kind: &str, settings: toml::Value) -> Result<Spec, Problem> {
                let spec = match kind {
                    $($name => Spec::$variant(deserialize(settings)?),)*
                    other => {
                        return Err((
                            KeyPath::default().key("type"),
                            format!("unknown middleware type {other:?}: expected one of {}", Self::TYPES.join(", ")),
                        ))
                    }
                };
                spec.settings().validate()?;
                Ok(spec)
            }
        }

        impl Spec {
            /// The TOML `type` of this entry.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Spec::$variant(_) => $name,)*
                }
            }

            /// The settings, as the trait every type implements.
            pub fn settings(&self) -> &dyn Settings {
                match self {
                    $(Spec::$variant(s) => s,)*
                }
            }

            /// Builds the middleware of the entry called `name`.
            pub fn build(&self, name: &str, handles: &Handles) -> Box<dyn Middleware> {
                self.settings().build(name, handles)
            }
        }
    };
}

registry! {
    "request_id" => RequestId(request_id),
    "timing" => Timing(timing),
    "headers" => Headers(headers),
    "ip_filter" => IpFilter(ip_filter),
    "cors" => Cors(cors),
    "body_limit" => BodyLimit(body_limit),
    "rate_limit" => RateLimit(rate_limit),
    "api_key" => ApiKey(api_key),
    "basic_auth" => BasicAuth(basic_auth),
    "jwt" => Jwt(jwt),
    "forward_auth" => ForwardAuth(forward_auth),
}

/// Builds the chain of a config's entries, in order.
pub fn chain(entries: &[MiddlewareEntry<Spec>], handles: &Handles) -> Chain {
    // `cors` entries expose the headers the other entries add, found once per chain.
    let exposed = cors::chain_headers(entries, handles);
    Chain::new(
        entries
            .iter()
            .map(|e| Link {
                name: e.name.as_str().into(),
                kind: e.spec.kind(),
                scope: Scope {
                    paths: e.paths.clone(),
                    skip_paths: e.skip_paths.clone(),
                    methods: e.methods.clone(),
                },
                middleware: match &e.spec {
                    Spec::Cors(cors) => cors.build_exposing(&exposed),
                    spec => spec.build(&e.name, handles),
                },
            })
            .collect(),
    )
}

/// Formats a list for `check` summaries: `[a, b]`.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let inner: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("[{}]", inner.join(", "))
}
