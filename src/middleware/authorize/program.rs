//! A rule's expression as it runs on the request path.
//!
//! The CEL interpreter dispatches every operator by comparing its name, resolves every
//! variable through the container's candidate names, and collects a method's arguments
//! into a vector: about 150 ns for a rule as small as `request.method == 'PATCH'`. The
//! operators policies are made of (`&&`, `||`, `!`, `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`,
//! `? :`, indexing, `startsWith`, `endsWith`, `contains`, `matches`) are resolved here
//! once, when the config loads, and run on the interpreter's own values with its own
//! equality, ordering, containment and indexing; the variables are read by their place in
//! the request, not by name; subexpressions without variables (`['GET', 'HEAD']`) are
//! evaluated once; a `matches` pattern written as a literal is compiled once (the
//! interpreter compiles it at every call), and a pattern that does not compile is a config
//! error.
//!
//! Everything else (comprehensions, arithmetic, `size`, `has`, the strings extension) is
//! handed to the interpreter, subexpression by subexpression. Where this evaluation meets
//! anything the interpreter would report as an error it gives up ([`Defer`]) and the
//! interpreter evaluates the whole rule: its value or its error is the answer, so both
//! paths give the same results (a property test holds them to it).

use std::cmp::Ordering;
use std::sync::Arc;

use cel::common::ast::{operators, EntryExpr, Expr, ListExpr, LiteralValue, MapExpr};
use cel::common::types::{CelBool, CelString};
use cel::common::value::{CowVal, Val};
use cel::{Env, IdedExpr, Value};
use regex::Regex;

use super::Activation;

/// What an expression reads of a request, by its place rather than its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variable {
    Request,
    Field(Field),
    Source,
    SourceIp,
    Subject,
    Claims,
    Time,
}

/// A field of `request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Method,
    Path,
    Host,
    Query,
    Headers,
}

impl Variable {
    /// The variable of a name as [`check`](super::check) leaves them: a variable, or a
    /// field of `request` or `source` by its whole name (`request.path`).
    pub(super) fn named(name: &str) -> Option<Variable> {
        Some(match name {
            "request" => Variable::Request,
            "request.method" => Variable::Field(Field::Method),
            "request.path" => Variable::Field(Field::Path),
            "request.host" => Variable::Field(Field::Host),
            "request.query" => Variable::Field(Field::Query),
            "request.headers" => Variable::Field(Field::Headers),
            "source" => Variable::Source,
            "source.ip" => Variable::SourceIp,
            "subject" => Variable::Subject,
            "claims" => Variable::Claims,
            "time" => Variable::Time,
            _ => return None,
        })
    }
}

/// An ordering comparison.
#[derive(Debug, Clone, Copy)]
pub(super) enum Relation {
    Less,
    LessEquals,
    Greater,
    GreaterEquals,
}

impl Relation {
    /// Whether `left` ordered against `right` as `ordering` satisfies the relation.
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Relation::Less => ordering == Ordering::Less,
            Relation::LessEquals => ordering != Ordering::Greater,
            Relation::Greater => ordering == Ordering::Greater,
            Relation::GreaterEquals => ordering != Ordering::Less,
        }
    }
}

/// A string test a method call makes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Text {
    StartsWith,
    EndsWith,
    Contains,
}

/// An expression resolved for evaluation (see the module's comment).
#[derive(Debug)]
pub(super) enum Node {
    /// A literal, or a subexpression of literals evaluated at load.
    Constant(Box<dyn Val>),
    Variable(Variable),
    /// `&&` (decided by `false`) and `||` (decided by `true`).
    Logical(bool, Box<[Node; 2]>),
    Not(Box<Node>),
    /// `==` (`true`) and `!=` (`false`).
    Equals(bool, Box<[Node; 2]>),
    Compare(Relation, Box<[Node; 2]>),
    /// `[0] in [1]`.
    In(Box<[Node; 2]>),
    /// `[0][[1]]`, on a variable or on what indexing one gave.
    Index(Box<[Node; 2]>),
    Conditional(Box<[Node; 3]>),
    Text(Text, Box<[Node; 2]>),
    Matches(Box<Node>, Regex),
    /// Evaluated by the interpreter.
    Interpreted(IdedExpr),
}

/// The interpreter decides: this evaluation met what the interpreter reports as an error.
#[derive(Debug)]
pub(super) struct Defer;

/// A value: booleans, what most nodes give, without a box.
pub(super) enum Out<'a> {
    Bool(bool),
    Value(CowVal<'a, 'a>),
}

impl Out<'_> {
    /// The value as the interpreter's: a boolean as its static `true` or `false`.
    pub(super) fn val(&self) -> &dyn Val {
        match self {
            Out::Bool(true) => &CelBool::TRUE,
            Out::Bool(false) => &CelBool::FALSE,
            Out::Value(v) => v.as_ref(),
        }
    }

    /// The boolean, or `Defer` for another value (the interpreter's error).
    pub(super) fn truth(&self) -> Result<bool, Defer> {
        match self {
            Out::Bool(b) => Ok(*b),
            Out::Value(v) => v.downcast_ref::<CelBool>().map(|b| *b.inner()).ok_or(Defer),
        }
    }
}

/// A node's id and how many characters after its start an error is, and the error: as
/// [`check`](super::check) reports them.
type Invalid = (u64, usize, String);

impl Node {
    /// Resolves a checked expression.
    pub(super) fn new(e: &IdedExpr, env: &Arc<Env>) -> Result<Node, Invalid> {
        let interpreted = || Node::Interpreted(e.clone());
        Ok(match &e.expr {
            Expr::Literal(literal) => Node::Constant(literal.to_val().into_owned()),
            Expr::Ident(name) => Variable::named(name).map_or_else(interpreted, Node::Variable),
            _ if is_constant(e) => constant(e, env).unwrap_or_else(interpreted),
            Expr::Call(call) => match (&call.target, call.func_name.as_str(), &call.args[..]) {
                (None, operators::LOGICAL_AND, [a, b]) => Node::Logical(false, pair(a, b, env)?),
                (None, operators::LOGICAL_OR, [a, b]) => Node::Logical(true, pair(a, b, env)?),
                (None, operators::LOGICAL_NOT, [a]) => Node::Not(Box::new(Node::new(a, env)?)),
                (None, operators::EQUALS, [a, b]) => Node::Equals(true, pair(a, b, env)?),
                (None, operators::NOT_EQUALS, [a, b]) => Node::Equals(false, pair(a, b, env)?),
                (None, operators::LESS, [a, b]) => Node::Compare(Relation::Less, pair(a, b, env)?),
                (None, operators::LESS_EQUALS, [a, b]) => {
                    Node::Compare(Relation::LessEquals, pair(a, b, env)?)
                }
                (None, operators::GREATER, [a, b]) => {
                    Node::Compare(Relation::Greater, pair(a, b, env)?)
                }
                (None, operators::GREATER_EQUALS, [a, b]) => {
                    Node::Compare(Relation::GreaterEquals, pair(a, b, env)?)
                }
                (None, operators::IN, [a, b]) => Node::In(pair(a, b, env)?),
                (None, operators::INDEX, [a, b]) if indexes_a_variable(a) => {
                    Node::Index(pair(a, b, env)?)
                }
                (None, operators::CONDITIONAL, [c, a, b]) => Node::Conditional(Box::new([
                    Node::new(c, env)?,
                    Node::new(a, env)?,
                    Node::new(b, env)?,
                ])),
                (Some(target), method, [arg]) => {
                    let text = match method {
                        "startsWith" => Text::StartsWith,
                        "endsWith" => Text::EndsWith,
                        "contains" => Text::Contains,
                        "matches" => return matches(e, target, arg, env),
                        _ => return Ok(interpreted()),
                    };
                    Node::Text(text, pair(target, arg, env)?)
                }
                _ => interpreted(),
            },
            _ => interpreted(),
        })
    }

    /// Evaluates the node over a request's variables; `scope` runs what the interpreter does.
    pub(super) fn eval<'a>(
        &'a self,
        variables: &'a Activation<'_>,
        scope: &'a cel::Context<'_, '_>,
    ) -> Result<Out<'a>, Defer> {
        let eval = |node: &'a Node| node.eval(variables, scope);
        Ok(match self {
            Node::Constant(value) => Out::Value(CowVal::Borrowed(value.as_ref())),
            Node::Variable(v) => Out::Value(CowVal::Borrowed(variables.variable(*v))),
            // As the interpreter: the left side first; an error on one side is absorbed
            // when the other decides.
            Node::Logical(decides, n) => {
                let left = eval(&n[0]).and_then(|v| v.truth());
                if matches!(left, Ok(l) if l == *decides) {
                    return Ok(Out::Bool(*decides));
                }
                match (left, eval(&n[1])?.truth()) {
                    (Ok(_), Ok(right)) => Out::Bool(right),
                    (Err(Defer), Ok(right)) if right == *decides => Out::Bool(right),
                    _ => return Err(Defer),
                }
            }
            Node::Not(n) => Out::Bool(!eval(n)?.truth()?),
            Node::Equals(equal, n) => {
                let (left, right) = (eval(&n[0])?, eval(&n[1])?);
                Out::Bool(left.val().equals(right.val()) == *equal)
            }
            Node::Compare(relation, n) => {
                let (left, right) = (eval(&n[0])?, eval(&n[1])?);
                let comparer = left.val().as_comparer().ok_or(Defer)?;
                Out::Bool(relation.holds(comparer.compare(right.val()).map_err(|_| Defer)?))
            }
            Node::In(n) => {
                let (item, container) = (eval(&n[0])?, eval(&n[1])?);
                let found = container
                    .val()
                    .as_container()
                    .ok_or(Defer)?
                    .contains(item.val());
                Out::Bool(found.map_err(|_| Defer)?)
            }
            Node::Index(n) => {
                // The operand is a variable's value or part of one: borrowed, never optional.
                let Out::Value(CowVal::Borrowed(base)) = eval(&n[0])? else {
                    return Err(Defer);
                };
                let index = eval(&n[1])?;
                let indexer = base.as_indexer().ok_or(Defer)?;
                Out::Value(indexer.get(index.val()).map_err(|_| Defer)?)
            }
            Node::Conditional(n) => {
                if eval(&n[0])?.truth()? {
                    eval(&n[1])?
                } else {
                    eval(&n[2])?
                }
            }
            Node::Text(test, n) => {
                let (target, arg) = (eval(&n[0])?, eval(&n[1])?);
                let (Some(target), Some(arg)) = (string(&target), string(&arg)) else {
                    return Err(Defer);
                };
                Out::Bool(match test {
                    Text::StartsWith => target.starts_with(arg),
                    Text::EndsWith => target.ends_with(arg),
                    Text::Contains => target.contains(arg),
                })
            }
            Node::Matches(target, pattern) => {
                let target = eval(target)?;
                Out::Bool(pattern.is_match(string(&target).ok_or(Defer)?))
            }
            Node::Interpreted(e) => Out::Value(Value::resolve_val(e, scope).map_err(|_| Defer)?),
        })
    }
}

fn pair(a: &IdedExpr, b: &IdedExpr, env: &Arc<Env>) -> Result<Box<[Node; 2]>, Invalid> {
    Ok(Box::new([Node::new(a, env)?, Node::new(b, env)?]))
}

fn string<'s>(value: &'s Out<'_>) -> Option<&'s str> {
    match value {
        Out::Value(v) => v.downcast_ref::<CelString>().map(|s| s.inner()),
        Out::Bool(_) => None,
    }
}

/// `target.matches(pattern)`: a literal pattern compiled now, with the regex crate as
/// the interpreter compiles it at every call; any other left to the interpreter.
fn matches(
    e: &IdedExpr,
    target: &IdedExpr,
    pattern: &IdedExpr,
    env: &Arc<Env>,
) -> Result<Node, Invalid> {
    let Expr::Literal(LiteralValue::String(source)) = &pattern.expr else {
        return Ok(Node::Interpreted(e.clone()));
    };
    let regex = Regex::new(source.inner()).map_err(|error| {
        // The regex crate's syntax error draws the pattern with a caret over several
        // lines; the error already points at the pattern, so its last line says enough.
        let reason = match &error {
            regex::Error::Syntax(text) => text
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error: "))
                .unwrap_or(text)
                .to_owned(),
            _ => error.to_string(),
        };
        (
            pattern.id,
            0,
            format!("invalid pattern for matches(): {reason}"),
        )
    })?;
    Ok(Node::Matches(Box::new(Node::new(target, env)?), regex))
}

/// Whether the expression reads no name (a variable, or one a comprehension binds):
/// its value is the same for every request.
fn is_constant(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Ident(_) | Expr::Comprehension(_) | Expr::Struct(_) | Expr::Unspecified => false,
        Expr::Literal(_) => true,
        Expr::Select(select) => is_constant(&select.operand),
        Expr::Call(call) => {
            call.target.as_deref().is_none_or(is_constant) && call.args.iter().all(is_constant)
        }
        Expr::List(ListExpr { elements, .. }) => elements.iter().all(is_constant),
        Expr::Map(MapExpr { entries }) => entries.iter().all(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => is_constant(&m.key) && is_constant(&m.value),
            EntryExpr::StructField(_) => false,
        }),
    }
}

/// The value of an expression that reads no name, unless evaluating it fails (left to
/// the interpreter, to fail at request time as it would).
fn constant(e: &IdedExpr, env: &Arc<Env>) -> Option<Node> {
    let scope = cel::Context::with_env(Arc::clone(env));
    let value = Value::resolve_val(e, &scope).ok()?.into_owned();
    Some(Node::Constant(value))
}

/// Whether `e` is a variable, or an index or field of one: what [`Node::Index`] takes.
fn indexes_a_variable(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Ident(name) => Variable::named(name).is_some(),
        Expr::Call(call) if call.func_name == operators::INDEX && call.target.is_none() => {
            call.args.first().is_some_and(indexes_a_variable)
        }
        _ => false,
    }
}
