//! The container image archive that `deploy/build-image.sh` writes (`target/gatehouse-image.tar`,
//! or `$GATEHOUSE_IMAGE`), checked with the tools that consume it: `skopeo` reads it as an
//! `oci-archive:` (labels, user, ports, entrypoint), `umoci` unpacks it into a runtime bundle
//! like a container engine would, and the binary in that root filesystem runs (`--version`,
//! `check` of the config the image ships at the path its `GATEHOUSE_CONFIG` names). The names
//! that `docker load`, `podman load` and `kind load image-archive` give the image are checked
//! in the archive's `index.json` and `manifest.json`.
//!
//! The archive needs the release musl build, which `cargo test` does not make, so the tests
//! of the archive are ignored by default, with the reason; `.ci/run` builds the archive, installs skopeo and
//! umoci, and runs them with `cargo test --test image -- --ignored`, where a missing piece
//! fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run_setup;
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// What the kubelet asks containerd for when a pod says `gatehouse:VERSION`.
fn normalized_name() -> String {
    format!("docker.io/library/gatehouse:{VERSION}")
}

/// The archive, once the OCI tools are known to be there.
fn prerequisites() -> PathBuf {
    let archive = std::env::var_os("GATEHOUSE_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target/gatehouse-image.tar"));
    assert!(
        archive.is_file(),
        "no image archive at {} (bash deploy/build-static.sh && bash deploy/build-image.sh)",
        archive.display()
    );
    for tool in ["skopeo", "umoci"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "no `{tool}` on PATH (Debian: apt-get install {tool})"
        );
    }
    archive
}

/// Run `cmd`, panicking with its output unless it succeeds; its stdout.
fn output(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    json(&text, &path.display().to_string())
}

fn skopeo_inspect(archive: &Path, extra: &[&str]) -> Value {
    let reference = format!("oci-archive:{}", archive.display());
    let text = output(
        Command::new("skopeo")
            .arg("inspect")
            .args(extra)
            .arg(&reference),
        &format!("skopeo inspect {} {reference}", extra.join(" ")),
    );
    json(&text, "skopeo inspect")
}

/// What skopeo reads from the archive: the crate's version and description, the documented
/// defaults (config path, ports, non-root user) and the entrypoint.
#[test]
#[ignore = "needs the image archive: bash deploy/build-static.sh && bash deploy/build-image.sh, then cargo test --test image -- --ignored"]
fn skopeo_reads_the_image_and_its_defaults() {
    let archive = prerequisites();
    let image = skopeo_inspect(&archive, &[]);
    let labels = &image["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"], VERSION,
        "{image:#}"
    );
    assert_eq!(
        labels["org.opencontainers.image.description"],
        env!("CARGO_PKG_DESCRIPTION"),
        "{image:#}"
    );
    assert_eq!(
        labels["io.gatehouse.config"], "/etc/gatehouse/proxy.toml",
        "{image:#}"
    );
    assert_eq!(labels["io.gatehouse.port.proxy"], "8080", "{image:#}");
    assert_eq!(labels["io.gatehouse.port.admin"], "9901", "{image:#}");
    assert_eq!(image["Architecture"], "amd64", "{image:#}");
    assert_eq!(image["Os"], "linux", "{image:#}");
    assert_eq!(
        image["Layers"].as_array().map(Vec::len),
        Some(1),
        "{image:#}"
    );

    let config = skopeo_inspect(&archive, &["--config"]);
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "{config:#}");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/gatehouse"]),
        "{config:#}"
    );
    assert_eq!(c["Cmd"], serde_json::json!(["run"]), "{config:#}");
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap_or_else(|| panic!("no Env: {config:#}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        env.contains(&"GATEHOUSE_CONFIG=/etc/gatehouse/proxy.toml"),
        "{env:?}"
    );
    let ports: Vec<&String> = c["ExposedPorts"]
        .as_object()
        .unwrap_or_else(|| panic!("no ExposedPorts: {config:#}"))
        .keys()
        .collect();
    assert_eq!(ports, ["8080/tcp", "9901/tcp"], "{config:#}");
}

/// The names the loaders give the image: containerd (kind, Docker's containerd store) takes
/// `io.containerd.image.name` verbatim, so it must be the normalized name the kubelet asks
/// for; podman normalizes `org.opencontainers.image.ref.name`; Docker's classic store reads
/// `manifest.json`, whose config and layer must be the OCI manifest's own blobs.
#[test]
#[ignore = "needs the image archive: bash deploy/build-static.sh && bash deploy/build-image.sh, then cargo test --test image -- --ignored"]
fn loaders_name_it_gatehouse_version() {
    let archive = prerequisites();
    let layout = tempfile::tempdir().unwrap();
    run_setup(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(layout.path()),
        "extract the archive",
    );
    let index = read_json(&layout.path().join("index.json"));
    let manifests = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(manifests.len(), 1, "{index:#}");
    let annotations = &manifests[0]["annotations"];
    assert_eq!(annotations["io.containerd.image.name"], normalized_name());
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"],
        normalized_name()
    );

    let blob = |digest: &Value| {
        let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
        format!("blobs/sha256/{hex}")
    };
    let manifest = read_json(&layout.path().join(blob(&manifests[0]["digest"])));
    let docker = read_json(&layout.path().join("manifest.json"));
    assert_eq!(
        docker,
        serde_json::json!([{
            "Config": blob(&manifest["config"]["digest"]),
            "RepoTags": [format!("gatehouse:{VERSION}")],
            "Layers": [blob(&manifest["layers"][0]["digest"])],
        }]),
        "manifest.json against the OCI manifest {manifest:#}"
    );
}

/// umoci unpacks the image into a runtime bundle; the binary in its root filesystem is the
/// crate's version and passes `check` of the config shipped at the image's config path, which
/// is deploy/kubernetes/base/proxy.toml. The bundle's process is what an engine would run:
/// gatehouse `run` as 65532 with GATEHOUSE_CONFIG set, and there is no shell to run anything
/// else.
#[test]
#[ignore = "needs the image archive: bash deploy/build-static.sh && bash deploy/build-image.sh, then cargo test --test image -- --ignored"]
fn unpacked_root_filesystem_runs() {
    let archive = prerequisites();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let bundle = work.path().join("bundle");
    std::fs::create_dir(&layout).unwrap();
    run_setup(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
        "extract the archive",
    );
    run_setup(
        Command::new("umoci")
            .arg("unpack")
            .arg("--rootless")
            .arg("--image")
            .arg(format!("{}:{}", layout.display(), normalized_name()))
            .arg(&bundle),
        "umoci unpack",
    );

    let runtime = read_json(&bundle.join("config.json"));
    let process = &runtime["process"];
    assert_eq!(process["user"]["uid"], 65532, "{process:#}");
    assert_eq!(process["user"]["gid"], 65532, "{process:#}");
    assert_eq!(
        process["args"],
        serde_json::json!(["/usr/local/bin/gatehouse", "run"]),
        "{process:#}"
    );
    let config_path = process["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("GATEHOUSE_CONFIG="))
        .unwrap_or_else(|| panic!("no GATEHOUSE_CONFIG in {process:#}"));

    let rootfs = bundle.join("rootfs");
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!rootfs.join(shell).exists(), "the image has /{shell}");
    }
    let shipped = rootfs.join(config_path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read(&shipped).unwrap_or_else(|e| panic!("{}: {e}", shipped.display())),
        std::fs::read(Path::new(ROOT).join("deploy/kubernetes/base/proxy.toml")).unwrap(),
        "{config_path} in the image is not deploy/kubernetes/base/proxy.toml: rebuild the \
         archive (bash deploy/build-image.sh)"
    );

    let binary = rootfs.join(process["args"][0].as_str().unwrap().trim_start_matches('/'));
    let version = output(
        Command::new(&binary).arg("--version"),
        "gatehouse --version",
    );
    assert_eq!(version.trim(), format!("gatehouse {VERSION}"));

    // The path the image's environment names, mapped into the unpacked root filesystem; the
    // variables are the ones the pod sets (the key from a Secret).
    let check = output(
        Command::new(&binary)
            .arg("check")
            .env_clear()
            .env("GATEHOUSE_CONFIG", &shipped)
            .env("API_KEY", "image-test-key"),
        "gatehouse check of the shipped config",
    );
    assert!(
        check.contains("-> upstream http://127.0.0.1:8000"),
        "{check}"
    );
}

/// Two builds from the same binary and commit are the same bytes (fixed mtimes and owners,
/// sorted entries, gzip without a timestamp), so the image's digest identifies its inputs.
#[test]
#[ignore = "needs the image archive: bash deploy/build-static.sh && bash deploy/build-image.sh, then cargo test --test image -- --ignored"]
fn the_archive_is_reproducible() {
    let binary = Path::new(ROOT).join("target/x86_64-unknown-linux-musl/release/gatehouse");
    assert!(
        binary.is_file(),
        "no static binary at {} (bash deploy/build-static.sh)",
        binary.display()
    );
    let work = tempfile::tempdir().unwrap();
    let build = |name: &str| {
        let out = work.path().join(name);
        run_setup(
            Command::new("bash")
                .arg(Path::new(ROOT).join("deploy/build-image.sh"))
                .env("GATEHOUSE_BIN", &binary)
                .env("GATEHOUSE_IMAGE", &out)
                .env("SOURCE_DATE_EPOCH", "1700000000"),
            "bash deploy/build-image.sh",
        );
        std::fs::read(out).unwrap()
    };
    let (first, second) = (build("a.tar"), build("b.tar"));
    assert!(first == second, "two builds of the image differ");
}

/// `build-static.sh` checks its one argument before it installs or builds anything: a typo
/// must not start a 14-minute trained build, or a plain one the user did not ask for.
#[test]
fn build_static_refuses_an_unknown_argument() {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("deploy/build-static.sh"))
        .arg("--pgo-off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "build-static: unknown argument '--pgo-off' (usage: build-static.sh [--no-pgo])"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing ran before the check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
