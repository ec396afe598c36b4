//! `gatehouse inject`: Kubernetes YAML in, the same YAML out with gatehouse added as a
//! native sidecar to every workload, so that traffic goes through it with nothing else to
//! edit:
//!
//! * each Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod gets the
//!   sidecar (see [`pod`]) in front of its app container's port, and a ConfigMap before it
//!   with its own copy of the config, whose addresses are set for the pod (see
//!   [`proxy_toml`]; an app whose port has a gRPC probe is spoken to over h2c);
//! * a Service in the input that selects an injected pod template and targets the app's
//!   port (by number or by name) targets gatehouse's instead;
//! * the app's probes stay as they are, straight to the app's port, unless the app is put
//!   on a Unix socket (`gatehouse.io/app-socket`): then it has no port to probe, and its
//!   probes move to gatehouse's, each checked against the chain as `explain` would;
//! * every other document is written back byte for byte. A document inject changes is
//!   written anew from its tree: its comments before and after the content are kept, those
//!   inside it are not, anchors come out expanded and strings in the sidecar's style.
//!
//! Each ConfigMap's name ends in a hash of its content, as kustomize's configMapGenerator
//! does, and the pod template mounts it by that name: a changed config changes the pod
//! template, which rolls the pods (they cannot be told to reload: the image has no shell to
//! send SIGHUP with, and gatehouse does not watch its file).
//!
//! A workload inject wrote before (its pod template has the hash annotation) gets only its
//! config updated: with the same config nothing changes, so injecting twice is injecting
//! once; with another, its ConfigMap is replaced where it is in the input (or added before
//! the workload), and the pod template points at the new one. A `gatehouse` container
//! written by hand is left as it is (and so are its Services), and so is a workload whose
//! containers declare no port (a worker), with a note, unless an annotation names the port.

mod pod;
mod proxy_toml;
mod yaml;

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::Method;
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::explain;
use crate::Config;
use pod::{MovedProbe, Outcome, Plan, ProbeKind, Sidecar};
use yaml::{Node, Segment};

/// The sidecar's image unless `--image` says otherwise: the image the release builds.
pub const DEFAULT_IMAGE: &str = concat!("gatehouse:", env!("CARGO_PKG_VERSION"));

/// `gatehouse inject --help`.
pub const HELP: &str = "\
Add gatehouse as a native sidecar (Kubernetes 1.29+) to every Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob and Pod in Kubernetes YAML, and write the YAML to standard output.

Each workload gets the sidecar in front of its app's port, a ConfigMap with its copy of the
config (listen, admin and upstream addresses set for the pod) and a termination grace period
that covers the app's drain and then gatehouse's. A Service in the same input that targets the
app's port targets gatehouse's instead. The app's own probes are left as they are: the kubelet
sends them to the pod IP, straight to the app's port. Other documents are written back byte for
byte. The ConfigMap's name ends in a hash of the config, so a changed config changes the pod
template (a Deployment, StatefulSet or DaemonSet rolls its pods). Injecting inject's own output again changes nothing with the same
config, and with another one moves the workload to a new ConfigMap (it replaces the old one in
the output); a gatehouse sidecar written by hand is left as it is, and so is a workload whose
containers declare no port (a worker), with a note.

The app still listens on the pod IP, where other pods can reach it around gatehouse: add a
NetworkPolicy, or bind the app to 127.0.0.1 (then its httpGet and tcpSocket probes, which the
kubelet sends to the pod IP, must become exec probes). Variables the config reads with ${VAR}
must be given to the gatehouse container (inject names them).

Annotations on a workload or its pod template:
  gatehouse.io/inject: \"false\"        leave it out
  gatehouse.io/container: NAME        the container gatehouse fronts (when several have ports)
  gatehouse.io/app-port: NAME|NUMBER  its port (when it has several and none is named http)
  gatehouse.io/port: NUMBER           gatehouse's port (default 8080, or the next free one)
  gatehouse.io/admin-port: NUMBER     its admin port: probes, metrics (default 9901, or next)
  gatehouse.io/upstream-protocol: h2c|http1
                                      what the app speaks (h2c when its port has a gRPC probe;
                                      else the config's upstream.protocol)
  gatehouse.io/app-socket: PATH       the app listens on this Unix socket (uvicorn --uds PATH)
                                      instead of its port: cheaper per request, and only the
                                      two containers reach it. inject adds an in-memory volume
                                      for it to both and moves the app's probes of its port to
                                      gatehouse's (the chain must let them through: inject
                                      says when it would not)

Exit status: 0, 2 when the config is invalid, 1 when the YAML cannot be read or injected.";

/// Why inject wrote nothing.
#[derive(Debug)]
pub enum Error {
    /// The config does not load (exit 2, as for `gatehouse check`).
    Config(ConfigError),
    /// The YAML cannot be read or a workload cannot be injected (exit 1).
    Input(String),
}

/// What inject wrote, and what the user must still do by hand.
#[derive(Debug)]
pub struct Injected {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// Reads the config and the YAML (`input`, or stdin when `None` or `-`) and returns the
/// injected YAML.
pub fn run(config_path: &Path, image: &str, input: Option<&Path>) -> Result<Injected, Error> {
    let source = std::fs::read_to_string(config_path).map_err(|e| {
        Error::Config(ConfigError::file(
            config_path,
            format!("cannot read the config file: {e}"),
        ))
    })?;
    let config = Config::parse(config_path, &source, &|name| std::env::var(name).ok())
        .map_err(Error::Config)?;
    let (name, stream) = match input.filter(|p| *p != Path::new("-")) {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?,
        ),
        None => {
            let mut stream = String::new();
            std::io::stdin()
                .read_to_string(&mut stream)
                .map_err(|e| Error::Input(format!("cannot read standard input: {e}")))?;
            ("<stdin>".to_owned(), stream)
        }
    };
    let wildcard = |ip: IpAddr| {
        if ip.is_unspecified() {
            ip
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    };
    let s = &config.server;
    let settings = Settings {
        sidecar: Sidecar {
            image,
            drain: (s.shutdown_delay.0 + s.shutdown_grace.0)
                .as_millis()
                .div_ceil(1000)
                .try_into()
                .unwrap_or(i64::MAX / 2),
        },
        config: &source,
        loaded: &config,
        config_file: config_path.file_name().map_or_else(
            || config_path.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        listen_ip: wildcard(s.listen.0.ip()),
        admin_ip: config
            .admin
            .as_ref()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| {
                wildcard(a.listen.0.ip())
            }),
    };
    let mut out = inject(&name, &stream, &settings).map_err(Error::Input)?;
    out.notes
        .extend(proxy_toml::required_env(&source).into_iter().map(|var| {
            format!(
                "{} reads ${{{var}}} with no default: give the gatehouse containers {var} \
                 (env or envFrom, from a Secret say), or they will not start",
                config_path.display()
            )
        }));
    Ok(out)
}

/// What every injected workload shares.
struct Settings<'a> {
    sidecar: Sidecar<'a>,
    /// The config's text, and its file's name for the copies' header.
    config: &'a str,
    /// The config as loaded: what the chain does to a probe moved onto gatehouse's port.
    loaded: &'a Config,
    config_file: String,
    listen_ip: IpAddr,
    admin_ip: IpAddr,
}

/// Where an object is: a document, or an item of a `kind: List` document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Loc {
    doc: usize,
    item: Option<usize>,
}

struct Doc<'a> {
    segment: Segment<'a>,
    /// 1-based, counting documents with content.
    number: usize,
    node: Option<Node>,
    changed: bool,
}

/// A workload found in the input, and what inject makes of it.
struct Workload {
    loc: Loc,
    /// Where it is, for messages.
    at: String,
    /// Where its pod template is.
    path: &'static [&'static str],
    kind: String,
    name: String,
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    outcome: Outcome,
}

impl Workload {
    fn id(&self) -> String {
        format!("{}/{}", self.kind.to_lowercase(), self.name)
    }
}

/// Injects every workload of `stream` (read from `name`, for messages).
fn inject(name: &str, stream: &str, settings: &Settings) -> Result<Injected, String> {
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for segment in yaml::split(stream) {
        let number = docs.iter().filter(|d: &&Doc| d.node.is_some()).count() + 1;
        match yaml::parse(&segment) {
            Ok(node) => docs.push(Doc {
                segment,
                number,
                node,
                changed: false,
            }),
            Err(e) => problems.push(format!(
                "{name}:{}:{}: document {number}: {}",
                e.line, e.column, e.message
            )),
        }
    }
    check(&problems)?;

    let objects = objects(&docs);
    let at = |loc: Loc| {
        let d = &docs[loc.doc];
        let node = object(&docs, loc);
        format!("{name}:{}: document {}", node.line.max(1), d.number)
            + &loc
                .item
                .map(|i| format!(", items[{i}]"))
                .unwrap_or_default()
    };

    let mut workloads = Vec::new();
    for &loc in &objects {
        let node = object(&docs, loc);
        let (api, kind) = type_of(node);
        let Some(path) = template_path(api, kind) else {
            continue;
        };
        let meta = node.get("metadata");
        let text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Node::as_str);
        let id = format!("{}/{}", kind.to_lowercase(), text("name").unwrap_or("?"));
        let Some(name) = text("name") else {
            problems.push(format!(
                "{}: {id}: no metadata.name, which gatehouse needs to name its ConfigMap",
                at(loc)
            ));
            continue;
        };
        let Some(template) = node.at(path) else {
            problems.push(format!(
                "{}: {id}: no pod template at {}",
                at(loc),
                path.join(".")
            ));
            continue;
        };
        let empty = Node::map([]);
        match pod::plan(template, meta.unwrap_or(&empty), &settings.sidecar) {
            Ok(outcome) => workloads.push(Workload {
                loc,
                at: at(loc),
                path,
                kind: kind.to_owned(),
                name: name.to_owned(),
                namespace: text("namespace").map(str::to_owned),
                labels: strings(template.at(&["metadata", "labels"])),
                outcome,
            }),
            Err(e) => problems.push(format!("{}: {id}: {e}", at(loc))),
        }
    }

    let mut retargets = Vec::new();
    for &loc in &objects {
        let node = object(&docs, loc);
        if type_of(node) != ("v1", "Service") {
            continue;
        }
        match retarget(node, &workloads) {
            Ok(edits) => retargets.extend(edits.into_iter().map(|(i, t)| (loc, i, t))),
            Err(e) => problems.push(format!("{}: {e}", at(loc))),
        }
    }

    let mut configmaps: HashMap<Loc, NewConfig> = HashMap::new();
    for w in &workloads {
        let (Outcome::Inject(plan) | Outcome::Update { plan, .. }) = &w.outcome else {
            continue;
        };
        match configmap(w, plan, settings) {
            // The same config as before: nothing to change.
            Ok(cm) if matches!(&w.outcome, Outcome::Update { configmap, .. } if *configmap == cm.name) =>
                {}
            Ok(cm) => {
                configmaps.insert(w.loc, cm);
            }
            Err(e) => problems.push(format!("{}: {}: {e}", w.at, w.id())),
        }
    }
    check(&problems)?;
    // The ones a Service selects were refused above: the rest serve nothing.
    let mut notes: Vec<String> = workloads
        .iter()
        .filter(|w| w.outcome == Outcome::NoPort)
        .map(|w| {
            format!(
                "{}: {}: left as it is: no container declares a port (a worker?); to put \
                 gatehouse in front of one, annotate its pod template with {}: <number>",
                w.at,
                w.id(),
                pod::APP_PORT
            )
        })
        .collect();

    // Each new ConfigMap goes before its workload, unless it replaces one in the input.
    let mut before = HashMap::new();
    for w in &workloads {
        let Some(cm) = configmaps.remove(&w.loc) else {
            continue;
        };
        let replaced = match &w.outcome {
            Outcome::Update { configmap, .. } => objects
                .iter()
                .copied()
                .find(|&loc| written_configmap(object(&docs, loc), configmap, &w.namespace)),
            _ => None,
        };
        let template = object_mut(&mut docs, w.loc)
            .at_mut(w.path)
            .expect("planned from this template");
        let config = pod::ConfigRef {
            name: &cm.name,
            hash: &cm.hash,
        };
        let failed = |e| format!("{}: {}: {e}", w.at, w.id());
        match &w.outcome {
            Outcome::Inject(plan) => {
                let moved =
                    pod::apply(template, plan, &settings.sidecar, &config).map_err(failed)?;
                if let Some(socket) = &plan.socket {
                    notes.extend(socket_notes(w, plan, socket, &moved, settings.loaded));
                }
            }
            Outcome::Update { plan, configmap } => {
                pod::repoint(template, plan, &settings.sidecar, &config).map_err(failed)?;
                notes.push(format!(
                    "{}: {}: its config changed: it now mounts ConfigMap {} instead of \
                     {configmap}; {}; {configmap} stays in the cluster until you delete it",
                    w.at,
                    w.id(),
                    cm.name,
                    reaching(&w.kind)
                ));
            }
            _ => unreachable!("only injected workloads get a ConfigMap"),
        }
        docs[w.loc.doc].changed = true;
        match replaced {
            Some(loc) => {
                *object_mut(&mut docs, loc) = cm.node;
                docs[loc.doc].changed = true;
            }
            None => {
                before.insert(w.loc, cm.node);
            }
        }
    }
    for (loc, i, target) in retargets {
        let port = object_mut(&mut docs, loc)
            .at_mut(&["spec", "ports"])
            .and_then(Node::as_seq_mut)
            .and_then(|ports| ports.get_mut(i))
            .expect("a port retarget found");
        port.set("targetPort", target);
        docs[loc.doc].changed = true;
    }
    Ok(Injected {
        yaml: render(docs, before),
        notes,
    })
}

fn check(problems: &[String]) -> Result<(), String> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems[0].clone()),
        n => Err(format!("{n} problems:\n  {}", problems.join("\n  "))),
    }
}

/// Every object of the stream: each document's, or each item of a `kind: List`.
fn objects(docs: &[Doc]) -> Vec<Loc> {
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let Some(node) = &d.node else { continue };
        if type_of(node) == ("v1", "List") {
            let items = node.get("items").map_or(&[][..], Node::as_seq);
            out.extend((0..items.len()).map(|item| Loc {
                doc: i,
                item: Some(item),
            }));
        } else {
            out.push(Loc { doc: i, item: None });
        }
    }
    out
}

fn object<'d>(docs: &'d [Doc], loc: Loc) -> &'d Node {
    let node = docs[loc.doc].node.as_ref().expect("an object's document");
    match loc.item {
        Some(i) => &node.get("items").expect("a List's items").as_seq()[i],
        None => node,
    }
}

fn object_mut<'d>(docs: &'d mut [Doc], loc: Loc) -> &'d mut Node {
    let node = docs[loc.doc].node.as_mut().expect("an object's document");
    match loc.item {
        Some(i) => &mut node
            .get_mut("items")
            .and_then(Node::as_seq_mut)
            .expect("a List's items")[i],
        None => node,
    }
}

/// An object's `apiVersion` and `kind` ("" when absent).
fn type_of(node: &Node) -> (&str, &str) {
    let text = |key| node.get(key).and_then(Node::as_str).unwrap_or("");
    (text("apiVersion"), text("kind"))
}

/// Where a workload kind keeps its pod template; `None` for anything else (a kind of the
/// same name in another API group included).
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch", "Job") => {
            Some(&["spec", "template"])
        }
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// A mapping of strings (labels, a selector) as pairs.
fn strings(node: Option<&Node>) -> Vec<(String, String)> {
    node.map_or(&[][..], Node::as_map)
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect()
}

/// The Service's ports that target an injected workload's app port, each with the
/// `targetPort` that reaches gatehouse instead: its port's name when the Service named the
/// app's port, its number otherwise.
fn retarget(service: &Node, workloads: &[Workload]) -> Result<Vec<(usize, Node)>, String> {
    let name = service
        .at(&["metadata", "name"])
        .and_then(Node::as_str)
        .unwrap_or("?");
    let namespace = service
        .at(&["metadata", "namespace"])
        .and_then(Node::as_str);
    let selector = strings(service.at(&["spec", "selector"]));
    if selector.is_empty()
        || service.at(&["spec", "type"]).and_then(Node::as_str) == Some("ExternalName")
    {
        return Ok(Vec::new());
    }
    // An absent namespace is the one applied to: it may be any.
    let selected: Vec<&Workload> = workloads
        .iter()
        .filter(|w| match (namespace, &w.namespace) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .filter(|w| selector.iter().all(|pair| w.labels.contains(pair)))
        .collect();
    if let Some(w) = selected.iter().find(|w| w.outcome == Outcome::NoPort) {
        return Err(format!(
            "service/{name} selects {}, none of whose containers declares a port: name the one \
             gatehouse fronts with the annotation {}: <number> on its pod template (and {}: \
             <name> if it has several containers), or opt it out with {}: \"false\"",
            w.id(),
            pod::APP_PORT,
            pod::CONTAINER,
            pod::INJECT
        ));
    }
    let ports = service.at(&["spec", "ports"]).map_or(&[][..], Node::as_seq);
    let mut edits = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        if port.get("protocol").and_then(Node::as_str).unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Some(target) = port.get("targetPort").or_else(|| port.get("port")) else {
            continue;
        };
        let by_name = target.as_int().is_none();
        let hit: Vec<(&Workload, &Plan)> = selected
            .iter()
            .filter_map(|w| match &w.outcome {
                Outcome::Inject(plan) => Some((*w, plan)),
                _ => None,
            })
            .filter(|(_, plan)| match target.as_int() {
                Some(n) => n == i64::from(plan.app.number),
                None => target.as_str() == plan.app.name.as_deref(),
            })
            .collect();
        let Some((first, plan)) = hit.first() else {
            continue;
        };
        let port_name = port
            .get("name")
            .and_then(Node::as_str)
            .map_or_else(|| format!("port {}", i + 1), |n| format!("port {n:?}"));
        if let Some(out) = selected.iter().find(|w| w.outcome == Outcome::OptedOut) {
            return Err(format!(
                "service/{name}: {port_name} reaches both {} (injected) and {} (opted out with \
                 {}: \"false\"): moving its targetPort to gatehouse would cut the second off; \
                 inject both, or neither",
                first.id(),
                out.id(),
                pod::INJECT
            ));
        }
        if by_name {
            edits.push((i, Node::str(pod::PORT_NAME)));
            continue;
        }
        if let Some((other, p)) = hit.iter().find(|(_, p)| p.port != plan.port) {
            return Err(format!(
                "service/{name}: {port_name} targets the app's port {} of {} and {}, whose \
                 gatehouse ports differ ({} and {}): give both the same with the annotation \
                 {}, or target the app's port by name",
                plan.app.number,
                first.id(),
                other.id(),
                plan.port,
                p.port,
                pod::PORT
            ));
        }
        edits.push((i, Node::int(plan.port.into())));
    }
    Ok(edits)
}

/// What the user of a workload whose app listens on a Unix socket must know: that the app
/// must be started on it, and where its probes now go. A probe moved onto gatehouse's port
/// passes through the chain, so each is explained offline, as `gatehouse explain` would,
/// and one the chain would refuse is named with the entry that refuses it.
fn socket_notes(
    w: &Workload,
    plan: &Plan,
    socket: &str,
    moved: &[MovedProbe],
    config: &Config,
) -> Vec<String> {
    let mut notes = vec![format!(
        "{}: {}: gatehouse reaches the app at unix:{socket}: start container {} listening \
         there instead of on port {} (uvicorn --uds {socket}, gunicorn --bind unix:{socket}, \
         Node's server.listen({socket:?}), Go's net.Listen(\"unix\", {socket:?})); until it \
         does, requests get 502",
        w.at,
        w.id(),
        plan.app.container,
        plan.app.number
    )];
    for m in moved {
        let (request, what) = match &m.kind {
            ProbeKind::Tcp => {
                notes.push(format!(
                    "{}: {}: the app's tcpSocket {} now checks gatehouse's port, not the app \
                     (an httpGet probe would check the app through gatehouse)",
                    w.at,
                    w.id(),
                    m.probe
                ));
                continue;
            }
            ProbeKind::Http { path, headers } => {
                probe_request(Method::GET, path, headers.iter().map(|(n, v)| (&**n, &**v)))
            }
            ProbeKind::Grpc => probe_request(
                Method::POST,
                "/grpc.health.v1.Health/Check",
                [("content-type", "application/grpc"), ("te", "trailers")],
            ),
        };
        let verdict = match explain::explain(config, &request, false) {
            Ok(report) if report.upstream.is_some() && report.status < 400 => continue,
            Ok(report) => format!("the chain answers it: {}", report.outcome()),
            Err(e) => format!("it could not be explained ({e})"),
        };
        notes.push(format!(
            "{}: {}: the app's {} ({what}) now goes through gatehouse, and {verdict}: let it \
             through (skip_paths on the entries that refuse it), or the probe fails",
            w.at,
            w.id(),
            m.probe
        ));
    }
    notes
}

/// The request the kubelet makes for a probe, as `explain` takes it, and how to name it.
fn probe_request<'h>(
    method: Method,
    path: &str,
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
) -> (explain::Request, String) {
    let what = format!("{method} {path}");
    let target = path
        .parse()
        .unwrap_or_else(|_| "/".parse().expect("a path"));
    let mut request = explain::Request::new(method, target);
    request.headers = headers
        .into_iter()
        .filter_map(|(n, v)| explain::parse_header(&format!("{n}: {v}")).ok())
        .collect();
    (request, what)
}

/// How a changed pod template reaches a kind's pods.
fn reaching(kind: &str) -> &'static str {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" => "applying it rolls its pods",
        "CronJob" => "its next Jobs use it",
        "ReplicaSet" => {
            "a ReplicaSet does not replace running pods: delete them (or use a Deployment)"
        }
        "Job" => "a Job's pod template cannot change: delete the Job and apply it again",
        _ => "a Pod's volumes cannot change: delete the Pod and apply it again",
    }
}

/// Labels the ConfigMaps inject writes, and so tells them from the user's.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "gatehouse-inject");

/// A workload's ConfigMap: its name, which ends in the hash of its content, and the object.
struct NewConfig {
    name: String,
    hash: String,
    node: Node,
}

/// Whether `node` is the ConfigMap `name` in `namespace` that inject wrote.
fn written_configmap(node: &Node, name: &str, namespace: &Option<String>) -> bool {
    let meta = |key: &str| node.at(&["metadata", key]).and_then(Node::as_str);
    type_of(node) == ("v1", "ConfigMap")
        && meta("name") == Some(name)
        && meta("namespace") == namespace.as_deref()
        && node
            .at(&["metadata", "labels", MANAGED_BY.0])
            .and_then(Node::as_str)
            == Some(MANAGED_BY.1)
}

/// The ConfigMap holding a workload's copy of the config. One per workload, as each pod's
/// copy differs and a later inject of other workloads into the same namespace must not
/// replace it; named, as kustomize's configMapGenerator does, with a hash of its content,
/// so that a changed config changes the pod template that mounts it, and the pods roll.
fn configmap(w: &Workload, plan: &Plan, settings: &Settings) -> Result<NewConfig, String> {
    let text = proxy_toml::for_pod(
        settings.config,
        &settings.config_file,
        &proxy_toml::ForPod {
            listen_ip: settings.listen_ip,
            admin_ip: settings.admin_ip,
            port: plan.port,
            admin: plan.admin,
            app: match &plan.socket {
                Some(path) => proxy_toml::App::Socket(path),
                None => proxy_toml::App::Port(plan.app.number),
            },
            protocol: plan.protocol,
        },
    )?;
    let hash: String = Sha256::digest(text.as_bytes())
        .iter()
        .take(HASH_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("gatehouse-{}-{}-{hash}", w.kind.to_lowercase(), w.name);
    if name.len() > 253 {
        return Err(format!(
            "its ConfigMap's name {name:?} would be longer than Kubernetes allows (253)"
        ));
    }
    let mut metadata = Node::map([("name", Node::str(&name))]);
    if let Some(ns) = &w.namespace {
        metadata.set("namespace", Node::str(ns));
    }
    metadata.set(
        "labels",
        Node::map([(MANAGED_BY.0, Node::str(MANAGED_BY.1))]),
    );
    let node = Node::map([
        ("apiVersion", Node::str("v1")),
        ("kind", Node::str("ConfigMap")),
        ("metadata", metadata),
        ("data", Node::map([(pod::CONFIG_KEY, Node::str(text))])),
    ]);
    Ok(NewConfig { name, hash, node })
}

/// Hex digits of the content hash in a ConfigMap's name: kustomize's length.
const HASH_LEN: usize = 10;

/// The output: unchanged documents as they were; a changed one preceded by its workload's
/// ConfigMap (a List's go into its items), keeping its comments before and after content.
fn render(docs: Vec<Doc>, mut configmaps: HashMap<Loc, Node>) -> String {
    let mut out = String::new();
    for (i, mut d) in docs.into_iter().enumerate() {
        let Some(mut node) = d.node.take().filter(|_| d.changed) else {
            out.push_str(d.segment.text);
            continue;
        };
        if let Some(cm) = configmaps.remove(&Loc { doc: i, item: None }) {
            out.push_str("---\n");
            out.push_str(&yaml::emit(&cm));
        }
        if let Some(items) = node.get_mut("items").and_then(Node::as_seq_mut) {
            let old = std::mem::take(items);
            for (j, item) in old.into_iter().enumerate() {
                items.extend(configmaps.remove(&Loc {
                    doc: i,
                    item: Some(j),
                }));
                items.push(item);
            }
        }
        let (head, tail) = comments(d.segment.text);
        out.push_str(&head);
        out.push_str(&yaml::emit(&node));
        out.push_str(&tail);
    }
    out
}

/// A document's `---` line (written if absent) and the comments before its content, and
/// the column-0 comments and `...` after it (blank lines dropped, so that none joins a
/// block scalar kept with `|+`).
fn comments(text: &str) -> (String, String) {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut head = String::from("---\n");
    let mut rest = &lines[..];
    if let Some((first, after)) = lines.split_first() {
        if yaml::marker(first, "---") {
            let comment = first[3..].trim();
            if comment.starts_with('#') {
                head = format!("--- {comment}\n");
            }
            rest = after;
        }
    }
    let leading = rest
        .iter()
        .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        .count();
    for line in &rest[..leading] {
        head.push_str(line.trim_end_matches(['\r', '\n']));
        head.push('\n');
    }
    let rest = &rest[leading..];
    let trailing = rest
        .iter()
        .rev()
        .take_while(|l| l.trim().is_empty() || l.starts_with('#') || yaml::marker(l, "..."))
        .count();
    let mut tail = String::new();
    for line in &rest[rest.len() - trailing..] {
        if !line.trim().is_empty() {
            tail.push_str(line.trim_end_matches(['\r', '\n']));
            tail.push('\n');
        }
    }
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str =
        "[server]\nlisten = \"0.0.0.0:8080\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n";

    fn settings() -> Settings<'static> {
        settings_for(CONFIG, 25)
    }

    fn settings_for(config: &'static str, drain: i64) -> Settings<'static> {
        let loaded = Config::parse(Path::new("proxy.toml"), config, &|_| None).unwrap();
        Settings {
            sidecar: Sidecar {
                image: "gatehouse:test",
                drain,
            },
            config,
            // Each test's settings live for the test.
            loaded: Box::leak(Box::new(loaded)),
            config_file: "proxy.toml".into(),
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            admin_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }

    const APP: &str = "# the web tier\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, ports: [{name: http, containerPort: 3000}]}]\n# end of web\n---\n# untouched\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}   # keep me\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n    - {name: a, port: 80, targetPort: http}\n    - {name: b, port: 3000}\n    - {name: c, port: 81, targetPort: 9999}\n";

    #[test]
    fn injects_retargets_and_keeps_what_it_does_not_touch() {
        let out = inject("in.yaml", APP, &settings()).unwrap().yaml;
        assert!(out.starts_with("# the web tier\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: gatehouse-deployment-web-"), "{out}");
        assert!(out.contains("---\n# untouched\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}   # keep me\n"), "{out}");
        assert!(out.contains("# end of web\n"), "{out}");
        assert!(out.contains("    - name: a\n      port: 80\n      targetPort: gatehouse\n    - name: b\n      port: 3000\n      targetPort: 8080\n    - name: c\n      port: 81\n      targetPort: 9999\n"), "{out}");
        assert!(out.contains("url = \"http://127.0.0.1:3000\""), "{out}");
        // Injected output is left as it is.
        assert_eq!(inject("out.yaml", &out, &settings()).unwrap().yaml, out);
    }

    #[test]
    fn a_changed_config_replaces_the_configmap_where_it_was() {
        let once = inject("in.yaml", APP, &settings()).unwrap().yaml;
        let changed = settings_for(
            "[server]\nlisten = \"0.0.0.0:8080\"\nshutdown_delay = \"20s\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n",
            45,
        );
        let out = inject("out.yaml", &once, &changed).unwrap();
        // Each ConfigMap's name, and what the Deployment's pod template refers to.
        let read = |yaml: &str| {
            let docs: Vec<Node> = yaml::split(yaml)
                .iter()
                .filter_map(|s| yaml::parse(s).unwrap())
                .collect();
            let names: Vec<String> = docs
                .iter()
                .filter(|d| type_of(d).1 == "ConfigMap")
                .filter_map(|d| d.at(&["metadata", "name"])?.as_str())
                .filter(|n| n.starts_with("gatehouse-"))
                .map(str::to_owned)
                .collect();
            let template = docs
                .iter()
                .find_map(|d| d.at(&["spec", "template"]))
                .unwrap();
            let text = |path: &[&str]| template.at(path).and_then(Node::as_str).unwrap().to_owned();
            let mounted = template.at(&["spec", "volumes"]).unwrap().as_seq()[0]
                .at(&["configMap", "name"])
                .and_then(Node::as_str)
                .unwrap()
                .to_owned();
            (
                names,
                mounted,
                text(&["metadata", "annotations", pod::CONFIG_HASH]),
            )
        };
        let (old, old_mounted, old_hash) = read(&once);
        let (new, mounted, hash) = read(&out.yaml);
        // One ConfigMap, in the same place, named anew, and the pod template mounts it.
        assert_eq!(old, std::slice::from_ref(&old_mounted));
        assert_eq!(new, std::slice::from_ref(&mounted));
        assert_ne!(mounted, old_mounted);
        assert!(mounted.ends_with(&format!("-{hash}")) && hash != old_hash);
        assert!(out
            .yaml
            .starts_with("# the web tier\n---\napiVersion: v1\nkind: ConfigMap\n"));
        // The app's drain (its default 30s, taken as at least gatehouse's new 45s), then
        // gatehouse's and the margin.
        assert!(
            out.yaml.contains("terminationGracePeriodSeconds: 100\n"),
            "{}",
            out.yaml
        );
        assert!(
            out.notes[0].contains("its config changed"),
            "{:?}",
            out.notes
        );
        assert_eq!(
            inject("again.yaml", &out.yaml, &changed).unwrap().yaml,
            out.yaml
        );
    }

    #[test]
    fn lists_get_their_configmaps_as_items() {
        let list = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: p}\n    spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n";
        let out = inject("l.yaml", list, &settings()).unwrap().yaml;
        let doc = yaml::parse(&Segment {
            text: &out,
            first_line: 1,
        })
        .unwrap()
        .unwrap();
        let items = doc.get("items").unwrap().as_seq();
        let kinds: Vec<&str> = items.iter().map(|i| type_of(i).1).collect();
        assert_eq!(kinds, ["ConfigMap", "Pod"]);
    }

    #[test]
    fn errors_name_file_document_and_line() {
        let bad = "a: 1\n---\nb: [\n";
        let e = inject("bad.yaml", bad, &settings()).unwrap_err();
        assert!(e.starts_with("bad.yaml:4:1: document 2: "), "{e}");
        let two = APP.replace(
            "[{name: web, ports: [{name: http, containerPort: 3000}]}]",
            "[{name: web, ports: [{containerPort: 3000}]}, {name: side, ports: [{containerPort: 9}]}]",
        );
        let e = inject("two.yaml", &two, &settings()).unwrap_err();
        assert!(
            e.starts_with(
                "two.yaml:3: document 1: deployment/web: containers web, side all declare ports"
            ),
            "{e}"
        );
    }

    #[test]
    fn comments_around_content_are_kept() {
        let (head, tail) =
            comments("--- # doc\n# lead\n\na: |\n  # inside\nb: 1\n# after\n\n...\n");
        assert_eq!(head, "--- # doc\n# lead\n\n");
        assert_eq!(tail, "# after\n...\n");
        assert_eq!(comments("a: 1").0, "---\n");
    }
}
