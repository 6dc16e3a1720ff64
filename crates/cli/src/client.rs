//! Client commands: `submit`, `job status|results|why|cancel`, `nodes`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

/// Where the domain is and who we are.
#[derive(Debug, clap::Args)]
pub struct Conn {
    /// The domain, http://HOST:PORT.
    #[arg(long, env = "STARDUST_DOMAIN", default_value = "http://127.0.0.1:7700")]
    domain: String,
    /// The client key file (created on first use).
    #[arg(long, env = "STARDUST_KEY")]
    key: Option<PathBuf>,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
    /// Extra CA certificates (PEM) to trust for an https domain.
    #[arg(long, env = "STARDUST_CA")]
    ca: Option<PathBuf>,
}

impl Conn {
    fn client(&self) -> anyhow::Result<stardust_sdk::Client> {
        let key = match &self.key {
            Some(k) => k.clone(),
            None => {
                let home = std::env::var_os("HOME").context("HOME is not set; pass --key FILE")?;
                PathBuf::from(home).join(".stardust").join("client.key")
            }
        };
        let identity = stardust_keystore::load_or_create(&key)?;
        let ca = match &self.ca {
            Some(p) => {
                Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
            }
            None => None,
        };
        Ok(stardust_sdk::Client::with_ca(
            &self.domain,
            identity,
            ca.as_deref(),
        )?)
    }
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job file (TOML or JSON).
    file: PathBuf,
    /// Wait for the job to end, with a progress bar.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct QuoteArgs {
    /// The job file (TOML or JSON).
    file: PathBuf,
    #[command(flatten)]
    conn: Conn,
}

pub fn quote(args: QuoteArgs) -> anyhow::Result<ExitCode> {
    let loaded = crate::jobfile::load(&args.file)?;
    let client = args.conn.client()?;
    let v = runtime()?.block_on(client.quote(&loaded.spec))?;
    let c = |k: &str| crate::units::credits(v[k].as_i64().unwrap_or(0).into());
    print(&args.conn, &v, |v| {
        format!(
            "{} tasks × {} replicas, at most {} fuel each\nprice: {} credits per SCU (base {} × demand {} × priority {})\nmost it can cost: {} credits (held in escrow at submission; unused credits come back)\nyour balance: {} credits{}",
            v["tasks"],
            v["redundancy"],
            v["fuel_limit"],
            c("price_per_scu"),
            c("base_per_scu"),
            v["demand_milli"].as_u64().unwrap_or(0) as f64 / 1000.0,
            v["priority_milli"].as_u64().unwrap_or(0) as f64 / 1000.0,
            c("max_cost"),
            c("balance"),
            if v["affordable"] == true {
                ""
            } else {
                " — not enough: ask the domain's operator for a grant"
            },
        )
    });
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// State and task counts.
    Status {
        /// The job id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait for the job to end, with a progress bar; exits non-zero unless it completed.
    Wait {
        /// The job id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Verified results, with small outputs inline.
    Results {
        /// The job id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Why pending tasks are not running.
    Why {
        /// The job id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel the job.
    Cancel {
        /// The job id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print(conn: &Conn, value: &Value, text: impl FnOnce(&Value) -> String) {
    if conn.json {
        println!("{value}");
    } else {
        println!("{}", text(value));
    }
}

fn status_line(v: &Value) -> String {
    format!(
        "job {} {}: {}/{} verified, {} failed, {} pending",
        v["job_id"],
        v["state"].as_str().unwrap_or("?"),
        v["tasks_verified"],
        v["tasks_total"],
        v["tasks_failed"],
        v["tasks_pending"]
    )
}

/// Draws a progress bar on stderr when it is a terminal.
pub(crate) fn progress(v: &Value) {
    let err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let total = v["tasks_total"].as_u64().unwrap_or(0).max(1);
    let done = v["tasks_verified"].as_u64().unwrap_or(0)
        + v["tasks_failed"].as_u64().unwrap_or(0)
        + v["tasks_cancelled"].as_u64().unwrap_or(0);
    let width = 40;
    let filled = (done * width / total) as usize;
    let mut e = err.lock();
    let _ = write!(
        e,
        "\r[{}{}] {done}/{total} {}   ",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        v["state"].as_str().unwrap_or("")
    );
    let _ = e.flush();
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let loaded = crate::jobfile::load(&args.file)?;
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        for (_, bytes) in loaded.uploads {
            client.put_blob(bytes).await?;
        }
        let job = client.submit(&loaded.spec).await?;
        if !args.wait {
            let v = json!({ "job_id": job, "state": "queued" });
            print(&args.conn, &v, |_| format!("submitted job {job}"));
            return Ok(ExitCode::SUCCESS);
        }
        if !args.conn.json {
            eprintln!("submitted job {job}; waiting");
        }
        wait(&client, &args.conn, job).await
    })
}

/// Waits for `job` to end, prints its status; success only when it completed.
async fn wait(client: &stardust_sdk::Client, conn: &Conn, job: u64) -> anyhow::Result<ExitCode> {
    let status = client.wait(job, progress).await?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    print(conn, &status, status_line);
    Ok(if status["state"] == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn job(cmd: JobCommand) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match cmd {
        JobCommand::Wait { id, conn } => {
            return rt.block_on(async { wait(&conn.client()?, &conn, id).await });
        }
        JobCommand::Status { id, conn } => {
            let v = rt.block_on(conn.client()?.job(id))?;
            print(&conn, &v, status_line);
        }
        JobCommand::Results { id, conn } => {
            let v = rt.block_on(conn.client()?.results(id))?;
            print(&conn, &v, |v| {
                let mut out = String::new();
                for r in v["results"].as_array().into_iter().flatten() {
                    let args: Vec<&str> = r["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let text = r["output_text"]
                        .as_str()
                        .map_or_else(|| r["output"].to_string(), |t| t.trim_end().to_string());
                    out.push_str(&format!(
                        "#{} [{}] {}: {}\n",
                        r["index"],
                        args.join(" "),
                        r["state"].as_str().unwrap_or("?"),
                        text
                    ));
                }
                out.trim_end().to_string()
            });
        }
        JobCommand::Why { id, conn } => {
            let v = rt.block_on(conn.client()?.why(id))?;
            print(&conn, &v, |v| {
                let lines: Vec<String> = v["explanations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        format!(
                            "{} task(s): {}",
                            e["tasks"],
                            e["why"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                if lines.is_empty() {
                    format!("job {id} has no pending task ({} running)", v["running"])
                } else {
                    lines.join("\n")
                }
            });
        }
        JobCommand::Cancel { id, conn } => {
            let v = rt.block_on(conn.client()?.cancel(id))?;
            print(&conn, &v, status_line);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn nodes(conn: Conn) -> anyhow::Result<ExitCode> {
    let v = runtime()?.block_on(conn.client()?.nodes())?;
    print(&conn, &v, |v| {
        let mut out = format!(
            "{:<12} {:<9} {:<9} {:>5} {:>7} {:>7} {:>10} {:>14}\n",
            "node", "state", "tier", "cores", "running", "agreed", "reputation", "credits"
        );
        for n in v["nodes"].as_array().into_iter().flatten() {
            let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
            out.push_str(&format!(
                "{:<12} {:<9} {:<9} {:>5} {:>7} {:>7} {:>10.3} {:>14}\n",
                text(&n["id"]).chars().take(10).collect::<String>(),
                text(&n["state"]),
                text(&n["tier"]),
                text(&n["hardware"]["cores"]),
                text(&n["running"]),
                text(&n["agreed"]),
                n["reputation"].as_f64().unwrap_or(0.0),
                crate::units::credits(n["credits"].as_i64().unwrap_or(0).into())
            ));
        }
        out.trim_end().to_string()
    });
    Ok(ExitCode::SUCCESS)
}
