//! `zw secrets` against an in-process captain with one registered node:
//! set (from the command line, the environment and an env file), list
//! (names only), the complete-set rule of set/unset/rotate, and the meta
//! repository holding only ciphertext, re-encrypted by every write.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

const ZW: &str = env!("CARGO_BIN_EXE_zw");
/// A valid age X25519 recipient (age's test vector); nobody here decrypts.
const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
const V_ARG: &str = "value-from-argv-51d2";
const V_ENV: &str = "value-from-environ-9aa0";
const V_FILE: &str = "value from a file 7e3b";

struct Zw {
    api: String,
    token: String,
    home: std::path::PathBuf,
}

impl Zw {
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(ZW);
        c.args(args)
            .args(["--api", &self.api, "--token", &self.token])
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let o = self.run(args, env);
        assert!(
            o.status.success(),
            "zw {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn fails(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let o = self.run(args, env);
        assert!(!o.status.success(), "zw {args:?} succeeded");
        String::from_utf8(o.stderr).unwrap()
    }
}

fn names(zw: &Zw) -> Value {
    let v: Value =
        serde_json::from_str(&zw.ok(&["secrets", "list", "--app", "web", "--json"], &[])).unwrap();
    v["names"].clone()
}

fn secrets_blobs(meta_git: &Path) -> Vec<String> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(meta_git)
        .args([
            "log",
            "--format=%H",
            "--",
            "envs/production/apps/web/secrets.sops.yaml",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|c| {
            let o = Command::new("git")
                .arg("--git-dir")
                .arg(meta_git)
                .args([
                    "cat-file",
                    "blob",
                    &format!("{c}:envs/production/apps/web/secrets.sops.yaml"),
                ])
                .output()
                .unwrap();
            String::from_utf8(o.stdout).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_list_unset_rotate_send_the_complete_set() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("captain");
    let captain = captain::Captain::start(captain::Config::new(&data))
        .await
        .unwrap();
    let zw = Zw {
        api: format!("http://{}", captain.local_addr()),
        token: captain.admin_token().unwrap().to_string(),
        home: tmp.path().join("home"),
    };
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{}{path}", zw.api))
            .bearer_auth(&zw.token)
            .json(&body)
            .send()
    };
    let r = post(
        "/v1/nodes",
        json!({"id": "node-a", "address": "127.0.0.1", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "age_recipient": RECIPIENT}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = post(
        "/v1/projects",
        json!({"name": "web", "repo": "https://example.invalid/web.git"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let pid = p["id"].as_str().unwrap();
    let r = post(
        &format!("/v1/projects/{pid}/apps"),
        json!({"name": "web", "env": "production"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    let zw = tokio::task::spawn_blocking(move || {
        let env_file = zw.home.parent().unwrap().join("app.env");
        std::fs::write(&env_file, format!("# db\nexport DB_URL=\"{V_FILE}\"\n")).unwrap();
        let f = env_file.to_str().unwrap();

        assert_eq!(names(&zw), json!([]));
        let out = zw.ok(
            &[
                "secrets",
                "set",
                "--app",
                "web",
                &format!("API_KEY={V_ARG}"),
                "TOKEN",
                "--from-env-file",
                f,
            ],
            &[("TOKEN", V_ENV)],
        );
        assert!(out.contains("API_KEY, DB_URL, TOKEN"), "{out}");
        assert!(out.contains("encrypted to: node-a"), "{out}");
        assert_eq!(names(&zw), json!(["API_KEY", "DB_URL", "TOKEN"]));
        let listed = zw.ok(&["secrets", "list", "--app", "web"], &[]);
        assert_eq!(listed, "API_KEY\nDB_URL\nTOKEN\n");

        // Leaving a current secret out is refused before anything is sent.
        let err = zw.fails(&["secrets", "set", "--app", "web", "API_KEY=x"], &[]);
        assert!(err.contains("also give: DB_URL, TOKEN"), "{err}");
        assert_eq!(names(&zw), json!(["API_KEY", "DB_URL", "TOKEN"]));
        let err = zw.fails(&["secrets", "set", "--app", "web", "UNSET_VAR"], &[]);
        assert!(err.contains("$UNSET_VAR is not set"), "{err}");
        let err = zw.fails(&["secrets", "set", "--app", "web", "1BAD=x"], &[]);
        assert!(err.contains("not a secret name"), "{err}");

        // unset: the others are given again (the same env file serves).
        let err = zw.fails(
            &[
                "secrets",
                "unset",
                "--app",
                "web",
                "TOKEN",
                "--from-env-file",
                f,
            ],
            &[],
        );
        assert!(err.contains("also give: API_KEY"), "{err}");
        zw.ok(
            &[
                "secrets",
                "unset",
                "--app",
                "web",
                "TOKEN",
                "--keep",
                &format!("API_KEY={V_ARG}"),
                "--from-env-file",
                f,
            ],
            &[],
        );
        assert_eq!(names(&zw), json!(["API_KEY", "DB_URL"]));
        let err = zw.fails(&["secrets", "unset", "--app", "web", "NOPE"], &[]);
        assert!(err.contains("not secrets of web.production: NOPE"), "{err}");

        // rotate: the same names, every value again.
        let err = zw.fails(
            &["secrets", "rotate", "--app", "web", "--from-env-file", f],
            &[],
        );
        assert!(err.contains("also give: API_KEY"), "{err}");
        let err = zw.fails(
            &[
                "secrets",
                "rotate",
                "--app",
                "web",
                "API_KEY=a",
                "NEW=b",
                "--from-env-file",
                f,
            ],
            &[],
        );
        assert!(err.contains("NEW are new"), "{err}");
        let out = zw.ok(
            &[
                "secrets",
                "rotate",
                "--app",
                "web",
                &format!("API_KEY={V_ARG}"),
                "--from-env-file",
                f,
                "--json",
            ],
            &[],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["names"], json!(["API_KEY", "DB_URL"]));
        assert_eq!(v["stale"], json!(false));
        zw
    })
    .await
    .unwrap();

    // Three writes, three files, each encrypted anew to the node; no plaintext.
    let blobs = secrets_blobs(&data.join("meta.git"));
    assert_eq!(blobs.len(), 3);
    let keys: std::collections::BTreeSet<String> = blobs
        .iter()
        .map(|b| {
            let f = meta_schema::sops::SopsFile::parse(b).unwrap();
            assert_eq!(f.recipients(), [RECIPIENT]);
            f.age_entries()[0].enc.clone()
        })
        .collect();
    assert_eq!(keys.len(), 3, "every write wraps its data key anew");
    for b in &blobs {
        for v in [V_ARG, V_ENV, V_FILE] {
            assert!(!b.contains(v), "plaintext in the meta repo");
        }
    }
    drop(zw);
    captain.shutdown().await;
}
