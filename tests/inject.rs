//! `gatehouse inject`, run as a user runs it, on fixtures modelled on multi-service apps
//! (`tests/fixtures/kubernetes/`): every result is validated offline against the Kubernetes
//! 1.29 schemas (kubernetes-validate, as `deploy/validate.sh` does, in its venv), checked by
//! `deploy/check_drain.py`, read back by an independent YAML reader (PyYAML) and followed
//! from each Service's port to the container it reaches and on to gatehouse's upstream.
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{cli, gatehouse_cmd, run_setup, CliOutput};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
        .join(name)
}

fn inject(file: &Path) -> CliOutput {
    let config = fixture("proxy.toml");
    let args = [
        "inject",
        "--config",
        config.to_str().unwrap(),
        file.to_str().unwrap(),
    ];
    cli(&args, &[], None)
}

/// Where a Service port should land: gatehouse in front of `app` (the app's port), or a
/// container's own port (one gatehouse does not front).
enum Lands {
    Gatehouse { workload: &'static str, app: u16 },
    Direct { container: &'static str, port: u16 },
}

struct Case {
    file: &'static str,
    /// Workloads (kind/name) and the app port gatehouse must front.
    injected: &'static [(&'static str, u16)],
    /// Workloads that must come out without the sidecar.
    untouched: &'static [&'static str],
    /// Service name, Service port, where it must land.
    routes: &'static [(&'static str, u16, Lands)],
}

const CASES: &[Case] = &[
    Case {
        file: "shop.yaml",
        injected: &[
            ("deployment/storefront", 8080),
            ("deployment/catalog", 50051),
            ("deployment/cart", 7070),
            ("deployment/checkout", 3000),
        ],
        untouched: &["deployment/backoffice", "deployment/order-worker"],
        routes: &[
            (
                "storefront",
                80,
                Lands::Gatehouse {
                    workload: "deployment/storefront",
                    app: 8080,
                },
            ),
            (
                "catalog",
                50051,
                Lands::Gatehouse {
                    workload: "deployment/catalog",
                    app: 50051,
                },
            ),
            (
                "cart",
                7070,
                Lands::Gatehouse {
                    workload: "deployment/cart",
                    app: 7070,
                },
            ),
            (
                "checkout",
                80,
                Lands::Gatehouse {
                    workload: "deployment/checkout",
                    app: 3000,
                },
            ),
            (
                "checkout",
                9102,
                Lands::Direct {
                    container: "exporter",
                    port: 9102,
                },
            ),
        ],
    },
    Case {
        file: "search.yaml",
        injected: &[("statefulset/search", 9200)],
        untouched: &[],
        routes: &[
            (
                "search-peers",
                9200,
                Lands::Gatehouse {
                    workload: "statefulset/search",
                    app: 9200,
                },
            ),
            (
                "search-peers",
                9300,
                Lands::Direct {
                    container: "node",
                    port: 9300,
                },
            ),
            (
                "search",
                9200,
                Lands::Gatehouse {
                    workload: "statefulset/search",
                    app: 9200,
                },
            ),
        ],
    },
    Case {
        file: "jobs.yaml",
        injected: &[
            ("cronjob/nightly-report", 9000),
            ("job/migrate-2026-12", 8080),
        ],
        untouched: &[],
        routes: &[],
    },
    Case {
        file: "list.yaml",
        injected: &[
            ("daemonset/node-agent", 9901),
            ("pod/debug-echo", 5678),
            ("replicaset/legacy-web", 80),
        ],
        untouched: &[],
        routes: &[(
            "node-agent",
            80,
            Lands::Gatehouse {
                workload: "daemonset/node-agent",
                app: 9901,
            },
        )],
    },
];

/// Reads a YAML stream with PyYAML, `kind: List` items as objects of their own; writes them
/// to `argv[2]` as a stream for the validators and prints them as JSON.
const FLATTEN: &str = r#"
import json, sys, yaml
with open(sys.argv[1]) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
flat = []
for d in docs:
    flat.extend(d["items"] if d.get("kind") == "List" else [d])
with open(sys.argv[2], "w") as f:
    yaml.safe_dump_all(flat, f, sort_keys=False)
json.dump(flat, sys.stdout)
"#;

/// The venv `deploy/validate.sh` uses, with the validator it pins.
fn validator_venv() -> PathBuf {
    common::python_venv("ci-venv", "tests/fixtures/kubernetes/requirements.txt")
}

fn kind_name(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["kind"].as_str().unwrap().to_lowercase(),
        obj["metadata"]["name"].as_str().unwrap()
    )
}

fn pod_template(obj: &Value) -> &Value {
    match obj["kind"].as_str().unwrap() {
        "Pod" => obj,
        "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"],
        _ => &obj["spec"]["template"],
    }
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    let spec = &pod["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
}

/// The (container name, port number) a Service port's target reaches in `pod`.
fn resolve(service_port: &Value, pod: &Value) -> (String, u64) {
    let target = match &service_port["targetPort"] {
        Value::Null => &service_port["port"],
        t => t,
    };
    for c in containers(pod) {
        for p in c["ports"].as_array().into_iter().flatten() {
            let hit = match target {
                Value::String(name) => p["name"].as_str() == Some(name),
                n => p["containerPort"] == *n,
            };
            if hit {
                let name = c["name"].as_str().unwrap().to_owned();
                return (name, p["containerPort"].as_u64().unwrap());
            }
        }
    }
    panic!("targetPort {target} reaches no container port of the pod")
}

/// The port number of the named port of the `gatehouse` container.
fn gatehouse_port(pod: &Value, name: &str) -> u64 {
    let sidecar = containers(pod).find(|c| c["name"] == "gatehouse").unwrap();
    let port = sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name);
    port.unwrap()["containerPort"].as_u64().unwrap()
}

/// The config gatehouse reads in `pod`: its ConfigMap (the one its volume names), parsed.
fn pod_config<'a>(pod: &Value, by_name: &HashMap<String, &'a Value>) -> (&'a Value, toml::Value) {
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "gatehouse-config")
        .unwrap();
    let name = volume["configMap"]["name"].as_str().unwrap();
    let cm = by_name[&format!("configmap/{name}")];
    let config = cm["data"]["proxy.toml"].as_str().unwrap().parse().unwrap();
    (cm, config)
}

fn toml_port(table: &toml::Value, path: &str) -> u64 {
    let addr: std::net::SocketAddr = table[path]["listen"].as_str().unwrap().parse().unwrap();
    u64::from(addr.port())
}

#[test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) for the Kubernetes schema validator"
)]
fn every_workload_is_injected_validated_and_routed_through_gatehouse() {
    let venv = validator_venv();
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let input = fixture(case.file);
        let out = inject(&input);
        assert_eq!(out.code, Some(0), "{}: {}", case.file, out.stderr);
        let injected = dir.path().join(case.file);
        std::fs::write(&injected, &out.stdout).unwrap();
        let flat = dir.path().join(format!("flat-{}", case.file));

        // An independent reader, then the repository's validators.
        let objects = read_objects(&venv, &injected, &flat);
        run_setup(
            Command::new(venv.join("bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", "1.29.0"])
                .arg(&flat),
            &format!("kubernetes-validate of inject's output for {}", case.file),
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        run_setup(
            Command::new(venv.join("bin/python"))
                .arg(root.join("deploy/check_drain.py"))
                .arg(&flat),
            &format!("deploy/check_drain.py of inject's output for {}", case.file),
        );

        let by_name: HashMap<String, &Value> = objects.iter().map(|o| (kind_name(o), o)).collect();
        let originals = flatten_original(&venv, &input, dir.path());
        for (workload, app) in case.injected {
            let obj = by_name
                .get(*workload)
                .unwrap_or_else(|| panic!("{workload} in the output"));
            let pod = pod_template(obj);
            let sidecar = &pod["spec"]["initContainers"][0];
            assert_eq!(sidecar["name"], "gatehouse", "{workload}");
            assert_eq!(sidecar["restartPolicy"], "Always", "{workload}");
            assert_eq!(
                sidecar["image"],
                concat!("gatehouse:", env!("CARGO_PKG_VERSION"))
            );
            assert_eq!(sidecar["imagePullPolicy"], "IfNotPresent");
            let sc = &sidecar["securityContext"];
            assert_eq!(
                (&sc["runAsNonRoot"], &sc["runAsUser"]),
                (&Value::Bool(true), &Value::from(65532))
            );
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert_eq!(sidecar["resources"]["limits"]["memory"], "128Mi");
            for (probe, path) in [
                ("startupProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
                ("livenessProbe", "/healthz"),
            ] {
                let get = &sidecar[probe]["httpGet"];
                assert_eq!(
                    (&get["path"], &get["port"]),
                    (&Value::from(path), &Value::from("gatehouse-admin")),
                    "{workload} {probe}"
                );
            }

            let (cm, config) = pod_config(pod, &by_name);
            assert_eq!(cm["metadata"]["namespace"], obj["metadata"]["namespace"]);
            assert_eq!(
                config["upstream"]["url"].as_str(),
                Some(format!("http://127.0.0.1:{app}").as_str()),
                "{workload}"
            );
            // A gRPC app (its port has a gRPC probe) is spoken to over h2c.
            let grpc = *workload == "deployment/catalog";
            assert_eq!(
                config["upstream"].get("protocol").and_then(|p| p.as_str()),
                grpc.then_some("h2c"),
                "{workload}"
            );
            assert_eq!(
                toml_port(&config, "server"),
                gatehouse_port(pod, "gatehouse")
            );
            assert_eq!(
                toml_port(&config, "admin"),
                gatehouse_port(pod, "gatehouse-admin")
            );
            // Comments of the user's file survive into the copy.
            assert!(cm["data"]["proxy.toml"]
                .as_str()
                .unwrap()
                .contains("# keep serving while endpoints drop the pod"));
            // gatehouse's ports are its own: no other container's, not the app's.
            let mut others: Vec<u64> = containers(pod)
                .filter(|c| c["name"] != "gatehouse")
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .map(|p| p["containerPort"].as_u64().unwrap())
                .collect();
            others.push(u64::from(*app));
            let ours = [
                gatehouse_port(pod, "gatehouse"),
                gatehouse_port(pod, "gatehouse-admin"),
            ];
            assert!(
                ours[0] != ours[1] && !ours.iter().any(|p| others.contains(p)),
                "{workload}: {ours:?} vs {others:?}"
            );

            // The grace period covers the app's own (30s by default), then gatehouse's
            // 5s + 20s drain.
            let before = pod_template(&originals[*workload])["spec"]
                ["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            let after = pod["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap();
            assert!(
                after >= before.max(25) + 25,
                "{workload}: {before}s became {after}s"
            );
        }
        for workload in case.untouched {
            let pod = pod_template(by_name[*workload]);
            assert!(
                containers(pod).all(|c| c["name"] != "gatehouse"),
                "{workload}"
            );
        }

        for (service, port, lands) in case.routes {
            let svc = by_name[&format!("service/{service}")];
            let sp = svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["port"] == *port)
                .unwrap_or_else(|| panic!("service/{service} port {port}"));
            match lands {
                Lands::Gatehouse { workload, app } => {
                    let pod = pod_template(by_name[*workload]);
                    let (container, number) = resolve(sp, pod);
                    assert_eq!(container, "gatehouse", "service/{service}:{port}");
                    assert_eq!(number, gatehouse_port(pod, "gatehouse"));
                    let (_, config) = pod_config(pod, &by_name);
                    assert_eq!(toml_port(&config, "server"), number);
                    assert_eq!(
                        config["upstream"]["url"].as_str(),
                        Some(format!("http://127.0.0.1:{app}").as_str())
                    );
                }
                Lands::Direct {
                    container,
                    port: want,
                } => {
                    let pod = objects
                        .iter()
                        .filter(|o| o["kind"] != "Service" && o["kind"] != "ConfigMap")
                        .map(pod_template)
                        .find(|p| containers(p).any(|c| c["name"] == *container))
                        .unwrap();
                    assert_eq!(
                        resolve(sp, pod),
                        ((*container).to_owned(), u64::from(*want))
                    );
                }
            }
        }

        // Injecting the output again changes nothing.
        let again = inject(&injected);
        assert_eq!(again.code, Some(0), "{}", again.stderr);
        assert_eq!(again.stdout, out.stdout, "{}: inject | inject", case.file);
    }
}

/// The input's objects (PyYAML), by kind/name.
fn flatten_original(venv: &Path, input: &Path, dir: &Path) -> HashMap<String, Value> {
    read_objects(venv, input, &dir.join("original.yaml"))
        .into_iter()
        .map(|o| (kind_name(&o), o))
        .collect()
}

/// `input`'s objects as PyYAML reads them (a List's items flattened), also written to
/// `flat` as one object per document for the validators.
fn read_objects(venv: &Path, input: &Path, flat: &Path) -> Vec<Value> {
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", FLATTEN])
        .arg(input)
        .arg(flat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: PyYAML: {}",
        input.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A config change reaches the pods: each ConfigMap's name ends in a hash of its content
/// and the pod template mounts it by name (and carries the hash), so injecting inject's
/// output with a changed config changes every pod template, which rolls the pods; with the
/// same config nothing changes.
#[test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) for the Kubernetes schema validator"
)]
fn a_changed_config_renames_the_configmap_and_rolls_the_pods() {
    let venv = validator_venv();
    let dir = tempfile::tempdir().unwrap();
    let first = inject(&fixture("shop.yaml"));
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let once = dir.path().join("once.yaml");
    std::fs::write(&once, &first.stdout).unwrap();

    // The same config: not a byte changes, and nothing is said.
    let same = inject(&once);
    assert_eq!(same.code, Some(0), "{}", same.stderr);
    assert_eq!(same.stdout, first.stdout);
    assert!(!same.stderr.contains("config changed"), "{}", same.stderr);

    // Another chain and a longer drain.
    let config = dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(fixture("proxy.toml")).unwrap();
    let changed_text = text.replace("shutdown_grace = \"20s\"", "shutdown_grace = \"40s\"")
        + "\n[[middleware]]\ntype = \"timing\"\n";
    assert_ne!(changed_text, text);
    std::fs::write(&config, changed_text).unwrap();
    let again = |input: &Path| {
        let args = [
            "inject",
            "--config",
            config.to_str().unwrap(),
            input.to_str().unwrap(),
        ];
        cli(&args, &[], None)
    };
    let out = again(&once);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let twice = dir.path().join("twice.yaml");
    std::fs::write(&twice, &out.stdout).unwrap();

    let before = read_objects(&venv, &once, &dir.path().join("flat-once.yaml"));
    let flat = dir.path().join("flat-twice.yaml");
    let after = read_objects(&venv, &twice, &flat);
    run_setup(
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.29.0"])
            .arg(&flat),
        "kubernetes-validate of inject's output re-injected with a changed config",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_setup(
        Command::new(venv.join("bin/python"))
            .arg(root.join("deploy/check_drain.py"))
            .arg(&flat),
        "deploy/check_drain.py of inject's output re-injected with a changed config",
    );
    let by_name: HashMap<String, &Value> = after.iter().map(|o| (kind_name(o), o)).collect();
    let old_names: HashMap<String, &Value> = before.iter().map(|o| (kind_name(o), o)).collect();
    assert_eq!(
        before.len(),
        after.len(),
        "each ConfigMap replaced, none added"
    );

    let mut updated = 0;
    for old in &before {
        let name = kind_name(old);
        if old["kind"] == "ConfigMap" {
            // inject's own are followed from their workloads below.
            if old["metadata"]["labels"]["app.kubernetes.io/managed-by"] != "gatehouse-inject" {
                assert_eq!(old, by_name[&name], "{name} changed");
            }
            continue;
        }
        let new = by_name[&name];
        if old["kind"] == "Service"
            || !containers(pod_template(old)).any(|c| c["name"] == "gatehouse")
        {
            assert_eq!(old, new, "{name} changed");
            continue;
        }
        updated += 1;
        let (old_pod, new_pod) = (pod_template(old), pod_template(new));
        let (old_cm, _) = pod_config(old_pod, &old_names);
        let (new_cm, config) = pod_config(new_pod, &by_name);
        let (old_cm, new_cm) = (
            old_cm["metadata"]["name"].as_str().unwrap(),
            new_cm["metadata"]["name"].as_str().unwrap(),
        );
        assert_ne!(old_cm, new_cm, "{name}: the same ConfigMap name");
        assert!(
            !by_name.contains_key(&format!("configmap/{old_cm}")),
            "{name}: the old ConfigMap {old_cm} is still in the output"
        );
        let hash = new_pod["metadata"]["annotations"]["gatehouse.io/config-hash"]
            .as_str()
            .unwrap();
        assert!(new_cm.ends_with(&format!("-{hash}")), "{name}: {new_cm}");
        assert_eq!(
            config["middleware"].as_array().unwrap().last().unwrap()["type"].as_str(),
            Some("timing"),
            "{name}: the new chain"
        );
        // The app keeps its grace period (what the old one held beyond gatehouse's 25s drain
        // and the 10s margin, and at least the drain); gatehouse's grew to 45s.
        let grace = |pod: &Value| {
            pod["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap()
        };
        let app = grace(old_pod) - 25 - 10;
        assert_eq!(grace(new_pod), app.max(45) + 45 + 10, "{name}");
        // The containers are as they were: only what points at the config changed.
        assert_eq!(
            containers(old_pod).collect::<Vec<_>>(),
            containers(new_pod).collect::<Vec<_>>(),
            "{name}"
        );
        assert!(
            out.stderr.contains(&format!(
                "{name}: its config changed: it now mounts ConfigMap {new_cm} instead of \
                 {old_cm}; applying it rolls its pods"
            )),
            "{}",
            out.stderr
        );
    }
    assert_eq!(updated, 4, "the four injected Deployments of shop.yaml");

    // Updated once, it is as injected: the changed config again changes nothing.
    let same = again(&twice);
    assert_eq!(same.code, Some(0), "{}", same.stderr);
    assert_eq!(same.stdout, out.stdout);
}

/// Documents inject does not change come out byte for byte: comments, anchors, quoting.
#[test]
fn documents_it_does_not_change_are_written_back_byte_for_byte() {
    let input = std::fs::read_to_string(fixture("shop.yaml")).unwrap();
    let out = inject(&fixture("shop.yaml"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut kept = 0;
    for doc in input.split("\n---\n") {
        let workload = doc.contains("kind: Deployment") || doc.contains("kind: Service");
        let left_alone =
            doc.contains("gatehouse.io/inject: \"false\"") || doc.contains("name: order-worker");
        if !workload || left_alone {
            assert!(out.stdout.contains(doc), "not kept as it was:\n{doc}");
            kept += 1;
        }
    }
    assert_eq!(
        kept, 4,
        "the header, the settings ConfigMap, the opted-out and the portless Deployment"
    );
    assert!(
        out.stderr
            .contains("deployment/order-worker: left as it is: no container declares a port"),
        "{}",
        out.stderr
    );
    // A changed document keeps its comments before its content.
    assert!(out.stdout.contains(
        "---\n# The storefront listens on 8080, gatehouse's default port: gatehouse takes the next one.\napiVersion: apps/v1\n"
    ));

    let injected = std::fs::read_to_string(fixture("injected.yaml")).unwrap();
    let out = inject(&fixture("injected.yaml"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout, injected,
        "an injected workload and its Service are left alone"
    );
}

#[test]
fn reads_standard_input() {
    let config = fixture("proxy.toml");
    let input = std::fs::read(fixture("jobs.yaml")).unwrap();
    let from_file = inject(&fixture("jobs.yaml"));
    for args in [&["-"][..], &[]] {
        let mut child = gatehouse_cmd()
            .args(["inject", "--config", config.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), from_file.stdout);
    }
}

/// Runs inject on `yaml` written to a file; returns (exit code, stderr, the file's path).
fn inject_text(yaml: &str) -> (Option<i32>, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = inject(&path);
    (out.code, out.stderr, out.stdout, dir)
}

const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n        - {name: web, image: web, ports: [{containerPort: 80}]}\n";

#[test]
fn unreadable_yaml_names_file_document_and_line() {
    let (code, stderr, stdout, dir) = inject_text(&format!(
        "{WEB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web\nspec: {{}}\n"
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "nothing is written on error: {stdout}");
    let path = dir.path().join("input.yaml");
    assert!(
        stderr.starts_with(&format!(
            "gatehouse: error: {}:18:5: document 2: ",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn two_app_containers_need_the_annotation() {
    let two = WEB.replace(
        "        - {name: web, image: web, ports: [{containerPort: 80}]}\n",
        "        - {name: web, image: web, ports: [{containerPort: 80}]}\n        - {name: admin, image: admin, ports: [{containerPort: 81}]}\n",
    );
    let (code, stderr, stdout, _dir) = inject_text(&two);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("deployment/web: containers web, admin all declare ports")
            && stderr.contains("gatehouse.io/container: <name>"),
        "{stderr}"
    );
    let annotated = two.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web}\n      annotations: {gatehouse.io/container: admin}\n",
    );
    let (code, stderr, stdout, _dir) = inject_text(&annotated);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("url = \"http://127.0.0.1:81\""), "{stdout}");
}

#[test]
fn a_service_selecting_a_pod_without_ports_needs_the_annotation() {
    let portless = WEB.replace(", ports: [{containerPort: 80}]", "");
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n";
    let (code, stderr, _, _dir) = inject_text(&format!("{portless}---\n{service}"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "service/web selects deployment/web, none of whose containers declares a port"
        ) && stderr.contains("gatehouse.io/app-port: <number>"),
        "{stderr}"
    );
}

#[test]
fn a_service_shared_with_an_opted_out_workload_is_refused() {
    let opted_out = WEB.replace(
        "name: web\n",
        "name: old-web\n  annotations: {gatehouse.io/inject: \"false\"}\n",
    );
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n";
    let (code, stderr, _, _dir) = inject_text(&format!("{WEB}---\n{opted_out}---\n{service}"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "service/web: port 1 reaches both deployment/web (injected) and deployment/old-web"
        ),
        "{stderr}"
    );
}

#[test]
fn an_invalid_config_exits_2_with_the_loaders_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[server]\nlisten = \"0.0.0.0:8080\"\nshutdown_grace = \"soon\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    let input = fixture("shop.yaml");
    let args = [
        "inject",
        "--config",
        config.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
    let out = cli(&args, &[], None);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let check = cli(&["check", "--config", config.to_str().unwrap()], &[], None);
    assert_eq!(check.code, Some(2));
    assert_eq!(
        out.stderr, check.stderr,
        "the same message as gatehouse check"
    );
    assert!(
        out.stderr.contains(&format!("{}:3:", config.display())),
        "{}",
        out.stderr
    );
}

/// A `${VAR}` the config needs in the pod is the user's to provide: inject says so.
#[test]
fn variables_the_sidecar_needs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[server]\nlisten = \"0.0.0.0:8080\"\n[upstream]\nurl = \"${APP_URL:-http://127.0.0.1:1}\"\n[[middleware]]\ntype = \"api_key\"\nheader = \"x-api-key\"\nkeys = [{ id = \"k\", key = \"${API_KEY}\" }]\n").unwrap();
    let input = fixture("jobs.yaml");
    let args = [
        "inject",
        "--config",
        config.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
    let out = cli(&args, &[("API_KEY", "set-where-inject-runs")], None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("reads ${API_KEY} with no default: give the gatehouse containers API_KEY")
            && !out.stderr.contains("APP_URL"),
        "{}",
        out.stderr
    );
    // The copies keep the reference, never the value.
    assert!(
        out.stdout.contains("key = \"${API_KEY}\"")
            && !out.stdout.contains("set-where-inject-runs")
    );
}

/// The app on a Unix socket (`gatehouse.io/app-socket`): both containers mount one in-memory
/// volume, gatehouse's upstream is the socket, and the app's probes of its port (which it no
/// longer listens on) move to gatehouse's; the one the chain would refuse is named.
#[test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) for the Kubernetes schema validator"
)]
fn an_app_on_a_unix_socket_shares_a_volume_and_its_probes_go_through_gatehouse() {
    let venv = validator_venv();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"0.0.0.0:8080\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
         [[middleware]]\ntype = \"api_key\"\nheader = \"x-api-key\"\n\
         keys = [{ id = \"k\", key = \"secret\" }]\nskip_paths = [\"/healthz\"]\n",
    )
    .unwrap();
    let app = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\nspec:\n  selector:\n    matchLabels: {app: api}\n  template:\n    metadata:\n      labels: {app: api}\n      annotations: {gatehouse.io/app-socket: /run/app/app.sock}\n    spec:\n      containers:\n        - name: api\n          image: api:1\n          args: [--uds, /run/app/app.sock]\n          ports: [{name: http, containerPort: 8000}]\n          readinessProbe: {httpGet: {path: /healthz, port: http}}\n          startupProbe: {httpGet: {path: /ready, port: 8000, httpHeaders: [{name: x-api-key, value: secret}]}}\n          livenessProbe: {httpGet: {path: /live, port: 8000}}\n        - name: metrics\n          image: exporter:1\n          readinessProbe: {tcpSocket: {port: 8000}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  selector: {app: api}\n  ports: [{port: 80, targetPort: http}]\n";
    let input = dir.path().join("in.yaml");
    std::fs::write(&input, app).unwrap();
    let args = [
        "inject",
        "--config",
        config.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
    let out = cli(&args, &[], None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let injected = dir.path().join("out.yaml");
    std::fs::write(&injected, &out.stdout).unwrap();
    let flat = dir.path().join("flat.yaml");
    let json = Command::new(venv.join("bin/python"))
        .args(["-c", FLATTEN])
        .arg(&injected)
        .arg(&flat)
        .output()
        .unwrap();
    assert!(json.status.success());
    run_setup(
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.29.0"])
            .arg(&flat),
        "kubernetes-validate of inject's output",
    );
    let objects: Vec<Value> = serde_json::from_slice(&json.stdout).unwrap();
    let by_name: HashMap<String, &Value> = objects.iter().map(|o| (kind_name(o), o)).collect();
    let pod = pod_template(by_name["deployment/api"]);

    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "gatehouse-app-socket")
        .expect("the socket's volume");
    assert_eq!(volume["emptyDir"]["medium"], "Memory");
    let mount = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "gatehouse-app-socket")
            .map(|m| (m["mountPath"].clone(), m["readOnly"].clone()))
    };
    let by = |name: &str| containers(pod).find(|c| c["name"] == name).unwrap();
    assert_eq!(
        mount(by("gatehouse")),
        Some(("/run/app".into(), true.into()))
    );
    assert_eq!(mount(by("api")), Some(("/run/app".into(), Value::Null)));
    assert_eq!(mount(by("metrics")), None);
    let (_, toml) = pod_config(pod, &by_name);
    assert_eq!(
        toml["upstream"]["url"].as_str(),
        Some("unix:/run/app/app.sock")
    );

    // The app's probes of its port (by name or number) reach gatehouse's port; another
    // container's are its own business.
    for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
        let port = &by("api")[probe]["httpGet"]["port"];
        assert_eq!(port, "gatehouse", "{probe}");
        assert_eq!(
            resolve(&serde_json::json!({ "targetPort": port }), pod),
            ("gatehouse".into(), 8080)
        );
    }
    assert_eq!(by("metrics")["readinessProbe"]["tcpSocket"]["port"], 8000);
    assert_eq!(
        resolve(&by_name["service/api"]["spec"]["ports"][0], pod),
        ("gatehouse".into(), 8080)
    );

    // The notes: how to start the app, and the one probe the chain refuses (the others are
    // exempt, or carry the key).
    let notes: Vec<&str> = out.stderr.lines().collect();
    assert!(
        notes.iter().any(|n| n.contains(
            "gatehouse reaches the app at unix:/run/app/app.sock: start container api listening there"
        ) && n.contains("uvicorn --uds /run/app/app.sock")),
        "{}",
        out.stderr
    );
    let refused: Vec<&&str> = notes.iter().filter(|n| n.contains("Probe (")).collect();
    assert_eq!(refused.len(), 1, "{}", out.stderr);
    assert!(
        refused[0].contains("livenessProbe (GET /live) now goes through gatehouse")
            && refused[0].contains("status 401 (denied by api_key: missing_credentials)"),
        "{}",
        out.stderr
    );

    // Injected output is left as it is.
    let again = cli(
        &[
            "inject",
            "--config",
            config.to_str().unwrap(),
            injected.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(again.stdout, out.stdout);
}

#[test]
fn a_socket_path_both_containers_cannot_share_is_refused() {
    for (path, why) in [
        ("app.sock", "expected an absolute path"),
        ("/app.sock", "the socket needs a directory of its own"),
        ("/run/../app.sock", "expected an absolute path"),
        (
            "/etc/gatehouse/app.sock",
            "gatehouse's config is mounted there",
        ),
    ] {
        let yaml = WEB.replace(
            "      labels: {app: web}\n",
            &format!("      labels: {{app: web}}\n      annotations: {{gatehouse.io/app-socket: {path:?}}}\n"),
        );
        let (code, stderr, stdout, _dir) = inject_text(&yaml);
        assert_eq!(code, Some(1), "{path}: {stderr}");
        assert!(stdout.is_empty());
        assert!(
            stderr.contains(&format!(
                "annotation gatehouse.io/app-socket: {path:?}: {why}"
            )),
            "{path}: {stderr}"
        );
    }
}
