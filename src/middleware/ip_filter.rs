//! `ip_filter`: allow or deny by client address. The address is the one the server
//! derived with `server.trusted_proxies`, so a client cannot pick it with a header.

use http::{request, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware, Reason, Reject};
use crate::config::value::Cidr;
use crate::config::{KeyPath, Problem};

/// `ip_filter`: allow or deny by client address (after `server.trusted_proxies`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// When not empty, only these networks pass.
    #[serde(default)]
    allow: Vec<Cidr>,
    /// Always refused, even when also allowed.
    #[serde(default)]
    deny: Vec<Cidr>,
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return Err((
                KeyPath::default().key("allow"),
                "an ip_filter needs `allow` or `deny` networks".into(),
            ));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "allow={} deny={}",
            super::list(&self.allow),
            super::list(&self.deny)
        )
    }

    fn role(&self) -> super::Role {
        super::Role {
            refuses: Some(http::Method::GET),
            ..super::Role::default()
        }
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(IpFilter {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        })
    }
}

struct IpFilter {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Middleware for IpFilter {
    fn on_request(&self, _: &mut request::Parts, ctx: &mut Context) -> Flow<'_> {
        let ip = ctx.client_ip;
        let denied = self.deny.iter().any(|n| n.contains(ip));
        let allowed = self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip));
        if denied || !allowed {
            return Flow::Reject(Reject::new(
                StatusCode::FORBIDDEN,
                Reason::IpDenied,
                "the client address is not allowed",
            ));
        }
        Flow::Continue
    }
}
