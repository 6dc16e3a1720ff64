//! `stardust keys new|show`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a new Ed25519 key file (mode 0600) and print its id.
    New {
        /// Where to write the key; refuses to overwrite.
        #[arg(long, env = "STARDUST_KEY")]
        key: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the id of an existing key file.
    Show {
        /// The key file.
        #[arg(long, env = "STARDUST_KEY")]
        key: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    let (identity, key, json) = match cmd {
        Command::New { key, json } => {
            let identity = stardust_keystore::generate()?;
            stardust_keystore::write(&key, &identity).context("cannot create the key")?;
            (identity, key, json)
        }
        Command::Show { key, json } => (stardust_keystore::read(&key)?, key, json),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "id": identity.id().to_string(), "key": key.display().to_string() })
        );
    } else {
        println!("{}", identity.id());
    }
    Ok(ExitCode::SUCCESS)
}
