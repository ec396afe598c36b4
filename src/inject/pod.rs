//! One pod template: which container and port gatehouse fronts, which ports it takes, and
//! the sidecar, volume and grace period it adds. The shape is the hand-written sidecar's in
//! `deploy/kubernetes/base/deployment.yaml`.

use std::collections::BTreeSet;

use super::yaml::{empty_map, empty_seq, Node};

/// Annotations a workload (or its pod template, which wins) may carry.
pub const INJECT: &str = "gatehouse.io/inject";
pub const CONTAINER: &str = "gatehouse.io/container";
pub const APP_PORT: &str = "gatehouse.io/app-port";
pub const PORT: &str = "gatehouse.io/port";
pub const ADMIN_PORT: &str = "gatehouse.io/admin-port";
pub const PROTOCOL: &str = "gatehouse.io/upstream-protocol";
pub const APP_SOCKET: &str = "gatehouse.io/app-socket";
/// Set on the pod template of every injected workload.
pub const INJECTED: &str = "gatehouse.io/injected";
/// Set with `INJECTED` by inject: the hash of the pod's config (the end of its ConfigMap's
/// name), and the drain its grace period covers. A template that has them is one inject
/// may update for a new config.
pub const CONFIG_HASH: &str = "gatehouse.io/config-hash";
const DRAIN: &str = "gatehouse.io/drain-seconds";

/// The sidecar's container name, and its ports' names (a Service's named `targetPort`
/// moves to `PORT_NAME`).
pub const NAME: &str = "gatehouse";
pub const PORT_NAME: &str = "gatehouse";
const ADMIN_PORT_NAME: &str = "gatehouse-admin";
const VOLUME: &str = "gatehouse-config";
/// The in-memory volume both containers mount for `APP_SOCKET`.
const SOCKET_VOLUME: &str = "gatehouse-app-socket";
/// A Unix socket's path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
const CONFIG_DIR: &str = "/etc/gatehouse";
pub const CONFIG_KEY: &str = "proxy.toml";

/// Where gatehouse's ports start looking for a free one.
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_ADMIN_PORT: u16 = 9901;
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: i64 = 30;
/// Beyond the two drains: the audit queue's flush and the process exit.
const GRACE_MARGIN: i64 = 10;
/// The distroless image's unprivileged user.
const NONROOT: i64 = 65532;

/// The port gatehouse forwards to: a container's port, by number and (if declared) name.
#[derive(Debug, Clone, PartialEq)]
pub struct AppPort {
    pub container: String,
    pub number: u16,
    pub name: Option<String>,
}

/// What injecting one pod template takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub app: AppPort,
    /// `upstream.protocol` for this pod: the annotation's, or `h2c` when the app's port
    /// has a gRPC probe (it speaks HTTP/2); `None` keeps the config's.
    pub protocol: Option<&'static str>,
    /// The Unix socket the app listens on (`APP_SOCKET`), instead of its port.
    pub socket: Option<String>,
    pub port: u16,
    pub admin: u16,
    pub grace: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Inject(Plan),
    /// Injected by inject before: the plan it was injected with, and the ConfigMap it
    /// mounts, which a changed config replaces.
    Update {
        plan: Plan,
        configmap: String,
    },
    OptedOut,
    /// A gatehouse sidecar inject did not write (no `CONFIG_HASH`): the user's to keep.
    AlreadyInjected,
    /// No container declares a TCP port and no annotation names one: a worker, most
    /// likely, with no traffic to proxy.
    NoPort,
}

/// The sidecar's settings, the same for every workload.
pub struct Sidecar<'a> {
    pub image: &'a str,
    /// `shutdown_delay + shutdown_grace`, rounded up to whole seconds.
    pub drain: i64,
}

/// Decides what to do with `template` (a pod template, or a Pod: `metadata` and `spec`);
/// `workload` is the object's own metadata, whose annotations apply too.
pub fn plan(template: &Node, workload: &Node, sidecar: &Sidecar) -> Result<Outcome, String> {
    let annotation = |key: &str| {
        template
            .at(&["metadata", "annotations", key])
            .or_else(|| workload.at(&["annotations", key]))
            .and_then(Node::as_str)
    };
    match annotation(INJECT) {
        None | Some("true") => {}
        Some("false") => return Ok(Outcome::OptedOut),
        Some(other) => {
            return Err(format!(
                "annotation {INJECT}: {other:?}: expected \"true\" or \"false\""
            ))
        }
    }
    let spec = template
        .get("spec")
        .ok_or("no pod spec (spec.template.spec)")?;
    let containers = spec.get("containers").map_or(&[][..], Node::as_seq);
    let init = spec.get("initContainers").map_or(&[][..], Node::as_seq);
    let all = || containers.iter().chain(init);
    let injected = annotation(INJECTED).is_some() || all().any(|c| name(c) == Some(NAME));
    // Only what inject wrote carries the hash: a sidecar written by hand is the user's.
    if injected
        && template
            .at(&["metadata", "annotations", CONFIG_HASH])
            .is_none()
    {
        return Ok(Outcome::AlreadyInjected);
    }
    if containers.is_empty() {
        return Err("the pod has no containers".into());
    }
    if !injected
        && annotation(CONTAINER).is_none()
        && annotation(APP_PORT).is_none()
        && containers.iter().all(|c| ports(c, true).is_empty())
    {
        return Ok(Outcome::NoPort);
    }
    if spec.get("hostNetwork").and_then(Node::as_str) == Some("true") {
        return Err(format!(
            "the pod uses hostNetwork, so its ports are the node's and gatehouse cannot take \
             one safely: opt it out with the annotation {INJECT}: \"false\""
        ));
    }

    let app = app_port(containers, annotation(CONTAINER), annotation(APP_PORT))?;
    let socket = annotation(APP_SOCKET).map(socket_path).transpose()?;
    let app_container = containers
        .iter()
        .find(|c| name(c) == Some(app.container.as_str()));
    let protocol = |probed: u16| match annotation(PROTOCOL) {
        Some("h2c") => Ok(Some("h2c")),
        Some("http1") => Ok(Some("http1")),
        Some(other) => Err(format!(
            "annotation {PROTOCOL}: {other:?}: expected \"http1\" or \"h2c\""
        )),
        None => Ok(app_container
            .filter(|c| grpc_probe(c, probed))
            .map(|_| "h2c")),
    };
    let current = match spec.get("terminationGracePeriodSeconds") {
        None => DEFAULT_GRACE,
        Some(n) => n
            .as_int()
            .ok_or("terminationGracePeriodSeconds: expected a whole number of seconds")?,
    };
    if injected {
        let w = written(spec, init, annotation(DRAIN), current, sidecar)?;
        // With the app on a socket, its probes were moved to gatehouse's port.
        let probed = if socket.is_some() { w.port } else { app.number };
        return Ok(Outcome::Update {
            plan: Plan {
                protocol: protocol(probed)?,
                app,
                socket,
                port: w.port,
                admin: w.admin,
                grace: w.grace,
            },
            configmap: w.configmap,
        });
    }

    let protocol = protocol(app.number)?;
    let mut used: BTreeSet<u16> = all().flat_map(|c| ports(c, false)).map(|p| p.1).collect();
    used.insert(app.number);
    let port = choose_port(annotation(PORT), PORT, DEFAULT_PORT, &used)?;
    used.insert(port);
    let admin = choose_port(
        annotation(ADMIN_PORT),
        ADMIN_PORT,
        DEFAULT_ADMIN_PORT,
        &used,
    )?;

    for p in all().flat_map(|c| ports(c, false)) {
        if let Some(n) = p.0.filter(|n| *n == PORT_NAME || *n == ADMIN_PORT_NAME) {
            return Err(format!(
                "a container already has a port named {n}, which gatehouse's sidecar uses"
            ));
        }
    }
    let volumes = spec.get("volumes").map_or(&[][..], Node::as_seq);
    if let Some(v) = [VOLUME, SOCKET_VOLUME]
        .into_iter()
        .find(|v| volumes.iter().any(|have| name(have) == Some(v)))
    {
        return Err(format!(
            "the pod already has a volume named {v}, which gatehouse's sidecar uses"
        ));
    }
    if let Some(path) = &socket {
        let dir = socket_dir(path);
        let mounts = app_container
            .and_then(|c| c.get("volumeMounts"))
            .map_or(&[][..], Node::as_seq);
        if mounts
            .iter()
            .any(|m| m.get("mountPath").and_then(Node::as_str) == Some(dir))
        {
            return Err(format!(
                "annotation {APP_SOCKET}: container {} already mounts a volume at {dir}: put \
                 the socket in a directory of its own",
                app.container
            ));
        }
    }

    Ok(Outcome::Inject(Plan {
        app,
        protocol,
        socket,
        port,
        admin,
        grace: grace(current, sidecar.drain),
    }))
}

/// A native sidecar is stopped only once the app has exited: the pod's grace period must
/// cover the app's drain (`app`, taken as at least gatehouse's own), then gatehouse's.
fn grace(app: i64, drain: i64) -> i64 {
    app.max(drain) + drain + GRACE_MARGIN
}

/// What a template inject wrote before says of itself.
struct Written {
    port: u16,
    admin: u16,
    /// The grace period for the new drain: the app's own is what the current one holds
    /// beyond the drain it was written for.
    grace: i64,
    /// The ConfigMap it mounts.
    configmap: String,
}

fn written(
    spec: &Node,
    init: &[Node],
    drain: Option<&str>,
    current: i64,
    sidecar: &Sidecar,
) -> Result<Written, String> {
    let broken = |what: String| {
        format!(
            "annotation {CONFIG_HASH} says inject wrote it, but {what}: re-inject the \
             manifest as it was before inject, or remove the annotation to leave it as it is"
        )
    };
    let gatehouse = init
        .iter()
        .find(|c| name(c) == Some(NAME))
        .ok_or_else(|| broken(format!("it has no init container named {NAME}")))?;
    let declared = ports(gatehouse, false);
    let port = |wanted: &str| {
        declared
            .iter()
            .find(|p| p.0 == Some(wanted))
            .map(|p| p.1)
            .ok_or_else(|| broken(format!("container {NAME} has no port named {wanted}")))
    };
    let (port, admin) = (port(PORT_NAME)?, port(ADMIN_PORT_NAME)?);
    let configmap = spec
        .get("volumes")
        .map_or(&[][..], Node::as_seq)
        .iter()
        .find(|v| name(v) == Some(VOLUME))
        .and_then(|v| v.at(&["configMap", "name"]))
        .and_then(Node::as_str)
        .ok_or_else(|| broken(format!("it has no volume {VOLUME} from a ConfigMap")))?;
    let drain: i64 = drain
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| broken(format!("annotation {DRAIN} is not a number of seconds")))?;
    Ok(Written {
        port,
        admin,
        grace: grace(current - drain - GRACE_MARGIN, sidecar.drain),
        configmap: configmap.to_owned(),
    })
}

/// Whether a probe of `container` asks gRPC health on `port`.
fn grpc_probe(container: &Node, port: u16) -> bool {
    ["readinessProbe", "livenessProbe", "startupProbe"]
        .iter()
        .filter_map(|p| container.at(&[p, "grpc", "port"]))
        .any(|p| p.as_int() == Some(port.into()))
}

fn name(node: &Node) -> Option<&str> {
    node.get("name").and_then(Node::as_str)
}

/// The annotation's socket path, if it is one both containers can mount the directory of:
/// absolute, plain (no `.`, `..` or empty segments), not at the root nor under the config's
/// directory, and short enough for a socket address.
fn socket_path(text: &str) -> Result<String, String> {
    let plain = text.starts_with('/')
        && text[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    let dir = socket_dir(text);
    let problem = if !plain {
        "expected an absolute path such as /run/app/app.sock"
    } else if dir.is_empty() {
        "the socket needs a directory of its own (both containers mount it), not /"
    } else if dir == CONFIG_DIR || dir.starts_with(&format!("{CONFIG_DIR}/")) {
        "gatehouse's config is mounted there: choose another directory"
    } else if text.len() > MAX_SOCKET_PATH {
        "longer than a Unix socket address allows (107 bytes)"
    } else {
        return Ok(text.to_owned());
    };
    Err(format!("annotation {APP_SOCKET}: {text:?}: {problem}"))
}

/// The directory a socket path is in (empty for one at the root).
fn socket_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// A container's declared ports as (name, number), TCP only when `tcp_only`.
fn ports(container: &Node, tcp_only: bool) -> Vec<(Option<&str>, u16)> {
    let list = container.get("ports").map_or(&[][..], Node::as_seq);
    list.iter()
        .filter(|p| !tcp_only || p.get("protocol").and_then(Node::as_str).unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let number = p.get("containerPort")?.as_int()?;
            Some((name(p), u16::try_from(number).ok()?))
        })
        .collect()
}

fn describe_ports(list: &[(Option<&str>, u16)]) -> String {
    let each: Vec<String> = list
        .iter()
        .map(|(name, n)| match name {
            Some(name) => format!("{name} ({n})"),
            None => n.to_string(),
        })
        .collect();
    each.join(", ")
}

/// The container and port gatehouse fronts: the ones the annotations name, else the only
/// container with a TCP port, and its only one or the one named `http`.
fn app_port(
    containers: &[Node],
    container: Option<&str>,
    port: Option<&str>,
) -> Result<AppPort, String> {
    let names: Vec<&str> = containers.iter().filter_map(name).collect();
    let chosen = match container {
        Some(wanted) => containers
            .iter()
            .find(|c| name(c) == Some(wanted))
            .ok_or_else(|| {
                format!(
                    "annotation {CONTAINER}: {wanted:?} names no container of the pod (it has {})",
                    names.join(", ")
                )
            })?,
        None => {
            let serving: Vec<&Node> = containers
                .iter()
                .filter(|c| !ports(c, true).is_empty())
                .collect();
            match serving.as_slice() {
                [one] => one,
                [] if containers.len() == 1 => &containers[0],
                [] => {
                    return Err(format!(
                        "no container declares a TCP port: name the one gatehouse fronts with \
                         the annotation {CONTAINER}: <name> (containers: {}) and its port with \
                         {APP_PORT}: <number>",
                        names.join(", ")
                    ))
                }
                several => {
                    let which: Vec<&str> = several.iter().filter_map(|c| name(c)).collect();
                    return Err(format!(
                        "containers {} all declare ports: name the one gatehouse fronts with \
                         the annotation {CONTAINER}: <name> on the pod template (or the workload)",
                        which.join(", ")
                    ));
                }
            }
        }
    };
    let container = name(chosen).ok_or("a container has no name")?.to_owned();
    let declared = ports(chosen, true);
    let (name, number) = match port {
        Some(wanted) => match wanted.parse::<u16>() {
            Ok(n) if n > 0 => (declared.iter().find(|p| p.1 == n).and_then(|p| p.0), n),
            _ => *declared
                .iter()
                .find(|p| p.0 == Some(wanted))
                .ok_or_else(|| {
                    format!(
                    "annotation {APP_PORT}: {wanted:?} is neither a port number nor the name of \
                     a TCP port of container {container} (its ports: {})",
                    describe_ports(&declared)
                )
                })?,
        },
        None => match declared.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "container {container} declares no TCP port: give the port gatehouse \
                     fronts with the annotation {APP_PORT}: <number>"
                ))
            }
            // The conventional name of a container's HTTP port, when it has others
            // (metrics, debug) beside it.
            several => match several.iter().find(|p| p.0 == Some("http")) {
                Some(http) => *http,
                None => {
                    return Err(format!(
                        "container {container} declares several ports ({}) and none is named \
                         http: name the one gatehouse fronts with the annotation {APP_PORT}: \
                         <name or number>",
                        describe_ports(several)
                    ))
                }
            },
        },
    };
    Ok(AppPort {
        container,
        number,
        name: name.map(str::to_owned),
    })
}

/// The annotated port if free, else the first free one from `from`.
fn choose_port(
    annotated: Option<&str>,
    key: &str,
    from: u16,
    used: &BTreeSet<u16>,
) -> Result<u16, String> {
    match annotated {
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 && !used.contains(&p) => Ok(p),
            Ok(p) if p > 0 => Err(format!(
                "annotation {key}: {p} is already a port of the pod (or the app's): choose another"
            )),
            _ => Err(format!(
                "annotation {key}: {text:?}: expected a port number (1-65535)"
            )),
        },
        None => (from..=u16::MAX)
            .find(|p| !used.contains(p))
            .ok_or_else(|| format!("no free port from {from} up: choose one with {key}")),
    }
}

/// A probe of the app that [`apply`] moved to gatehouse's port, because the app listens on
/// a Unix socket and no longer on the port it probed: the kubelet's requests now pass
/// through the chain to the app.
#[derive(Debug, PartialEq)]
pub struct MovedProbe {
    /// `readinessProbe`, `livenessProbe` or `startupProbe`.
    pub probe: &'static str,
    pub kind: ProbeKind,
}

#[derive(Debug, PartialEq)]
pub enum ProbeKind {
    /// An `httpGet` probe: its path and `httpHeaders`.
    Http {
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A gRPC health check, which gatehouse forwards like any request.
    Grpc,
    /// A `tcpSocket` probe, which now reaches gatehouse's listener, not the app.
    Tcp,
}

/// The ConfigMap a pod's config is in: its name, and the hash of its content that ends it.
pub struct ConfigRef<'a> {
    pub name: &'a str,
    pub hash: &'a str,
}

/// Adds the sidecar, its config volume and the marker annotations to `template`, and
/// points it at its config (see [`repoint`]); with the app on a Unix socket, also the
/// socket's volume, and the app's probes of its port moved to gatehouse's (returned).
pub fn apply(
    template: &mut Node,
    plan: &Plan,
    sidecar: &Sidecar,
    config: &ConfigRef,
) -> Result<Vec<MovedProbe>, String> {
    template
        .child("metadata", empty_map)
        .and_then(|m| m.child("annotations", empty_map))
        .ok_or_else(|| shape("metadata.annotations"))?
        .set(INJECTED, Node::str("true"));
    let spec = template.get_mut("spec").ok_or_else(|| shape("spec"))?;
    spec.child("initContainers", empty_seq)
        .and_then(Node::as_seq_mut)
        .ok_or_else(|| shape("initContainers"))?
        .insert(0, container(plan, sidecar));
    spec.child("volumes", empty_seq)
        .and_then(Node::as_seq_mut)
        .ok_or_else(|| shape("volumes"))?
        .push(Node::map([("name", Node::str(VOLUME))]));
    repoint(template, plan, sidecar, config)?;
    let spec = template.get_mut("spec").ok_or_else(|| shape("spec"))?;
    let Some(socket) = &plan.socket else {
        return Ok(Vec::new());
    };
    spec.child("volumes", empty_seq)
        .and_then(Node::as_seq_mut)
        .ok_or_else(|| shape("volumes"))?
        .push(Node::map([
            ("name", Node::str(SOCKET_VOLUME)),
            (
                "emptyDir",
                Node::map([
                    ("medium", Node::str("Memory")),
                    ("sizeLimit", Node::str("1Mi")),
                ]),
            ),
        ]));
    let app = spec
        .get_mut("containers")
        .and_then(Node::as_seq_mut)
        .and_then(|cs| {
            cs.iter_mut()
                .find(|c| name(c) == Some(plan.app.container.as_str()))
        })
        .expect("planned from this template");
    app.child("volumeMounts", empty_seq)
        .and_then(Node::as_seq_mut)
        .ok_or_else(|| shape("volumeMounts"))?
        .push(Node::map([
            ("name", Node::str(SOCKET_VOLUME)),
            ("mountPath", Node::str(socket_dir(socket))),
        ]));
    Ok(move_probes(app, plan))
}

/// Points an injected `template` at the ConfigMap of its config: the config volume, the
/// hash annotation (so the pod template, and with it the pods, change when the config
/// does) and the grace period for the config's drain, recorded beside it.
pub fn repoint(
    template: &mut Node,
    plan: &Plan,
    sidecar: &Sidecar,
    config: &ConfigRef,
) -> Result<(), String> {
    let annotations = template
        .child("metadata", empty_map)
        .and_then(|m| m.child("annotations", empty_map))
        .ok_or_else(|| shape("metadata.annotations"))?;
    annotations.set(CONFIG_HASH, Node::str(config.hash));
    annotations.set(DRAIN, Node::str(sidecar.drain.to_string()));
    let spec = template.get_mut("spec").ok_or_else(|| shape("spec"))?;
    spec.get_mut("volumes")
        .and_then(Node::as_seq_mut)
        .and_then(|vs| vs.iter_mut().find(|v| name(v) == Some(VOLUME)))
        .ok_or_else(|| shape("volumes"))?
        .child("configMap", empty_map)
        .ok_or_else(|| shape("volumes[].configMap"))?
        .set("name", Node::str(config.name));
    spec.set("terminationGracePeriodSeconds", Node::int(plan.grace));
    Ok(())
}

fn shape(what: &str) -> String {
    format!("{what}: expected a mapping or list as Kubernetes has it")
}

/// Points the app container's probes of its port at gatehouse's instead.
fn move_probes(app: &mut Node, plan: &Plan) -> Vec<MovedProbe> {
    let targets_app = |port: Option<&Node>| {
        port.is_some_and(|p| {
            p.as_int() == Some(plan.app.number.into())
                || (p.as_str().is_some() && p.as_str() == plan.app.name.as_deref())
        })
    };
    let mut moved = Vec::new();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let Some(node) = app.get_mut(probe) else {
            continue;
        };
        let kind = if let Some(get) = node.get_mut("httpGet") {
            if !targets_app(get.get("port")) {
                continue;
            }
            get.set("port", Node::str(PORT_NAME));
            ProbeKind::Http {
                path: get
                    .get("path")
                    .and_then(Node::as_str)
                    .unwrap_or("/")
                    .to_owned(),
                headers: get
                    .get("httpHeaders")
                    .map_or(&[][..], Node::as_seq)
                    .iter()
                    .filter_map(|h| {
                        let text = |k| h.get(k).and_then(Node::as_str).map(str::to_owned);
                        Some((text("name")?, text("value")?))
                    })
                    .collect(),
            }
        } else if let Some(grpc) = node.get_mut("grpc") {
            if !targets_app(grpc.get("port")) {
                continue;
            }
            // A gRPC probe's port is a number only.
            grpc.set("port", Node::int(plan.port.into()));
            ProbeKind::Grpc
        } else if let Some(tcp) = node.get_mut("tcpSocket") {
            if !targets_app(tcp.get("port")) {
                continue;
            }
            tcp.set("port", Node::str(PORT_NAME));
            ProbeKind::Tcp
        } else {
            continue;
        };
        moved.push(MovedProbe { probe, kind });
    }
    moved
}

fn probe(path: &str, period: i64, timeout: Option<i64>, failures: i64) -> Node {
    let mut probe = Node::map([
        (
            "httpGet",
            Node::map([
                ("path", Node::str(path)),
                ("port", Node::str(ADMIN_PORT_NAME)),
            ]),
        ),
        ("periodSeconds", Node::int(period)),
        ("failureThreshold", Node::int(failures)),
    ]);
    if let Some(t) = timeout {
        probe.set("timeoutSeconds", Node::int(t));
    }
    probe
}

/// The sidecar: a native one (an init container that keeps running), so it starts before
/// the app, serves for the pod's life and is stopped only after the app has exited. The
/// app's own probes are left as they are: the kubelet sends them to the pod IP, straight to
/// the app's port, so they report the app itself; gatehouse's report gatehouse.
fn container(plan: &Plan, sidecar: &Sidecar) -> Node {
    let mount = |name: &str, path: &str| {
        Node::map([
            ("name", Node::str(name)),
            ("mountPath", Node::str(path)),
            ("readOnly", Node::bool(true)),
        ])
    };
    // Read-only suffices for the socket: connecting to one writes nothing.
    let mounts = std::iter::once(mount(VOLUME, CONFIG_DIR))
        .chain(
            plan.socket
                .as_deref()
                .map(|s| mount(SOCKET_VOLUME, socket_dir(s))),
        )
        .collect();
    let port = |name: &str, n: u16| {
        Node::map([
            ("name", Node::str(name)),
            ("containerPort", Node::int(n.into())),
        ])
    };
    Node::map([
        ("name", Node::str(NAME)),
        ("image", Node::str(sidecar.image)),
        ("imagePullPolicy", Node::str("IfNotPresent")),
        ("restartPolicy", Node::str("Always")),
        (
            "args",
            Node::seq(vec![
                Node::str("run"),
                Node::str("--config"),
                Node::str(format!("{CONFIG_DIR}/{CONFIG_KEY}")),
            ]),
        ),
        (
            "ports",
            Node::seq(vec![
                port(PORT_NAME, plan.port),
                port(ADMIN_PORT_NAME, plan.admin),
            ]),
        ),
        // The app container starts once this succeeds, so it never runs without its proxy.
        // /healthz, not /readyz: with `[admin] upstream_check` /readyz waits for the app,
        // which waits for this. gatehouse binds its public port before the admin port.
        ("startupProbe", probe("/healthz", 1, None, 30)),
        ("livenessProbe", probe("/healthz", 10, Some(2), 3)),
        // Out of the Service as soon as gatehouse starts draining.
        ("readinessProbe", probe("/readyz", 5, Some(2), 1)),
        // Measured peak RSS under saturated load is 13-20 MiB. `workers = 0` runs one
        // worker per CPU of the limit.
        (
            "resources",
            Node::map([
                (
                    "requests",
                    Node::map([("cpu", Node::str("100m")), ("memory", Node::str("32Mi"))]),
                ),
                (
                    "limits",
                    Node::map([("cpu", Node::str("1")), ("memory", Node::str("128Mi"))]),
                ),
            ]),
        ),
        (
            "securityContext",
            Node::map([
                ("runAsNonRoot", Node::bool(true)),
                ("runAsUser", Node::int(NONROOT)),
                ("runAsGroup", Node::int(NONROOT)),
                ("allowPrivilegeEscalation", Node::bool(false)),
                ("readOnlyRootFilesystem", Node::bool(true)),
                (
                    "capabilities",
                    Node::map([("drop", Node::seq(vec![Node::str("ALL")]))]),
                ),
                (
                    "seccompProfile",
                    Node::map([("type", Node::str("RuntimeDefault"))]),
                ),
            ]),
        ),
        ("volumeMounts", Node::seq(mounts)),
    ])
}

#[cfg(test)]
mod tests {
    use super::super::yaml::{parse, Segment};
    use super::*;

    fn node(text: &str) -> Node {
        parse(&Segment {
            text,
            first_line: 1,
        })
        .unwrap()
        .unwrap()
    }

    const SIDECAR: Sidecar = Sidecar {
        image: "gatehouse:test",
        drain: 25,
    };

    fn plan_of(template: &str) -> Result<Outcome, String> {
        plan(&node(template), &node("name: w\n"), &SIDECAR)
    }

    #[test]
    fn fronts_the_only_container_with_a_port() {
        let t = "spec:\n  containers:\n    - name: log\n    - name: web\n      ports:\n        - {name: http, containerPort: 8080}\n        - {containerPort: 5353, protocol: UDP}\n";
        let Outcome::Inject(p) = plan_of(t).unwrap() else {
            panic!("not injected")
        };
        assert_eq!(
            p.app,
            AppPort {
                container: "web".into(),
                number: 8080,
                name: Some("http".into())
            }
        );
        // 8080 is the app's: gatehouse takes the next free port.
        assert_eq!((p.port, p.admin), (8081, 9901));
        assert_eq!(p.protocol, None);
        // 30s default for the app, then gatehouse's 25s drain and the margin.
        assert_eq!(p.grace, 30 + 25 + 10);
    }

    #[test]
    fn annotations_choose_container_ports_and_opt_out() {
        let two = "metadata:\n  annotations:\n    gatehouse.io/container: b\n    gatehouse.io/app-port: grpc\n    gatehouse.io/port: \"7000\"\nspec:\n  terminationGracePeriodSeconds: 120\n  containers:\n    - {name: a, ports: [{containerPort: 80}]}\n    - {name: b, ports: [{name: http, containerPort: 81}, {name: grpc, containerPort: 50051}]}\n";
        let Outcome::Inject(p) = plan_of(two).unwrap() else {
            panic!("not injected")
        };
        assert_eq!(
            (p.app.number, p.port, p.admin, p.grace),
            (50051, 7000, 9901, 155)
        );
        let unannotated = two.replace("gatehouse.io/", "x/");
        let e = plan_of(&unannotated).unwrap_err();
        assert!(
            e.contains("containers a, b all declare ports") && e.contains(CONTAINER),
            "{e}"
        );
        let workload = node("annotations:\n  gatehouse.io/inject: \"false\"\n");
        assert_eq!(
            plan(&node(two), &workload, &SIDECAR).unwrap(),
            Outcome::OptedOut
        );
        let taken = two.replace("\"7000\"", "\"81\"");
        assert!(plan_of(&taken).unwrap_err().contains("already a port"));
        let several = "spec:\n  containers:\n    - {name: a, ports: [{name: x, containerPort: 1}, {containerPort: 2}]}\n";
        let e = plan_of(several).unwrap_err();
        assert!(e.contains("x (1), 2") && e.contains(APP_PORT), "{e}");
        let Outcome::Inject(p) =
            plan_of(&several.replace("{containerPort: 2}", "{name: http, containerPort: 2}"))
                .unwrap()
        else {
            panic!("not injected")
        };
        assert_eq!(p.app.number, 2);
    }

    #[test]
    fn a_pod_without_ports_is_not_fronted_unless_annotated() {
        let worker = "spec:\n  containers: [{name: w}, {name: x, ports: [{containerPort: 53, protocol: UDP}]}]\n";
        assert_eq!(plan_of(worker).unwrap(), Outcome::NoPort);
        let annotated = format!(
            "metadata: {{annotations: {{{CONTAINER}: w, {APP_PORT}: \"9000\"}}}}\n{worker}"
        );
        let Outcome::Inject(p) = plan_of(&annotated).unwrap() else {
            panic!("not injected")
        };
        assert_eq!((p.app.container.as_str(), p.app.number), ("w", 9000));
    }

    #[test]
    fn a_grpc_probe_or_the_annotation_chooses_h2c() {
        let grpc = "spec:\n  containers:\n    - name: s\n      ports: [{containerPort: 50051}]\n      readinessProbe: {grpc: {port: 50051}}\n";
        let Outcome::Inject(p) = plan_of(grpc).unwrap() else {
            panic!("not injected")
        };
        assert_eq!(p.protocol, Some("h2c"));
        let annotated = format!("metadata:\n  annotations: {{{PROTOCOL}: http1}}\n{grpc}");
        let Outcome::Inject(p) = plan_of(&annotated).unwrap() else {
            panic!("not injected")
        };
        assert_eq!(p.protocol, Some("http1"));
        let bad = annotated.replace("http1", "h3");
        assert!(plan_of(&bad)
            .unwrap_err()
            .contains("expected \"http1\" or \"h2c\""));
    }

    const CM: ConfigRef = ConfigRef {
        name: "cm-0123456789",
        hash: "0123456789",
    };

    #[test]
    fn an_injected_template_is_updated_and_a_hand_written_one_left_alone() {
        let t = "spec:\n  terminationGracePeriodSeconds: 120\n  containers: [{name: web, ports: [{containerPort: 80}]}]\n";
        let mut template = node(t);
        let Outcome::Inject(p) = plan_of(t).unwrap() else {
            panic!("not injected")
        };
        apply(&mut template, &p, &SIDECAR, &CM).unwrap();
        let init = template.at(&["spec", "initContainers"]).unwrap().as_seq();
        assert_eq!(
            init[0].at(&["restartPolicy"]).unwrap().as_str(),
            Some("Always")
        );
        assert_eq!(
            template
                .at(&["spec", "volumes"])
                .unwrap()
                .as_seq()
                .iter()
                .find_map(|v| v.at(&["configMap", "name"]))
                .and_then(Node::as_str),
            Some(CM.name)
        );
        assert_eq!(
            template
                .at(&["metadata", "annotations", CONFIG_HASH])
                .and_then(Node::as_str),
            Some(CM.hash)
        );
        // The app's own 120s, then gatehouse's 25s drain and the margin.
        assert_eq!(p.grace, 120 + 25 + 10);
        let workload = node(
            "name: w
",
        );
        assert_eq!(
            plan(&template, &workload, &SIDECAR).unwrap(),
            Outcome::Update {
                plan: p.clone(),
                configmap: CM.name.into()
            }
        );
        // A config with a longer drain: the app keeps its 120s, gatehouse gets the new drain.
        let longer = Sidecar {
            drain: 40,
            ..SIDECAR
        };
        let Outcome::Update { plan: q, .. } = plan(&template, &workload, &longer).unwrap() else {
            panic!("not updated")
        };
        assert_eq!((q.port, q.admin, q.grace), (p.port, p.admin, 120 + 40 + 10));

        let by_hand = "spec:\n  initContainers: [{name: gatehouse, ports: [{containerPort: 8080}]}]\n  containers: [{name: web, ports: [{containerPort: 80}]}]\n";
        assert_eq!(plan_of(by_hand).unwrap(), Outcome::AlreadyInjected);
        let broken = format!("metadata: {{annotations: {{{CONFIG_HASH}: x}}}}\n{by_hand}");
        let e = plan_of(&broken).unwrap_err();
        assert!(
            e.contains("container gatehouse has no port named gatehouse"),
            "{e}"
        );
    }

    #[test]
    fn an_app_on_a_socket_gets_the_volume_and_its_probes_move() {
        let t = "metadata: {annotations: {gatehouse.io/app-socket: /run/app/s.sock}}\nspec:\n  containers:\n    - name: s\n      ports: [{name: grpc, containerPort: 50051}]\n      readinessProbe: {grpc: {port: 50051}}\n      livenessProbe: {tcpSocket: {port: grpc}}\n      startupProbe: {exec: {command: [true]}}\n";
        let Outcome::Inject(p) = plan_of(t).unwrap() else {
            panic!("not injected")
        };
        assert_eq!(p.socket.as_deref(), Some("/run/app/s.sock"));
        let mut template = node(t);
        let moved = apply(&mut template, &p, &SIDECAR, &CM).unwrap();
        // Planned again, its moved gRPC probe still says the app speaks h2c.
        assert_eq!(
            plan(&template, &node("name: w\n"), &SIDECAR).unwrap(),
            Outcome::Update {
                plan: p.clone(),
                configmap: CM.name.into()
            }
        );
        assert_eq!(
            moved,
            [
                MovedProbe {
                    probe: "readinessProbe",
                    kind: ProbeKind::Grpc
                },
                MovedProbe {
                    probe: "livenessProbe",
                    kind: ProbeKind::Tcp
                }
            ]
        );
        let app = &template.at(&["spec", "containers"]).unwrap().as_seq()[0];
        // A gRPC probe's port can only be a number.
        assert_eq!(
            app.at(&["readinessProbe", "grpc", "port"])
                .unwrap()
                .as_int(),
            Some(p.port.into())
        );
        assert_eq!(
            app.at(&["livenessProbe", "tcpSocket", "port"])
                .unwrap()
                .as_str(),
            Some(PORT_NAME)
        );
        let mounted = app.get("volumeMounts").unwrap().as_seq();
        assert_eq!(
            mounted[0].get("mountPath").unwrap().as_str(),
            Some("/run/app")
        );

        let taken = t.replace(
            "      startupProbe",
            "      volumeMounts: [{name: data, mountPath: /run/app}]\n      startupProbe",
        );
        let e = plan_of(&taken).unwrap_err();
        assert!(
            e.contains("container s already mounts a volume at /run/app"),
            "{e}"
        );
    }
}
