//! `stardust domain`: run a domain coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML file with any of these settings (flags and STARDUST_* variables win).
    #[arg(long, env = "STARDUST_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "STARDUST_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Data directory (domain key; the SQLite database unless --database is given).
    #[arg(long, env = "STARDUST_DATA", default_value = ".stardust/domain")]
    data: PathBuf,
    /// PostgreSQL URL, e.g. postgres://user:pass@host/db (default: SQLite under --data).
    #[arg(long, env = "STARDUST_DATABASE")]
    database: Option<String>,
    /// Lease duration without a heartbeat, e.g. 30s.
    #[arg(long, env = "STARDUST_LEASE", default_value = "30s", value_parser = crate::units::parse_duration)]
    lease: std::time::Duration,
    /// Heartbeat interval nodes must keep, e.g. 5s.
    #[arg(long, env = "STARDUST_HEARTBEAT", default_value = "5s", value_parser = crate::units::parse_duration)]
    heartbeat: std::time::Duration,
    /// Serve HTTPS/WSS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "STARDUST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "STARDUST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Failed attempts before a task is dead-lettered.
    #[arg(long, env = "STARDUST_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// Credits granted once to each new submitter key (minted).
    #[arg(long, env = "STARDUST_WELCOME_GRANT", default_value = "0", value_parser = crate::units::parse_credits)]
    welcome_grant: u64,
    /// Base price of one SCU (10^9 fuel), in credits, before demand and priority.
    #[arg(long, env = "STARDUST_PRICE", default_value = "1", value_parser = crate::units::parse_credits)]
    price: u64,
    /// Stake in credits a node must hold per task it runs; lost on a wrong result.
    #[arg(long, env = "STARDUST_STAKE", default_value = "0", value_parser = crate::units::parse_credits)]
    stake: u64,
    /// Fraction of assignments that come with a spot check (a known-answer task).
    #[arg(long, env = "STARDUST_SPOT_RATE", default_value_t = 0.02)]
    spot_rate: f64,
    /// Agreeing results in a row before a node may run tasks as a single replica (0: off).
    #[arg(long, env = "STARDUST_ADAPTIVE_STREAK", default_value_t = 10)]
    adaptive_streak: u64,
    /// Show jobs on the dashboard to every visitor (default: only to this machine).
    #[arg(long, env = "STARDUST_PUBLIC_DASHBOARD")]
    public_dashboard: bool,
    /// Processor cores the domain's threads run on: auto (one core with SQLite, whose one
    /// writer gains nothing from more and loses time to waking threads across cores; every core
    /// with PostgreSQL), all, or a core number.
    #[arg(long, env = "STARDUST_CORES", default_value = "auto")]
    cores: stardust_domain::Cores,
    /// Accept relay links from the connection gateway with this key (repeatable; `stardust
    /// gateway` prints its key).
    #[arg(
        long = "gateway-key",
        env = "STARDUST_GATEWAY_KEYS",
        value_delimiter = ','
    )]
    gateway_keys: Vec<stardust_proto::identity::NodeId>,
}

pub fn main(mut args: Args, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    if let Some(path) = args.config.clone() {
        use crate::config::from_str;
        let mut f = crate::config::File::read(&path, matches)?;
        f.set("listen", &mut args.listen, from_str)?;
        f.set("data", &mut args.data, from_str)?;
        f.set("database", &mut args.database, |s| Ok(Some(s.to_string())))?;
        f.set("lease", &mut args.lease, crate::units::parse_duration)?;
        f.set(
            "heartbeat",
            &mut args.heartbeat,
            crate::units::parse_duration,
        )?;
        f.set("max_attempts", &mut args.max_attempts, from_str)?;
        f.set(
            "welcome_grant",
            &mut args.welcome_grant,
            crate::units::parse_credits,
        )?;
        f.set("price", &mut args.price, crate::units::parse_credits)?;
        f.set("stake", &mut args.stake, crate::units::parse_credits)?;
        f.set("spot_rate", &mut args.spot_rate, from_str)?;
        f.set("adaptive_streak", &mut args.adaptive_streak, from_str)?;
        f.set("public_dashboard", &mut args.public_dashboard, from_str)?;
        f.set("cores", &mut args.cores, from_str)?;
        f.set("gateway_keys", &mut args.gateway_keys, |s| {
            s.split(',')
                .map(|k| k.trim().parse().map_err(|e| format!("{k}: {e}")))
                .collect()
        })?;
        f.set("tls_cert", &mut args.tls_cert, |s| {
            Ok(Some(PathBuf::from(s)))
        })?;
        f.set("tls_key", &mut args.tls_key, |s| Ok(Some(PathBuf::from(s))))?;
        f.finish()?;
    }
    // The domain runs on a runtime of its own (`Domain::start`); this one only waits.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&args.data)
            .with_context(|| format!("cannot create {}", args.data.display()))?;
        let identity = stardust_keystore::load_or_create(&args.data.join("domain.key"))?;
        let mut config = stardust_domain::Config::new(args.data.clone());
        config.listen = args.listen;
        config.database_url = args.database.clone();
        config.lease_ms = args.lease.as_millis() as i64;
        config.heartbeat_ms = args.heartbeat.as_millis() as u64;
        config.max_attempts = args.max_attempts;
        config.welcome_grant = args.welcome_grant;
        config.pricing.base = args.price;
        config.stake = args.stake;
        config.spot_rate = args.spot_rate;
        config.adaptive.min_streak = args.adaptive_streak;
        config.public_dashboard = args.public_dashboard;
        config.cores = args.cores;
        config.gateways = args.gateway_keys.clone();
        anyhow::ensure!(
            (0.0..=1.0).contains(&args.spot_rate),
            "--spot-rate must be between 0 and 1"
        );
        config.tls = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        anyhow::ensure!(
            config.max_attempts >= 1,
            "--max-attempts must be at least 1"
        );
        anyhow::ensure!(
            config.heartbeat_ms >= 100 && (config.heartbeat_ms as i64) < config.lease_ms,
            "--heartbeat must be at least 100ms and shorter than --lease"
        );
        let domain = stardust_domain::Domain::start(config, identity).await?;
        eprintln!(
            "stardust domain {} listening on {scheme}://{} (dashboard: {scheme}://{}/)",
            domain.id(),
            domain.addr(),
            domain.addr()
        );
        crate::signals::terminated().await;
        eprintln!("stardust domain: shutting down");
        domain.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
