//! Every file in `config/` parses and validates; `check-config` lists every
//! problem of a broken file with its key; `broker/definitions.json` matches
//! what the servers declare.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_config_file_loads_and_validates() {
    let cluster = root().join("config/cluster.toml");
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("config")).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Node files are layered over the cluster file, as documented.
        let files = if path == cluster {
            vec![cluster.clone()]
        } else {
            vec![cluster.clone(), path.clone()]
        };
        if let Err(e) = provring::config::load(&files) {
            panic!("{} does not validate: {e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 2, "expected the cluster file and node files");
}

#[test]
fn example_events_are_valid() {
    let dir = root().join("config/events");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config/events") {
        let path = entry.expect("entry").path();
        let body = std::fs::read(&path).expect("read");
        let kind = if path.to_string_lossy().contains("password") {
            provring::config::AdaptorKind::Password
        } else {
            provring::config::AdaptorKind::Provisioning
        };
        provring::event::decode(&body, kind, &provring::config::LimitsConfig::default())
            .unwrap_or_else(|e| panic!("{} is not a valid event: {e}", path.display()));
        n += 1;
    }
    assert_eq!(n, 6, "one example per event type");
}

#[test]
fn check_config_lists_every_problem_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[broker]
uris = ["http://nope"]
prefetch = 0
[servers.a]
admin_listen = "nothere"
data_dir = "d"
[servers.b]
admin_lisen = "127.0.0.1:1"
data_dir = "e"
[adaptors.x]
kind = "provisioning"
queue = "q"
server = "zz"
target = "t"
[targets.u]
kind = "webhook"
url = "https://user:s3cret@example.com/hook"
[retry]
jitter = 4.0
"#,
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("run check-config");
    let text = String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert_eq!(out.status.code(), Some(64));
    assert!(text.contains(&bad.display().to_string()), "names the file");
    for key in [
        "broker.uris[0]",
        "broker.prefetch",
        "servers.a.admin_listen",
        "servers.b: unknown field `admin_lisen`",
        "adaptors.x.server",
        "adaptors.x.target",
        "retry.jitter",
        "targets.u.url: holds credentials",
        "security: missing section [security]",
    ] {
        assert!(text.contains(key), "missing problem for {key}");
    }
    assert!(!text.contains("s3cret"), "a secret reached the output");
    assert!(text.contains("9 problems"));
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["check-config", "--config", "/nonexistent/provring.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/provring.toml"));
}

#[test]
fn broker_definitions_file_matches_the_cluster_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["broker-definitions", "--config"])
        .arg(root().join("config/cluster.toml"))
        .output()
        .expect("run");
    assert!(out.status.success());
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("broker/definitions.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(
        generated, file,
        "broker/definitions.json is stale: regenerate with provring broker-definitions --config config/cluster.toml"
    );
}

/// `provring … | head` closes the pipe before the command has written
/// everything: the command ends quietly with its own exit code, without a
/// panic's backtrace.
#[test]
fn a_closed_output_pipe_ends_a_command_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["broker-definitions", "--config"])
        .arg(root().join("config/cluster.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // The reader goes away before the command writes (it reads its
    // configuration first).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
}
