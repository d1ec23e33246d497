//! The marker file `provring-repository.json` that a repository's directory
//! carries from its creation on. It tells "a new, empty directory" from "a
//! repository whose database came up empty" (sled opens a damaged `db`
//! file as an empty database), so that a server never starts empty in
//! place of its backlog.

use std::io::Write;
use std::path::Path;

pub const FILE: &str = "provring-repository.json";
const FORMAT: u64 = 1;

/// Why a data directory cannot hold this server's repository.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("exists but is not a directory")]
    NotADirectory,
    #[error("cannot create it: {0}")]
    Create(std::io::Error),
    #[error("{0}")]
    Look(std::io::Error),
    #[error("{FILE} is unreadable ({0}); is this a provring repository?")]
    Unreadable(serde_json::Error),
    #[error("{FILE} says format {0:?}, this provring reads format {FORMAT}")]
    Format(Option<u64>),
    #[error(
        "the directory is not empty but has no {FILE}; it is not a provring repository \
         (point data_dir at an empty or new directory)"
    )]
    Foreign,
    #[error("cannot read {FILE}: {0}")]
    Read(std::io::Error),
    #[error("cannot write {FILE}: {0}")]
    Write(std::io::Error),
}

/// Check `dir` before opening the database. `Ok(Some(created))` if it holds
/// a repository of this format, `Ok(None)` if it is new or empty (it is
/// created), an error naming the cause otherwise.
pub fn check(dir: &Path) -> Result<Option<String>, MarkerError> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(MarkerError::NotADirectory),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(MarkerError::Create)?;
            return Ok(None);
        }
        Err(e) => return Err(MarkerError::Look(e)),
    }
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(MarkerError::Unreadable)?;
            let format = v.get("format").and_then(serde_json::Value::as_u64);
            if format != Some(FORMAT) {
                return Err(MarkerError::Format(format));
            }
            Ok(Some(
                v.get("created")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("at an unknown time")
                    .to_owned(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Only sled's own files (a first start that stopped before the
            // marker was written) are fine; anything else is not ours.
            let foreign = std::fs::read_dir(dir)
                .map_err(MarkerError::Look)?
                .filter_map(Result::ok)
                .any(|e| !is_sled_file(&e.file_name().to_string_lossy()));
            if foreign {
                return Err(MarkerError::Foreign);
            }
            Ok(None)
        }
        Err(e) => Err(MarkerError::Read(e)),
    }
}

fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// Write the marker (synced) once a new repository's database is durable.
pub fn write(dir: &Path) -> Result<(), MarkerError> {
    let body = serde_json::json!({
        "format": FORMAT,
        "created": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "by": concat!("provring ", env!("CARGO_PKG_VERSION")),
    });
    let path = dir.join(FILE);
    let mut f = std::fs::File::create(&path).map_err(MarkerError::Write)?;
    f.write_all(body.to_string().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(MarkerError::Write)
}
