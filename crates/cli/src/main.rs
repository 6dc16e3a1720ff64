//! `stardust`: the one binary of the Stardust compute network.
//!
//! Configuration is read here and only here (flags and `STARDUST_*` environment variables);
//! the libraries take typed configs.

#![forbid(unsafe_code)]

mod bare;
mod bench;
mod client;
mod config;
mod demo;
mod domain;
mod floor;
mod gateway;
mod jobfile;
mod keys;
mod ledger;
mod node;
mod run;
mod scale;
mod signals;
mod units;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Stardust: a federated compute network. Contribute idle compute, run verified jobs.
#[derive(Debug, Parser)]
#[command(name = "stardust", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STARDUST_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `stardust_sandbox=debug`.
    #[arg(long, global = true, default_value = "warn", env = "STARDUST_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole network on this machine: a domain, local nodes, the hyperparameter-search
    /// example, verified and paid, with a report.
    Demo(demo::Args),
    /// Run a domain coordinator (REST API, node sessions, scheduling).
    Domain(domain::Args),
    /// Contribute this machine to a domain.
    Node(node::Args),
    /// Hold nodes' connections for a domain and relay their sessions to it over one link.
    Gateway(gateway::Args),
    /// Submit a job file (TOML or JSON).
    Submit(client::SubmitArgs),
    /// Price a job file now: price per SCU, the most it can cost, your balance.
    Quote(client::QuoteArgs),
    /// Inspect or cancel a job.
    #[command(subcommand)]
    Job(client::JobCommand),
    /// List the domain's nodes.
    Nodes(client::Conn),
    /// Run a WebAssembly module locally under exactly the sandbox nodes use.
    Run(run::Args),
    /// Manage identity keys.
    #[command(subcommand)]
    Keys(keys::Command),
    /// The credit ledger: verify it, list balances, grant credits.
    #[command(subcommand)]
    Ledger(ledger::Command),
    /// Measure performance (results belong in docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::Command),
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    bench::exit_with_parent();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    if let Err(e) = init_logging(cli.log_format, &cli.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Demo(args) => demo::main(args),
        Command::Domain(args) => domain::main(args, &sub),
        Command::Node(args) => node::main(args, &sub),
        Command::Gateway(args) => gateway::main(args, &sub),
        Command::Submit(args) => client::submit(args),
        Command::Quote(args) => client::quote(args),
        Command::Ledger(cmd) => ledger::main(cmd),
        Command::Job(cmd) => client::job(cmd),
        Command::Nodes(conn) => client::nodes(conn),
        Command::Run(args) => run::main(args),
        Command::Keys(cmd) => keys::main(cmd),
        Command::Bench(cmd) => bench::main(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
