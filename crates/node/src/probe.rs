//! Hardware probe: cores, memory, CPU model, OS, GPUs, and a short benchmark of a reference
//! WebAssembly kernel giving the node's speed in micro-SCU per second.

use std::sync::Arc;
use std::time::Instant;

use stardust_proto::task::{Hardware, Limits};
use stardust_sandbox::{Sandbox, Task};

/// The reference kernel: `benchmarks/kernels/hash.c` built to wasm32-wasi (integer work).
const REFERENCE_KERNEL: &[u8] = include_bytes!("../../../benchmarks/kernels/hash.wasm");

/// Probes this machine. `bench` runs the reference kernel (about 0.1–0.3 s).
pub fn probe(sandbox: &Sandbox, bench: bool, labels: Vec<String>) -> Hardware {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = meminfo_total().unwrap_or(0);
    let cpu_model = cpu_model().unwrap_or_else(|| "unknown".into());
    let (gpus, gpu_unusable_reason) = gpus();
    let micro_scu_per_s = if bench {
        benchmark(sandbox).unwrap_or(0)
    } else {
        0
    };
    Hardware {
        cores,
        memory_bytes,
        cpu_model,
        os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        gpus,
        gpu_unusable_reason,
        micro_scu_per_s,
        labels,
    }
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// NVIDIA GPUs through NVML (loaded at run time: nodes without the driver still run). When a
/// GPU device is present but NVML cannot be used, the reason is reported instead.
fn gpus() -> (Vec<stardust_proto::task::Gpu>, Option<String>) {
    let present = std::path::Path::new("/dev/nvidia0").exists()
        || std::path::Path::new("/proc/driver/nvidia/gpus").exists();
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => {
            let count = match nvml.device_count() {
                Ok(n) => n,
                Err(e) => return (Vec::new(), Some(format!("NVML cannot count devices: {e}"))),
            };
            let mut gpus = Vec::new();
            let mut problems = Vec::new();
            for i in 0..count {
                let info = nvml
                    .device_by_index(i)
                    .and_then(|d| Ok((d.name()?, d.memory_info()?.total)));
                match info {
                    Ok((name, memory_bytes)) => {
                        gpus.push(stardust_proto::task::Gpu { name, memory_bytes })
                    }
                    Err(e) => problems.push(format!("GPU {i}: {e}")),
                }
            }
            let reason = (!problems.is_empty()).then(|| problems.join("; "));
            (gpus, reason)
        }
        Err(e) if present => (
            Vec::new(),
            Some(format!(
                "an NVIDIA GPU is present but NVML is unusable: {e}"
            )),
        ),
        Err(_) => (Vec::new(), None),
    }
}

/// Runs the reference kernel once and returns micro-SCU per second.
pub fn benchmark(sandbox: &Sandbox) -> Option<u64> {
    let metered = stardust_meter_instrument(REFERENCE_KERNEL)?;
    let prepared = sandbox.load(&metered).ok()?;
    let args = vec!["262144".to_string(), "40".to_string()];
    let task = Task {
        input: Arc::from(&b""[..]),
        args: &args,
        seed: 0,
        limits: Limits::default(),
    };
    let started = Instant::now();
    let out = sandbox.run(&prepared, &task);
    let secs = started.elapsed().as_secs_f64();
    if out.report.status != stardust_proto::task::Status::Ok || secs <= 0.0 {
        return None;
    }
    Some((stardust_proto::scu::micro_scu(out.report.fuel_used) as f64 / secs) as u64)
}

fn stardust_meter_instrument(wasm: &[u8]) -> Option<Vec<u8>> {
    stardust_meter::instrument(wasm).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_this_machine() {
        let sandbox = Sandbox::new(stardust_sandbox::Config {
            max_instances: 2,
            ..Default::default()
        })
        .expect("sandbox");
        let hw = probe(&sandbox, true, vec!["eu".into()]);
        assert!(hw.cores >= 1);
        assert!(hw.memory_bytes > 0, "MemTotal read from /proc/meminfo");
        assert!(hw.micro_scu_per_s > 0, "the reference kernel ran");
        assert_eq!(hw.labels, ["eu"]);
        assert!(hw.os.contains(std::env::consts::ARCH));
        let device = std::path::Path::new("/dev/nvidia0").exists();
        if !device {
            // No GPU here: none reported, and no reason to complain.
            assert!(hw.gpus.is_empty());
            assert_eq!(hw.gpu_unusable_reason, None);
        } else {
            assert!(
                !hw.gpus.is_empty() || hw.gpu_unusable_reason.is_some(),
                "a present GPU is listed or explained"
            );
        }
    }
}
