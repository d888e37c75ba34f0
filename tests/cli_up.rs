//! The user CLI against a real `zw up` (captain, follower with the process
//! runtime, edge): `zw deploy` of a directory builds it, follows the rollout
//! to `running` and prints the URL, which then serves the page through the
//! edge; `zw env set` and `zw rollback` roll out new releases the same way.
//! The CLI finds the API and token through the data dir alone.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Up, free_port, wait_for_page, zw};

fn run(data: &Path, cwd: &Path, args: &[&str]) -> Output {
    let home = data.join("home");
    Command::new(zw())
        .current_dir(cwd)
        .args(args)
        .env_remove("ZW_API")
        .env_remove("ZW_TOKEN")
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("ZW_DATA_DIR", data)
        .env("ZW_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(data: &Path, cwd: &Path, args: &[&str]) -> String {
    let out = run(data, cwd, args);
    assert!(
        out.status.success(),
        "zw {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn deploy_env_and_rollback_with_zw_up() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let up = Up::start(&data, free_port(), free_port());
    let ctx = work.path().join("app");
    std::fs::create_dir_all(&ctx).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    std::fs::copy(example.join("Dockerfile"), ctx.join("Dockerfile")).unwrap();
    std::fs::write(ctx.join("index.html"), "version-1\n").unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox"))
        .expect("busybox-static is installed (/bin/busybox)");
    std::fs::write(ctx.join(".zeitwork.toml"), "app = \"hello\"\n").unwrap();

    ok(
        &data,
        &ctx,
        &[
            "apps",
            "create",
            "hello",
            "--repo",
            "https://example.invalid/hello.git",
        ],
    );
    let url = ok(
        &data,
        &ctx,
        &[
            "deploy",
            "--port",
            "8080",
            "--health-check",
            "/healthz",
            "--instances",
            "3",
            "--wait-timeout",
            "120",
        ],
    );
    assert_eq!(url.trim(), format!("http://hello.localhost:{}", up.http));
    wait_for_page(&up, "version-1", 60);
    let first: serde_json::Value =
        serde_json::from_str(&ok(&data, &ctx, &["releases", "--json"])).unwrap();
    let first = first[0]["id"].as_str().unwrap().to_string();

    std::fs::write(ctx.join("index.html"), "version-2\n").unwrap();
    ok(&data, &ctx, &["deploy", "--wait-timeout", "120"]);
    wait_for_page(&up, "version-2", 60);
    // Both images were built by the captain inside `zw up`, from uploads,
    // and their logs were kept.
    let builds = up.api(reqwest::Method::GET, "/v1/builds", None);
    let builds = builds.as_array().unwrap();
    assert_eq!(builds.len(), 2, "{builds:?}");
    for b in builds {
        assert_eq!(b["status"], "succeeded", "{b}");
        assert_eq!(b["source_kind"], "upload", "{b}");
        let logs = up.api(
            reqwest::Method::GET,
            &format!("/v1/builds/{}/logs", b["id"].as_str().unwrap()),
            None,
        );
        assert!(
            logs.to_string()
                .contains(b["image_digest"].as_str().unwrap())
        );
    }

    // `--git`: the captain clones the commit the branch points at.
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for f in ["Dockerfile", "busybox", ".zeitwork.toml"] {
        std::fs::copy(ctx.join(f), repo.join(f)).unwrap();
    }
    std::fs::write(repo.join("index.html"), "version-3\n").unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .current_dir(&repo)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "v3"]);
    let sha = git(&["rev-parse", "HEAD"]);
    let url = format!("file://{}", repo.display());
    ok(
        &data,
        &ctx,
        &["deploy", "--git", &url, "--wait-timeout", "120"],
    );
    wait_for_page(&up, "version-3", 60);
    let builds = up.api(reqwest::Method::GET, "/v1/builds", None);
    assert_eq!(builds[0]["source_kind"], "git", "{builds}");
    assert_eq!(builds[0]["source_commit"], sha.as_str(), "{builds}");

    ok(
        &data,
        &ctx,
        &["env", "set", "GREETING=hello", "--wait-timeout", "120"],
    );
    let env: serde_json::Value =
        serde_json::from_str(&ok(&data, &ctx, &["env", "list", "--json"])).unwrap();
    assert_eq!(env["GREETING"], "hello");

    ok(
        &data,
        &ctx,
        &["rollback", "--to", &first, "--wait-timeout", "120"],
    );
    wait_for_page(&up, "version-1", 60);

    // A secret set through the captain (a release of its own); the CLI's
    // next release names the secrets file as it is now, although the
    // release it copies (the first) had none.
    up.api(
        reqwest::Method::PUT,
        "/v1/apps/hello.production/secrets",
        Some(serde_json::json!({"secrets": {"API_KEY": "s3cret"}})),
    );
    ok(
        &data,
        &ctx,
        &["rollback", "--to", &first, "--wait-timeout", "120"],
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&data, &ctx, &["status", "--json"])).unwrap();
    let active = status["active"]["path"].as_str().unwrap();
    let pb = Command::new("git")
        .arg("--git-dir")
        .arg(data.join("meta.git"))
        .args(["cat-file", "blob", &format!("HEAD:{active}")])
        .output()
        .unwrap();
    assert!(
        pb.status.success(),
        "{}",
        String::from_utf8_lossy(&pb.stderr)
    );
    let decoded = {
        use std::io::Write as _;
        let mut c = Command::new(zw())
            .args(["meta", "decode", "-", "--kind", "release"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(&pb.stdout).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(decoded.contains("API_KEY"), "{decoded}");
    assert!(!decoded.contains("s3cret"), "{decoded}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&data, &ctx, &["status", "--json"])).unwrap();
    assert_eq!(status["active"]["status"], "running");
    assert_eq!(
        status["active"]["image_digest"],
        status["latest"]["image_digest"]
    );
    let instances = status["instances"].as_array().unwrap();
    assert!(
        instances
            .iter()
            .filter(|i| i["release_id"] == status["active"]["id"] && i["state"] == "healthy")
            .count()
            >= 3,
        "{status}"
    );
}
