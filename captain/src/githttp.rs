//! `/meta.git`: the meta repository over git smart HTTP, by running
//! `git http-backend` (CGI) behind axum. Tokens authenticate as HTTP Basic
//! password or Bearer; node tokens may fetch, user and admin tokens may
//! also push. Pushes are validated by the pre-receive hook
//! ([`crate::hooks`]) and indexed by the mirror before the answer is sent.

use std::process::Stdio;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use futures::TryStreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::TokenKind;
use crate::error::{ApiError, Code};
use crate::state::AppState;

pub async fn serve(State(st): State<AppState>, req: Request) -> Response<Body> {
    match serve_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e,
    }
}

async fn serve_inner(st: AppState, req: Request) -> Result<Response<Body>, Response<Body>> {
    let req_headers = req.headers().clone();
    let caller = crate::auth::authenticate_git(&st, &req_headers).await?;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let rest = path.strip_prefix("/meta.git").unwrap_or("");
    let push = rest == "/git-receive-pack" || query.contains("service=git-receive-pack");
    if push && caller.kind == TokenKind::Node {
        return Err(ApiError::new(
            Code::Forbidden,
            "node tokens may fetch the meta repository, not push to it",
        )
        .into_response());
    }
    // Who pushes, for the pre-receive hook's authorization of each path.
    let mut pusher_env: Vec<(&str, String)> = Vec::new();
    if push {
        match (caller.kind, &caller.user_id) {
            (TokenKind::Admin, _) => {
                pusher_env.push((crate::hooks::PUSHER_ROLE_ENV, "admin".into()))
            }
            (TokenKind::User, Some(user)) => {
                let mut apps = Vec::new();
                let projects = st.db.projects_of_user(user).await.map_err(|e| {
                    ApiError::internal("reading the pusher's projects", &e).into_response()
                })?;
                for p in &projects {
                    for a in st.db.apps_of_project(p).await.map_err(|e| {
                        ApiError::internal("reading the pusher's apps", &e).into_response()
                    })? {
                        apps.push(format!("{}/{}", a.env, a.name));
                    }
                }
                pusher_env.push((crate::hooks::PUSHER_ROLE_ENV, "user".into()));
                pusher_env.push((crate::hooks::PUSHER_APPS_ENV, apps.join(",")));
                pusher_env.push((crate::hooks::PUSHER_PROJECTS_ENV, projects.join(",")));
            }
            _ => {
                return Err(ApiError::new(
                    Code::Forbidden,
                    "this token may not push to the meta repository",
                )
                .into_response());
            }
        }
    }
    let git_dir = st.meta.git_dir();
    let (Some(root), Some(name)) = (git_dir.parent(), git_dir.file_name()) else {
        return Err(ApiError::internal(
            "meta repository path",
            &std::io::Error::other("no parent directory"),
        )
        .into_response());
    };
    let header = |n: &str| {
        req_headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{}{rest}", name.to_string_lossy()))
        .env("REQUEST_METHOD", req.method().as_str())
        .env("QUERY_STRING", &query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env(
            "REMOTE_USER",
            format!("{}:{}", caller.kind.as_str(), caller.token_id),
        )
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "http.receivepack")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env(crate::hooks::HOOK_ENV, st.config.hook_command().join("\n"))
        .envs(pusher_env)
        .env(
            crate::hooks::META_REMOTE_ENV,
            st.meta.origin().unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| ApiError::internal("starting git http-backend", &e).into_response())?;
    let mut stdin = child.stdin.take();
    let body = req
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let feeder = tokio::spawn(async move {
        let mut reader = StreamReader::new(body);
        if let Some(stdin) = stdin.as_mut() {
            tokio::io::copy(&mut reader, stdin).await?;
            stdin.shutdown().await?;
        }
        drop(stdin);
        Ok::<(), std::io::Error>(())
    });
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let Some(stdout) = stdout else {
        return Err(
            ApiError::internal("git http-backend", &std::io::Error::other("no stdout"))
                .into_response(),
        );
    };
    let mut out = BufReader::new(stdout);
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    for _ in 0..100 {
        let mut line = String::new();
        let n = out
            .read_line(&mut line)
            .await
            .map_err(|e| ApiError::internal("reading git http-backend", &e).into_response())?;
        let line = line.trim_end_matches(['\r', '\n']);
        if n == 0 || line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            headers.push((k, v));
        }
    }
    let body = if push {
        // Small answer: wait for receive-pack (and its hook) to finish, then
        // index the new head so the API shows the push when git returns.
        let mut buf = Vec::new();
        out.read_to_end(&mut buf)
            .await
            .map_err(|e| ApiError::internal("reading git http-backend", &e).into_response())?;
        let _ = feeder.await;
        let mut err = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut err).await;
        }
        let exit = child.wait().await;
        if !err.trim().is_empty() {
            tracing::info!(stderr = %err.trim(), "git receive-pack");
        }
        tracing::info!(?exit, "push to the meta repository");
        if let Err(e) = crate::meta::sync(&st.meta, &st.db).await {
            tracing::error!(error = %e, "indexing the meta repository after a push");
        }
        Body::from(buf)
    } else {
        tokio::spawn(async move {
            let mut err = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut err).await;
            }
            let _ = feeder.await;
            let _ = child.wait().await;
            if !err.trim().is_empty() {
                tracing::debug!(stderr = %err.trim(), "git http-backend");
            }
        });
        Body::from_stream(ReaderStream::new(out))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (k, v) in headers {
        resp.headers_mut().append(k, v);
    }
    Ok(resp)
}
