//! `zw logs [-f]`: an app's log lines from the captain, paged by time:
//! `GET /v1/apps/{id}/logs?from=<unix-nanos>` answers the lines stamped
//! after `from` (JSON `[{"t": nanos, "line": "...", "instance": "..."}]`, the
//! followers' format) and `X-Last-Log-Nano`, the stamp of the last one, which
//! is the next `from`; so no line prints twice.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::Method;
use serde::{Deserialize, Serialize};

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
    #[command(flatten)]
    pub app: AppArg,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Deserialize, Serialize)]
struct Line {
    t: u64,
    line: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
}

pub fn run(a: LogsArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let mut from = a.from;
    let stdout = std::io::stdout();
    loop {
        let path = format!("/v1/apps/{}/logs?from={from}&limit=1000", enc(&app.id));
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
        let lines: Vec<Line> = resp.json().context("reading the logs answer")?;
        let n = lines.len();
        {
            let mut out = stdout.lock();
            for l in &lines {
                if a.json {
                    writeln!(out, "{}", serde_json::to_string(l)?)?;
                } else {
                    match &l.instance {
                        Some(i) => writeln!(out, "[{i}] {}", l.line)?,
                        None => writeln!(out, "{}", l.line)?,
                    }
                }
            }
            out.flush()?;
        }
        // A page that moves nothing forward ends a non-following read.
        let advanced = last > from;
        from = from.max(last);
        if n >= 1000 && advanced {
            continue;
        }
        if !a.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
