//! The captain keeps to its OpenAPI document under fuzzing: a real captain
//! (the `zw` binary, SQLite, its admin token) is fuzzed by schemathesis
//! (pinned, installed into a venv by `scripts/openapi-fuzz.sh`) for at most
//! two minutes. Any 5xx, undocumented status code or media type, or answer
//! that does not match its schema fails the test with schemathesis' report.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FUZZ_SH: &str = include_str!("../scripts/openapi-fuzz.sh");

/// The captain child; killed and reaped on drop, also when the test fails.
struct Captain(Child);

impl Drop for Captain {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fuzz_sh(args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c").arg(FUZZ_SH).arg("openapi-fuzz.sh").args(args);
    c
}

fn start_captain(data: &Path, port: u16) -> Captain {
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_zw"))
        .args(["captain", "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("DATABASE_URL")
        .env_remove("ZW_GITHUB_CLIENT_ID")
        .env_remove("ZW_GITHUB_CLIENT_SECRET")
        .env_remove("ZW_GITHUB_WEBHOOK_SECRET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start zw captain");
    Captain(child)
}

#[test]
fn schemathesis_finds_no_5xx_and_no_answer_outside_the_document() {
    // Installing is not fuzzing: outside the two minutes.
    let out = fuzz_sh(&["install"]).output().unwrap();
    assert!(
        out.status.success(),
        "installing schemathesis: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("captain");
    let port = free_port();
    let _captain = start_captain(&data, port);
    let base = format!("http://127.0.0.1:{port}");
    let token_path = data.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = reqwest::blocking::get(format!("{base}/v1/health"))
            .is_ok_and(|r| r.status().is_success());
        if up && token_path.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the captain did not start: {}",
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = std::fs::read_to_string(&token_path).unwrap();

    let started = Instant::now();
    let out = fuzz_sh(&["run", &base, token.trim(), "120"])
        // Its example database (.schemathesis/) stays out of the checkout.
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "schemathesis ran {:.0?}:\n{report}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    // timeout(1) answers 124 when the time ran out: also a failure (the
    // run is bounded by the number of examples, well within the time).
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}); see its report above",
        out.status.code()
    );
    assert!(report.contains("Tested:"), "schemathesis tested nothing");
}
