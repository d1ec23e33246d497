//! The marker file `provring-repository.json` that a repository's directory
//! carries from its creation on. It tells "a new, empty directory" from "a
//! repository whose database came up empty" (sled opens a damaged `db`
//! file as an empty database), so that a server never starts empty in
//! place of its backlog.

use std::io::Write;
use std::path::Path;

pub const FILE: &str = "provring-repository.json";
const FORMAT: u64 = 1;

/// Check `dir` before opening the database. `Ok(Some(created))` if it holds
/// a repository of this format, `Ok(None)` if it is new or empty (it is
/// created), an error naming the cause otherwise.
pub fn check(dir: &Path) -> Result<Option<String>, String> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err("exists but is not a directory".into()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    }
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                format!("{FILE} is unreadable ({e}); is this a provring repository?")
            })?;
            let format = v.get("format").and_then(serde_json::Value::as_u64);
            if format != Some(FORMAT) {
                return Err(format!(
                    "{FILE} says format {format:?}, this provring reads format {FORMAT}"
                ));
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
                .map_err(|e| e.to_string())?
                .filter_map(Result::ok)
                .any(|e| !is_sled_file(&e.file_name().to_string_lossy()));
            if foreign {
                return Err(format!(
                    "the directory is not empty but has no {FILE}; it is not a provring repository \
                     (point data_dir at an empty or new directory)"
                ));
            }
            Ok(None)
        }
        Err(e) => Err(format!("cannot read {FILE}: {e}")),
    }
}

fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// Write the marker (synced) once a new repository's database is durable.
pub fn write(dir: &Path) -> Result<(), String> {
    let body = serde_json::json!({
        "format": FORMAT,
        "created": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "by": concat!("provring ", env!("CARGO_PKG_VERSION")),
    });
    let path = dir.join(FILE);
    let mut f = std::fs::File::create(&path).map_err(|e| format!("cannot write {FILE}: {e}"))?;
    f.write_all(body.to_string().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {FILE}: {e}"))
}
