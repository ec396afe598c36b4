//! Finds the outside programs some integration tests need and sets a `gatehouse_has_*` cfg
//! for each one present, so that a test which cannot run is compiled with
//! `#[cfg_attr(not(gatehouse_has_redis), ignore = "needs redis-server (...)")]`: `cargo test`
//! then counts it as ignored and prints why, instead of failing with a panic or passing
//! without having run. Under CI (`CI` set) every cfg is set: nothing may be skipped there,
//! so a missing program fails its tests.
//!
//! The script reruns only when `PATH`, `CI` or `GATEHOUSE_OTLP_COLLECTOR` change, when a
//! program it found changes or goes, or when a `PATH` directory it searched in vain changes
//! (a program installed there), so ordinary builds never pay for it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["PATH", "CI", "GATEHOUSE_OTLP_COLLECTOR"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let ci = env::var_os("CI").is_some();
    let path: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();

    let redis = find(&path, "redis-server");
    let chromium = find(&path, "chromium");
    let node = find(&path, "node");
    let npm = find(&path, "npm");
    let python = find(&path, "python3");
    let chattr = find(&path, "chattr");
    let venv = python.as_deref().is_some_and(|python| {
        Command::new(python)
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|out| out.status.success())
    });
    let collector = env::var_os("GATEHOUSE_OTLP_COLLECTOR").is_some_and(|p| !p.is_empty());
    let wasm_std = wasm32_wasip1_std();

    let mut searched_in_vain = false;
    let mut have = |cfg: &str, found: bool, watch: &[&Option<PathBuf>], missing: &str| {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        for program in watch.iter().filter_map(|p| p.as_ref()) {
            println!("cargo::rerun-if-changed={}", program.display());
        }
        if found || ci {
            println!("cargo::rustc-cfg={cfg}");
        }
        if !found {
            searched_in_vain |= !watch.is_empty();
            let consequence = if ci { "they fail (CI)" } else { "ignored" };
            println!("cargo::warning=tests that need {missing}: {consequence}");
        }
    };
    have(
        "gatehouse_has_redis",
        redis.is_some(),
        &[&redis],
        "redis-server (apt-get install redis-server)",
    );
    have(
        "gatehouse_has_chromium",
        chromium.is_some(),
        &[&chromium],
        "chromium (apt-get install chromium)",
    );
    have(
        "gatehouse_has_node",
        node.is_some() && npm.is_some(),
        &[&node, &npm],
        "node and npm (apt-get install nodejs npm)",
    );
    have(
        "gatehouse_has_python_venv",
        venv,
        &[&python],
        "python3 with venv (apt-get install python3-venv)",
    );
    have(
        "gatehouse_has_chattr",
        chattr.is_some() && is_root(),
        &[&chattr],
        "root and chattr (e2fsprogs) to make a directory immutable",
    );
    have(
        "gatehouse_has_otlp_collector",
        collector,
        &[],
        "an OTLP collector (GATEHOUSE_OTLP_COLLECTOR naming rotel's rotel-agent, as .ci/run sets it)",
    );
    have(
        "gatehouse_has_wasm32_wasip1",
        wasm_std.as_ref().is_some_and(|dir| dir.is_dir()),
        &[],
        "the wasm32-wasip1 target to build proxy-wasm plugins (rustup target add wasm32-wasip1)",
    );
    // The directory of the toolchain's targets changes when one is added.
    if let Some(targets) = wasm_std.as_ref().and_then(|dir| dir.parent()) {
        println!("cargo::rerun-if-changed={}", targets.display());
    }
    if searched_in_vain {
        for dir in path.iter().filter(|dir| dir.is_dir()) {
            println!("cargo::rerun-if-changed={}", dir.display());
        }
    }
}

/// The first executable file `name` in the `PATH` directories.
fn find(path: &[PathBuf], name: &str) -> Option<PathBuf> {
    path.iter()
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where the toolchain building gatehouse keeps the standard library for `wasm32-wasip1`
/// (present once `rustup target add wasm32-wasip1` ran): the tests build their proxy-wasm
/// plugins with the same toolchain.
fn wasm32_wasip1_std() -> Option<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("--print")
        .arg("sysroot")
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    Some(Path::new(sysroot.trim()).join("lib/rustlib/wasm32-wasip1"))
}

/// Whether the build (and so, normally, the test run) is root's: `chattr +i` needs
/// CAP_LINUX_IMMUTABLE.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}
