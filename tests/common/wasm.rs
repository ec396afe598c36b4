//! The proxy-wasm test plugins, built once per test run: the first test that asks builds
//! them, the others wait for it.
//!
//! * [`plugin`]: the Rust crates of `tests/fixtures/wasm`, for `wasm32-wasip1`. Across test
//!   binaries cargo's own lock on `target/wasm-plugins` serializes the builds, and the second
//!   finds everything fresh.
//! * [`assemblyscript_headers`]: `tests/fixtures/wasm-as`, AssemblyScript with its proxy-wasm
//!   SDK from npm (pinned in its package.json), installed and built in `target/wasm-as`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::run_setup;

/// The release directory the plugins are built into, once they are.
fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("wasm-plugins");
        let manifest = root.join("tests/fixtures/wasm/Cargo.toml");
        // The cargo running the tests (its toolchain has the target), else the one on PATH.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_setup(
            Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "--locked",
                    "--target",
                    "wasm32-wasip1",
                ])
                .arg("--manifest-path")
                .arg(&manifest)
                .env("CARGO_TARGET_DIR", &target),
            &format!(
                "building the test plugins ({}; needs `rustup target add wasm32-wasip1` and \
                 the proxy-wasm crate from crates.io)",
                manifest.display()
            ),
        );
        target.join("wasm32-wasip1").join("release")
    })
}

/// The built plugin `name` (a crate of `tests/fixtures/wasm`): `<name>.wasm`.
pub fn plugin(name: &str) -> PathBuf {
    let path = built().join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "no {} after building the plugins: is `{name}` a crate of tests/fixtures/wasm?",
        path.display()
    );
    path
}

/// The AssemblyScript plugin (the headers case, root id `headers`), built with the pinned
/// `assemblyscript` compiler and `@solo-io/proxy-runtime` SDK; the packages are installed
/// again only when package.json changes. Needs node and npm, and the npm registry the first
/// time.
pub fn assemblyscript_headers() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let fixture = root.join("tests/fixtures/wasm-as");
            let dir = root.join("target/wasm-as");
            std::fs::create_dir_all(dir.join("assembly")).unwrap();
            for file in ["package.json", "assembly/index.ts"] {
                std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
            }
            let wanted = std::fs::read(fixture.join("package.json")).unwrap();
            let installed = dir.join("installed-package.json");
            if std::fs::read(&installed).ok().as_ref() != Some(&wanted) {
                run_setup(
                    Command::new("npm")
                        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                        .current_dir(&dir),
                    &format!("npm install in {} (needs the npm registry)", dir.display()),
                );
                std::fs::write(&installed, &wanted).unwrap();
            }
            run_setup(
                Command::new("npm")
                    .args(["run", "--silent", "build"])
                    .current_dir(&dir),
                &format!("building the AssemblyScript plugin in {}", dir.display()),
            );
            dir.join("build/headers.wasm")
        })
        .clone()
}
