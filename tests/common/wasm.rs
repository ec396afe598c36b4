//! The proxy-wasm test plugins of `tests/fixtures/wasm`, built for `wasm32-wasip1` once per
//! test run: the first test that asks builds them all, the others wait for it. Across test
//! binaries cargo's own lock on `target/wasm-plugins` serializes the builds, and the second
//! finds everything fresh.

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
