//! `stardust node`: contribute this machine to a domain.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML file with any of these settings (flags and STARDUST_* variables win).
    #[arg(long, env = "STARDUST_CONFIG")]
    config: Option<PathBuf>,
    /// The domain, http://HOST:PORT.
    #[arg(long, env = "STARDUST_DOMAIN", default_value = "http://127.0.0.1:7700")]
    domain: String,
    /// Hold the session through this connection gateway of the domain, http://HOST:PORT
    /// (blobs still come from --domain).
    #[arg(long, env = "STARDUST_GATEWAY")]
    gateway: Option<String>,
    /// Tasks run at once (default: the number of cores).
    #[arg(long, env = "STARDUST_SLOTS")]
    slots: Option<u32>,
    /// Data directory (node key, cached modules and inputs).
    #[arg(long, env = "STARDUST_DATA", default_value = ".stardust/node")]
    data: PathBuf,
    /// Share of CPU time to use, as a duty cycle in (0, 1].
    #[arg(long, env = "STARDUST_CPU_LIMIT", default_value_t = 1.0)]
    cpu_limit: f64,
    /// Take work only while other processes leave the machine idle (load ≤ --idle-threshold).
    #[arg(long, env = "STARDUST_WHEN_IDLE")]
    when_idle: bool,
    /// Load of other processes above which --when-idle pauses work.
    #[arg(long, env = "STARDUST_IDLE_THRESHOLD", default_value_t = 0.25)]
    idle_threshold: f64,
    /// Labels offered to tasks' requirements (repeatable).
    #[arg(long = "label", env = "STARDUST_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Extra CA certificates (PEM) to trust for an https domain.
    #[arg(long, env = "STARDUST_CA")]
    ca: Option<PathBuf>,
    /// Disk the caches of fetched inputs and compiled modules may use, MiB (at least 16;
    /// the least recently used go first).
    #[arg(long, env = "STARDUST_CACHE_MB", default_value_t = stardust_node::DEFAULT_CACHE_BYTES >> 20)]
    cache_mb: u64,
    /// CPU priority as a nice value, 0–19: the node runs below its owner's own work (19,
    /// the lowest, by default, as BOINC runs its tasks); 0 keeps the priority it started
    /// with.
    #[arg(long, env = "STARDUST_NICE", default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
    nice: u8,
    /// Skip the startup benchmark.
    #[arg(long)]
    no_bench: bool,
}

pub fn main(mut args: Args, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    if let Some(path) = args.config.clone() {
        use crate::config::from_str;
        let mut f = crate::config::File::read(&path, matches)?;
        f.set("domain", &mut args.domain, from_str)?;
        f.set("gateway", &mut args.gateway, |s| Ok(Some(s.to_string())))?;
        f.set("slots", &mut args.slots, |s| from_str(s).map(Some))?;
        f.set("data", &mut args.data, from_str)?;
        f.set("cpu_limit", &mut args.cpu_limit, from_str)?;
        f.set("when_idle", &mut args.when_idle, from_str)?;
        f.set("idle_threshold", &mut args.idle_threshold, from_str)?;
        f.set("labels", &mut args.labels, |s| {
            Ok(s.split(',').map(str::to_string).collect())
        })?;
        f.set("no_bench", &mut args.no_bench, from_str)?;
        f.set("cache_mb", &mut args.cache_mb, from_str)?;
        f.set("ca", &mut args.ca, |s| Ok(Some(PathBuf::from(s))))?;
        f.set("nice", &mut args.nice, |s| match from_str::<u8>(s)? {
            n @ 0..=19 => Ok(n),
            n => Err(format!("nice must be 0–19, not {n}")),
        })?;
        f.finish()?;
    }
    // Before the runtime starts its threads: they inherit it.
    lower_priority(args.nice)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&args.data)?;
        let identity = stardust_keystore::load_or_create(&args.data.join("node.key"))?;
        let mut config = stardust_node::Config::new(args.domain.clone(), args.data.clone());
        if let Some(slots) = args.slots {
            config.slots = slots;
        }
        config.gateway = args.gateway.clone();
        config.cpu_limit = args.cpu_limit;
        config.when_idle = args.when_idle;
        config.idle_threshold = args.idle_threshold;
        config.labels = args.labels.clone();
        config.bench = !args.no_bench;
        config.cache_bytes = args.cache_mb.saturating_mul(1 << 20);
        if let Some(ca) = &args.ca {
            config.ca_pem = Some(
                std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?,
            );
        }
        let via = args
            .gateway
            .as_deref()
            .map_or_else(String::new, |g| format!(" through gateway {g}"));
        eprintln!(
            "stardust node {} joining {}{via} with {} slots",
            identity.id(),
            args.domain,
            config.slots
        );
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::signals::terminated().await;
            eprintln!("stardust node: draining (finishing running tasks, taking none)");
            let _ = stop.send(true);
        });
        stardust_node::run(config, identity, shutdown).await?;
        eprintln!("stardust node: drained, bye");
        Ok(ExitCode::SUCCESS)
    })
}

/// Lowers this process's CPU priority to nice value `nice` (never raises it: a node has no
/// reason to, and only a privileged process may). Linux keeps the nice value per thread and
/// gives each new thread its creator's: this runs before the node's threads start.
fn lower_priority(nice: u8) -> anyhow::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    let now = rustix::process::getpriority_process(None)
        .map_err(|e| anyhow::anyhow!("cannot read this process's priority: {e}"))?;
    let nice = i32::from(nice);
    if nice > now {
        rustix::process::setpriority_process(None, nice).map_err(|e| {
            anyhow::anyhow!("cannot lower this process's priority to nice {nice}: {e}")
        })?;
    }
    Ok(())
}
