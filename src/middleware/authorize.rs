//! `authorize`: who may do what, as ordered rules of CEL expressions (the Common
//! Expression Language of Envoy's RBAC filter and Kubernetes admission policies) over the
//! request, the client address, the subject and the claims an authentication verified.
//!
//! The first rule whose expression is true decides; `default` decides when none is.
//! Expressions are compiled when the config loads, and every name they use is checked
//! then, so a typo is a config error rather than a rule that never matches. Evaluating
//! one can still fail (a claim the token lacks, a claim of another type): that rule does
//! not match, and the failure is counted and logged, at most once per interval per rule.
//!
//! A request pays for what the rules read: each variable, and each field of `request` and
//! `source`, is made the first time an expression reads it (the headers and the query
//! parameters only when some rule reads them), and a token's claims once per token (kept
//! with its cached verification).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr, LiteralValue, MapExpr, StructExpr};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
    CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Env, IdedExpr, Value};
use http::header::{HOST, WWW_AUTHENTICATE};
use http::{request, HeaderValue, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{path, Context, Flow, Middleware, Policy, Reason, Reject};
use crate::config::{KeyPath, Problem};
use crate::logging::Throttle;

mod program;
use program::{Field, Node, Variable};

/// The variables an expression may read, as the error for any other name lists them.
const VARIABLES: &str = "request, source, subject, claims, time";
/// The fields of `request`.
const REQUEST_FIELDS: [(&str, Field); 5] = [
    ("method", Field::Method),
    ("path", Field::Path),
    ("host", Field::Host),
    ("query", Field::Query),
    ("headers", Field::Headers),
];

/// `authorize`: ordered rules, each allowing or denying with a CEL expression; the first
/// true one decides.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The rules, in order: `{ name = "…", allow = "<CEL>" }` or `{ name = "…", deny = "<CEL>" }`.
    rules: Vec<RuleSettings>,
    /// What happens when no rule's expression is true: `deny` or `allow`.
    #[serde(default)]
    default: Effect,
}

/// One rule: a name and one expression.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleSettings {
    /// Names the rule in audit events, metrics, logs and `explain`.
    name: String,
    /// A CEL expression: when true, the request is allowed.
    allow: Option<String>,
    /// A CEL expression: when true, the request is refused.
    deny: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Effect {
    #[default]
    Deny,
    Allow,
}

impl RuleSettings {
    /// The expression, its key and whether it allows.
    fn expression(&self) -> Option<(&str, &'static str, bool)> {
        match (&self.allow, &self.deny) {
            (Some(e), None) => Some((e, "allow", true)),
            (None, Some(e)) => Some((e, "deny", false)),
            _ => None,
        }
    }
}

/// The environment every expression is compiled and run in: the standard library and
/// the strings extension (`split`, `lowerAscii`, …).
fn environment() -> Env {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .expect("the strings extension declares nothing the standard library has");
    env
}

/// Compiles one expression, checks the names it reads and resolves it for evaluation
/// ([`Node`]); an error is at a character of `source` (from 0). What the interpreter runs
/// is the checked expression with its fields read directly (see [`check`]); errors are
/// placed in the text as written.
fn compile(env: &Arc<Env>, source: &str) -> Result<(IdedExpr, Node), (usize, String)> {
    let program = env.compile(source).map_err(|errors| {
        let first = errors.errors.first();
        // The parser counts lines and columns from 1, in characters.
        let at = first.map_or(0, |e| char_at(source, e.pos.0, e.pos.1));
        let message = first.map_or_else(|| errors.to_string(), |e| e.msg.clone());
        (at, message)
    })?;
    let place = |(id, after, message): Unknown| {
        // The parser's offsets are in bytes.
        let byte = program
            .source_info()
            .offset_for(id)
            .map_or(0, |(start, _)| start as usize);
        let at = source
            .get(..byte.min(source.len()))
            .map_or(0, |s| s.chars().count());
        (at + after, message)
    };
    let mut expression = program.expression().clone();
    check(&mut expression, &mut Vec::new()).map_err(place)?;
    let node = Node::new(&expression, env).map_err(place)?;
    Ok((expression, node))
}

/// The character index of 1-based `line` and `col` in `source`.
fn char_at(source: &str, line: isize, col: isize) -> usize {
    let before: usize = source
        .split_inclusive('\n')
        .take(line.max(1) as usize - 1)
        .map(|l| l.chars().count())
        .sum();
    before + col.max(1) as usize - 1
}

/// What an expression may not say (a name it may not read, a pattern that does not
/// compile): the id of the node that says it, how many characters after that node's
/// start, and the error.
type Unknown = (u64, usize, String);

/// Refuses a name outside the variables (and the fields of `request` and `source`);
/// names a comprehension binds (`r` in `claims.roles.exists(r, …)`) are fine within it.
///
/// And rewrites each field read of a variable into a form the interpreter reads without
/// resolving a qualified name, which joins the segments into new strings (`claims.role`,
/// then `claims`) on every evaluation. A field of `request` or `source`, always there,
/// becomes its whole name (`request.path`), which the [`Activation`] answers without
/// making the map; a claim becomes an index, `claims["role"]`, which gives the same value
/// and, for a claim the token lacks, the same error: both look the key up in the map. A
/// presence test, `has(claims.role)`, stays a selection, and so do fields of a name a
/// comprehension binds: that is not the variable.
fn check(e: &mut IdedExpr, bound: &mut Vec<String>) -> Result<(), Unknown> {
    match &mut e.expr {
        Expr::Ident(name) if bound.contains(name) => Ok(()),
        Expr::Ident(name) => match name.as_str() {
            "request" | "source" | "subject" | "claims" | "time" => Ok(()),
            other => Err((
                e.id,
                0,
                format!("unknown variable `{other}`: expected one of {VARIABLES}"),
            )),
        },
        Expr::Select(select) => {
            let root = match &select.operand.expr {
                Expr::Ident(root) if !bound.contains(root) => root.as_str(),
                _ => return check(&mut select.operand, bound),
            };
            let field = select.field.as_str();
            match root {
                "request" if REQUEST_FIELDS.iter().any(|(name, _)| *name == field) => {}
                "request" => {
                    // The node starts at the dot.
                    return Err((
                        e.id,
                        1,
                        format!(
                            "`request` has no field `{field}`: expected one of {}",
                            REQUEST_FIELDS.map(|(name, _)| name).join(", ")
                        ),
                    ));
                }
                "source" if field == "ip" => {}
                "source" => {
                    return Err((
                        e.id,
                        1,
                        format!("`source` has no field `{field}`: expected ip"),
                    ))
                }
                "claims" => {}
                _ => return check(&mut select.operand, bound),
            }
            if select.test {
                return Ok(());
            }
            e.expr = if root == "claims" {
                let key = LiteralValue::String(std::mem::take(&mut select.field).into());
                let variable = std::mem::take(&mut *select.operand);
                Expr::Call(CallExpr {
                    func_name: operators::INDEX.to_owned(),
                    target: None,
                    // Node ids only place errors in the source, which the original does.
                    args: vec![
                        variable,
                        IdedExpr {
                            id: e.id,
                            expr: Expr::Literal(key),
                        },
                    ],
                })
            } else {
                Expr::Ident(format!("{root}.{field}"))
            };
            Ok(())
        }
        Expr::Call(call) => {
            if let Some(target) = &mut call.target {
                check(target, bound)?;
            }
            call.args.iter_mut().try_for_each(|a| check(a, bound))
        }
        Expr::Comprehension(c) => {
            check(&mut c.iter_range, bound)?;
            check(&mut c.accu_init, bound)?;
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            let inner = [&mut c.loop_cond, &mut c.loop_step, &mut c.result]
                .into_iter()
                .try_for_each(|x| check(x, bound));
            bound.truncate(depth);
            inner
        }
        Expr::List(list) => list.elements.iter_mut().try_for_each(|x| check(x, bound)),
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => entries
            .iter_mut()
            .try_for_each(|entry| match &mut entry.expr {
                EntryExpr::MapEntry(m) => {
                    check(&mut m.key, bound)?;
                    check(&mut m.value, bound)
                }
                EntryExpr::StructField(f) => check(&mut f.value, bound),
            }),
        Expr::Literal(_) | Expr::Unspecified => Ok(()),
    }
}

impl Settings {
    /// Every rule compiled, with what they read together; the first problem otherwise.
    fn compiled(&self, env: &Arc<Env>) -> Result<Vec<(IdedExpr, Node, bool)>, Problem> {
        let mut expressions = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let mut at = KeyPath::default().key("rules");
            at.push_index(i);
            let Some((source, key, allows)) = rule.expression() else {
                let key = if rule.allow.is_some() {
                    "deny"
                } else {
                    "allow"
                };
                return Err((
                    at.key(key),
                    format!(
                        "rule {:?}: set exactly one of `allow` and `deny` (a CEL expression)",
                        rule.name
                    ),
                ));
            };
            let (expression, node) = compile(env, source).map_err(|(n, message)| {
                let message = format!("rule {:?}: invalid expression: {message}", rule.name);
                (at.key(key).char(n), message)
            })?;
            expressions.push((expression, node, allows));
        }
        Ok(expressions)
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        if self.rules.is_empty() {
            return Err((
                KeyPath::default().key("rules"),
                "list at least one rule: { name = \"…\", allow = \"<CEL>\" } or deny".into(),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let mut at = KeyPath::default().key("rules");
            at.push_index(i);
            if rule.name.trim().is_empty() {
                return Err((at.key("name"), "the rule name is empty".into()));
            }
            if self.rules[..i].iter().any(|r| r.name == rule.name) {
                return Err((
                    at.key("name"),
                    format!("duplicate rule name {:?}", rule.name),
                ));
            }
            if rule.name == "default" {
                return Err((
                    at.key("name"),
                    "`default` names the decision when no rule matches: choose another name".into(),
                ));
            }
        }
        self.compiled(&Arc::new(environment())).map(|_| ())
    }

    fn summary(&self) -> String {
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|r| match r.expression() {
                Some((_, key, _)) => format!("{}:{key}", r.name),
                None => r.name.clone(),
            })
            .collect();
        let default = match self.default {
            Effect::Deny => "deny",
            Effect::Allow => "allow",
        };
        format!("rules={} default={default}", super::list(&rules))
    }

    fn role(&self) -> super::Role {
        super::Role {
            // A preflight carries no credentials: a policy on the subject refuses it.
            refuses: Some(http::Method::OPTIONS),
            response_headers: vec![WWW_AUTHENTICATE],
            ..super::Role::default()
        }
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        let env = Arc::new(environment());
        let expressions = self.compiled(&env).expect("validated");
        let errors = build.handles.metrics.family::<ErrorLabels, Counter>(
            "gatehouse_policy_errors",
            "Policy rule expressions that failed to evaluate (and so did not match), by middleware name and rule",
        );
        let middleware: Arc<str> = build.name.into();
        let names: Arc<[Arc<str>]> = self.rules.iter().map(|r| r.name.as_str().into()).collect();
        let rules = expressions
            .into_iter()
            .zip(names.iter())
            .map(|((expression, node, allows), name)| Rule {
                expression,
                node,
                allows,
                errors: errors.get_or_create_owned(&ErrorLabels {
                    middleware: middleware.clone(),
                    rule: name.clone(),
                }),
                warnings: Throttle::default(),
            })
            .collect();
        Box::new(Authorize {
            env,
            rules,
            names,
            default_allows: self.default == Effect::Allow,
            middleware,
            challenge: HeaderValue::from_static("Bearer"),
        })
    }
}

/// `gatehouse_policy_errors_total{middleware, rule}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    middleware: Arc<str>,
    rule: Arc<str>,
}

struct Rule {
    /// The compiled expression, fields indexed (see [`check`]), as the interpreter runs it.
    expression: IdedExpr,
    /// The same, resolved for evaluation; the interpreter decides where it cannot.
    node: Node,
    allows: bool,
    /// Its evaluation failures, counted.
    errors: Counter,
    /// Lets one log line about its failures through per interval.
    warnings: Throttle,
}

struct Authorize {
    env: Arc<Env>,
    rules: Vec<Rule>,
    /// The rule names, in order, shared with every request's [`Policy`].
    names: Arc<[Arc<str>]>,
    default_allows: bool,
    middleware: Arc<str>,
    /// The challenge of a `401`: a refused request without a subject may authenticate.
    challenge: HeaderValue,
}

impl Authorize {
    /// The decision on a request: the rule that decided (`None`: the default), whether it
    /// allows, and the rules before it that failed to evaluate.
    fn decide(&self, req: &request::Parts, ctx: &Context) -> Policy {
        let activation = Activation::new(req, ctx);
        let mut scope = cel::Context::with_env(Arc::clone(&self.env));
        scope.set_variable_resolver(&activation);
        let mut errors = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let fast = rule.node.eval(&activation, &scope).and_then(|v| v.truth());
            let error = match fast {
                Ok(true) => return self.policy(Some(i), rule.allows, errors),
                Ok(false) => continue,
                Err(_) => match Value::resolve_val(&rule.expression, &scope) {
                    Ok(value) => match value.downcast_ref::<CelBool>().map(|b| *b.inner()) {
                        Some(true) => return self.policy(Some(i), rule.allows, errors),
                        Some(false) => continue,
                        None => match Value::try_from(value.as_ref()) {
                            Ok(other) => format!("the expression gave {other:?}, not a bool"),
                            Err(e) => e.to_string(),
                        },
                    },
                    Err(e) => e.to_string(),
                },
            };
            rule.errors.inc();
            if let Some(held_back) = rule.warnings.ready() {
                tracing::warn!(
                    middleware = %self.middleware,
                    rule = %self.names[i],
                    error = %error,
                    held_back,
                    "a policy rule failed to evaluate, and so did not match"
                );
            }
            errors.push((i, error));
        }
        self.policy(None, self.default_allows, errors)
    }

    fn policy(&self, rule: Option<usize>, allowed: bool, errors: Vec<(usize, String)>) -> Policy {
        Policy {
            rules: Arc::clone(&self.names),
            rule,
            allowed,
            errors,
        }
    }
}

impl Middleware for Authorize {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let policy = self.decide(req, ctx);
        let refusal = (!policy.allowed).then(|| {
            let message = match policy.rule {
                Some(_) => format!("denied by policy rule {:?}", policy.rule_name()),
                None => "no policy rule allows the request (default)".to_owned(),
            };
            if ctx.subject.is_none() {
                Reject::new(StatusCode::UNAUTHORIZED, Reason::PolicyDenied, message)
                    .with_header(WWW_AUTHENTICATE, self.challenge.clone())
            } else {
                Reject::new(StatusCode::FORBIDDEN, Reason::PolicyDenied, message)
            }
        });
        ctx.policy = Some(policy);
        match refusal {
            Some(reject) => Flow::Reject(reject),
            None => Flow::Continue,
        }
    }
}

/// The claims as CEL values, derived once per set of claims (see [`Claims::derived`]).
///
/// [`Claims::derived`]: crate::chain::Claims::derived
struct CelClaims(CelMap<'static>);

/// A JSON value as a CEL value: numbers as `int` when whole and in range, else `uint`,
/// else `double`.
fn cel_value(value: &serde_json::Value) -> Box<dyn Val> {
    use serde_json::Value as J;
    match value {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Box::new(CelInt::from(i)),
            (None, Some(u)) => Box::new(CelUInt::from(u)),
            _ => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        J::String(s) => Box::new(CelString::from(s.clone())),
        J::Array(items) => Box::new(CelList::from(
            items.iter().map(cel_value).collect::<Vec<_>>(),
        )),
        J::Object(map) => Box::new(cel_map(map)),
    }
}

fn cel_map(map: &serde_json::Map<String, serde_json::Value>) -> CelMap<'static> {
    map.iter()
        .map(|(k, v)| (CelMapKey::from(k.clone()), cel_value(v)))
        .collect::<HashMap<_, _>>()
        .into()
}

/// The variables of one request, each made the first time an expression reads it, and
/// borrowing from the request where it can. The fields of `request` and `source` are
/// made one by one, as rules read them (see [`check`]); their maps only when a rule reads
/// the variable whole (`size(request)`).
struct Activation<'r> {
    req: &'r request::Parts,
    ctx: &'r Context,
    method: OnceLock<CelString<'r>>,
    path: OnceLock<CelString<'r>>,
    /// `None`: no host, `null`.
    host: OnceLock<Option<CelString<'r>>>,
    query: OnceLock<CelMap<'r>>,
    headers: OnceLock<CelMap<'r>>,
    request: OnceLock<CelMap<'r>>,
    ip: OnceLock<CelString<'static>>,
    source: OnceLock<CelMap<'static>>,
    /// `None`: no subject, `null`.
    subject: Option<CelString<'r>>,
    /// The claims when they are not derived once per token (see [`CelClaims`]), or `{}`.
    claims: OnceLock<CelMap<'static>>,
    time: OnceLock<CelTimestamp>,
}

impl<'r> Activation<'r> {
    fn new(req: &'r request::Parts, ctx: &'r Context) -> Self {
        Activation {
            req,
            ctx,
            method: OnceLock::new(),
            path: OnceLock::new(),
            host: OnceLock::new(),
            query: OnceLock::new(),
            headers: OnceLock::new(),
            request: OnceLock::new(),
            ip: OnceLock::new(),
            source: OnceLock::new(),
            subject: ctx.subject.as_deref().map(CelString::from),
            claims: OnceLock::new(),
            time: OnceLock::new(),
        }
    }

    /// `request`, whole: every field.
    fn request(&self) -> CelMap<'r> {
        REQUEST_FIELDS
            .iter()
            .map(|&(name, field)| {
                (
                    CelMapKey::from(name),
                    self.request_field(field).clone_as_boxed(),
                )
            })
            .collect::<HashMap<_, _>>()
            .into()
    }

    fn claims(&self) -> &CelMap<'_> {
        let derived = self.ctx.claims.as_deref().map(|claims| {
            claims
                .derived(|values| CelClaims(cel_map(values)))
                .map(|c| &c.0)
        });
        match derived {
            Some(Some(shared)) => shared,
            Some(None) => self
                .claims
                .get_or_init(|| cel_map(&self.ctx.claims.as_deref().expect("claims").values)),
            None => self.claims.get_or_init(CelMap::default),
        }
    }
}

/// The query parameters, percent-decoded (`+` as a space), the first value of each name.
fn query(query: Option<&str>) -> CelMap<'_> {
    fn decode(s: &str) -> Cow<'_, str> {
        if s.contains(['%', '+']) {
            Cow::Owned(path::percent_decode(s.replace('+', " ").as_bytes()))
        } else {
            Cow::Borrowed(s)
        }
    }
    let mut params: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = match decode(name) {
            Cow::Borrowed(name) => CelMapKey::from(name),
            Cow::Owned(name) => CelMapKey::from(name),
        };
        params
            .entry(key)
            .or_insert_with(|| Box::new(CelString::from(decode(value))));
    }
    params.into()
}

/// The request headers by (lower-case) name, the first value of each.
fn headers(headers: &http::HeaderMap) -> CelMap<'_> {
    headers
        .keys()
        .filter_map(|name| {
            let value = String::from_utf8_lossy(headers.get(name)?.as_bytes());
            let value: Box<dyn Val> = Box::new(CelString::from(value));
            Some((CelMapKey::from(name.as_str()), value))
        })
        .collect::<HashMap<_, _>>()
        .into()
}

impl<'r> Activation<'r> {
    fn subject(&self) -> &(dyn Val + 'r) {
        match &self.subject {
            Some(subject) => subject,
            None => &CelNull,
        }
    }

    fn ip(&self) -> &CelString<'static> {
        self.ip
            .get_or_init(|| CelString::from(self.ctx.client_ip.to_string()))
    }

    fn source(&self) -> &CelMap<'static> {
        self.source.get_or_init(|| {
            HashMap::from([(CelMapKey::from("ip"), self.ip().clone_as_boxed())]).into()
        })
    }
}

impl<'r> Activation<'r> {
    /// A variable, or a field of `request` or `source`.
    fn variable(&self, variable: Variable) -> &(dyn Val + '_) {
        match variable {
            Variable::Request => self.request.get_or_init(|| self.request()),
            Variable::Field(field) => self.request_field(field),
            Variable::Source => self.source(),
            Variable::SourceIp => self.ip(),
            Variable::Subject => self.subject(),
            Variable::Claims => self.claims(),
            Variable::Time => self
                .time
                .get_or_init(|| CelTimestamp::from(chrono::Utc::now().fixed_offset())),
        }
    }

    /// A field of `request`: the method, the path as `paths` patterns see it
    /// (percent-decoded, so `/%61dmin` is `/admin`), the host, the query or the headers.
    fn request_field(&self, field: Field) -> &(dyn Val + 'r) {
        let req = self.req;
        match field {
            Field::Method => self
                .method
                .get_or_init(|| CelString::from(req.method.as_str())),
            Field::Path => self
                .path
                .get_or_init(|| match path::normalize(req.uri.path()) {
                    Ok(Cow::Owned(decoded)) => CelString::from(decoded),
                    _ => CelString::from(req.uri.path()),
                }),
            Field::Host => {
                let host = self.host.get_or_init(|| {
                    req.headers
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .or_else(|| req.uri.authority().map(|a| a.as_str()))
                        .map(CelString::from)
                });
                match host {
                    Some(host) => host,
                    None => &CelNull,
                }
            }
            Field::Query => self.query.get_or_init(|| query(req.uri.query())),
            Field::Headers => self.headers.get_or_init(|| headers(&req.headers)),
        }
    }
}

impl VariableResolver for Activation<'_> {
    /// A variable, or a field of `request` or `source` by its whole name (`request.path`):
    /// the interpreter asks for a qualified name whole first, and [`check`] makes every
    /// field read of those a whole name.
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        Some(CowVal::Borrowed(self.variable(Variable::named(variable)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use std::time::Instant;

    /// The policy of `rules` built as a chain builds it, and its decision on `req`.
    fn decide(rules: &str, req: http::Request<()>, ctx: &mut Context) -> Policy {
        use super::super::Settings as _;
        let settings: Settings = toml::from_str(rules).unwrap();
        let middleware = settings.build(&super::super::Build {
            name: "authorize",
            handles: &super::super::Handles::offline(),
            response_headers: &[],
        });
        let mut parts = req.into_parts().0;
        let _ = middleware.on_request(&mut parts, ctx);
        ctx.policy.take().expect("a decision")
    }

    fn context() -> Context {
        Context::new(
            [203, 0, 113, 9].into(),
            [127, 0, 0, 1].into(),
            false,
            Instant::now(),
            0,
        )
    }

    /// Field selections on every variable, nested, under a presence test, and on names
    /// a comprehension binds, one of them shadowing a variable; and the same fields read
    /// from the variables whole.
    const SELECTIONS: [&str; 26] = [
        "request['path']",
        "request['host']",
        "request['query']",
        "source['ip']",
        "claims.role",
        "claims.roles",
        "claims.level",
        "claims.org",
        "claims.org.name",
        "claims.org.teams",
        "claims.missing",
        "has(claims.role)",
        "has(claims.org.name)",
        "request.path",
        "request.method",
        "request.host",
        "request.query.q",
        "request.headers['x-tenant']",
        "request.headers.accept",
        "source.ip",
        "subject",
        "subject.name",
        "claims.roles.exists(r, r == claims.role)",
        "claims.roles.exists(claims, claims.startsWith('ad'))",
        "claims.roles.exists(claims, claims.x == 1)",
        "[claims.org].all(request, request.name == claims.org.name)",
    ];

    /// A claim's value, of any JSON type.
    fn claim() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        prop_oneof![
            select(&["admin", "reader", "/v1/items", "acme", ""][..]).prop_map(|s| json!(s)),
            (-2i64..5).prop_map(|n| json!(n)),
            any::<bool>().prop_map(|b| json!(b)),
            Just(serde_json::Value::Null),
            vec(select(&["admin", "reader", "ops"][..]), 0..3).prop_map(|v| json!(v)),
            (
                select(&["acme", "admin"][..]),
                vec(select(&["ops", "dev"][..]), 0..2)
            )
                .prop_map(|(name, teams)| json!({"name": name, "teams": teams})),
        ]
    }

    /// An expression: a selection, compared with a literal, or two joined.
    fn expression() -> impl Strategy<Value = String> {
        let atom = select(&SELECTIONS[..]).prop_map(str::to_owned);
        let leaf = prop_oneof![
            atom.clone(),
            (
                atom.clone(),
                select(&["'admin'", "3", "'/v1/items'", "null", "['ops']"][..])
            )
                .prop_map(|(a, b)| format!("{a} == {b}")),
            (atom.clone(), atom.clone()).prop_map(|(a, b)| format!("{a} in {b}")),
            atom.clone().prop_map(|a| format!("size({a}) > 1")),
            (
                atom.clone(),
                select(&["<", "<=", ">", ">="][..]),
                select(&["3", "'m'", "1.5", "null", "claims.level"][..])
            )
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            // Equal operands: where `<=` and `<` differ.
            (atom.clone(), select(&["<", "<=", ">", ">="][..]))
                .prop_map(|(a, op)| format!("{a} {op} {a}")),
            (
                atom.clone(),
                select(&["['admin', 'ops']", "{'admin': 1}", "'admin'"][..])
            )
                .prop_map(|(a, b)| format!("{a} in {b}")),
            (
                atom.clone(),
                select(&["startsWith", "endsWith", "contains", "matches"][..]),
                select(&["'ad'", "'/v1'", "'^/v1/'", "'in$'", "claims.role"][..])
            )
                .prop_map(|(a, method, b)| format!("{a}.{method}({b})")),
        ];
        leaf.prop_recursive(2, 6, 2, |inner| {
            prop_oneof![
                (
                    inner.clone(),
                    select(&["&&", "||", "==", "!="][..]),
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| format!("({a}) {op} ({b})")),
                inner.clone().prop_map(|a| format!("!({a})")),
                (inner.clone(), inner.clone(), inner)
                    .prop_map(|(c, a, b)| format!("({c}) ? ({a}) : ({b})")),
            ]
        })
    }

    proptest! {
        /// What runs, fields indexed, gives what the expression as written gives: the same
        /// value, or the same error; and where the resolved evaluation ([`Node`]) gives a
        /// value, the same value.
        #[test]
        fn indexed_fields_evaluate_as_the_selections_written(
            source in expression(),
            claims in proptest::collection::btree_map(
                select(&["role", "roles", "level", "org", "sub"][..]).prop_map(str::to_owned),
                claim(),
                0..5,
            ),
            path in select(&["/v1/items", "/admin/x"][..]),
            tenant in proptest::option::of(select(&["acme", "admin"][..])),
            query in select(&["", "q=admin", "q=a&q=b"][..]),
            subject in proptest::option::of(select(&["alice", "admin"][..])),
        ) {
            let env = Arc::new(environment());
            let written = env.compile(&source).unwrap();
            let (indexed, node) = compile(&env, &source).unwrap();
            let mut req = http::Request::get(format!("{path}?{query}"));
            if let Some(tenant) = tenant {
                req = req.header("x-tenant", tenant);
            }
            let parts = req.body(()).unwrap().into_parts().0;
            let mut ctx = context();
            ctx.subject = subject.map(Into::into);
            ctx.claims = Some(Arc::new(crate::chain::Claims::new(claims.into_iter().collect())));
            let activation = Activation::new(&parts, &ctx);
            let mut scope = cel::Context::with_env(Arc::clone(&env));
            scope.set_variable_resolver(&activation);
            let expected = written.execute(&scope);
            prop_assert_eq!(&Value::resolve(&indexed, &scope), &expected, "{}", source);
            let fast = node.eval(&activation, &scope).map(|v| Value::try_from(v.val()));
            if let Ok(value) = fast {
                prop_assert_eq!(value, expected, "{}", source);
            }
        }
    }

    #[test]
    fn the_headers_and_query_are_made_only_for_rules_that_read_them() {
        let env = Arc::new(environment());
        let parts = http::Request::get("/?q=1")
            .header("x-tenant", "a")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let ctx = context();
        // Whether evaluating `source` made the headers, the query, and `request` whole.
        let made = |source: &str| {
            let activation = Activation::new(&parts, &ctx);
            let mut scope = cel::Context::with_env(Arc::clone(&env));
            scope.set_variable_resolver(&activation);
            let (expression, _) = compile(&env, source).unwrap();
            assert_eq!(Value::resolve(&expression, &scope), Ok(Value::Bool(true)));
            (
                activation.headers.get().is_some(),
                activation.query.get().is_some(),
                activation.request.get().is_some(),
            )
        };
        let fields = "request.path == '/' && source.ip == '203.0.113.9' && request.method == 'GET'";
        assert_eq!(made(fields), (false, false, false));
        assert_eq!(
            made("request.headers['x-tenant'] == 'a'"),
            (true, false, false)
        );
        assert_eq!(made("has(request.query.q)"), (false, true, false));
        assert_eq!(
            made("size(request) == 5"),
            (true, true, true),
            "the whole request"
        );
    }

    #[test]
    fn variables_as_the_rules_see_them() {
        let rules = r#"rules = [
          { name = "path", deny = "request.path != '/admin/x y'" },
          { name = "query", deny = "request.query.q != 'a b+c' || request.query['n'] != '1'" },
          { name = "header", deny = "request.headers['x-tenant'] != 'acme'" },
          { name = "host", deny = "request.host != 'api.example:8080'" },
          { name = "source", deny = "source.ip != '203.0.113.9'" },
          { name = "anonymous", deny = "subject != null || claims != {}" },
          { name = "time", deny = "time < timestamp('2024-01-01T00:00:00Z')" },
          { name = "all", allow = "true" },
        ]"#;
        let req = http::Request::get("/%61dmin/x%20y?q=a+b%2Bc&n=1&n=2")
            .header("host", "api.example:8080")
            .header("x-tenant", "acme")
            .header("x-tenant", "other")
            .body(())
            .unwrap();
        let policy = decide(rules, req, &mut context());
        assert_eq!(policy.errors, []);
        assert_eq!(policy.rule_name(), "all");
    }

    #[test]
    fn claims_are_derived_once_and_failures_do_not_match() {
        let rules = r#"rules = [
          { name = "typed", allow = "claims.level > 3" },
          { name = "missing", allow = "'admin' in claims.roles" },
          { name = "not-bool", allow = "claims.sub" },
          { name = "reader", allow = "'read' in claims.scope.split(' ') && subject == 'alice'" },
        ]"#;
        let serde_json::Value::Object(values) =
            serde_json::json!({"sub": "alice", "level": "high", "scope": "read write"})
        else {
            unreachable!()
        };
        let claims = Arc::new(crate::chain::Claims::new(values));
        let mut ctx = context();
        ctx.subject = Some("alice".into());
        ctx.claims = Some(Arc::clone(&claims));
        let policy = decide(rules, http::Request::get("/").body(()).unwrap(), &mut ctx);
        assert_eq!(policy.rule_name(), "reader");
        assert!(policy.allowed);
        let failed: Vec<usize> = policy.errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(failed, [0, 1, 2], "{:?}", policy.errors);
        let derived = |c: &crate::chain::Claims| {
            c.derived(|_| -> CelClaims { unreachable!("derived already") })
                .map(|c| c as *const CelClaims)
        };
        let first = derived(&claims).expect("derived by the first request");
        decide(rules, http::Request::get("/").body(()).unwrap(), &mut ctx);
        assert_eq!(
            derived(&claims),
            Some(first),
            "the same values, not made again"
        );
    }

    #[test]
    fn error_positions_count_characters() {
        assert_eq!(char_at("ab\né + ) x", 2, 3), 5);
        assert_eq!(char_at("abc", 1, 1), 0);
        let env = Arc::new(environment());
        let (at, message) = compile(&env, "'é' == x").unwrap_err();
        assert_eq!(
            (at, message.as_str()),
            (
                7,
                "unknown variable `x`: expected one of request, source, subject, claims, time"
            )
        );
        let (at, _) = compile(&env, "claims.all(k, k == r)").unwrap_err();
        assert_eq!(at, 19, "`k` is bound, `r` is not");
        let (at, message) =
            compile(&env, "subject == 'é' || request.path.matches('/v1/(')").unwrap_err();
        assert_eq!(at, 39, "at the pattern");
        assert_eq!(message, "invalid pattern for matches(): unclosed group");
    }
}
