//! Domain settings. The binary fills this from flags, `STARDUST_*` variables and a TOML
//! file; the library never reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::cores::Cores;
pub use crate::ratelimit::Rate;
pub use stardust_scheduler::pricing::Pricing;
pub use stardust_scheduler::reputation::Adaptive;

/// Everything a domain needs to run. Defaults are listed per field.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:7700`.
    pub listen: SocketAddr,
    /// Data directory: the domain key (`domain.key`) and, without `database_url`, the SQLite
    /// database.
    pub data_dir: PathBuf,
    /// PostgreSQL URL; SQLite under `data_dir` when absent.
    pub database_url: Option<String>,
    /// A lease lapses this long after the last heartbeat that renewed it. Default 30 s.
    pub lease_ms: i64,
    /// How often nodes must heartbeat. Default 5 s.
    pub heartbeat_ms: u64,
    /// Failed attempts of a task before it is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Most replicas of one task, extra ones on disagreement included. Default 5.
    pub max_replicas: u8,
    /// Largest REST request body (blob uploads included). Default 64 MiB.
    pub max_request_bytes: usize,
    /// Largest WebSocket frame from a node. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Outgoing frames queued per node session before the session is dropped as too slow.
    /// Default 1024.
    pub session_queue: usize,
    /// Tasks examined per dispatch round. Default 512.
    pub dispatch_batch: u32,
    /// Leases per node slot, so each slot has its next task queued. Default 2.
    pub lease_ahead: u32,
    /// Signed requests per client key. Default 100/s, bursts of 200.
    pub rate_per_key: Rate,
    /// Requests per network address (signed or not, node sessions included). Default 500/s,
    /// bursts of 1,000.
    pub rate_per_addr: Rate,
    /// Frames per node session. Default 2,000/s, bursts of 4,000.
    pub rate_per_session: Rate,
    /// Serve HTTPS/WSS with this certificate chain and private key (PEM files). Default:
    /// plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Price of compute (base price per SCU). Default one credit per SCU.
    pub pricing: Pricing,
    /// Micro-credits minted once for each new submitter key. Default 0.
    pub welcome_grant: u64,
    /// Stake (micro-credits) a node must hold per lease, lost to the treasury when it
    /// loses a quorum or fails a spot check. Default 0 (no stake needed).
    pub stake: u64,
    /// Probability that an assignment to a node comes with a spot check (a known-answer
    /// task). Default 0.02.
    pub spot_rate: f64,
    /// Adaptive replication. Default: on, after 10 agreeing results, re-checks ≥ 5 %.
    pub adaptive: Adaptive,
    /// Show jobs (names, progress, sweep results) on the dashboard to every visitor, not
    /// only to requests from this machine (loopback). Default false.
    pub public_dashboard: bool,
    /// Which processor cores the domain's threads run on (see [`Cores`]). Default
    /// [`Cores::Auto`]: one core with SQLite, every core with PostgreSQL.
    pub cores: Cores,
    /// Keys of the connection gateways whose relay links (`/v1/relay`) this domain accepts
    /// (docs/protocol.md §5d). Default none: the endpoint refuses every link.
    pub gateways: Vec<stardust_proto::identity::NodeId>,
}

impl Config {
    /// Defaults, with the data directory given.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir,
            database_url: None,
            lease_ms: 30_000,
            heartbeat_ms: 5_000,
            max_attempts: 5,
            max_replicas: 5,
            max_request_bytes: 64 << 20,
            max_frame_bytes: 16 << 20,
            session_queue: 1024,
            dispatch_batch: 512,
            lease_ahead: 2,
            rate_per_key: Rate {
                per_s: 100.0,
                burst: 200.0,
            },
            rate_per_addr: Rate {
                per_s: 500.0,
                burst: 1_000.0,
            },
            rate_per_session: Rate {
                per_s: 2_000.0,
                burst: 4_000.0,
            },
            tls: None,
            pricing: Pricing::default(),
            welcome_grant: 0,
            stake: 0,
            spot_rate: 0.02,
            adaptive: Adaptive::default(),
            public_dashboard: false,
            cores: Cores::Auto,
            gateways: Vec::new(),
        }
    }
}
