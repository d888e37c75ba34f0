//! `zw logs [-f]`: an app's log lines from the captain, paged by time:
//! `GET /v1/apps/{id}/logs?from=<unix-nanos>` answers the lines stamped
//! after `from` (JSON `[{"t": nanos, "line": "...", "instance": "..."}]`, the
//! followers' format) and `X-Last-Log-Nano`, the stamp of the last one, which
//! is the next `from`; so no line prints twice. Nodes the captain could not
//! reach are named in `X-Log-Unreachable`; their lines are missing, which
//! is said on stderr.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use api_types::logs::AppLogLine;
use reqwest::Method;

use super::api::{ApiError, enc};
use super::creds::{self, ConnArgs};
use super::{AppArg, app_name, resolve_app};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Keep polling for new lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start after this unix-nanosecond stamp (default: the beginning).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Only this instance of the app.
    #[arg(long)]
    pub instance: Option<String>,
    #[command(flatten)]
    pub app: AppArg,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Lines asked for per request.
const PAGE: usize = 1000;

pub fn run(a: LogsArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let mut from = a.from;
    let stdout = std::io::stdout();
    let mut unreachable = String::new();
    loop {
        let mut path = format!("/v1/apps/{}/logs?from={from}&limit={PAGE}", enc(&app.id));
        if let Some(i) = &a.instance {
            path.push_str(&format!("&instance={}", enc(i)));
        }
        let resp = match client.send(Method::GET, &path, None) {
            Ok(r) => r,
            Err(e) => {
                if let Some(api) = e.downcast_ref::<ApiError>()
                    && api.status == 404
                    && (api.code.starts_with("http_") || api.message.starts_with("no route for"))
                {
                    anyhow::bail!(
                        "the API at {} has no logs endpoint (GET /v1/apps/{{id}}/logs); this captain cannot serve logs yet",
                        client.base
                    );
                }
                return Err(e);
            }
        };
        let last: u64 = resp
            .headers()
            .get("x-last-log-nano")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .context("the logs answer has no X-Last-Log-Nano header")?;
        let down = resp
            .headers()
            .get("x-log-unreachable")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if down != unreachable {
            if !down.is_empty() {
                eprintln!("warning: node(s) {down} did not answer; their lines are missing");
            } else if a.follow {
                eprintln!("every node answers again");
            }
            unreachable = down;
        }
        let lines: Vec<AppLogLine> = resp.json().context("reading the logs answer")?;
        let n = lines.len();
        {
            let mut out = stdout.lock();
            for l in &lines {
                if a.json {
                    writeln!(out, "{}", serde_json::to_string(l)?)?;
                } else {
                    match l.instance.as_str() {
                        "" => writeln!(out, "{}", l.line)?,
                        i => writeln!(out, "[{i}] {}", l.line)?,
                    }
                }
            }
            out.flush()?;
        }
        // A page that moves nothing forward ends a non-following read. A
        // page may be a few lines short of full (the captain never ends one
        // between two lines of the same stamp): near full means more.
        let advanced = last > from;
        from = from.max(last);
        if n * 10 >= PAGE * 9 && advanced {
            continue;
        }
        if !a.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
