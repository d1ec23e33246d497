//! A repository that cannot be opened stops the server at start with a
//! message naming the path and the cause; it never starts empty in its place.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn start_fails(cfg: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_provring"))
        .args(["server", "--config"])
        .arg(cfg)
        .args(["--node", "a"])
        .output()
        .expect("run provring");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "server must refuse to start:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_damaged_locked_and_foreign_repositories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new("repoopen", "http://127.0.0.1:9/events");
    let cfg_path = setup.write(dir.path());
    let cfg = load(&cfg_path);
    let _cleanup = Cleanup::new(&cfg.broker, &["hr"]);
    let data = dir.path().join("data-a");

    // A healthy start creates the repository; a second server on the same
    // directory is refused while the first runs.
    let mut first = ServerProc::start(&cfg_path, "a", dir.path().join("a.log"));
    first.wait_started(Duration::from_secs(30));
    let text = start_fails(&cfg_path);
    assert!(
        text.contains(&data.display().to_string()) && text.contains("another provring process"),
        "{text}"
    );
    assert!(first.stop(Duration::from_secs(30)).success());

    // A damaged database is refused, not replaced by an empty one.
    std::fs::write(data.join("db"), vec![0x5a; 8192]).expect("damage db");
    let text = start_fails(&cfg_path);
    assert!(
        text.contains(&data.display().to_string()) && text.contains("will not start empty"),
        "{text}"
    );

    // A directory that is not a provring repository is not used.
    std::fs::remove_dir_all(&data).expect("remove");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("notes.txt"), "not a repository").expect("write");
    let text = start_fails(&cfg_path);
    assert!(text.contains("not a provring repository"), "{text}");
}
