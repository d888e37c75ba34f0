//! GitHub sign-in against a local stand-in of github.com speaking GitHub's
//! documented JSON (github.com is unreachable here): the OAuth code
//! exchange, `GET /user` and `GET /user/orgs`, each checking what the
//! captain sends. Sign-up is closed: only allow-listed users and members of
//! allow-listed organizations get a token; everyone else lands on the
//! waitlist until an admin admits them. The `state` is bound to the
//! browser by a cookie: a callback without it is refused (CSRF).

mod common;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use common::Backend;
use serde_json::{Value, json};

#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

fn bearer(h: &HeaderMap) -> Option<String> {
    h.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer gho_")
        .map(str::to_string)
}

/// The GitHub stand-in: code `good-<login>` is exchanged for token
/// `gho_<login>`; `hubot` is a member of organization `acme`.
async fn github_standin() -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route(
            "/login/oauth/access_token",
            post(|h: HeaderMap, body: String| async move {
                let form: std::collections::HashMap<String, String> =
                    url_form(&body);
                let accept_json = h
                    .get("accept")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/json"));
                match (
                    accept_json,
                    form.get("client_id").map(String::as_str),
                    form.get("client_secret").map(String::as_str),
                    form.get("code").and_then(|c| c.strip_prefix("good-")),
                ) {
                    (true, Some("cid"), Some("csecret"), Some(login)) => axum::Json(
                        json!({"access_token": format!("gho_{login}"), "token_type": "bearer", "scope": "read:user,user:email"}),
                    ),
                    _ => axum::Json(json!({"error": "bad_verification_code", "error_description": "The code passed is incorrect or expired."})),
                }
            }),
        )
        .route(
            "/user",
            get(|h: HeaderMap| async move {
                match bearer(&h) {
                    Some(login) => (
                        StatusCode::OK,
                        axum::Json(json!({
                            "login": login,
                            "id": login.len() as u64 * 1000 + login.as_bytes()[0] as u64,
                            "type": "User",
                            "email": null,
                        })),
                    ),
                    None => (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"message": "Requires authentication", "documentation_url": "https://docs.github.com/rest"})),
                    ),
                }
            }),
        )
        .route(
            "/user/orgs",
            get(|h: HeaderMap| async move {
                match bearer(&h) {
                    Some(login) if login == "hubot" => (
                        StatusCode::OK,
                        axum::Json(json!([{"login": "acme", "id": 7, "url": "https://api.github.com/orgs/acme"}])),
                    ),
                    Some(_) => (StatusCode::OK, axum::Json(json!([]))),
                    None => (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"message": "Requires authentication"})),
                    ),
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    (
        base,
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() }),
    )
}

fn url_form(body: &str) -> std::collections::HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%3A", ":")))
        .collect()
}

/// A browser: follows no redirect, keeps the captain's cookie.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: std::sync::Mutex<Option<String>>,
}

impl Browser {
    /// Start a sign-in: the captain redirects to GitHub with a state and
    /// sets the cookie; returns the state.
    async fn start(&self, gh: &str) -> String {
        let r = self
            .http
            .get(format!("{}/v1/auth/github", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_redirection(), "{}", r.status());
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        assert!(
            loc.starts_with(&format!("{gh}/login/oauth/authorize?client_id=cid&scope=")),
            "{loc}"
        );
        let cookie = r.headers()["set-cookie"].to_str().unwrap();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        *self.cookie.lock().unwrap() = cookie.split(';').next().map(str::to_string);
        loc.split("state=").nth(1).unwrap().to_string()
    }

    async fn callback(&self, code: &str, state: &str) -> (u16, Value) {
        let mut req = self.http.get(format!(
            "{}/v1/auth/github?code={code}&state={state}",
            self.base
        ));
        if let Some(c) = self.cookie.lock().unwrap().clone() {
            req = req.header("cookie", c);
        }
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
}

fn browser(base: &str) -> Browser {
    Browser {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: base.to_string(),
        cookie: std::sync::Mutex::new(None),
    }
}

async fn github_standin_sign_in_is_closed_by_default(backend: Backend) {
    let (gh, server) = github_standin().await;
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(backend, dir.path()).await;
    let mut config = common::config(dir.path(), &url);
    config.github_client_id = Some("cid".into());
    config.github_client_secret = Some("csecret".into());
    config.github_url = gh.clone();
    config.github_api_url = gh.clone();
    config.github_allow_users = vec!["monalisa".into()];
    config.github_allow_orgs = vec!["acme".into()];
    let c = captain::Captain::start(config).await.unwrap();
    let admin = c.admin_token().unwrap().to_string();
    let base = format!("http://{}", c.local_addr());

    // CSRF: a callback the browser did not start (no cookie), or with
    // another state, is refused before GitHub is asked anything.
    let b = browser(&base);
    let state = b.start(&gh).await;
    let stranger = browser(&base);
    let (s, v) = stranger.callback("good-monalisa", &state).await;
    assert_eq!(s, 400, "no cookie: {v}");
    let (s, v) = b.callback("good-monalisa", "forged-state").await;
    assert_eq!(s, 400, "another state: {v}");
    // A bad code.
    let state = b.start(&gh).await;
    let (s, v) = b.callback("bad", &state).await;
    assert_eq!(s, 403, "{v}");

    // Allowed by name, and by organization.
    for who in ["monalisa", "hubot"] {
        let b = browser(&base);
        let state = b.start(&gh).await;
        let (s, v) = b.callback(&format!("good-{who}"), &state).await;
        assert_eq!(s, 200, "{who}: {v}");
        assert_eq!(v["login"], who);
        let token = v["token"].as_str().unwrap();
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/projects"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "the token is a user's");
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/tokens"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "not an admin's");
    }

    // Anyone else: the waitlist, until an admin admits them.
    let b = browser(&base);
    let state = b.start(&gh).await;
    let (s, v) = b.callback("good-octocat", &state).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "waitlisted", "{v}");
    assert!(v.to_string().find("token").is_none(), "no token: {v}");
    let http = reqwest::Client::new();
    let list: Value = http
        .get(format!("{base}/v1/waitlist"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["github_login"] == "octocat")
        .unwrap_or_else(|| panic!("octocat is on the waitlist: {list}"))
        .clone();
    assert_eq!(entry["email"], "octocat@users.noreply.github.com");
    let r = http
        .post(format!(
            "{base}/v1/waitlist/{}/admit",
            entry["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let state = b.start(&gh).await;
    let (s, v) = b.callback("good-octocat", &state).await;
    assert_eq!(s, 200, "admitted: {v}");
    assert!(v["token"].as_str().unwrap().starts_with("zwu_"));
    c.shutdown().await;
    server.abort();
}
both!(
    github_standin_sign_in,
    github_standin_sign_in_is_closed_by_default
);

/// The waitlist takes a bounded number of sign-ups per client address.
async fn waitlist_is_rate_limited(backend: Backend) {
    let env = common::Env::start(backend).await;
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for i in 0..12 {
        let r = http
            .post(format!("{}/v1/waitlist", env.base))
            .json(&json!({"email": format!("flood{i}@example.com")}))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            assert!(r.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(&codes[..10], &[201; 10], "{codes:?}");
    assert_eq!(&codes[10..], &[429, 429], "{codes:?}");
    let (_, list) = env.get("/v1/waitlist").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        10,
        "the flood was not stored"
    );
    env.stop().await;
}
both!(waitlist_rate_limit, waitlist_is_rate_limited);
