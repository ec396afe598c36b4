//! One file per middleware, named after its TOML `type`. Each file owns its `Settings`
//! (the keys of its `[[middleware]]` entry), the [`Middleware`] built from them, its
//! per-request state (in the context's `state`), its metrics and the state it keeps across
//! reloads ([`Kept`]), and declares its [`Role`] for the rest of the chain; the registry
//! below maps `type` names to files, the only place that lists them all.

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderName, Method};
use schemars::{JsonSchema, Schema, SchemaGenerator};

use crate::chain::{Chain, Link, Middleware, Scope};
use crate::config::{typed, Entries, MiddlewareEntry, Problem};
use crate::metrics::Metrics;
use crate::pool::Trust;
use crate::redis_link::Links;

mod auth;
mod jwks;
pub mod order;

/// What every middleware's settings can do besides deserializing.
pub trait Settings: std::fmt::Debug {
    /// Checks that need several keys at once; the key path is relative to the entry.
    fn validate(&self) -> Result<(), Problem> {
        Ok(())
    }
    /// The entry's settings on one line, for `gatehouse check`.
    fn summary(&self) -> String;
    /// What the entry does that other entries and the order warnings need to know.
    fn role(&self) -> Role {
        Role::default()
    }
    /// The middleware of the entry, with what its building may need.
    fn build(&self, build: &Build) -> Box<dyn Middleware>;
}

/// An entry's part in the chain, as the rest of the chain sees it.
#[derive(Debug, Default)]
pub struct Role {
    /// It authenticates: it refuses a request without credentials, a browser's preflight
    /// included.
    pub authenticates: bool,
    /// It refuses requests a page makes, shown in an order warning by a request of this
    /// method (a preflight for an authentication, a body for a size limit).
    pub refuses: Option<Method>,
    /// It answers CORS preflights and decorates responses for pages (`cors`): an entry
    /// that refuses above it leaves pages an unreadable error.
    pub answers_preflights: bool,
    /// Headers its answers or its response phase add for the client (`retry-after`, a
    /// request id), which a page reads only when `cors` exposes them.
    pub response_headers: Vec<HeaderName>,
}

impl Role {
    /// An authentication's: it refuses requests without credentials (preflights too, shown
    /// by one in a warning) with a `www-authenticate` challenge.
    pub fn authentication() -> Role {
        Role {
            authenticates: true,
            refuses: Some(Method::OPTIONS),
            answers_preflights: false,
            response_headers: vec![http::header::WWW_AUTHENTICATE],
        }
    }
}

/// What building one entry's middleware may need besides its settings.
pub struct Build<'a> {
    /// The entry's name (its type, unless named): types whose state is keyed by name use
    /// it (kept across reloads, shared through Redis, labelled in metrics).
    pub name: &'a str,
    pub handles: &'a Handles,
    /// Every [`Role::response_headers`] of the chain's entries, once each.
    pub response_headers: &'a [HeaderName],
}

/// What building a middleware may need besides its settings: handles owned by whoever
/// builds chains (the server for its life, `explain` in-process, a test), never
/// process-wide globals.
pub struct Handles {
    pub metrics: Arc<Metrics>,
    /// State that outlives a chain (a local rate limit's counts, kept by a reload).
    pub kept: Kept,
    /// Where background work (JWKS refreshes) runs; `None` builds without any, as `check`
    /// and an offline `explain` do.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Worker threads: per-worker state (connection pools, Redis connections) has one
    /// slot per worker, plus one (the last) for the control thread.
    pub workers: usize,
    /// Middlewares look at their outside state but change nothing there, as
    /// `explain --live` wants: a Redis rate limit reads its bucket without taking from it.
    pub read_only: bool,
    /// The Redis links built with these handles, for `/readyz`.
    pub redis: Links,
    /// The roots that https side services (JWKS URLs, auth services, OpenID Providers) are
    /// verified against, read once for all the chains built with these handles.
    pub trust: Trust,
}

impl Handles {
    /// Handles for building outside a server: fresh metrics and state, no background work.
    pub fn offline() -> Handles {
        Handles {
            metrics: Arc::default(),
            kept: Kept::default(),
            runtime: None,
            workers: 1,
            read_only: false,
            redis: Links::default(),
            trust: Trust::default(),
        }
    }
}

/// State that outlives a config generation, one value per type, made on first use: a
/// middleware type keeps its own here, and whoever holds the handles never names it.
/// Looked up only while a chain is built.
#[derive(Default)]
pub struct Kept(Mutex<Vec<Arc<dyn Any + Send + Sync>>>);

impl Kept {
    /// The kept value of type `T`, made now if there is none yet.
    pub fn get<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = kept.iter().find_map(|v| v.clone().downcast::<T>().ok()) {
            return found;
        }
        let made = Arc::new(T::default());
        kept.push(made.clone());
        made
    }
}

/// Declares the registry: TOML `type` name → module (declared here too), in one place.
macro_rules! registry {
    ($($name:literal => $variant:ident($module:ident)),* $(,)?) => {
        $(pub mod $module;)*

        /// A middleware entry's settings, by type.
        #[derive(Debug)]
        pub enum Spec {
            $($variant($module::Settings),)*
        }

        impl Entries for Spec {
            const TYPES: &'static [&'static str] = &[$($name),*];

            fn parse(kind: &str, settings: toml::Value) -> Result<Spec, Vec<Problem>> {
                let spec = match kind {
                    $($name => Spec::$variant(typed(settings)?),)*
                    other => unreachable!("the config checks the type {other:?} against TYPES"),
                };
                spec.settings().validate().map_err(|problem| vec![problem])?;
                Ok(spec)
            }

            fn schemas(generator: &mut SchemaGenerator) -> Vec<(&'static str, Schema)> {
                vec![$(($name, <$module::Settings as JsonSchema>::json_schema(generator)),)*]
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

            /// Builds the entry's middleware.
            pub fn build(&self, build: &Build) -> Box<dyn Middleware> {
                self.settings().build(build)
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
    "oidc" => Oidc(oidc),
    "authorize" => Authorize(authorize),
    "compress" => Compress(compress),
    "wasm" => Wasm(wasm),
}

/// Builds the chain of a config's entries, in order.
pub fn chain(entries: &[MiddlewareEntry<Spec>], handles: &Handles) -> Chain {
    let response_headers = response_headers(entries);
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
                middleware: e.spec.build(&Build {
                    name: &e.name,
                    handles,
                    response_headers: &response_headers,
                }),
            })
            .collect(),
    )
}

/// Every [`Role::response_headers`] of `entries`, once each, in chain order.
fn response_headers(entries: &[MiddlewareEntry<Spec>]) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for name in entries
        .iter()
        .flat_map(|e| e.spec.settings().role().response_headers)
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Formats a list for `check` summaries: `[a, b]`.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let inner: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("[{}]", inner.join(", "))
}
