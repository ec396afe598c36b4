//! The documentation is tested, so it cannot drift from the binary: README.md and every
//! Markdown file under docs/ are read block by block.
//!
//! - A ```` ```toml ```` block is a whole config and must pass `gatehouse check`.
//!   ```` ```toml fragment ```` is part of one: without its own `[server]` and `[upstream]` it
//!   is put under a minimal pair and checked all the same.
//! - A block of any language marked `file=NAME` (```` ```toml file=proxy.toml ````, ```` ```yaml
//!   file=deploy.yaml ````) is also saved as `NAME` for the page's transcripts.
//! - A page whose `file=` blocks include a `Cargo.toml` walks through writing a plugin: its
//!   files are a crate, built for `wasm32-wasip1` as the page says, and its TOML blocks and
//!   transcripts run in the crate's directory (skipped, and said so, without that target).
//! - ```` ```toml invalid ```` shows a config error: `gatehouse check` must refuse it (exit 2).
//! - ```` ```toml cases ```` is a policy test file: it must load in `gatehouse test` against
//!   the repository's proxy.toml.
//! - A ```` ```console ```` block is a transcript: each `$ gatehouse explain|check|test|inject ...`
//!   line (after optional `VAR=value` words) is run and its output (stdout, then stderr)
//!   must be the lines that follow it, exactly, but for what is genuinely variable (generated
//!   ids, measured durations, the worker count). It runs in a directory holding the page's
//!   `file=` blocks when one of its arguments names one, else in the repository's root. Any
//!   other command in a transcript fails the test: show those in a ```` ```sh ```` block.
//!
//! - Every key of `gatehouse schema` is documented ([`every_config_key_is_documented`]).
//!
//! A failure names the file and line of the block.

mod common;

use std::path::{Path, PathBuf};

use common::cli;

/// The variables the documented configs read, as a deployment would set them.
const ENV: &[(&str, &str)] = &[
    ("API_KEY", "s3cret"),
    ("CI_KEY", "ci-key"),
    ("CI_API_KEY", "ci-key"),
    ("JWT_SECRET", "a-long-enough-shared-secret-for-hs256"),
    ("OIDC_CLIENT_SECRET", "client-secret"),
    (
        "OIDC_COOKIE_SECRET",
        "q83vEi1Nq2d1ZTXyYx0jxHoDhn2Fc/HpSoBpR1kz5bM=",
    ),
    ("REDIS_URL", "redis://127.0.0.1:6379"),
    ("REDIS_PASSWORD", "s3cret"),
    ("AUDIT_FILE", "/tmp/gatehouse-docs-audit.jsonl"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
    ("OTEL_TOKEN", "token"),
];

/// What wraps a fragment that has no `[server]` or `[upstream]` of its own.
const SERVER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n";
const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:8000\"\n";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and docs/**/*.md, in a stable order.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut out);
    out
}

/// One fenced block: its language, the words after it, its text and where it starts.
struct Block {
    file: String,
    line: usize,
    lang: String,
    marks: Vec<String>,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    fn mark(&self, name: &str) -> bool {
        self.marks.iter().any(|m| m == name)
    }

    /// The value of a `key=value` mark.
    fn value(&self, key: &str) -> Option<&str> {
        self.marks
            .iter()
            .find_map(|m| m.strip_prefix(key)?.strip_prefix('='))
    }
}

fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let file = path
        .strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match open.take() {
            None => {
                // A fence is three backticks and an info string without any (a line of
                // prose may start with an inline ```` ```toml ````).
                if let Some(info) = fence.strip_prefix("```").filter(|i| !i.contains('`')) {
                    let mut words = info.split_whitespace().map(str::to_owned);
                    open = Some(Block {
                        file: file.clone(),
                        line: i + 1,
                        lang: words.next().unwrap_or_default(),
                        marks: words.collect(),
                        text: String::new(),
                    });
                }
            }
            Some(mut block) => {
                if fence == "```" {
                    out.push(block);
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                    open = Some(block);
                }
            }
        }
    }
    if let Some(block) = open {
        panic!("{}: the block is never closed", block.at());
    }
    out
}

/// The config a TOML block stands for.
fn config_of(block: &Block) -> String {
    if !block.mark("fragment") {
        return block.text.clone();
    }
    let has = |section: &str| block.text.lines().any(|l| l.trim() == section);
    let mut config = String::new();
    if !has("[server]") {
        config.push_str(SERVER);
    }
    if !has("[upstream]") {
        config.push_str(UPSTREAM);
    }
    config.push('\n');
    config.push_str(&block.text);
    config
}

/// The directory holding a page's `file=` blocks, and their names; a page with a
/// `Cargo.toml` among them is a plugin's crate, built there (in `target/docs-crates/`, so
/// that a later run builds only what changed). `Err` says why the page cannot be run.
fn page_files(page: &Path, blocks: &[Block]) -> Result<(Files, Vec<String>), String> {
    let mut names = Vec::new();
    let files = blocks.iter().filter_map(|b| Some((b, b.value("file")?)));
    let is_crate = blocks.iter().any(|b| b.value("file") == Some("Cargo.toml"));
    let dir = if is_crate {
        if !cfg!(gatehouse_has_wasm32_wasip1) {
            return Err(
                "the wasm32-wasip1 target is not installed (rustup target add \
                        wasm32-wasip1)"
                    .into(),
            );
        }
        let stem = page.file_stem().unwrap().to_string_lossy();
        Files::Kept(root().join("target/docs-crates").join(&*stem))
    } else {
        Files::Temp(tempfile::tempdir().unwrap())
    };
    for (block, name) in files {
        let text = match block.lang.as_str() {
            "toml" if name != "Cargo.toml" => config_of(block),
            _ => block.text.clone(),
        };
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(&text) {
            std::fs::write(&path, text).unwrap();
        }
        names.push(name.to_owned());
    }
    if is_crate {
        // Both tests may ask at once; cargo's own lock keeps one build at a time.
        let out = std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "--target", "wasm32-wasip1", "--quiet"])
            .current_dir(dir.path())
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        if !out.status.success() {
            panic!(
                "{}: the page's crate does not build:\n{}",
                page.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((dir, names))
}

/// Where a page's files are: a temporary directory, or a crate's kept one.
enum Files {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Files {
    fn path(&self) -> &Path {
        match self {
            Files::Temp(dir) => dir.path(),
            Files::Kept(dir) => dir,
        }
    }
}

#[test]
fn every_toml_block_passes_gatehouse_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let blocks = blocks(&page);
        let is_crate = blocks.iter().any(|b| b.value("file") == Some("Cargo.toml"));
        let cwd = if is_crate {
            match page_files(&page, &blocks) {
                Ok((files, _)) => Some(files),
                Err(why) => {
                    eprintln!("skipped: the configs of {}: {why}", page.display());
                    continue;
                }
            }
        } else {
            None
        };
        let cwd = cwd.as_ref().map_or(root(), Files::path);
        check_blocks(&blocks, dir.path(), cwd, &mut failures, &mut checked);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    assert!(checked > 15, "only {checked} TOML blocks found");
}

fn check_blocks(
    blocks: &[Block],
    dir: &Path,
    cwd: &Path,
    failures: &mut Vec<String>,
    checked: &mut usize,
) {
    for block in blocks
        .iter()
        .filter(|b| b.lang == "toml" && b.value("file") != Some("Cargo.toml"))
    {
        let path = dir.join("proxy.toml");
        std::fs::write(&path, config_of(block)).unwrap();
        let path = path.to_str().unwrap();
        // A policy test file loads against the repository's proxy.toml (its cases may fail:
        // exit 1; a file that does not load exits 2).
        let (args, ok): (Vec<&str>, &[i32]) = if block.mark("cases") {
            (vec!["test", path, "--config", "proxy.toml"], &[0, 1])
        } else if block.mark("invalid") {
            (vec!["check", "--config", path], &[2])
        } else {
            (vec!["check", "--config", path], &[0])
        };
        let out = cli(&args, ENV, Some(cwd));
        *checked += 1;
        if !out.code.is_some_and(|c| ok.contains(&c)) {
            failures.push(format!(
                "{}: gatehouse check exited {:?}\n{}{}",
                block.at(),
                out.code,
                out.stdout,
                out.stderr
            ));
        }
    }
}

/// One `$ ...` line of a transcript and the output lines under it.
struct Step {
    line: usize,
    env: Vec<(String, String)>,
    argv: Vec<String>,
    expected: String,
}

/// The steps of a console block; `Err` for a command the test cannot run.
fn steps(block: &Block) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    for (i, line) in block.text.lines().enumerate() {
        let Some(command) = line.strip_prefix("$ ") else {
            match steps.last_mut() {
                Some(step) => {
                    step.expected.push_str(line);
                    step.expected.push('\n');
                }
                None => return Err(format!("output before any `$ ` line: {line}")),
            }
            continue;
        };
        let words = shell_words(command)?;
        let mut words = words.into_iter().peekable();
        let mut env = Vec::new();
        while let Some((k, v)) = words.peek().and_then(|w| w.split_once('=')) {
            env.push((k.to_owned(), v.to_owned()));
            words.next();
        }
        let argv: Vec<String> = words.collect();
        let runnable = argv.first().map(String::as_str) == Some("gatehouse")
            && matches!(
                argv.get(1).map(String::as_str),
                Some("explain" | "check" | "test" | "inject")
            );
        if !runnable {
            return Err(format!(
                "`{command}` is not a command this test runs (gatehouse explain, check, test or \
                 inject): show it in a `sh` block instead"
            ));
        }
        steps.push(Step {
            line: block.line + 1 + i,
            env,
            argv: argv[1..].to_vec(),
            expected: String::new(),
        });
    }
    Ok(steps)
}

/// Splits a command line as a POSIX shell would for the quoting the docs use: words,
/// '…' and "…" (without expansions).
fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(word.take()),
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => w.extend(chars.next()),
                        Some(other) => w.push(other),
                        None => return Err(format!("unclosed quote in `{line}`")),
                    }
                }
            }
            '|' | '>' | '<' | ';' | '&' | '$' | '`' => {
                return Err(format!("`{line}` uses the shell (`{c}`)"))
            }
            other => word.get_or_insert_with(String::new).push(other),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Replaces what differs from run to run: request ids (UUIDs), measured durations and the
/// worker count (one per CPU).
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut line = line.to_owned();
        // A UUID: 8-4-4-4-12 hex digits.
        let bytes: Vec<char> = line.chars().collect();
        let mut i = 0;
        let mut rebuilt = String::new();
        while i < bytes.len() {
            if is_uuid_at(&bytes[i..]) {
                rebuilt.push_str("<uuid>");
                i += 36;
            } else {
                rebuilt.push(bytes[i]);
                i += 1;
            }
        }
        line = rebuilt;
        for key in ["x-response-time: ", "dur=", "x-process-time: "] {
            line = replace_number_after(&line, key);
        }
        line = replace_number_before(&line, " workers)");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.trim_end().to_owned()
}

fn is_uuid_at(chars: &[char]) -> bool {
    chars.len() >= 36
        && chars[..36].iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `key` followed by a decimal number: the number becomes `N`.
fn replace_number_after(line: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find(key) {
        let (head, tail) = rest.split_at(at + key.len());
        out.push_str(head);
        let digits = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tail.len());
        if digits > 0 {
            out.push('N');
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// A whole number right before `key` becomes `N`.
fn replace_number_before(line: &str, key: &str) -> String {
    match line.find(key) {
        Some(at) => {
            let head = line[..at].trim_end_matches(|c: char| c.is_ascii_digit());
            format!("{head}N{}", &line[at..])
        }
        None => line.to_owned(),
    }
}

#[test]
fn every_transcript_is_what_the_binary_prints() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for page in pages() {
        let blocks = blocks(&page);
        let (files, names) = match page_files(&page, &blocks) {
            Ok(files) => files,
            Err(why) => {
                eprintln!("skipped: the transcripts of {}: {why}", page.display());
                continue;
            }
        };
        for block in blocks.iter().filter(|b| b.lang == "console") {
            let steps = match steps(block) {
                Ok(steps) => steps,
                Err(e) => {
                    failures.push(format!("{}: {e}", block.at()));
                    continue;
                }
            };
            for step in steps {
                let cwd = match step.argv.iter().any(|a| names.contains(a)) {
                    true => files.path(),
                    false => root(),
                };
                let mut env: Vec<(&str, &str)> = ENV.to_vec();
                env.extend(step.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let args: Vec<&str> = step.argv.iter().map(String::as_str).collect();
                let out = cli(&args, &env, Some(cwd));
                ran += 1;
                let got = normalise(&format!("{}{}", out.stdout, out.stderr));
                let want = normalise(&step.expected);
                if got != want {
                    failures.push(format!(
                        "{}:{}: `gatehouse {}` printed something else\n--- the docs ---\n{want}\n--- the binary ---\n{got}\n",
                        block.file,
                        step.line,
                        step.argv.join(" ")
                    ));
                }
            }
        }
    }
    assert!(ran > 10, "only {ran} transcript commands found");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    // The normalisation keeps everything but what varies.
    assert_eq!(
        normalise("set x-request-id: 0b8e3c3e-4a51-4bb4-9d0b-3d2f1c6a9e10  \nx"),
        "set x-request-id: <uuid>\nx"
    );
    assert_eq!(
        normalise("set server-timing: upstream;dur=0.006, proxy;dur=0.262"),
        "set server-timing: upstream;dur=N, proxy;dur=N"
    );
    assert_eq!(
        normalise("listen 0.0.0.0:8080 (12 workers) -> up"),
        "listen 0.0.0.0:8080 (N workers) -> up"
    );
    assert_eq!(normalise("status 200"), "status 200");
    // Quoting as the docs write it; anything needing a shell is refused.
    assert_eq!(
        shell_words("gatehouse explain -H 'x-api-key: s3cret' GET /").unwrap(),
        [
            "gatehouse",
            "explain",
            "-H",
            "x-api-key: s3cret",
            "GET",
            "/"
        ]
    );
    assert!(shell_words("gatehouse explain GET / | head").is_err());
    // A fragment gets a server and an upstream, unless it has its own.
    let fragment = |text: &str| Block {
        file: "x.md".into(),
        line: 1,
        lang: "toml".into(),
        marks: vec!["fragment".into()],
        text: text.into(),
    };
    assert!(config_of(&fragment("[[middleware]]\ntype = \"timing\"\n")).starts_with(SERVER));
    let own = config_of(&fragment("[upstream]\nurl = \"unix:/a\"\n"));
    assert!(own.starts_with(SERVER) && !own.contains(UPSTREAM), "{own}");
}

/// The Quick start's demo (docs/demo/run.sh): gatehouse with the repository's proxy.toml in
/// front of a static server of docs/demo/site, both on loopback; the repository itself is
/// not served; a SIGTERM to the script stops both.
#[test]
fn the_quick_start_demo_serves_its_site_on_loopback_and_stops_cleanly() {
    use std::io::{Read, Write};
    let (demo, listen, admin) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut script = std::process::Command::new("bash")
        .arg(root().join("docs/demo/run.sh"))
        .env("GATEHOUSE", env!("CARGO_BIN_EXE_gatehouse"))
        .env("DEMO_PORT", demo.to_string())
        .env("GATEHOUSE_LISTEN", format!("127.0.0.1:{listen}"))
        .env("GATEHOUSE_ADMIN", format!("127.0.0.1:{admin}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let get = |port: u16, path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let index = loop {
        match get(listen, "/") {
            Some(a) if a.starts_with("HTTP/1.1 200") => break a,
            _ if std::time::Instant::now() > deadline => {
                let _ = script.kill();
                panic!("the demo never answered 200 on 127.0.0.1:{listen}");
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    assert!(index.contains("Hello from the demo app"), "{index}");
    assert!(index.contains("x-request-id: "), "{index}");
    let git = get(listen, "/.git/config").unwrap();
    assert!(
        git.starts_with("HTTP/1.1 404"),
        "the repository is served: {git}"
    );
    let item = get(listen, "/items/1").unwrap();
    assert!(item.contains("\"first item\""), "{item}");

    let pid = script.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let ended = loop {
        if let Some(status) = script.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(10),
            "the demo script did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(ended.success(), "{ended}");
    assert!(get(demo, "/").is_none(), "the demo app outlived the script");
    assert!(get(listen, "/").is_none(), "gatehouse outlived the script");
}

/// The config reference is checked against `gatehouse schema`, generated from the types the
/// loader reads: every key of every section is documented somewhere under docs/ (as
/// `` `key` ``, `` `key = …` `` or the table `` `[section.key]` ``), every middleware type's
/// keys on its own page, every audit sink type's keys on the audit page. A key added to the
/// config without a word in the docs fails here.
#[test]
fn every_config_key_is_documented() {
    let out = cli(&["schema"], &[], None);
    assert_eq!(out.code, Some(0), "gatehouse schema: {}", out.stderr);
    let schema: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let definitions = &schema["definitions"];
    // A section's own keys, through `$ref`s and the `allOf`/`anyOf` wrappers of optional ones.
    fn keys<'a>(node: &'a serde_json::Value, defs: &'a serde_json::Value) -> Vec<&'a str> {
        if let Some(name) = node["$ref"].as_str() {
            return keys(&defs[name.rsplit('/').next().unwrap()], defs);
        }
        for wrapper in ["allOf", "anyOf"] {
            if let Some(inner) = node[wrapper].as_array() {
                return inner.iter().flat_map(|n| keys(n, defs)).collect();
            }
        }
        node["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
    let documents = |text: &str, section: &str, key: &str| {
        [
            format!("`{key}`"),
            format!("`{key} ="),
            format!("`[{section}.{key}]`"),
        ]
        .iter()
        .any(|form| text.contains(form.as_str()))
    };
    let read = |page: &str| std::fs::read_to_string(root().join(page)).unwrap();
    let all: String = pages()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let mut missing = Vec::new();
    let mut checked = 0;
    for section in ["server", "upstream", "admin", "log", "tracing", "audit"] {
        for key in keys(&schema["properties"][section], definitions) {
            checked += 1;
            if !documents(&all, section, key) {
                missing.push(format!("[{section}] {key}: nowhere under docs/"));
            }
        }
    }
    let typed = [
        (
            &schema["properties"]["middleware"]["items"]["oneOf"],
            "docs/middleware/{}.md",
        ),
        (
            &definitions["Audit"]["properties"]["sinks"]["items"]["oneOf"],
            "docs/audit.md",
        ),
    ];
    for (branches, page) in typed {
        let branches = branches.as_array().expect("a oneOf of types");
        assert!(branches.len() > 3, "{page}: only {} types", branches.len());
        for branch in branches {
            let kind = branch["properties"]["type"]["const"].as_str().unwrap();
            let page = page.replace("{}", kind);
            let text = read(&page);
            for key in keys(branch, definitions)
                .into_iter()
                .filter(|k| *k != "type")
            {
                checked += 1;
                if !documents(&text, kind, key) {
                    missing.push(format!("type {kind:?}, key {key}: not in {page}"));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} keys found in the schema");
    assert!(
        missing.is_empty(),
        "undocumented config keys:\n{}",
        missing.join("\n")
    );
}
