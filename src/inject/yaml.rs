//! The YAML side of `gatehouse inject`: a stream split into its documents, so that the ones
//! inject leaves alone are written back byte for byte; a document read into a small tree
//! (anchors and `<<` merge keys resolved, as the API server resolves them); and that tree
//! written back in block style.
//!
//! A plain scalar keeps the text it was written with and is written back the same way, so
//! a value inject does not touch means the same to the API server's YAML 1.1 reader after
//! the round trip (`0644` stays octal, `yes` stays what it was); only strings inject writes
//! itself, or that were quoted, are quoted when they need it.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One document of a stream, as written: its text runs from its `---` line (if any) up to
/// the next one, or to just after its `...` line.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub text: &'a str,
    /// The 1-based line of the stream its text starts on.
    pub first_line: usize,
}

/// Splits a stream at its document markers. A line starting `---` or `...` (then a space
/// or the line's end) can only be a marker in YAML, even inside a block scalar, so the split
/// needs no parsing.
pub fn split(stream: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    let (mut start, mut start_line, mut at) = (0, 1, 0);
    for (i, line) in stream.split_inclusive('\n').enumerate() {
        if marker(line, "---") && at > start {
            segments.push(Segment {
                text: &stream[start..at],
                first_line: start_line,
            });
            (start, start_line) = (at, i + 1);
        }
        at += line.len();
        if marker(line, "...") {
            segments.push(Segment {
                text: &stream[start..at],
                first_line: start_line,
            });
            (start, start_line) = (at, i + 2);
        }
    }
    if at > start {
        segments.push(Segment {
            text: &stream[start..at],
            first_line: start_line,
        });
    }
    segments
}

/// Whether `line` is the document marker `m` (`---` or `...`).
pub fn marker(line: &str, m: &str) -> bool {
    line.strip_prefix(m)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// A node of a document: its value, its tag as written (`!!str`), and the 1-based line of
/// the stream it starts on (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub tag: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in the order written (merged keys after the explicit ones).
    Map(Vec<(Node, Node)>),
}

/// A scalar: `plain` ones are written back as their text (which a reader resolves to a
/// number, a boolean, null or a string as before); the others are strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub text: String,
    pub plain: bool,
}

impl Node {
    fn new(value: Value) -> Node {
        Node {
            value,
            tag: None,
            line: 0,
        }
    }

    /// A string (quoted when written if it would otherwise read as something else).
    pub fn str(text: impl Into<String>) -> Node {
        Node::new(Value::Scalar(Scalar {
            text: text.into(),
            plain: false,
        }))
    }

    pub fn int(n: i64) -> Node {
        Node::new(Value::Scalar(Scalar {
            text: n.to_string(),
            plain: true,
        }))
    }

    pub fn bool(b: bool) -> Node {
        Node::new(Value::Scalar(Scalar {
            text: b.to_string(),
            plain: true,
        }))
    }

    pub fn seq(items: Vec<Node>) -> Node {
        Node::new(Value::Seq(items))
    }

    /// A mapping with string keys.
    pub fn map<const N: usize>(entries: [(&str, Node); N]) -> Node {
        Node::new(Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Node::str(k), v))
                .collect(),
        ))
    }

    /// The value under `key`, if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match &mut self.value {
            Value::Map(entries) => entries
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at `path` of keys.
    pub fn at(&self, path: &[&str]) -> Option<&Node> {
        path.iter().try_fold(self, |node, key| node.get(key))
    }

    pub fn at_mut(&mut self, path: &[&str]) -> Option<&mut Node> {
        path.iter().try_fold(self, |node, key| node.get_mut(key))
    }

    /// Sets `key` (in place if present, else at the end) and returns its new value; `None`
    /// if this is not a mapping.
    pub fn set(&mut self, key: &str, value: Node) -> Option<&mut Node> {
        let Value::Map(entries) = &mut self.value else {
            return None;
        };
        let i = match entries.iter().position(|(k, _)| k.as_str() == Some(key)) {
            Some(i) => {
                entries[i].1 = value;
                i
            }
            None => {
                entries.push((Node::str(key), value));
                entries.len() - 1
            }
        };
        Some(&mut entries[i].1)
    }

    /// The mapping or sequence under `key`, created empty when absent or null; `None` if
    /// this is not a mapping or `key` holds something else.
    pub fn child(&mut self, key: &str, empty: fn() -> Value) -> Option<&mut Node> {
        if self.get(key).is_none_or(Node::is_null) {
            self.set(key, Node::new(empty()));
        }
        self.get_mut(key)
            .filter(|n| std::mem::discriminant(&n.value) == std::mem::discriminant(&empty()))
    }

    /// A scalar's text, whatever its style.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s) => Some(&s.text),
            _ => None,
        }
    }

    /// A plain scalar written as a decimal integer.
    pub fn as_int(&self) -> Option<i64> {
        match &self.value {
            Value::Scalar(s) if s.plain && s.text.bytes().all(|b| b.is_ascii_digit()) => {
                s.text.parse().ok()
            }
            _ => None,
        }
    }

    /// Whether this is a plain scalar meaning null (`key:` with nothing, `~`, `null`).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s)
            if s.plain && matches!(s.text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_seq(&self) -> &[Node] {
        match &self.value {
            Value::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn as_seq_mut(&mut self) -> Option<&mut Vec<Node>> {
        match &mut self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_map(&self) -> &[(Node, Node)] {
        match &self.value {
            Value::Map(entries) => entries,
            _ => &[],
        }
    }

    fn size(&self) -> usize {
        1 + match &self.value {
            Value::Scalar(_) => 0,
            Value::Seq(items) => items.iter().map(Node::size).sum(),
            Value::Map(entries) => entries.iter().map(|(k, v)| k.size() + v.size()).sum(),
        }
    }
}

pub fn empty_map() -> Value {
    Value::Map(Vec::new())
}

pub fn empty_seq() -> Value {
    Value::Seq(Vec::new())
}

/// What is wrong with a document, and where (1-based line and column of the stream).
#[derive(Debug, Clone, PartialEq)]
pub struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The most nodes aliases may expand a document to: a few anchors referring to each other
/// can otherwise describe an exponentially large tree.
const MAX_EXPANDED: usize = 100_000;

/// Reads the document of `segment`: `None` when it holds only comments.
pub fn parse(segment: &Segment) -> Result<Option<Node>, YamlError> {
    let mut builder = Builder {
        offset: segment.first_line - 1,
        stack: Vec::new(),
        anchors: HashMap::new(),
        docs: Vec::new(),
        error: None,
        expanded: 0,
    };
    let mut parser = Parser::new_from_str(segment.text);
    parser
        .load(&mut builder, true)
        .map_err(|e| builder.error_at(e.marker(), e.info().to_owned()))?;
    if let Some(e) = builder.error {
        return Err(e);
    }
    let mut docs = builder.docs.into_iter();
    match (docs.next(), docs.next()) {
        (doc, None) => Ok(doc),
        (_, Some(second)) => Err(YamlError {
            line: second.line,
            column: 1,
            message: "a second document without a `---` line before it".into(),
        }),
    }
}

/// Builds the tree from the parser's events.
struct Builder {
    /// Lines of the stream before the segment's first.
    offset: usize,
    stack: Vec<Frame>,
    /// Anchor id → the node it names (resolved: aliases are copies).
    anchors: HashMap<usize, Node>,
    docs: Vec<Node>,
    error: Option<YamlError>,
    expanded: usize,
}

/// A collection being read, with the key waiting for its value, the anchor it will be
/// registered under and the `<<` merge sources met so far.
struct Frame {
    node: Node,
    key: Option<Node>,
    anchor: usize,
    merges: Vec<Node>,
}

impl Builder {
    fn error_at(&self, mark: &Marker, message: String) -> YamlError {
        YamlError {
            line: self.offset + mark.line(),
            column: mark.col() + 1,
            message,
        }
    }

    fn fail(&mut self, mark: &Marker, message: String) {
        if self.error.is_none() {
            self.error = Some(self.error_at(mark, message));
        }
    }

    fn add(&mut self, node: Node, mark: &Marker) {
        let Some(frame) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        match &mut frame.node.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match frame.key.take() {
                None if !matches!(node.value, Value::Scalar(_)) => self.fail(
                    mark,
                    "a mapping or list as a key: not supported here".into(),
                ),
                None => frame.key = Some(node),
                Some(key) if key.tag.is_none() && key.value == plain("<<") => {
                    frame.merges.push(node)
                }
                Some(key) => {
                    let duplicate =
                        key.as_str().is_some() && entries.iter().any(|(k, _)| k.value == key.value);
                    let message = format!(
                        "duplicate key {:?} (line {}): a mapping may hold each key once",
                        key.as_str().unwrap_or_default(),
                        key.line
                    );
                    entries.push((key, node));
                    if duplicate {
                        self.fail(mark, message);
                    }
                }
            },
            Value::Scalar(_) => unreachable!("only collections are pushed as frames"),
        }
    }

    fn open(&mut self, value: Value, anchor: usize, tag: Option<Tag>, mark: &Marker) {
        let mut node = Node::new(value);
        node.tag = tag.map(tag_text);
        node.line = self.offset + mark.line();
        self.stack.push(Frame {
            node,
            key: None,
            anchor,
            merges: Vec::new(),
        });
    }

    fn close(&mut self, mark: &Marker) {
        let Some(mut frame) = self.stack.pop() else {
            return;
        };
        if let Err(message) = merge(&mut frame.node, frame.merges) {
            self.fail(mark, message);
        }
        self.register(frame.anchor, &frame.node);
        self.add(frame.node, mark);
    }

    fn register(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                // A plain scalar with a line break in it (folded from an empty line) can
                // only be a string, and must be written back as one.
                let plain = style == TScalarStyle::Plain && !text.contains('\n');
                let mut node = Node::new(Value::Scalar(Scalar { text, plain }));
                node.tag = tag.map(tag_text);
                node.line = self.offset + mark.line();
                self.register(anchor, &node);
                self.add(node, &mark);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => {
                    self.expanded += node.size();
                    if self.expanded > MAX_EXPANDED {
                        self.fail(
                            &mark,
                            format!("aliases expand to more than {MAX_EXPANDED} nodes"),
                        );
                    } else {
                        self.add(node, &mark);
                    }
                }
                None => self.fail(&mark, "an alias to an unknown anchor".into()),
            },
            Event::SequenceStart(anchor, tag) => self.open(empty_seq(), anchor, tag, &mark),
            Event::MappingStart(anchor, tag) => self.open(empty_map(), anchor, tag, &mark),
            Event::SequenceEnd | Event::MappingEnd => self.close(&mark),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn plain(text: &str) -> Value {
    Value::Scalar(Scalar {
        text: text.into(),
        plain: true,
    })
}

fn tag_text(tag: Tag) -> String {
    match tag.handle.as_str() {
        "!" | "!!" => format!("{}{}", tag.handle, tag.suffix),
        "tag:yaml.org,2002:" => format!("!!{}", tag.suffix),
        handle => format!("!<{handle}{}>", tag.suffix),
    }
}

/// Applies `<<` merge keys (YAML 1.1, which Kubernetes reads): the keys of each merged
/// mapping that the mapping does not set itself, earlier sources first.
fn merge(node: &mut Node, sources: Vec<Node>) -> Result<(), String> {
    let Value::Map(entries) = &mut node.value else {
        return Ok(());
    };
    for source in sources {
        let maps = match source.value {
            Value::Map(_) => vec![source],
            Value::Seq(items) => items,
            Value::Scalar(_) => {
                return Err("`<<` merges a mapping or a list of mappings, not a scalar".into())
            }
        };
        for map in maps {
            let Value::Map(merged) = map.value else {
                return Err("`<<` merges a mapping or a list of mappings".into());
            };
            for (k, v) in merged {
                if !entries.iter().any(|(have, _)| have.value == k.value) {
                    entries.push((k, v));
                }
            }
        }
    }
    Ok(())
}

/// Writes `node` as a block-style document body, ending in a line break.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    match &node.value {
        Value::Scalar(_) => {
            write_tag(&mut out, node, " ");
            write_scalar(&mut out, node, 0, false);
        }
        _ if is_empty(node) => {
            write_tag(&mut out, node, " ");
            write_empty(&mut out, node);
        }
        _ => {
            if let Some(tag) = &node.tag {
                out.push_str(tag);
                out.push('\n');
            }
            write_block(&mut out, node, 0);
        }
    }
    out.push('\n');
    out
}

fn is_empty(node: &Node) -> bool {
    match &node.value {
        Value::Seq(items) => items.is_empty(),
        Value::Map(entries) => entries.is_empty(),
        Value::Scalar(_) => false,
    }
}

fn write_empty(out: &mut String, node: &Node) {
    out.push_str(match node.value {
        Value::Seq(_) => "[]",
        _ => "{}",
    });
}

fn write_tag(out: &mut String, node: &Node, after: &str) {
    if let Some(tag) = &node.tag {
        out.push_str(tag);
        out.push_str(after);
    }
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Writes a non-empty collection whose first line starts at the cursor, at column `col`.
fn write_block(out: &mut String, node: &Node, col: usize) {
    match &node.value {
        Value::Map(entries) => {
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                    indent(out, col);
                }
                write_tag(out, k, " ");
                write_scalar(out, k, col, true);
                out.push(':');
                write_value(out, v, col + 2, false);
            }
        }
        Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                    indent(out, col);
                }
                out.push('-');
                write_value(out, item, col + 2, true);
            }
        }
        Value::Scalar(_) => unreachable!("only collections are written as blocks"),
    }
}

/// Writes the value after `key:` or `-`; a collection goes on the next lines at `col`, or
/// (a sequence item's, `compact`) starts on the same line.
fn write_value(out: &mut String, node: &Node, col: usize, compact: bool) {
    match &node.value {
        Value::Scalar(s) if s.plain && s.text.is_empty() && node.tag.is_none() => {}
        Value::Scalar(_) => {
            out.push(' ');
            write_tag(out, node, " ");
            write_scalar(out, node, col - 2, false);
        }
        _ if is_empty(node) => {
            out.push(' ');
            write_tag(out, node, " ");
            write_empty(out, node);
        }
        _ => {
            if let Some(tag) = &node.tag {
                out.push(' ');
                out.push_str(tag);
            } else if compact {
                out.push(' ');
                write_block(out, node, col);
                return;
            }
            out.push('\n');
            indent(out, col);
            write_block(out, node, col);
        }
    }
}

/// Writes a scalar whose parent sits at column `col` (a block scalar's lines go deeper).
fn write_scalar(out: &mut String, node: &Node, col: usize, key: bool) {
    let Value::Scalar(s) = &node.value else {
        return;
    };
    let text = s.text.as_str();
    if s.plain || plain_string(text) {
        out.push_str(text);
    } else if !key && literal_block(text) {
        let body = text.trim_end_matches('\n');
        out.push_str(match text.len() - body.len() {
            0 => "|-",
            1 => "|",
            _ => "|+",
        });
        for line in body.split('\n') {
            out.push('\n');
            if !line.is_empty() {
                indent(out, col + 2);
                out.push_str(line);
            }
        }
        for _ in 1..text.len() - body.len() {
            out.push('\n');
        }
    } else {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    }
}

/// Whether a string can be written plain and read back as the same string by a YAML 1.1 or
/// 1.2 reader: no indicator first, nothing that ends it early, nothing that reads as a
/// number, boolean, null or date. Errs on the side of quoting.
fn plain_string(text: &str) -> bool {
    const WORDS: [&str; 11] = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", "nan",
    ];
    let Some(first) = text.chars().next() else {
        return false;
    };
    let safe_chars = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " _./:@+=-()%".contains(c));
    let digits_then_unit = {
        let unit = text.trim_start_matches(|c: char| c.is_ascii_digit());
        unit.len() < text.len()
            && !unit.is_empty()
            && unit
                .chars()
                .all(|c| c.is_ascii_alphabetic() && !matches!(c, 'e' | 'E' | 'x' | 'o' | 'b'))
    };
    safe_chars
        && (first.is_ascii_alphabetic() || first == '/' || first == '_' || digits_then_unit)
        && !text.ends_with([' ', ':'])
        && !text.contains(": ")
        && !WORDS.contains(&text.to_ascii_lowercase().as_str())
}

/// Whether a multi-line string reads back the same from a literal block (`|`).
fn literal_block(text: &str) -> bool {
    let body = text.trim_end_matches('\n');
    text.contains('\n')
        && !body.is_empty()
        && !body.starts_with([' ', '\t', '\n'])
        && !text
            .chars()
            .any(|c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Node {
        parse(&Segment {
            text,
            first_line: 1,
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn splits_at_markers_only() {
        let stream = "# head\n---\na: |\n  --- not a marker, indented\n---\nb: 1\n...\n# tail\n";
        let parts: Vec<(&str, usize)> = split(stream)
            .iter()
            .map(|s| (s.text, s.first_line))
            .collect();
        assert_eq!(
            parts,
            [
                ("# head\n", 1),
                ("---\na: |\n  --- not a marker, indented\n", 2),
                ("---\nb: 1\n...\n", 5),
                ("# tail\n", 8),
            ]
        );
        assert_eq!(split("").len(), 0);
        assert!(marker("--- # c\n", "---") && !marker("----\n", "---"));
    }

    #[test]
    fn resolves_anchors_and_merge_keys() {
        let d = doc("base: &b {x: 1, y: 2}\nlist: &l [a, b]\nuse:\n  <<: *b\n  y: 3\ncopy: *l\n");
        assert_eq!(emit(d.get("use").unwrap()), "y: 3\nx: 1\n");
        assert_eq!(d.get("copy").unwrap(), d.get("list").unwrap());
        let many = doc("m:\n  <<: [{a: 1}, {a: 2, b: 2}]\n");
        assert_eq!(emit(many.get("m").unwrap()), "a: 1\nb: 2\n");
    }

    #[test]
    fn reports_where_a_document_is_wrong() {
        let seg = Segment {
            text: "a: 1\nb: [\n",
            first_line: 10,
        };
        let e = parse(&seg).unwrap_err();
        assert_eq!(e.line, 12, "{e:?}");
        let dup = parse(&Segment {
            text: "a: 1\nb: 2\na: 3\n",
            first_line: 1,
        })
        .unwrap_err();
        assert!(dup.message.contains("duplicate key \"a\""), "{dup:?}");
        assert_eq!(dup.line, 3);
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
        let e = parse(&Segment {
            text: bomb,
            first_line: 1,
        })
        .unwrap_err();
        assert!(e.message.contains("aliases expand"), "{e:?}");
        let complex = parse(&Segment {
            text: "? [a, b]\n: 1\n",
            first_line: 1,
        })
        .unwrap_err();
        assert!(complex.message.contains("as a key"), "{complex:?}");
        assert!(parse(&Segment {
            text: "# only a comment\n",
            first_line: 1
        })
        .unwrap()
        .is_none());
    }

    #[test]
    fn plain_scalars_round_trip_as_written() {
        let src = "mode: 0644\nflag: yes\nnone:\nport: 8080\nname: \"8080\"\nq: 'true'\ntagged: !!str 12\nlist:\n  - a\n  - k: v\n    j: w\n  - []\nempty: {}\n";
        let out = emit(&doc(src));
        assert_eq!(
            out,
            "mode: 0644\nflag: yes\nnone:\nport: 8080\nname: \"8080\"\nq: \"true\"\ntagged: !!str 12\nlist:\n  - a\n  - k: v\n    j: w\n  - []\nempty: {}\n"
        );
        assert_eq!(doc(&out), doc(src));
    }

    #[test]
    fn strings_are_quoted_when_they_must_be() {
        for (text, plain) in [
            ("IfNotPresent", true),
            ("/etc/gatehouse/proxy.toml", true),
            ("50m", true),
            ("32Mi", true),
            ("gatehouse:0.1.0", true),
            ("1e3", false),
            ("0x1F", false),
            ("10.0.0.1", false),
            ("no", false),
            ("On", false),
            ("--config", false),
            ("a: b", false),
            ("a #b", false),
            ("", false),
            ("2026-01-01", false),
        ] {
            assert_eq!(plain_string(text), plain, "{text}");
        }
    }

    #[test]
    fn multi_line_strings_become_literal_blocks() {
        let node = Node::map([
            ("keep", Node::str("a\n\n  b\n")),
            ("strip", Node::str("x\ny")),
            ("plus", Node::str("x\n\n")),
            ("lead", Node::str(" x\ny")),
            ("items", Node::seq(vec![Node::str("p\nq\n")])),
        ]);
        let out = emit(&node);
        assert_eq!(
            out,
            "keep: |\n  a\n\n    b\nstrip: |-\n  x\n  y\nplus: |+\n  x\n\nlead: \" x\\ny\"\nitems:\n  - |\n    p\n    q\n"
        );
        let back = doc(&out);
        for key in ["keep", "strip", "plus", "lead"] {
            assert_eq!(
                back.get(key).unwrap().as_str(),
                node.get(key).unwrap().as_str()
            );
        }
        assert_eq!(
            back.at(&["items"]).unwrap().as_seq()[0].as_str(),
            Some("p\nq\n")
        );
    }
}
