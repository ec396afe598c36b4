//! The `gatehouse` command: `run` serves, `check` validates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gatehouse::middleware::order;
use gatehouse::Config;

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
}

#[derive(Args)]
struct ConfigArg {
    /// The config file.
    #[arg(long, env = "GATEHOUSE_CONFIG", default_value = "proxy.toml")]
    config: PathBuf,
}

/// Exit statuses of SPEC: 1 start-up failure, 2 invalid config.
const START_FAILED: u8 = 1;
const INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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

fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("gatehouse: error: {error}");
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
