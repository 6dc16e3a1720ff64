//! `stardust run MODULE`: run a module locally under exactly the sandbox nodes use.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use stardust_proto::content::ContentId;
use stardust_proto::task::{Limits, Status};
use stardust_sandbox::{Config, Sandbox, Task};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The module: a WASI preview 1 command (.wasm binary or .wat text).
    module: PathBuf,
    /// File whose bytes are the task's stdin (`-` for this process's stdin). Default: empty.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the guest's stdout here instead of to this process's stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Fuel limit (1 SCU = 10^9 fuel).
    #[arg(long, default_value_t = Limits::default().fuel)]
    fuel: u64,
    /// Memory cap, e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = crate::units::parse_size)]
    memory: u64,
    /// Wall-clock deadline, e.g. 30s or 500ms.
    #[arg(long, default_value = "60s", value_parser = crate::units::parse_duration)]
    timeout: std::time::Duration,
    /// Output cap, e.g. 16MiB.
    #[arg(long, default_value = "16MiB", value_parser = crate::units::parse_size)]
    max_output: u64,
    /// Seed of the guest's deterministic random source.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print a JSON report as the last stdout line.
    #[arg(long)]
    json: bool,
    /// Also write the metered module (what nodes run) to this file, e.g. to run it in
    /// another host such as the browser node's (`Stardust.run`).
    #[arg(long, value_name = "FILE")]
    save_metered: Option<PathBuf>,
    /// Arguments passed to the guest after `argv[0]`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Reads a module file: WebAssembly binary as is, anything else parsed as WAT text.
pub fn read_module(path: &std::path::Path) -> anyhow::Result<Result<Vec<u8>, String>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))?;
    if bytes.starts_with(b"\0asm") {
        return Ok(Ok(bytes));
    }
    Ok(match std::str::from_utf8(&bytes) {
        Ok(text) => wat::parse_str(text)
            .map_err(|e| format!("not a WebAssembly binary, and not valid WAT: {e}")),
        Err(_) => Err("not a WebAssembly module (bad magic bytes)".to_string()),
    })
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let input: Vec<u8> = match &args.input {
        None => Vec::new(),
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("cannot read stdin")?;
            buf
        }
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read input {}", p.display()))?
        }
    };
    let limits = Limits {
        fuel: args.fuel,
        memory_bytes: args.memory,
        wall_ms: args.timeout.as_millis().try_into().unwrap_or(u64::MAX),
        output_bytes: args.max_output,
    };
    limits.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let module = read_module(&args.module)?;
    let sandbox = Sandbox::new(Config {
        max_instances: 1,
        memory_cache_entries: 1,
        ..Config::default()
    })?;
    let task = Task {
        input: Arc::from(input),
        args: &args.args,
        seed: args.seed,
        limits,
    };
    let module_id = module.as_ref().ok().map(|m| ContentId::of(m));
    // A module fetched from a domain is already metered: run it as is.
    let metered = module.map_err(|e| e.to_string()).and_then(|m| {
        if stardust_meter::is_metered(&m) {
            Ok(m)
        } else {
            stardust_meter::instrument(&m).map_err(|e| e.to_string())
        }
    });
    if let (Some(path), Ok(m)) = (&args.save_metered, &metered) {
        std::fs::write(path, m).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let (out, metered_id) = match metered {
        Ok(metered) => (
            sandbox.run_bytes(&metered, &task),
            Some(ContentId::of(&metered)),
        ),
        Err(detail) => (stardust_sandbox::RunOutput::invalid(detail), None),
    };

    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    match &args.output {
        Some(path) => std::fs::write(path, &out.output)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => stdout.write_all(&out.output)?,
    }
    if !out.stderr.is_empty() {
        std::io::stderr().write_all(&out.stderr)?;
    }
    let r = &out.report;
    if args.json {
        if args.output.is_none() && !out.output.is_empty() && !out.output.ends_with(b"\n") {
            writeln!(stdout)?;
        }
        let json = serde_json::json!({
            "status": r.status,
            "exit_code": r.exit_code,
            "trap": r.trap,
            "fuel_used": r.fuel_used,
            "scu": stardust_proto::scu::scu(r.fuel_used),
            "output_hash": r.output,
            "output_len": r.output_len,
            "wall_ms": r.wall_ms,
            "detail": r.detail,
            "module": module_id,
            "metered_module": metered_id,
        });
        writeln!(stdout, "{json}")?;
    } else if r.status != Status::Ok {
        let extra = r
            .trap
            .map(|t| {
                format!(
                    " ({})",
                    serde_json::to_string(&t)
                        .unwrap_or_default()
                        .trim_matches('"')
                )
            })
            .or_else(|| r.exit_code.map(|c| format!(" (exit code {c})")))
            .or_else(|| r.detail.as_ref().map(|d| format!(": {d}")))
            .unwrap_or_default();
        eprintln!(
            "stardust run: {}{extra}; fuel used {}",
            r.status, r.fuel_used
        );
    }
    stdout.flush()?;
    Ok(if r.status == Status::Ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
