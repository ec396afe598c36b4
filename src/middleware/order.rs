//! Chain orders that load fine but break clients, found at load so that `gatehouse check`
//! and the start-up log can say so: a middleware that refuses requests (an authentication,
//! `rate_limit`, `body_limit`, `ip_filter`) above a `cors` entry that shares requests with
//! it. Its refusals carry no CORS headers, so a page cannot read them: a `429` or `413`
//! reaches it as a bare network error. An authentication is worse: a browser's preflight
//! carries no credentials, so it refuses that too and the browser never makes the call.

use std::collections::{HashSet, VecDeque};

use http::Method;

use super::Spec;
use crate::config::value::PathPattern;
use crate::config::MiddlewareEntry;

/// One warning per refusing entry and later `cors` entry whose scopes share a request,
/// naming both, an example request and the fix.
pub fn warnings(chain: &[MiddlewareEntry<Spec>]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, above) in chain.iter().enumerate() {
        let role = above.spec.settings().role();
        let Some(example) = role.refuses else {
            continue;
        };
        for cors in chain[i + 1..]
            .iter()
            .filter(|e| e.spec.settings().role().answers_preflights)
        {
            let Some((method, path)) = shared_request(above, cors, &example) else {
                continue;
            };
            let (a, c) = (&above.name, &cors.name);
            let harm = if method == Method::OPTIONS && role.authenticates {
                format!(
                    "browsers' preflights carry no credentials, so \"{a}\" refuses them and \
                     the browser never makes the call; its refusals also carry no CORS \
                     headers, so a page cannot read them"
                )
            } else {
                "its refusals carry no CORS headers, so a page cannot read them (fetch fails \
                 with a network error)"
                    .to_owned()
            };
            out.push(format!(
                "\"{a}\" ({}) comes before \"{c}\" (cors) on requests both handle, e.g. \
                 {method} {path}: {harm}. Move \"{c}\" above \"{a}\"",
                above.spec.kind()
            ));
        }
    }
    out
}

/// A request both entries' scopes take, preferring `method`.
fn shared_request(
    a: &MiddlewareEntry<Spec>,
    b: &MiddlewareEntry<Spec>,
    method: &Method,
) -> Option<(Method, String)> {
    let takes =
        |e: &MiddlewareEntry<Spec>, m: &Method| e.methods.is_empty() || e.methods.contains(m);
    let method = if takes(a, method) && takes(b, method) {
        method.clone()
    } else {
        a.methods
            .iter()
            .chain(&b.methods)
            .find(|m| takes(a, m) && takes(b, m))?
            .clone()
    };
    let path = shared_path([
        (a.paths.as_slice(), a.skip_paths.as_slice()),
        (b.paths.as_slice(), b.skip_paths.as_slice()),
    ])?;
    Some((method, path))
}

/// A pattern as an automaton: its states are positions in `tokens`, the last one accepting.
struct Glob {
    tokens: Vec<Token>,
}

#[derive(Clone, Copy, PartialEq)]
enum Token {
    Byte(u8),
    /// `*`: any run of bytes but `/`.
    Segment,
    /// `**`: any run of bytes.
    Any,
}

/// Positions in one glob's tokens, sorted: a subset-construction state.
type Positions = Vec<usize>;

impl Glob {
    fn new(pattern: &PathPattern) -> Glob {
        let source = pattern.to_string();
        let mut tokens = Vec::new();
        let mut bytes = source.bytes().peekable();
        while let Some(b) = bytes.next() {
            tokens.push(match b {
                b'*' if bytes.next_if_eq(&b'*').is_some() => Token::Any,
                b'*' => Token::Segment,
                b => Token::Byte(b),
            });
        }
        Glob { tokens }
    }

    /// Adds the positions reachable by letting wildcards match nothing.
    fn closure(&self, mut at: Positions) -> Positions {
        let mut i = 0;
        while i < at.len() {
            let p = at[i];
            if matches!(self.tokens.get(p), Some(Token::Segment | Token::Any))
                && !at.contains(&(p + 1))
            {
                at.push(p + 1);
            }
            i += 1;
        }
        at.sort_unstable();
        at
    }

    fn step(&self, at: &Positions, b: u8) -> Positions {
        let mut next = Vec::new();
        for &p in at {
            match self.tokens.get(p) {
                Some(Token::Byte(c)) if *c == b => next.push(p + 1),
                Some(Token::Segment) if b != b'/' => next.push(p),
                Some(Token::Any) => next.push(p),
                _ => {}
            }
        }
        next.dedup();
        self.closure(next)
    }

    fn accepts(&self, at: &Positions) -> bool {
        at.contains(&self.tokens.len())
    }
}

/// How far the search goes before giving up (and warning about nothing): far beyond what
/// the scopes of a real config need, which are settled within a few hundred states.
const MAX_STATES: usize = 100_000;

/// The shortest normalized request path that every `(paths, skip_paths)` scope takes, if
/// any: a breadth-first search over the product of the patterns' automata, on the bytes the
/// patterns name plus one byte none names (all such bytes behave alike).
fn shared_path(scopes: [(&[PathPattern], &[PathPattern]); 2]) -> Option<String> {
    let scopes = scopes.map(|(paths, skip)| ScopeGlobs::new(paths, skip));
    let mut alphabet: Vec<u8> = scopes
        .iter()
        .flat_map(|s| s.paths.iter().chain(&s.skip))
        .flat_map(|g| &g.tokens)
        .filter_map(|t| match t {
            Token::Byte(b) => Some(*b),
            _ => None,
        })
        .chain([b'/'])
        .collect();
    if let Some(fresh) = (b'a'..=b'z').find(|b| !alphabet.contains(b)) {
        alphabet.push(fresh);
    }
    alphabet.sort_unstable();
    alphabet.dedup();

    // Every path starts with `/`.
    let start = State {
        scopes: scopes.iter().map(|s| s.step(&s.start(), b'/')).collect(),
        segment: Segment::Empty,
    };
    let mut seen = HashSet::from([start.clone()]);
    let mut queue = VecDeque::from([(start, "/".to_owned())]);
    while let Some((state, path)) = queue.pop_front() {
        let mut both = scopes.iter().zip(&state.scopes);
        if state.segment.may_end() && both.all(|(s, at)| s.takes(at)) {
            return Some(path);
        }
        for &b in &alphabet {
            let Some(segment) = state.segment.then(b) else {
                continue;
            };
            let next = State {
                scopes: scopes
                    .iter()
                    .zip(&state.scopes)
                    .map(|(s, at)| s.step(at, b))
                    .collect(),
                segment,
            };
            let alive = scopes
                .iter()
                .zip(&next.scopes)
                .all(|(s, at)| s.may_take(at));
            if alive && seen.len() < MAX_STATES && seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(b as char);
                queue.push_back((next, longer));
            }
        }
    }
    None
}

/// One entry's scope as automata; no `paths` means every path.
struct ScopeGlobs {
    paths: Vec<Glob>,
    skip: Vec<Glob>,
}

/// Where each of a scope's automata is.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ScopeState {
    paths: Vec<Positions>,
    skip: Vec<Positions>,
}

impl ScopeGlobs {
    fn new(paths: &[PathPattern], skip: &[PathPattern]) -> ScopeGlobs {
        let paths = if paths.is_empty() {
            vec![Glob::new(&"/**".parse().expect("a valid pattern"))]
        } else {
            paths.iter().map(Glob::new).collect()
        };
        ScopeGlobs {
            paths,
            skip: skip.iter().map(Glob::new).collect(),
        }
    }

    fn start(&self) -> ScopeState {
        let start = |globs: &[Glob]| globs.iter().map(|g| g.closure(vec![0])).collect();
        ScopeState {
            paths: start(&self.paths),
            skip: start(&self.skip),
        }
    }

    fn step(&self, at: &ScopeState, b: u8) -> ScopeState {
        let step = |globs: &[Glob], at: &[Positions]| {
            globs.iter().zip(at).map(|(g, p)| g.step(p, b)).collect()
        };
        ScopeState {
            paths: step(&self.paths, &at.paths),
            skip: step(&self.skip, &at.skip),
        }
    }

    /// Whether the path read so far is in the scope.
    fn takes(&self, at: &ScopeState) -> bool {
        let accepts =
            |globs: &[Glob], at: &[Positions]| globs.iter().zip(at).any(|(g, p)| g.accepts(p));
        accepts(&self.paths, &at.paths) && !accepts(&self.skip, &at.skip)
    }

    /// Whether some continuation of the path read so far can still match a path pattern.
    fn may_take(&self, at: &ScopeState) -> bool {
        at.paths.iter().any(|p| !p.is_empty())
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct State {
    scopes: Vec<ScopeState>,
    /// The segment being read: a normalized path has no empty, `.` or `..` segment.
    segment: Segment,
}

/// The segment being written, as far as normalization cares.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Segment {
    Empty,
    Dot,
    DotDot,
    Other,
}

impl Segment {
    /// The segment after byte `b`, or `None` where a normalized path cannot go.
    fn then(self, b: u8) -> Option<Segment> {
        Some(match (self, b) {
            (Segment::Empty, b'/') => return None,
            (s, b'/') if !s.may_end() => return None,
            (_, b'/') => Segment::Empty,
            (Segment::Empty, b'.') => Segment::Dot,
            (Segment::Dot, b'.') => Segment::DotDot,
            _ => Segment::Other,
        })
    }

    fn may_end(self) -> bool {
        !matches!(self, Segment::Dot | Segment::DotDot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn patterns(list: &[&str]) -> Vec<PathPattern> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    /// The path both `(paths, skip_paths)` scopes take, checked against the real matcher.
    fn shared(a: (&[&str], &[&str]), b: (&[&str], &[&str])) -> Option<String> {
        let [a, b] = [a, b].map(|(p, s)| (patterns(p), patterns(s)));
        let path = shared_path([(&a.0, &a.1), (&b.0, &b.1)])?;
        for (paths, skip) in [&a, &b] {
            assert!(
                paths.is_empty() || paths.iter().any(|p| p.matches(&path)),
                "{path} not in {paths:?}"
            );
            assert!(!skip.iter().any(|p| p.matches(&path)), "{path} in {skip:?}");
        }
        assert_eq!(
            crate::chain::path::normalize(&path).unwrap(),
            path,
            "a normalized path"
        );
        Some(path)
    }

    #[test]
    fn scopes_that_share_a_path() {
        assert_eq!(shared((&[], &[]), (&[], &[])).as_deref(), Some("/"));
        assert_eq!(
            shared((&["/api/**"], &[]), (&["/api/v1/*"], &[])).as_deref(),
            Some("/api/v1/")
        );
        // `*` within a segment on both sides.
        assert!(shared((&["/v*/items"], &[]), (&["/*2/items"], &[])).is_some());
        // Skipping one level leaves the deeper ones.
        assert_eq!(
            shared((&["/api/**"], &["/api/*"]), (&[], &[])).as_deref(),
            Some("/api/a/")
        );
        // A skip that covers only part of the other scope.
        assert!(shared((&["/api/**"], &["/api/public/**"]), (&["/api/**"], &[])).is_some());
    }

    #[test]
    fn scopes_that_share_nothing() {
        assert_eq!(shared((&["/api/**"], &[]), (&["/admin/**"], &[])), None);
        assert_eq!(shared((&["/api/**"], &[]), (&["/api"], &[])), None);
        assert_eq!(
            shared(
                (&["/api/**"], &["/api/public/**"]),
                (&["/api/public/**"], &[])
            ),
            None
        );
        assert_eq!(
            shared((&[], &["/api/*", "/api/*/**"]), (&["/api/**"], &[])),
            None
        );
        // Only a dot-segment would match both, and such a path is refused before the chain.
        assert_eq!(shared((&["/a/*/b"], &[]), (&["/a/../b"], &[])), None);
        assert_eq!(shared((&["/x/*"], &[]), (&["/x/."], &[])), None);
    }

    fn warnings_for(chain: &str) -> Vec<String> {
        let source = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{chain}"
        );
        let config = Config::parse(std::path::Path::new("proxy.toml"), &source, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        warnings(&config.middleware)
    }

    const CORS: &str = "[[middleware]]\ntype = \"cors\"\nname = \"web\"\nallow_origins = [\"https://app.example\"]\n";
    const KEY: &str = "[[middleware]]\ntype = \"api_key\"\nkeys = [{ id = \"a\", key = \"k\" }]\n";

    #[test]
    fn authentication_before_cors_is_named_with_the_fix() {
        let found = warnings_for(&format!("{KEY}{CORS}"));
        assert_eq!(found.len(), 1, "{found:?}");
        let w = &found[0];
        for part in [
            "\"api_key\" (api_key) comes before \"web\" (cors)",
            "e.g. OPTIONS /:",
            "preflights carry no credentials",
            "Move \"web\" above \"api_key\"",
        ] {
            assert!(w.contains(part), "{part:?} not in {w}");
        }
        assert!(warnings_for(&format!("{CORS}{KEY}")).is_empty());
    }

    #[test]
    fn every_authentication_type_counts_and_others_do_not() {
        for auth in [
            "type = \"basic_auth\"\nusers = [{ user = \"u\", password_hash = \"$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW\" }]",
            "type = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"s\"",
            "type = \"forward_auth\"\nurl = \"http://127.0.0.1:9/auth\"",
        ] {
            let found = warnings_for(&format!("[[middleware]]\n{auth}\n{CORS}"));
            assert_eq!(found.len(), 1, "{auth}: {found:?}");
        }
        let others =
            "[[middleware]]\ntype = \"headers\"\nresponse = { set = { \"x-a\" = \"1\" } }\n";
        assert!(warnings_for(&format!("{others}{CORS}")).is_empty());
    }

    #[test]
    fn refusing_types_before_cors_are_named_with_the_fix() {
        for (entry, example) in [
            ("type = \"rate_limit\"\nrate = \"10/s\"", "GET /:"),
            ("type = \"body_limit\"\nmax = \"1KiB\"", "POST /:"),
            ("type = \"ip_filter\"\ndeny = [\"10.0.0.0/8\"]", "GET /:"),
        ] {
            let chain = format!("[[middleware]]\nname = \"guard\"\n{entry}\n{CORS}");
            let found = warnings_for(&chain);
            assert_eq!(found.len(), 1, "{entry}: {found:?}");
            let kind = entry.split('"').nth(1).unwrap();
            for part in [
                &format!("\"guard\" ({kind}) comes before \"web\" (cors)"),
                &format!("e.g. {example}"),
                "its refusals carry no CORS headers, so a page cannot read them",
                "Move \"web\" above \"guard\"",
            ] {
                assert!(found[0].contains(part), "{part:?} not in {found:?}");
            }
            assert!(!found[0].contains("credentials"), "{found:?}");
            // Below cors, its refusals get cors's headers.
            assert!(warnings_for(&format!("{CORS}[[middleware]]\n{entry}\n")).is_empty());
        }
    }

    #[test]
    fn scopes_and_methods_decide() {
        // Disjoint paths, or an authentication that skips what cors covers: nothing.
        let scoped = |auth: &str, cors: &str| {
            warnings_for(&format!(
                "[[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"a\", key = \"k\" }}]\n{auth}\n{CORS}{cors}\n"
            ))
        };
        assert!(scoped("paths = [\"/admin/**\"]", "paths = [\"/api/**\"]").is_empty());
        assert!(scoped("skip_paths = [\"/public/**\"]", "paths = [\"/public/**\"]").is_empty());
        let w = scoped("paths = [\"/api/**\"]", "");
        assert!(w[0].contains("e.g. OPTIONS /api/"), "{w:?}");
        // An authentication that preflights cannot reach: its refusals are still unreadable.
        let w = scoped("methods = [\"POST\", \"PUT\"]", "");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("e.g. POST /:"), "{w:?}");
        assert!(w[0].contains("cannot read them"), "{w:?}");
        assert!(!w[0].contains("preflight"), "{w:?}");
        // No method in common.
        assert!(scoped("methods = [\"POST\"]", "methods = [\"GET\"]").is_empty());
    }
}
