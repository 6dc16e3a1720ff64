//! `--config FILE`: settings from a TOML file, below flags and `STARDUST_*` variables.
//!
//! Precedence: command-line flag > environment variable > config file > default. Keys are
//! the long flag names (`listen`, `data`, `database`, `slots`, `cpu-limit` or `cpu_limit`,
//! …); values are TOML strings, numbers or booleans. Unknown keys are refused.

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context as _, bail};
use clap::ArgMatches;
use clap::parser::ValueSource;

/// A parsed config file and the matches of the subcommand it applies to.
pub struct File<'a> {
    table: toml::Table,
    matches: &'a ArgMatches,
    used: Vec<String>,
}

impl<'a> File<'a> {
    /// Reads `path`.
    pub fn read(path: &Path, matches: &'a ArgMatches) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        let table = table
            .into_iter()
            .map(|(k, v)| (k.replace('_', "-"), v))
            .collect();
        Ok(Self {
            table,
            matches,
            used: Vec::new(),
        })
    }

    /// Sets `target` from the file when the flag `id` (clap id: field name) came neither
    /// from the command line nor from the environment.
    pub fn set<T>(
        &mut self,
        id: &str,
        target: &mut T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<()> {
        let key = id.replace('_', "-");
        self.used.push(key.clone());
        let Some(value) = self.table.get(&key) else {
            return Ok(());
        };
        if matches!(
            self.matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            return Ok(());
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!("config key {key}: unsupported value {other:?}"),
        };
        *target = parse(&text).map_err(|e| anyhow::anyhow!("config key {key}: {e}"))?;
        Ok(())
    }

    /// Fails on keys no `set` asked for.
    pub fn finish(self) -> anyhow::Result<()> {
        let unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| !self.used.contains(k))
            .collect();
        if !unknown.is_empty() {
            bail!("unknown config keys: {unknown:?}");
        }
        Ok(())
    }
}

/// Parser for any `FromStr` value.
pub fn from_str<T: FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}
