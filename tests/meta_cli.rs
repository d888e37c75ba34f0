//! `zw meta` as a user runs it: the real binary against real git repos.

use std::path::Path;
use std::process::{Command, Output};

fn zw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zw"))
        .args(args)
        .output()
        .expect("zw runs")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn example_meta() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("example-meta")
}

#[test]
fn example_meta_is_valid() {
    let out = zw(&["meta", "validate", example_meta().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 envs") && stdout.contains("4 apps") && stdout.contains("8 releases"),
        "{stdout}"
    );
}

#[test]
fn validate_exits_1_and_names_the_invalid_file() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("meta");
    let status = Command::new("cp")
        .args([
            "-r",
            example_meta().to_str().unwrap(),
            copy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let bad = "envs/staging/apps/Bad_App/releases/01KDY021000000000000000099.pb";
    std::fs::create_dir_all(copy.join(bad).parent().unwrap()).unwrap();
    std::fs::write(copy.join(bad), b"").unwrap();
    let out = zw(&["meta", "validate", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(bad), "{stderr}");
    assert!(stderr.contains("not a DNS label"), "{stderr}");
    assert!(stderr.contains("field `id`"), "{stderr}");
}

#[test]
fn init_commit_and_git_log_shows_decoded_protobuf() {
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("meta.git");
    let out = zw(&["meta", "init", bare.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A person adds the example files in a clone, with the textconv driver.
    let clone = tmp.path().join("clone");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    assert!(clone.join(".gitattributes").exists() && clone.join("README.md").exists());
    let status = Command::new("cp")
        .args([
            "-r",
            &format!("{}/envs", example_meta().display()),
            &format!("{}/projects", example_meta().display()),
            clone.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    git(&clone, &["add", "envs", "projects"]);
    git(&clone, &["commit", "-qm", "example apps"]);
    git(&clone, &["push", "-q", "origin", "main"]);
    let textconv = format!("{} meta decode", env!("CARGO_BIN_EXE_zw"));
    git(&clone, &["config", "diff.zwmeta.textconv", &textconv]);
    let log = git(
        &clone,
        &[
            "log",
            "-p",
            "-1",
            "--",
            "envs/production/apps/web/deployments",
        ],
    );
    assert!(log.contains("rollout_id:"), "{log}");
    assert!(log.contains("Deployment {"), "{log}");

    // zw meta log and validate see the pushed commit.
    let out = zw(&[
        "meta",
        "log",
        bare.to_str().unwrap(),
        "--app",
        "worker",
        "--json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = zw(&["meta", "validate", bare.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // zw meta revert undoes it without a worktree.
    let head = git(&clone, &["rev-parse", "HEAD"]);
    let out = zw(&["meta", "revert", bare.to_str().unwrap(), head.trim()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = zw(&["meta", "validate", bare.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 apps"));
}

#[test]
fn decode_recognises_a_file_without_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let src = example_meta().join("channels/stable.pb");
    let anon = tmp.path().join("XyZ_blob");
    std::fs::copy(&src, &anon).unwrap();
    let out = zw(&["meta", "decode", anon.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Channel {"));
    std::fs::write(&anon, b"not protobuf at all").unwrap();
    let out = zw(&["meta", "decode", anon.to_str().unwrap()]);
    assert!(!out.status.success());
}
