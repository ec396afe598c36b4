//! The `gatehouse` command: `run` serves, `check` validates, `explain` shows what the chain
//! does to one request, `test` runs policy tests, `inject` adds gatehouse to Kubernetes YAML.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gatehouse::explain::{self, cases, Target};
use gatehouse::inject;
use gatehouse::middleware::order;
use gatehouse::Config;
use http::{HeaderName, HeaderValue, Method};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reverse-proxy sidecar: a TOML-configured middleware chain in front of any service.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM or SIGINT, then drain (SIGHUP reloads the config).
    Run(ConfigArg),
    /// Validate the config and print the resolved chain.
    Check(ConfigArg),
    /// Show what the chain does to one request, step by step, without contacting the app.
    Explain(ExplainArgs),
    /// Run policy test cases (a TOML file of [[case]] tables) against the config, offline.
    Test(TestArgs),
    /// Print the JSON Schema of the config file, for editors (`#:schema` in Taplo).
    Schema,
    /// Add gatehouse as a native sidecar to every workload in Kubernetes YAML.
    #[command(long_about = inject::HELP)]
    Inject(InjectArgs),
}

#[derive(Args)]
struct InjectArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The sidecar's image.
    #[arg(long, value_name = "IMAGE", default_value = inject::DEFAULT_IMAGE)]
    image: String,
    /// The YAML to read; standard input when absent or '-'.
    #[arg(value_name = "FILE|-")]
    file: Option<PathBuf>,
}

#[derive(Args)]
struct ConfigArg {
    /// The config file.
    #[arg(long, env = "GATEHOUSE_CONFIG", default_value = "proxy.toml")]
    config: PathBuf,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print the explanation as one JSON document.
    #[arg(long)]
    json: bool,
    /// The client's address (the connection's peer).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    from: IpAddr,
    /// A request header, as 'Name: value' (repeat for more).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE", value_parser = explain::parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The request body's size in bytes (sent as content-length unless a header frames it).
    #[arg(long, value_name = "N")]
    body_size: Option<u64>,
    /// The status the app is taken to answer.
    #[arg(long, value_name = "CODE", default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
    upstream_status: u16,
    /// A response header the app is taken to answer with, as 'Name: value' (repeat for more).
    #[arg(long = "upstream-header", value_name = "NAME: VALUE", value_parser = explain::parse_header)]
    upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Ask outside state for real (Redis, auth services, JWKS URLs), read-only where possible.
    #[arg(long)]
    live: bool,
    /// The request method, e.g. GET.
    #[arg(value_parser = explain::parse_method)]
    method: Method,
    /// A path such as /api/items?page=2, or a full URL whose host is the Host.
    url: Target,
}

#[derive(Args)]
struct TestArgs {
    /// The test cases: a TOML file of [[case]] tables.
    file: PathBuf,
    #[command(flatten)]
    config: ConfigArg,
}

/// The documented exit statuses: 1 start-up failure (and a bad command line, or a failed policy
/// test), 2 invalid config.
const START_FAILED: u8 = 1;
const INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // A bad command line exits 1: 2 says the config is invalid.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::from(e.use_stderr()));
        }
    };
    match cli.command {
        Command::Explain(args) => explain(args),
        Command::Test(args) => test(&args),
        Command::Schema => {
            let schema = Config::schema();
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("a schema serializes")
            );
            ExitCode::SUCCESS
        }
        Command::Inject(args) => inject(&args),
        Command::Check(args) => match Config::load(&args.config) {
            Ok(config) => {
                print!("{}", describe(&config));
                ExitCode::SUCCESS
            }
            Err(e) => fail(INVALID_CONFIG, &e),
        },
        Command::Run(args) => {
            let config = match Config::load(&args.config) {
                Ok(config) => config,
                Err(e) => return fail(INVALID_CONFIG, &e),
            };
            gatehouse::logging::init(&config.log);
            for warning in order::warnings(&config.middleware) {
                tracing::warn!("{warning}");
            }
            match gatehouse::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e.0, "start-up failed");
                    fail(START_FAILED, &e.0)
                }
            }
        }
    }
}

/// `explain`: 0 when the request was explained, whatever the chain decided.
fn explain(args: ExplainArgs) -> ExitCode {
    let config = match Config::load(&args.config.config) {
        Ok(config) => config,
        Err(e) => return fail(INVALID_CONFIG, &e),
    };
    let mut request = explain::Request::new(args.method, args.url);
    request.headers = args.headers;
    request.from = args.from;
    request.body_size = args.body_size;
    request.upstream_status =
        http::StatusCode::from_u16(args.upstream_status).expect("clap checked the range");
    request.upstream_headers = args.upstream_headers;
    match explain::explain(&config, &request, args.live) {
        Ok(report) if args.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("the report serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(START_FAILED, &format!("cannot run the chain: {e}")),
    }
}

/// `inject`: the YAML on stdout, or nothing and the error.
fn inject(args: &InjectArgs) -> ExitCode {
    match inject::run(&args.config.config, &args.image, args.file.as_deref()) {
        Ok(out) => {
            for note in &out.notes {
                eprintln!("gatehouse: note: {note}");
            }
            match std::io::Write::write_all(&mut std::io::stdout(), out.yaml.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(START_FAILED, &format!("cannot write the output: {e}")),
            }
        }
        Err(inject::Error::Config(e)) => fail(INVALID_CONFIG, &e),
        Err(inject::Error::Input(e)) => fail(START_FAILED, &e),
    }
}

/// `test`: every case's result, then the summary; 1 if any failed.
fn test(args: &TestArgs) -> ExitCode {
    let config = match Config::load(&args.config.config) {
        Ok(config) => config,
        Err(e) => return fail(INVALID_CONFIG, &e),
    };
    let cases = match cases::load(&args.file, &config) {
        Ok(cases) => cases,
        Err(e) => return fail(INVALID_CONFIG, &e),
    };
    let mut verdicts = Vec::with_capacity(cases.len());
    for case in &cases {
        match case.run(&config) {
            Ok(verdict) => {
                print!("{verdict}");
                verdicts.push(verdict);
            }
            Err(e) => return fail(START_FAILED, &format!("cannot run the chain: {e}")),
        }
    }
    println!("{}", cases::summary(&verdicts));
    if verdicts.iter().all(|v| v.failures.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(START_FAILED)
    }
}

/// Prints `error` to stderr, each of its lines (a config error has one per problem)
/// marked as an error.
fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    for line in error.to_string().lines() {
        eprintln!("gatehouse: error: {line}");
    }
    ExitCode::from(code)
}

/// `check`'s report: the settings that matter, the chain (one line per middleware), and
/// warnings about an order that loads but breaks clients (the same `run` logs at start).
fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let s = &config.server;
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", config.file.display());
    let _ = writeln!(
        out,
        "listen {} ({} workers) -> upstream {} over {} (timeout {}, connect_timeout {}, preserve_host {})",
        s.listen.0,
        config.workers(),
        config.upstream.url,
        config.upstream.protocol,
        config.upstream.timeout,
        config.upstream.connect_timeout,
        config.upstream.preserve_host
    );
    if let Some(tls) = &s.tls {
        let _ = writeln!(
            out,
            "tls: cert {} key {}",
            tls.cert.display(),
            tls.key.display()
        );
    }
    if let Some(admin) = &config.admin {
        let _ = writeln!(out, "admin {} (/healthz /readyz /metrics)", admin.listen.0);
    }
    if let Some(audit) = &config.audit {
        let sinks: Vec<&str> = audit.sinks.iter().map(|s| s.name.as_str()).collect();
        let _ = writeln!(
            out,
            "audit: include {}, queue {}, sinks {}",
            format!("{:?}", audit.include).to_lowercase(),
            audit.queue_capacity,
            sinks.join(",")
        );
    }
    if let Some(t) = &config.tracing {
        let _ = writeln!(
            out,
            "tracing: export to {} as service {}, sample_ratio {}, queue {}, batch {}, flush_interval {}",
            t.url, t.resource.service_name, t.sample_ratio, t.queue_capacity, t.batch_size, t.flush_interval
        );
    }
    let _ = writeln!(
        out,
        "chain ({} middlewares, request order):",
        config.middleware.len()
    );
    for (i, m) in config.middleware.iter().enumerate() {
        let mut scope = String::new();
        if !m.paths.is_empty() {
            let _ = write!(scope, " paths={}", join(&m.paths));
        }
        if !m.skip_paths.is_empty() {
            let _ = write!(scope, " skip_paths={}", join(&m.skip_paths));
        }
        if !m.methods.is_empty() {
            let _ = write!(scope, " methods={}", join(&m.methods));
        }
        let _ = writeln!(
            out,
            "  {}. {} (type {}){scope}: {}",
            i + 1,
            m.name,
            m.spec.kind(),
            m.spec.settings().summary()
        );
    }
    for warning in order::warnings(&config.middleware) {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
