//! `headers`: set, add and remove request and response headers, e.g. security headers on
//! every response or an environment marker for the app.

use http::{request, response, HeaderMap, HeaderName};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::{HeaderNameValue, HeaderPairs};

/// `headers`: set, add and remove request and response headers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Edits of the request, before the app sees it.
    #[serde(default)]
    request: Edits,
    /// Edits of the response, before the client sees it.
    #[serde(default)]
    response: Edits,
}

/// Applied in the order remove, set, add: `set` replaces every value of a name, `add`
/// appends one more, `remove` deletes every value.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Edits {
    /// Replace every value of these headers.
    #[serde(default)]
    set: HeaderPairs,
    /// Append one more value of these headers.
    #[serde(default)]
    add: HeaderPairs,
    /// Delete every value of these headers.
    #[serde(default)]
    remove: Vec<HeaderNameValue>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.set.0.is_empty() && self.add.0.is_empty() && self.remove.is_empty()
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(&name.0);
        }
        for (name, value) in &self.set.0 {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add.0 {
            headers.append(name.clone(), value.clone());
        }
    }

    fn summary(&self, side: &str) -> String {
        let names = |pairs: &HeaderPairs| {
            pairs
                .0
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let removed: Vec<&str> = self.remove.iter().map(|n| n.0.as_str()).collect();
        format!(
            "{side}(set={} add={} remove={})",
            names(&self.set),
            names(&self.add),
            removed.join(",")
        )
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), crate::config::Problem> {
        if self.request.is_empty() && self.response.is_empty() {
            return Err((
                crate::config::KeyPath::default(),
                "a headers entry needs `request` or `response` edits".into(),
            ));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "{} {}",
            self.request.summary("request"),
            self.response.summary("response")
        )
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(Headers {
            request: self.request.clone(),
            response: self.response.clone(),
        })
    }
}

struct Headers {
    request: Edits,
    response: Edits,
}

impl Middleware for Headers {
    fn on_request(&self, req: &mut request::Parts, _: &mut Context) -> Flow<'_> {
        self.request.apply(&mut req.headers);
        Flow::Continue
    }

    fn on_response(&self, resp: &mut response::Parts, _: &mut Context) {
        self.response.apply(&mut resp.headers);
    }

    fn request_fields(&self) -> Vec<HeaderName> {
        let edits = &self.request;
        let names = edits.set.0.iter().chain(&edits.add.0).map(|(n, _)| n);
        names
            .chain(edits.remove.iter().map(|n| &n.0))
            .cloned()
            .collect()
    }
}
