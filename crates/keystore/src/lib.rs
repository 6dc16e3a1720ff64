//! Key files for Stardust identities.
//!
//! A key file holds one Ed25519 secret key as text: the line `stardust-secret-key-v1`, then
//! 64 lowercase hex digits. Files are created with mode 0600 (atomically, never
//! overwriting), and refused when group or others may read them, as ssh does.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};

use stardust_proto::identity::Identity;

const HEADER: &str = "stardust-secret-key-v1";

/// A key file problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing failed. The message names the file and leaves the reason to its
    /// source (printed after it, as `path: reason`, by an error chain).
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error("{path}: key file is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a key file.
    #[error("{path}: not a stardust key file (expected {HEADER:?} then 64 hex digits)")]
    Malformed {
        /// The file.
        path: PathBuf,
    },
    /// Refusing to overwrite an existing key.
    #[error("{path}: a key file already exists; refusing to overwrite it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The operating system's random source failed.
    #[error("cannot read the operating system's random source: {0}")]
    Random(String),
}

/// A fresh identity from the operating system's CSPRNG.
pub fn generate() -> Result<Identity, KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
    Ok(Identity::from_secret_bytes(&secret))
}

/// Writes `identity` to a new file at `path` with mode 0600; fails if the file exists.
pub fn write(path: &Path, identity: &Identity) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io(e)
        }
    })?;
    let hex = identity
        .secret_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    writeln!(file, "{HEADER}\n{hex}")
        .and_then(|()| file.sync_all())
        .map_err(io)
}

/// Reads the identity in `path`, refusing files readable by others.
pub fn read(path: &Path) -> Result<Identity, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(io)?;
    let malformed = || KeyFileError::Malformed {
        path: path.to_path_buf(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(malformed());
    }
    let hex = lines.next().ok_or_else(malformed)?.trim();
    if hex.len() != 64 || lines.any(|l| !l.trim().is_empty()) {
        return Err(malformed());
    }
    let mut secret = [0u8; 32];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(malformed)?, 16)
            .map_err(|_| malformed())?;
    }
    Ok(Identity::from_secret_bytes(&secret))
}

/// Reads the identity at `path`, creating a fresh one there first if there is none.
pub fn load_or_create(path: &Path) -> Result<Identity, KeyFileError> {
    match read(path) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let identity = generate()?;
            match write(path, &identity) {
                Ok(()) => Ok(identity),
                // Lost a race with another process creating it: use theirs.
                Err(KeyFileError::Exists { .. }) => read(path),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_roundtrip_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/node.key");
        let id = generate().expect("random");
        write(&path, &id).expect("write");
        assert_eq!(read(&path).expect("read").id(), id.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(matches!(
            write(&path, &id),
            Err(KeyFileError::Exists { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        write(&path, &generate().expect("random")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            read(&path),
            Err(KeyFileError::TooOpen { mode: 0o644, .. })
        ));
    }

    #[test]
    fn malformed_and_created_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.key");
        write(&path, &generate().expect("random")).expect("write");
        std::fs::write(&path, "stardust-secret-key-v1\nxyz\n").expect("overwrite");
        assert!(matches!(read(&path), Err(KeyFileError::Malformed { .. })));
        let fresh = dir.path().join("fresh.key");
        let a = load_or_create(&fresh).expect("create");
        let b = load_or_create(&fresh).expect("load");
        assert_eq!(a.id(), b.id());
        assert_ne!(generate().expect("r").id(), generate().expect("r").id());
    }
}
