//! Redis that fails over, against real servers: three gatehouse processes share one global
//! limit (and write their audit events to a `redis_stream` sink) through a Sentinel-managed
//! primary, a 3-primary Cluster, and a TLS server with an ACL user, while the test kills the
//! primary, moves the limit's slot, or rotates the password. Each prints what it saw
//! (requests answered, fail-opens, how long until every answer came from Redis again, audit
//! events sent and received: run with `--nocapture`); none asserts a duration.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The config every gatehouse of a fleet runs: a global limit through `redis` (a TOML
/// inline table) and a journaled `redis_stream` sink to the same Redis.
fn fleet_config(redis: &str) -> String {
    config(
        "shutdown_grace = \"5s\"",
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{{admin}}\"\n\n\
             [[middleware]]\ntype = \"request_id\"\n\n\
             [[middleware]]\ntype = \"rate_limit\"\nname = \"shared\"\nrate = \"100/s\"\nkey = \"global\"\n\
             backend = \"redis\"\ntimeout = \"100ms\"\nredis = {redis}\n\n\
             [audit]\nflush_interval = \"20ms\"\nspool_dir = \"{{spool}}\"\n\
             [[audit.sinks]]\ntype = \"redis_stream\"\nstream = \"audit\"\nredis = {redis}\n"
        ),
    )
}

/// One gatehouse of a fleet, with its admin port and spool.
struct Member {
    gh: Gatehouse,
    admin: u16,
    _spool: tempfile::TempDir,
}

/// Three gatehouses sharing one limit.
struct Fleet {
    members: Vec<Member>,
    _up: Upstream,
}

impl Fleet {
    async fn start(redis: &str) -> Fleet {
        let up = Upstream::start().await;
        let mut members = Vec::new();
        for _ in 0..3 {
            let admin = free_port();
            let spool = tempfile::tempdir().unwrap();
            let gh = Gatehouse::start(
                &fleet_config(redis),
                &[
                    ("upstream", &up.url()),
                    ("admin", &admin.to_string()),
                    ("spool", spool.path().to_str().unwrap()),
                ],
            )
            .await;
            members.push(Member {
                gh,
                admin,
                _spool: spool,
            });
        }
        Fleet { members, _up: up }
    }

    /// The sum over the fleet of the metric lines starting with `series`.
    async fn metric(&self, series: &str) -> u64 {
        let mut total = 0;
        for m in &self.members {
            total += metric_of(m.admin, series).await;
        }
        total
    }

    /// Stops every gatehouse (SIGTERM: the audit queue and journal are flushed first).
    async fn stop(mut self) -> Vec<String> {
        let mut logs = Vec::new();
        for m in &mut self.members {
            m.gh.send_signal("TERM");
            let status = m.gh.wait_exit(Duration::from_secs(20)).await;
            assert!(
                status.is_some(),
                "gatehouse did not exit: {}",
                m.gh.output()
            );
            logs.push(m.gh.output());
        }
        logs
    }
}

/// The sum of the metric lines starting with `series` at the admin port `admin`.
async fn metric_of(admin: u16, series: &str) -> u64 {
    let text = get(admin, "/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One answer the load saw.
struct Sample {
    at: Instant,
    status: u16,
    /// Decided by Redis (it carries `ratelimit-*`); a fail-open answer does not.
    decided: bool,
    id: String,
}

/// Steady load on every member until stopped: two clients per gatehouse, one request every
/// 10 ms each.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(fleet: &Fleet) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let tasks = fleet
            .members
            .iter()
            .flat_map(|m| [m.gh.port, m.gh.port])
            .map(|port| {
                let (stop, samples) = (stop.clone(), samples.clone());
                tokio::spawn(async move {
                    let mut h1 = H1::connect(port).await;
                    while !stop.load(Ordering::Relaxed) {
                        let resp = h1
                            .send(request("GET", "/echo").body(empty()).unwrap())
                            .await;
                        samples.lock().unwrap().push(Sample {
                            at: Instant::now(),
                            status: resp.status.as_u16(),
                            decided: resp.header("ratelimit-limit").is_some(),
                            id: resp.header("x-request-id").expect("a request id"),
                        });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            tasks,
        }
    }

    /// Answers decided by Redis since `since`.
    fn decided_since(&self, since: Instant) -> usize {
        let samples = self.samples.lock().unwrap();
        samples.iter().filter(|s| s.at > since && s.decided).count()
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.samples)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// Runs load on `fleet`, calls `event` after a steady second, waits for `settled` (the
/// event is over as Redis sees it) and for answers decided by Redis again, keeps the load
/// one more second; returns the answers and when the event began.
async fn scenario(
    what: &str,
    fleet: &Fleet,
    event: impl std::future::Future<Output = ()>,
    settled: impl std::future::Future<Output = ()>,
) -> (Vec<Sample>, Instant) {
    let load = Load::start(fleet);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    event.await;
    within(Duration::from_secs(60), what, settled).await;
    let back = Instant::now();
    println!(
        "{what}: over as Redis sees it {} ms after it began",
        back.duration_since(started).as_millis()
    );
    within(
        Duration::from_secs(30),
        "answers decided by Redis again",
        async {
            while load.decided_since(back) < 50 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (load.finish().await, started)
}

/// Stops the fleet, checks every fail-open was counted and the audit stream (`received`
/// reads it) holds every event sent, and prints the figures.
async fn report(
    what: &str,
    fleet: Fleet,
    (samples, started): (Vec<Sample>, Instant),
    received: impl FnOnce() -> Vec<(String, bool)>,
) -> Vec<String> {
    let fail_opens = fleet.metric("gatehouse_fail_open_total").await;
    // The journals keep what Redis could not take yet until it takes it.
    let sent_count = samples.len() as u64;
    within(
        Duration::from_secs(60),
        "the journals to deliver every event",
        async {
            while fleet
                .metric("gatehouse_audit_events_total{sink=\"redis_stream\",outcome=\"delivered\"}")
                .await
                < sent_count
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    let logs = fleet.stop().await;
    let undecided: Vec<&Sample> = samples.iter().filter(|s| !s.decided).collect();
    assert!(
        undecided.iter().all(|s| s.status == 200),
        "on_backend_error = \"allow\": an undecided answer passes"
    );
    assert_eq!(
        fail_opens,
        undecided.len() as u64,
        "every answer that did not come from Redis is a counted fail-open\n{}",
        logs.join("\n")
    );
    let exact_after = undecided
        .iter()
        .map(|s| s.at.saturating_duration_since(started))
        .max();
    let sent: HashSet<String> = samples.iter().map(|s| s.id.clone()).collect();
    let got = received();
    let got_unique: HashSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    let failed_open: HashSet<&String> = got.iter().filter(|e| e.1).map(|e| &e.0).collect();
    let undecided_ids: HashSet<&String> = undecided.iter().map(|s| &s.id).collect();
    assert_eq!(
        failed_open, undecided_ids,
        "the audit events of exactly the undecided answers name the limiter in fail_open"
    );
    let missing = sent.difference(&got_unique).count();
    println!(
        "{what}: answered {} ({} passed, {} refused), fail-opens {fail_opens}, every answer from Redis again {} after the event; audit events sent {}, received {} ({} twice), missing {missing}",
        samples.len(),
        samples.iter().filter(|s| s.status == 200).count(),
        samples.iter().filter(|s| s.status == 429).count(),
        exact_after.map_or("at once (no fail-open)".into(), |d| format!("{} ms", d.as_millis())),
        sent.len(),
        got_unique.len(),
        got.len() - got_unique.len(),
    );
    assert_eq!(missing, 0, "audit events lost\n{}", logs.join("\n"));
    assert!(got_unique.is_subset(&sent), "events the load never sent");
    logs
}

/// Every event in `stream` (through `con`): its `request_id`, and whether its `fail_open`
/// names the limiter.
fn stream_ids(con: &mut impl redis::ConnectionLike, stream: &str) -> Vec<(String, bool)> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let event: serde_json::Value = serde_json::from_str(&fields[1]).unwrap();
            let failed_open = event["fail_open"] == serde_json::json!(["shared"]);
            (
                event["request_id"].as_str().unwrap().to_owned(),
                failed_open,
            )
        })
        .collect()
}

fn conn(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap()
}

fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn(port))
        .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    within(Duration::from_secs(30), what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------------------------

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn sentinel_promotes_a_replica_and_the_fleet_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (p, r) = (free_port(), free_port());
    // Without the default 5 s delay before a replica's first (diskless) sync.
    let primary = Redis::with(p, &["--repl-diskless-sync-delay", "0"]).await;
    // A replica writes the primary's snapshot to its `dir` (disk-based load).
    let _replica = Redis::with(
        r,
        &[
            "--replicaof",
            "127.0.0.1",
            &p.to_string(),
            "--dir",
            dir.path().to_str().unwrap(),
        ],
    )
    .await;
    let mut sentinels = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let conf = dir.path().join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor mymaster 127.0.0.1 {p} 2\n\
                 sentinel down-after-milliseconds mymaster 300\n\
                 sentinel failover-timeout mymaster 2000\n"
            ),
        )
        .unwrap();
        sentinels.push(Redis::with(port, &[conf.to_str().unwrap(), "--sentinel"]).await);
        ports.push(port);
    }
    until("the replica to be in sync", || {
        query::<String>(r, &["INFO", "replication"]).contains("master_link_status:up")
    })
    .await;
    until("the sentinels to know each other and the replica", || {
        ports.iter().all(|&s| {
            query::<Vec<redis::Value>>(s, &["SENTINEL", "sentinels", "mymaster"]).len() == 2
                && query::<Vec<redis::Value>>(s, &["SENTINEL", "replicas", "mymaster"]).len() == 1
        })
    })
    .await;
    let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let fleet = Fleet::start(&format!(
        "{{ url = \"redis+sentinel://{}/mymaster\" }}",
        list.join(",")
    ))
    .await;
    let primary_now = || {
        let (_, port): (String, u16) = query(
            ports[0],
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        );
        port
    };
    let what = "sentinel: the primary killed, a replica promoted";
    let run = scenario(
        what,
        &fleet,
        async {
            primary.kill();
        },
        async {
            while primary_now() != r {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    report(what, fleet, run, || stream_ids(&mut conn(r), "audit")).await;
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// Three primaries, cluster mode, slots spread by `redis-cli --cluster create`.
async fn cluster(dir: &Path) -> (Vec<Redis>, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for &port in &ports {
        let conf = dir.join(format!("nodes-{port}.conf"));
        // The cluster bus listens on its own port, by default the node's + 10000: from the
        // ports free_port() hands out, that can fall in the kernel's ephemeral range, where
        // the tests' own connections take ports, and the node then fails to start.
        let bus = free_port().to_string();
        nodes.push(
            Redis::with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &bus,
                ],
            )
            .await,
        );
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    run_setup(
        std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .arg("--cluster-yes"),
        "redis-cli --cluster create",
    );
    until("every node to see the cluster ok", || {
        ports
            .iter()
            .all(|&p| query::<String>(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    })
    .await;
    (nodes, ports)
}

/// The port of the node that serves `slot`.
fn owner(port: u16, slot: u16) -> u16 {
    let raw: Vec<redis::Value> = query(port, &["CLUSTER", "SLOTS"]);
    raw.into_iter()
        .map(|range| {
            // [start, end, [host, port, id, …], replicas…]
            let range: Vec<redis::Value> = redis::from_redis_value(range).unwrap();
            let (start, end): (u16, u16) = (
                redis::from_redis_value(range[0].clone()).unwrap(),
                redis::from_redis_value(range[1].clone()).unwrap(),
            );
            let node: Vec<redis::Value> = redis::from_redis_value(range[2].clone()).unwrap();
            let port: u16 = redis::from_redis_value(node[1].clone()).unwrap();
            (start, end, port)
        })
        .find(|(start, end, _)| (*start..=*end).contains(&slot))
        .map(|(_, _, port)| port)
        .expect("every slot is served")
}

/// Moves `slot` from `from` to `to` as `redis-cli --cluster reshard` does: IMPORTING,
/// MIGRATING, MIGRATE of its keys, then the new owner told to every node.
fn move_slot(ports: &[u16], slot: u16, from: u16, to: u16) {
    let id = |p: u16| query::<String>(p, &["CLUSTER", "MYID"]);
    let (from_id, to_id, slot_s) = (id(from), id(to), slot.to_string());
    let _: () = query(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
    let _: () = query(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
    loop {
        let keys: Vec<String> = query(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
        if keys.is_empty() {
            break;
        }
        let mut args = vec!["MIGRATE", "127.0.0.1"];
        let to_s = to.to_string();
        args.extend([to_s.as_str(), "", "0", "5000", "KEYS"]);
        args.extend(keys.iter().map(String::as_str));
        let _: () = query(from, &args);
    }
    for &p in ports {
        let _: () = query(p, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
    }
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn a_cluster_slot_moves_and_the_fleet_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = cluster(dir.path()).await;
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let fleet = Fleet::start(&format!(
        "{{ cluster = true, nodes = [{}] }}",
        list.join(", ")
    ))
    .await;
    let slot: u16 = query(ports[0], &["CLUSTER", "KEYSLOT", "gatehouse:rl:shared:-"]);
    let from = owner(ports[0], slot);
    let to = *ports.iter().find(|&&p| p != from).unwrap();
    let seeds: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let what = "cluster: the limit's slot moved to another primary";
    let run = scenario(
        what,
        &fleet,
        async {
            move_slot(&ports, slot, from, to);
        },
        async {
            while owner(ports[2], slot) != to {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    report(what, fleet, run, || {
        let client = redis::cluster::ClusterClient::new(seeds).unwrap();
        stream_ids(&mut client.get_connection().unwrap(), "audit")
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn on_a_cluster_the_fleets_combined_allowance_over_10s_is_within_1_percent_of_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = cluster(dir.path()).await;
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let fleet = Fleet::start(&format!(
        "{{ cluster = true, nodes = [{}] }}",
        list.join(", ")
    ))
    .await;
    // Each worker connects at its first request, which may pass undecided while a debug
    // build makes its cluster connection: warm every connection up first, then let the
    // bucket fill again (100 at 100/s: one second).
    for m in &fleet.members {
        within(Duration::from_secs(30), "every worker connected", async {
            // Fresh connections, so every worker gets some: ten decided in a row.
            let mut in_a_row = 0;
            while in_a_row < 10 {
                let resp = get(m.gh.port, "/echo").await;
                in_a_row = if resp.header("ratelimit-limit").is_some() {
                    in_a_row + 1
                } else {
                    0
                };
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = Load::start(&fleet);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let samples = load.finish().await;
    fleet.stop().await;
    assert!(
        samples.iter().all(|s| s.decided),
        "every answer came from Redis"
    );
    // GCRA from a full bucket: `burst` (100) at once, then 100 per second.
    let span = samples.last().unwrap().at - samples[0].at;
    let expected = 100.0 + 100.0 * span.as_secs_f64();
    let passed = samples.iter().filter(|s| s.status == 200).count() as f64;
    println!(
        "cluster, 10 s: {} answered, {passed} passed over {:.3} s, the rate allows {expected:.1} ({:+.2}%)",
        samples.len(),
        span.as_secs_f64(),
        (passed - expected) / expected * 100.0
    );
    assert!(
        (passed - expected).abs() <= expected / 100.0,
        "{passed} passed, {expected:.1} allowed"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS, ACL user, password rotation
// ---------------------------------------------------------------------------------------------

/// A test CA's files: `ca.pem`, and `NAME.pem`/`NAME.key` pairs it issued for localhost.
fn issue_certs(dir: &Path, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL (redis-server) takes a leaf whose subject is its issuer's for self-signed.
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "gatehouse test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn tls_with_a_client_certificate_and_an_acl_user_whose_password_file_is_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    issue_certs(d, &["server", "client"]);
    let file = |name: &str| d.join(name).to_str().unwrap().to_owned();
    // TLS on one port (client certificates required); plain on another for the test.
    let (plain, tls) = (free_port(), free_port());
    let _redis = Redis::with(
        plain,
        &[
            "--tls-port",
            &tls.to_string(),
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "yes",
            "--user",
            "gatehouse",
            "on",
            ">first-secret",
            "~gatehouse:*",
            "~audit",
            "+@all",
        ],
    )
    .await;
    // The password as a mounted Secret holds it: a file, rotated in place.
    let password_file = d.join("redis-password");
    std::fs::write(&password_file, "first-secret\n").unwrap();
    let table = format!(
        "{{ url = \"rediss://localhost:{tls}\", username = \"gatehouse\", password_file = \"{}\", \
         tls_ca_file = \"{}\", tls_cert_file = \"{}\", tls_key_file = \"{}\" }}",
        password_file.display(),
        file("ca.pem"),
        file("client.pem"),
        file("client.key")
    );
    let fleet = Fleet::start(&table).await;
    let what = "tls + ACL user: password rotated, password_file rewritten, SIGHUP";
    let run = scenario(
        what,
        &fleet,
        async {
            let _: () = query(
                plain,
                &["ACL", "SETUSER", "gatehouse", "resetpass", ">second-secret"],
            );
            // Connections made with the old password stay logged in: drop them, as
            // replacing the user would.
            let _: u64 = query(plain, &["CLIENT", "KILL", "USER", "gatehouse"]);
        },
        async {
            // Each gatehouse counts its refused logins before anyone edits its config.
            for m in &fleet.members {
                while metric_of(m.admin, "gatehouse_redis_connect_failures_total{client=\"rate_limit:shared\",reason=\"auth\"}").await == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            std::fs::write(&password_file, "second-secret\n").unwrap();
            for m in &fleet.members {
                m.gh.send_signal("HUP");
            }
        },
    )
    .await;
    let logs = report(what, fleet, run, || stream_ids(&mut conn(plain), "audit")).await;
    for log in logs {
        // Two links (the limit, the sink), each logging at most once per 10 s.
        let refused = log.matches("Redis refused the login").count();
        assert!(
            (1..=4).contains(&refused),
            "a refused login is logged, not once per attempt: {log}"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn readyz_waits_for_redis_at_start_when_told_to() {
    let port = free_port();
    let up = Upstream::start().await;
    let start = |ready_requires: &'static str| {
        let admin = free_port();
        let spool = tempfile::tempdir().unwrap();
        let template = fleet_config(&format!("{{ url = \"redis://127.0.0.1:{port}\" }}"))
            .replace("[admin]\n", &format!("[admin]\n{ready_requires}\n"));
        let gh = Gatehouse::spawn(
            &template,
            &[
                ("upstream", &up.url()),
                ("admin", &admin.to_string()),
                ("spool", spool.path().to_str().unwrap()),
            ],
            &[],
        );
        (gh, admin, spool)
    };
    let (mut waits, waits_admin, _s1) = start("ready_requires = [\"redis\"]");
    let (mut plain, plain_admin, _s2) = start("");
    waits.wait_ready().await;
    plain.wait_ready().await;
    let readyz = |admin| async move { get(admin, "/readyz").await };
    let not_yet = readyz(waits_admin).await;
    assert_eq!(not_yet.status, 503, "{not_yet:?}");
    assert!(
        not_yet.text().contains("rate_limit:shared")
            && not_yet.text().contains("audit:redis_stream"),
        "names what it waits for: {}",
        not_yet.text()
    );
    assert_eq!(readyz(plain_admin).await.status, 200, "off by default");

    let redis = Redis::on(port).await;
    within(Duration::from_secs(30), "/readyz to turn 200", async {
        while readyz(waits_admin).await.status != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Only the start waits: a later outage is on_backend_error's.
    redis.kill();
    assert_eq!(readyz(waits_admin).await.status, 200);
}
