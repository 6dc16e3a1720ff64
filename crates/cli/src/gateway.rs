//! `stardust gateway`: hold nodes' connections for a domain and relay their sessions to it
//! over one link (docs/protocol.md §5d).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML file with any of these settings (flags and STARDUST_* variables win).
    #[arg(long, env = "STARDUST_CONFIG")]
    config: Option<PathBuf>,
    /// The domain, http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "STARDUST_DOMAIN", default_value = "http://127.0.0.1:7700")]
    domain: String,
    /// Address nodes connect to (`stardust node --gateway http://ADDR`).
    #[arg(long, env = "STARDUST_LISTEN", default_value = "127.0.0.1:7800")]
    listen: SocketAddr,
    /// Data directory (the gateway key, gateway.key).
    #[arg(long, env = "STARDUST_DATA", default_value = ".stardust/gateway")]
    data: PathBuf,
    /// Node connections held at most (keep it under `ulimit -n`); beyond, nodes are
    /// refused and retry.
    #[arg(long, env = "STARDUST_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Extra CA certificates (PEM) to trust for an https domain.
    #[arg(long, env = "STARDUST_CA")]
    ca: Option<PathBuf>,
    /// Serve nodes HTTPS/WSS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "STARDUST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "STARDUST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn main(mut args: Args, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    if let Some(path) = args.config.clone() {
        use crate::config::from_str;
        let mut f = crate::config::File::read(&path, matches)?;
        f.set("domain", &mut args.domain, from_str)?;
        f.set("listen", &mut args.listen, from_str)?;
        f.set("data", &mut args.data, from_str)?;
        f.set("max_sessions", &mut args.max_sessions, from_str)?;
        f.set("ca", &mut args.ca, |s| Ok(Some(PathBuf::from(s))))?;
        f.set("tls_cert", &mut args.tls_cert, |s| {
            Ok(Some(PathBuf::from(s)))
        })?;
        f.set("tls_key", &mut args.tls_key, |s| Ok(Some(PathBuf::from(s))))?;
        f.finish()?;
    }
    anyhow::ensure!(args.max_sessions >= 1, "--max-sessions must be at least 1");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&args.data)?;
        let identity = stardust_keystore::load_or_create(&args.data.join("gateway.key"))?;
        let mut config = stardust_domain::gateway::GatewayConfig::new(args.domain.clone());
        config.listen = args.listen;
        config.max_sessions = args.max_sessions;
        config.serve_tls = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let scheme = if config.serve_tls.is_some() {
            "https"
        } else {
            "http"
        };
        if args.domain.starts_with("https://") {
            let ca = match &args.ca {
                Some(p) => Some(
                    std::fs::read(p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
                ),
                None => None,
            };
            config.tls = Some(std::sync::Arc::new(stardust_sdk::tls_config(ca.as_deref())?));
        }
        let gateway = stardust_domain::gateway::Gateway::start(config, identity).await?;
        eprintln!(
            "stardust gateway {} listening on {scheme}://{} for {} (list it there: stardust domain --gateway-key {})",
            gateway.id(),
            gateway.addr(),
            args.domain,
            gateway.id()
        );
        crate::signals::terminated().await;
        eprintln!("stardust gateway: shutting down");
        gateway.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
