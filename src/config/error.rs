//! Config errors that say where: file, line and column, key path, and what was expected.
//! One [`ConfigError`] holds every problem found in a file, so a fix-and-retry loop needs
//! one run, not one per mistake.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Item, TableLike, Value};

/// A key path such as `middleware[2].rate`: how operators and error messages name a key.
/// Its indexes count from 0, as the file's arrays do; shown, they count from 1, as
/// `gatehouse check` numbers the chain (`middleware[1]` is the first entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyPath(Vec<Segment>);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Key(String),
    Index(usize),
    /// A character of the string value at the path: where inside a value written in a
    /// language of its own (an expression) the problem is. Never shown in the path.
    Char(usize),
}

impl KeyPath {
    pub fn push_key(&mut self, key: &str) {
        self.0.push(Segment::Key(key.to_owned()));
    }

    pub fn push_index(&mut self, index: usize) {
        self.0.push(Segment::Index(index));
    }

    pub fn ends_with_key(&self, key: &str) -> bool {
        matches!(self.0.last(), Some(Segment::Key(k)) if k == key)
    }

    pub fn pop(&mut self) {
        self.0.pop();
    }

    /// Whether `self` is `prefix` or lies below it.
    pub fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The path of the table or array holding this key; `None` for the root.
    pub fn parent(&self) -> Option<KeyPath> {
        let (_, parent) = self.0.split_last()?;
        Some(KeyPath(parent.to_vec()))
    }

    /// This path, taken in `value` after the array elements at `removed` were taken out,
    /// as a path of the value before: every index moves past the removed elements.
    pub(crate) fn before_removals(&self, removed: &[KeyPath]) -> KeyPath {
        let mut out = KeyPath::default();
        for seg in &self.0 {
            match seg {
                Segment::Key(_) | Segment::Char(_) => out.0.push(seg.clone()),
                Segment::Index(i) => {
                    let mut gone: Vec<usize> = removed
                        .iter()
                        .filter_map(|r| match r.0.split_last() {
                            Some((Segment::Index(g), parent)) if parent == out.0 => Some(*g),
                            _ => None,
                        })
                        .collect();
                    gone.sort_unstable();
                    let mut index = *i;
                    for g in gone {
                        if g <= index {
                            index += 1;
                        }
                    }
                    out.0.push(Segment::Index(index));
                }
            }
        }
        out
    }

    /// Takes the value at this path out of `value`; false when there is none.
    pub(crate) fn remove_from(&self, value: &mut toml::Value) -> bool {
        let Some((last, parent)) = self.0.split_last() else {
            return false;
        };
        let mut node = value;
        for seg in parent {
            let next = match (seg, node) {
                (Segment::Key(k), toml::Value::Table(t)) => t.get_mut(k),
                (Segment::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
                _ => None,
            };
            let Some(next) = next else { return false };
            node = next;
        }
        match (last, node) {
            (Segment::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
            (Segment::Index(i), toml::Value::Array(a)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    }

    /// `self` followed by `more`.
    pub fn join(&self, more: &KeyPath) -> KeyPath {
        KeyPath(self.0.iter().chain(&more.0).cloned().collect())
    }

    /// The `n`-th character (from 0) of the string at this path: the problem is located
    /// there, in the file, rather than at the key.
    pub fn char(&self, n: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Segment::Char(n));
        p
    }

    /// `self` followed by one key.
    pub fn key(&self, key: &str) -> KeyPath {
        let mut p = self.clone();
        p.push_key(key);
        p
    }

    /// Converts serde_path_to_error's path.
    pub fn from_serde(path: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment as S;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    S::Seq { index } => Some(Segment::Index(*index)),
                    S::Map { key } => Some(Segment::Key(key.clone())),
                    S::Enum { variant } => Some(Segment::Key(variant.clone())),
                    S::Unknown => None,
                })
                .collect(),
        )
    }

    /// The span of the deepest part of this path that exists in the parsed document: the
    /// key itself when present, else its closest parent (e.g. for a missing key); for a
    /// [`KeyPath::char`], that character of the string as written in `source`.
    fn locate(&self, root: &Item, source: &str) -> Option<Range<usize>> {
        let mut span = None;
        let mut node = Node::Item(root);
        for seg in &self.0 {
            if let Segment::Char(n) = seg {
                let written = node
                    .string_span()
                    .map(|s| s.start + char_offset(&source[s], *n));
                return written.map(|at| at..at).or(span);
            }
            let Some((next, here)) = node.child(seg) else {
                break;
            };
            span = here.or(span);
            node = next;
        }
        span
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    /// The child at `seg` and its span (the key's, for a table entry).
    fn child(self, seg: &Segment) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match (self, seg) {
            (node, Segment::Key(k)) => {
                let (key, item) = node.table_like()?.get_key_value(k)?;
                Some((Node::Item(item), key.span().or_else(|| item.span())))
            }
            (Node::Item(Item::ArrayOfTables(a)), Segment::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (node, Segment::Index(i)) => {
                let v = node.array_value(*i)?;
                Some((Node::Value(v), v.span()))
            }
            (_, Segment::Char(_)) => None,
        }
    }

    /// Where the string value of this node is written, quotes included.
    fn string_span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(Item::Value(v @ Value::String(_))) | Node::Value(v @ Value::String(_)) => {
                v.span()
            }
            _ => None,
        }
    }

    fn table_like(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(Value::InlineTable(t)) => Some(t),
            Node::Value(_) => None,
        }
    }

    fn array_value(self, i: usize) -> Option<&'a Value> {
        match self {
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => a.get(i),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{}]", n + 1)?,
                Segment::Char(_) => {}
            }
        }
        Ok(())
    }
}

/// Why a file was refused: every problem found in it, each with enough context to fix it
/// without guessing. Never empty.
#[derive(Debug)]
pub struct ConfigError(Vec<Located>);

/// One problem, placed in its file.
#[derive(Debug)]
struct Located {
    file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    position: Option<(usize, usize)>,
    path: Option<KeyPath>,
    message: String,
}

impl ConfigError {
    /// A problem with the file as a whole (cannot read it).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError(vec![Located {
            file: file.to_owned(),
            position: None,
            path: None,
            message: message.into(),
        }])
    }

    /// A problem at a byte offset of the source, e.g. a TOML syntax error.
    pub fn at_span(
        file: &Path,
        source: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError(vec![Located {
            file: file.to_owned(),
            position: span.map(|s| line_col(source, s.start)),
            path: None,
            message: message.into(),
        }])
    }

    /// A problem with one key, located in the parsed document.
    pub fn at_key(
        file: &Path,
        source: &str,
        doc: &Item,
        path: KeyPath,
        message: impl Into<String>,
    ) -> Self {
        Self::at_keys(file, source, doc, vec![(path, message.into())])
    }

    /// Problems with keys, located in the parsed document and sorted by their place in
    /// the file. `problems` must not be empty.
    pub fn at_keys(
        file: &Path,
        source: &str,
        doc: &Item,
        problems: Vec<(KeyPath, String)>,
    ) -> Self {
        debug_assert!(!problems.is_empty(), "an error has at least one problem");
        let mut located: Vec<Located> = problems
            .into_iter()
            .map(|(path, message)| Located {
                file: file.to_owned(),
                position: path.locate(doc, source).map(|s| line_col(source, s.start)),
                path: Some(path),
                message,
            })
            .collect();
        located.sort_by_key(|l| l.position);
        ConfigError(located)
    }
}

/// One problem per line: `file:line:col: key.path: what was expected`.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(path) = self.path.as_ref().filter(|p| !p.0.is_empty()) {
            write!(f, ": {path}")?;
        }
        // One line per problem, whatever the message (TOML syntax errors have two).
        let lines: Vec<&str> = self.message.lines().map(str::trim).collect();
        write!(f, ": {}", lines.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// The byte offset in `raw`, a TOML string as written (delimiters included), of the
/// `n`-th character of its value; its end when the value is shorter. Escapes count as the
/// character they stand for, and a multi-line string's first newline and line-ending
/// backslashes as nothing, as TOML reads them.
fn char_offset(raw: &str, n: usize) -> usize {
    let literal = raw.starts_with('\'');
    let quote = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
        3
    } else {
        1
    };
    let end = raw.len().saturating_sub(quote).max(quote);
    let mut i = quote;
    if quote == 3 {
        i += ["\r\n", "\n"]
            .iter()
            .find(|nl| raw[i..].starts_with(**nl))
            .map_or(0, |nl| nl.len());
    }
    let mut count = 0;
    while i < end {
        let rest = &raw[i..];
        let width = if literal || !rest.starts_with('\\') {
            rest.chars().next().map_or(1, char::len_utf8)
        } else {
            let after = &rest[1..];
            let blank = after.trim_start_matches([' ', '\t']);
            if quote == 3 && (blank.starts_with('\n') || blank.starts_with("\r\n")) {
                // A line-ending backslash: it and the whitespace after it are not there.
                i += 1 + after.len() - after.trim_start().len();
                continue;
            }
            match after.chars().next() {
                Some('u') => 6,
                Some('U') => 10,
                Some(c) => 1 + c.len_utf8(),
                None => 1,
            }
        };
        if count == n {
            return i;
        }
        count += 1;
        i += width;
    }
    end
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_keys() {
        let src = "[server]\nlisten = \"x\"\n\n[[middleware]]\ntype = \"a\"\n\n[[middleware]]\ntype = \"b\"\nrate = \"5/x\"\nh = { set = { a = \"b\" } }\n";
        let doc = toml_edit::ImDocument::parse(src).unwrap();
        let root = doc.as_item();
        let mut p = KeyPath::default();
        p.push_key("middleware");
        p.push_index(1);
        p.push_key("rate");
        let err = ConfigError::at_key(Path::new("proxy.toml"), src, root, p, "bad rate");
        assert_eq!(
            err.to_string(),
            "proxy.toml:9:1: middleware[2].rate: bad rate"
        );

        let mut p = KeyPath::default();
        p.push_key("middleware");
        p.push_index(1);
        p.push_key("h");
        p.push_key("set");
        p.push_key("a");
        let err = ConfigError::at_key(Path::new("f"), src, root, p, "m");
        assert_eq!(err.to_string(), "f:10:15: middleware[2].h.set.a: m");

        // A missing key points at its parent.
        let mut p = KeyPath::default();
        p.push_key("server");
        p.push_key("upstream");
        let err = ConfigError::at_key(Path::new("f"), src, root, p, "missing");
        assert_eq!(err.to_string(), "f:1:2: server.upstream: missing");
    }

    #[test]
    fn locates_a_character_inside_a_string_value() {
        let src = concat!(
            "rules = [\n",
            "  { name = \"a\", allow = \"x \\u00e9 y\" },\n",
            "  { name = 'b', allow = 'é = y' },\n",
            "]\n",
            "multi = \"\"\"\n  one \\\n    two\"\"\"\n",
        );
        let doc = toml_edit::ImDocument::parse(src).unwrap();
        let at = |path: KeyPath| {
            let err = ConfigError::at_key(Path::new("f"), src, doc.as_item(), path, "m");
            err.to_string()
        };
        let mut rule = KeyPath::default().key("rules");
        rule.push_index(0);
        // `y` is the 4th character: after `x`, a space, the escaped `é` and a space.
        assert_eq!(at(rule.key("allow").char(4)), "f:2:35: rules[1].allow: m");
        let mut rule = KeyPath::default().key("rules");
        rule.push_index(1);
        assert_eq!(at(rule.key("allow").char(4)), "f:3:30: rules[2].allow: m");
        // Past the end: the closing quote.
        assert_eq!(at(rule.key("allow").char(99)), "f:3:31: rules[2].allow: m");
        // The first newline and the line-ending backslash are not part of the value.
        assert_eq!(
            at(KeyPath::default().key("multi").char(6)),
            "f:7:5: multi: m"
        );
    }
}
