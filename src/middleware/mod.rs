//! One file per middleware, named after its TOML `type`. Each file owns its `Settings`
//! (the keys of its `[[middleware]]` entry) and the [`Middleware`] built from them.

use crate::chain::Middleware;
use crate::config::{deserialize, KeyPath, Problem};

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
    /// The middleware of the entry called `name` (its type, unless named). Types whose
    /// state is keyed by name use it: kept across reloads, shared through Redis, labelled
    /// in metrics.
    fn build(&self, name: &str) -> Box<dyn Middleware>;
}

/// Declares the registry: TOML `type` name → module, in one place.
macro_rules! registry {
    ($($name:literal => $variant:ident($module:ident)),* $(,)?) => {
        /// A middleware entry's settings, by type.
        #[derive(Debug)]
        pub enum Spec {
            $($variant($module::Settings),)*
        }

        /// Every `type` a `[[middleware]]` entry may have.
        pub const TYPES: &[&str] = &[$($name),*];

        impl Spec {
            /// Parses the settings of a `type = kind` entry (its common keys already removed).
            pub fn parse(kind: &str, settings: toml::Value) -> Result<Spec, Problem> {
                let spec = match kind {
                    $($name => Spec::$variant(deserialize(settings)?),)*
                    other => {
                        return Err((
                            KeyPath::default().key("type"),
                            format!("unknown middleware type {other:?}: expected one of {}", TYPES.join(", ")),
                        ))
                    }
                };
                spec.settings().validate()?;
                Ok(spec)
            }

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
            pub fn build(&self, name: &str) -> Box<dyn Middleware> {
                self.settings().build(name)
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

/// Formats a list for `check` summaries: `[a, b]`.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let inner: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("[{}]", inner.join(", "))
}
