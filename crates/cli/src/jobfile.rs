//! Job files: TOML (or JSON) with local paths, turned into a wire `JobSpec` by uploading the
//! module and inputs.
//!
//! ```toml
//! name = "sweep"
//! module = "hyperparam.wasm"        # relative to this file
//! input = "digits.bin"              # optional; default: empty stdin
//! args = ["--lr={lr}", "--hidden={hidden}"]
//! redundancy = 2
//! price_limit = 2                   # credits per SCU at most (optional)
//! adaptive = true                   # adaptive replication (default)
//! [limits]                          # wire names, or friendly ones:
//! memory = "256MiB"                 # memory_bytes
//! timeout = "60s"                   # wall_ms
//! max_output = "1MiB"               # output_bytes
//! fuel = 10000000000
//! [sweep.grid]
//! lr = [0.1, 0.01]
//! hidden = [16, 32]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;
use stardust_proto::job::JobSpec;

/// A job file after its paths are resolved: the spec with placeholders for content ids,
/// and the files to upload.
pub struct Loaded {
    /// The spec as JSON, paths replaced by content ids.
    pub spec: JobSpec,
    /// Files to upload: (content id, bytes).
    pub uploads: Vec<(stardust_proto::content::ContentId, Vec<u8>)>,
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    match crate::run::read_module(path)? {
        Ok(bytes) => Ok(bytes),
        Err(reason) => bail!("{}: {reason}", path.display()),
    }
}

/// Reads and resolves a job file.
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    let mut v: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        let t: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(t)?
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| -> PathBuf { base.join(p) };
    let obj = v
        .as_object_mut()
        .context("a job file is a table of settings")?;
    let mut uploads = Vec::new();
    let module_path = obj
        .get("module")
        .and_then(Value::as_str)
        .context("the job file needs `module = \"FILE.wasm\"`")?;
    let module = read_module(&resolve(module_path))?;
    let module_id = stardust_proto::content::ContentId::of(&module);
    uploads.push((module_id, module));
    obj.insert("module".into(), Value::String(module_id.to_string()));
    let mut upload_file = |p: Option<&str>| -> anyhow::Result<String> {
        let bytes = match p {
            Some(p) => {
                std::fs::read(resolve(p)).with_context(|| format!("cannot read input {p}"))?
            }
            None => Vec::new(),
        };
        let id = stardust_proto::content::ContentId::of(&bytes);
        uploads.push((id, bytes));
        Ok(id.to_string())
    };
    let input = upload_file(obj.get("input").and_then(Value::as_str))?;
    obj.insert("input".into(), Value::String(input));
    if let Some(tasks) = obj.get_mut("tasks").and_then(Value::as_array_mut) {
        for t in tasks {
            if let Some(p) = t.get("input").and_then(Value::as_str).map(str::to_string) {
                t["input"] = Value::String(upload_file(Some(&p))?);
            }
        }
    }
    if let Some(limits) = obj.get_mut("limits").and_then(Value::as_object_mut) {
        let mut friendly = |from: &str,
                            to: &str,
                            parse: &dyn Fn(&str) -> Result<u64, String>|
         -> anyhow::Result<()> {
            if let Some(v) = limits.remove(from) {
                let n = match &v {
                    Value::String(s) => parse(s).map_err(anyhow::Error::msg)?,
                    Value::Number(n) => n.as_u64().context("limits must be positive integers")?,
                    _ => bail!("limits.{from} must be a number or a string like \"256MiB\""),
                };
                limits.insert(to.into(), Value::from(n));
            }
            Ok(())
        };
        friendly("memory", "memory_bytes", &crate::units::parse_size)?;
        friendly("max_output", "output_bytes", &crate::units::parse_size)?;
        friendly("timeout", "wall_ms", &|s| {
            crate::units::parse_duration(s).map(|d| d.as_millis() as u64)
        })?;
        let defaults = serde_json::to_value(stardust_proto::task::Limits::default())?;
        for key in ["fuel", "memory_bytes", "wall_ms", "output_bytes"] {
            if !limits.contains_key(key) {
                limits.insert(key.into(), defaults[key].clone());
            }
        }
    }
    if let Some(limit) = obj.remove("price_limit") {
        let text = match &limit {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => bail!("price_limit is credits per SCU, e.g. 2 or \"0.5\""),
        };
        let micro =
            crate::units::parse_credits(&text).map_err(|e| anyhow::anyhow!("price_limit: {e}"))?;
        obj.insert("price_limit".into(), Value::from(micro));
    }
    if let Some(seed) = obj.get("seed").cloned()
        && seed.is_number()
    {
        obj.insert("seed".into(), Value::String(seed.to_string()));
    }
    let spec: JobSpec =
        serde_json::from_value(v).with_context(|| format!("{}: invalid job", path.display()))?;
    spec.expand()
        .with_context(|| format!("{}: invalid job", path.display()))?;
    Ok(Loaded { spec, uploads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_job_file_with_friendly_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-programs/hello.wasm");
        std::fs::copy(&module, dir.path().join("m.wasm")).expect("copy");
        std::fs::write(dir.path().join("in.txt"), "data").expect("input");
        let file = dir.path().join("job.toml");
        std::fs::write(
            &file,
            r#"
name = "t"
module = "m.wasm"
input = "in.txt"
args = ["{x}"]
redundancy = 2
seed = 5
[limits]
memory = "64MiB"
timeout = "10s"
[sweep.grid]
x = [1, 2, 3]
"#,
        )
        .expect("write");
        let loaded = load(&file).expect("loads");
        assert_eq!(loaded.spec.limits.memory_bytes, 64 << 20);
        assert_eq!(loaded.spec.limits.wall_ms, 10_000);
        assert_eq!(loaded.spec.seed, 5);
        assert_eq!(loaded.spec.expand().expect("expands").len(), 3);
        assert_eq!(loaded.uploads.len(), 2);
        std::fs::write(&file, "module = \"m.wasm\"\nbogus = 1\n").expect("write");
        assert!(load(&file).is_err(), "unknown settings are refused");
        std::fs::write(&file, "module = \"missing.wasm\"\n").expect("write");
        assert!(format!("{:#}", load(&file).err().expect("error")).contains("missing.wasm"));
    }
}
