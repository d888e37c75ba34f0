//! The REST API: one table of routes ([`routes`]) from which both the axum
//! router and the OpenAPI document are built, so neither can miss a route.

use std::collections::BTreeMap;

use axum::Extension;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodFilter, MethodRouter};
use meta_schema::layout::{is_dns_label, release_path};
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, RepoError};
use prost::Message;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use crate::AppState;
use crate::auth::{self, Access, Caller, TokenKind};
use crate::db::{AppRow, DeploymentRow, ImageRow, InstanceRow, NodeRow, ProjectRow, TokenRow};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, Code};
use crate::meta::{self, MetaError};
use crate::status::Status;

/// Largest JSON body the API accepts.
pub const BODY_LIMIT: usize = 1024 * 1024;

type Schemas = Vec<(String, RefOr<Schema>)>;
/// Registers a schema (and the schemas it refers to); returns its name.
pub type SchemaFn = fn(&mut Schemas) -> String;

fn sch<T: ToSchema>(v: &mut Schemas) -> String {
    v.push((T::name().into_owned(), T::schema()));
    T::schemas(v);
    T::name().into_owned()
}

/// A body in the OpenAPI document.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    One(SchemaFn),
    List(SchemaFn),
}

/// One route of the API.
pub struct RouteSpec {
    pub methods: &'static [Method],
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub request: Body,
    pub status: u16,
    pub response: Body,
    pub handler: MethodRouter<AppState>,
}

macro_rules! route {
    ($m:ident $path:literal, $access:ident, $summary:literal, $req:expr, $status:literal => $resp:expr, $h:expr) => {
        RouteSpec {
            methods: &[Method::$m],
            path: $path,
            access: Access::$access,
            summary: $summary,
            request: $req,
            status: $status,
            response: $resp,
            handler: axum::routing::on(MethodFilter::$m, $h),
        }
    };
}

/// Every route of the captain.
pub fn routes() -> Vec<RouteSpec> {
    use Body::{List, None as No, One};
    vec![
        route!(GET "/v1/health", Public, "Liveness and the indexed meta head", No, 200 => One(sch::<Health>), health),
        RouteSpec {
            methods: &[Method::GET, Method::POST],
            path: "/v1/auth/github",
            access: Access::Public,
            summary: "GitHub OAuth: redirect to GitHub, or exchange the callback code for a user token",
            request: No,
            status: 200,
            response: One(sch::<GithubLogin>),
            handler: axum::routing::get(auth_github).post(auth_github),
        },
        route!(POST "/v1/webhook/github", Public, "GitHub push webhook (HMAC X-Hub-Signature-256)", One(sch::<GithubPush>), 202 => One(sch::<WebhookResult>), crate::webhook::github),
        route!(POST "/v1/waitlist", Public, "Join the waitlist", One(sch::<JoinWaitlist>), 201 => One(sch::<WaitlistResult>), join_waitlist),
        route!(GET "/v1/openapi.json", Public, "This OpenAPI document", No, 200 => No, openapi_json),
        route!(GET "/metrics", Node, "Prometheus metrics (scrape with any token)", No, 200 => No, crate::metrics::render),
        route!(GET "/v1/tokens", Admin, "List API tokens", No, 200 => List(sch::<TokenView>), list_tokens),
        route!(POST "/v1/tokens", Admin, "Create an API token", One(sch::<CreateToken>), 201 => One(sch::<CreatedToken>), create_token),
        route!(DELETE "/v1/tokens/{id}", Admin, "Revoke an API token", No, 204 => No, revoke_token),
        route!(GET "/v1/projects", User, "List projects", No, 200 => List(sch::<ProjectView>), list_projects),
        route!(POST "/v1/projects", User, "Create a project (a git source)", One(sch::<CreateProject>), 201 => One(sch::<ProjectView>), create_project),
        route!(GET "/v1/projects/{id}", User, "Get a project and its apps", No, 200 => One(sch::<ProjectView>), get_project),
        route!(GET "/v1/projects/{id}/apps", User, "List the apps of a project", No, 200 => List(sch::<AppView>), list_apps),
        route!(POST "/v1/projects/{id}/apps", User, "Create an app in a project", One(sch::<CreateApp>), 201 => One(sch::<AppView>), create_app),
        route!(GET "/v1/apps/{id}", User, "Get an app and its active release", No, 200 => One(sch::<AppView>), get_app),
        route!(DELETE "/v1/apps/{id}", User, "Delete an app (removes its releases from the meta repo)", No, 204 => No, delete_app),
        route!(GET "/v1/apps/{id}/secrets", User, "Names and recipients of an app's secrets (never values)", No, 200 => One(sch::<crate::secrets::SecretsView>), crate::secrets::get_secrets),
        route!(PUT "/v1/apps/{id}/secrets", User, "Replace an app's secrets with the complete set given: encrypted to the env's nodes, committed with a new release", One(sch::<crate::secrets::SetSecrets>), 200 => One(sch::<crate::secrets::SecretsView>), crate::secrets::put_secrets),
        route!(GET "/v1/apps/{id}/logs", User, "An app's log lines stamped after ?from=<unix-nanos>, from its instances on their nodes, merged by time (?limit=, default 1000, max 10000; ?instance=); X-Last-Log-Nano is the next from; X-Log-Unreachable lists nodes that did not answer", No, 200 => List(sch::<crate::logs::AppLogLine>), crate::logs::app_logs),
        route!(PUT "/v1/apps/{id}/secrets/file", Node, "A node re-encrypts the app's secrets file (sops YAML body) to exactly the env's recipients; idempotent; committed with a new release", No, 200 => One(sch::<crate::secrets::SecretsView>), crate::secrets::put_secrets_file),
        route!(GET "/v1/deployments", User, "List deployments, newest first", No, 200 => List(sch::<DeploymentView>), list_deployments),
        route!(POST "/v1/deployments", User, "Create a deployment: commits a new Release to the meta repo", One(sch::<CreateDeployment>), 201 => One(sch::<DeploymentView>), create_deployment),
        route!(GET "/v1/deployments/{id}", User, "Get a deployment", No, 200 => One(sch::<DeploymentView>), get_deployment),
        route!(PUT "/v1/deployments/{id}/status", User, "Move a deployment along the status machine", One(sch::<SetStatus>), 200 => One(sch::<DeploymentView>), set_deployment_status),
        route!(GET "/v1/nodes", User, "List nodes", No, 200 => List(sch::<NodeView>), list_nodes),
        route!(POST "/v1/nodes", Admin, "Register a node; returns its node token", One(sch::<RegisterNode>), 201 => One(sch::<RegisteredNode>), register_node),
        route!(GET "/v1/nodes/{id}", User, "Get a node", No, 200 => One(sch::<NodeView>), get_node),
        route!(DELETE "/v1/nodes/{id}", Admin, "Remove a node and revoke its tokens", No, 204 => No, delete_node),
        route!(PUT "/v1/nodes/{id}/state", Node, "Node heartbeat: state and resources", One(sch::<NodeHeartbeat>), 200 => One(sch::<NodeView>), node_heartbeat),
        route!(GET "/v1/instances", Node, "List instances as reported by followers", No, 200 => List(sch::<InstanceView>), list_instances),
        route!(POST "/v1/instances", Node, "Report an instance (upsert by id)", One(sch::<InstanceReport>), 200 => One(sch::<InstanceView>), report_instance),
        route!(GET "/v1/instances/{id}", Node, "Get an instance", No, 200 => One(sch::<InstanceView>), get_instance),
        route!(DELETE "/v1/instances/{id}", Node, "Forget an instance", No, 204 => No, delete_instance),
        route!(PUT "/v1/instances/{id}/state", Node, "Update an instance's state", One(sch::<InstanceStateUpdate>), 200 => One(sch::<InstanceView>), set_instance_state),
        route!(GET "/v1/images", User, "List image metadata", No, 200 => List(sch::<ImageView>), list_images),
        route!(POST "/v1/images", Node, "Record an image's metadata", One(sch::<CreateImage>), 201 => One(sch::<ImageView>), create_image),
        route!(GET "/v1/images/{id}", User, "Get an image by id or digest", No, 200 => One(sch::<ImageView>), get_image),
        route!(DELETE "/v1/images/{id}", Admin, "Forget an image", No, 204 => No, delete_image),
        route!(GET "/v1/images/{id}/download", Node, "Stream an image's ext4 root filesystem (?part=config: its config.json) from the object store", No, 200 => No, crate::builds::download_image),
        route!(POST "/v1/sources", User, "Upload a build source: a gzip'd tar with every entry under one top-level directory (Content-Type: application/gzip)", No, 201 => One(sch::<crate::builds::SourceView>), crate::builds::upload_source),
        route!(GET "/v1/builds", User, "List builds, newest first (?app_id=, ?limit=)", No, 200 => List(sch::<crate::builds::BuildView>), crate::builds::list_builds),
        route!(POST "/v1/builds", User, "Queue a build of a git source or an uploaded source; optionally deploy its image", One(sch::<crate::builds::CreateBuild>), 201 => One(sch::<crate::builds::BuildView>), crate::builds::create_build),
        route!(GET "/v1/builds/{id}", User, "Get a build", No, 200 => One(sch::<crate::builds::BuildView>), crate::builds::get_build),
        route!(GET "/v1/builds/{id}/logs", User, "A build's log lines after ?from=<seq> (X-Last-Log-Seq), or as server-sent events with Accept: text/event-stream", No, 200 => List(sch::<crate::builds::BuildLogLine>), crate::builds::build_logs),
        route!(GET "/v1/routes/stream", User, "The edge's route table as server-sent events (edge::routes format)", No, 200 => No, crate::routes::stream),
        route!(GET "/meta.git/info/refs", Git, "git smart HTTP: ref advertisement (Basic or Bearer token)", No, 200 => No, crate::githttp::serve),
        route!(POST "/meta.git/git-upload-pack", Git, "git smart HTTP: fetch", No, 200 => No, crate::githttp::serve),
        route!(POST "/meta.git/git-receive-pack", Git, "git smart HTTP: push (validated by the pre-receive hook)", No, 200 => No, crate::githttp::serve),
    ]
}

/// The axum router of the captain.
pub fn router(state: AppState) -> Router {
    let mut r: Router<AppState> = Router::new();
    for spec in routes() {
        // git pushes and source uploads are streamed and bounded by their
        // handlers; everything else is JSON.
        let limit = if spec.access == Access::Git || spec.path == "/v1/sources" {
            DefaultBodyLimit::disable()
        } else {
            DefaultBodyLimit::max(BODY_LIMIT)
        };
        let handler = spec
            .handler
            .route_layer(axum::middleware::from_fn_with_state(
                (state.clone(), spec.access),
                auth::require,
            ))
            .layer(limit);
        r = r.route(spec.path, handler);
    }
    r.fallback(crate::error::not_found_fallback)
        .method_not_allowed_fallback(crate::error::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The OpenAPI document, generated from [`routes`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::path::{
        HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
    };
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{
        ArrayBuilder, ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApiBuilder, PathsBuilder,
        Ref, ResponseBuilder,
    };

    let mut schemas: Schemas = Vec::new();
    let err = sch::<crate::error::ErrorBody>(&mut schemas);
    let mut paths = PathsBuilder::new();
    let content = |b: Body, schemas: &mut Schemas| -> Option<utoipa::openapi::Content> {
        match b {
            Body::None => None,
            Body::One(f) => Some(
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(f(schemas))))
                    .build(),
            ),
            Body::List(f) => Some(
                ContentBuilder::new()
                    .schema(Some(
                        ArrayBuilder::new()
                            .items(Ref::from_schema_name(f(schemas)))
                            .build(),
                    ))
                    .build(),
            ),
        }
    };
    for spec in routes() {
        for m in spec.methods {
            let method = match *m {
                Method::GET => HttpMethod::Get,
                Method::POST => HttpMethod::Post,
                Method::PUT => HttpMethod::Put,
                Method::DELETE => HttpMethod::Delete,
                _ => HttpMethod::Patch,
            };
            let mut op = OperationBuilder::new()
                .summary(Some(spec.summary))
                .operation_id(Some(format!(
                    "{}_{}",
                    m.as_str().to_lowercase(),
                    spec.path
                        .trim_start_matches('/')
                        .replace(['/', '{', '}', '.'], "_")
                )));
            for seg in spec.path.split('/') {
                if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    op = op.parameter(
                        ParameterBuilder::new()
                            .name(name)
                            .parameter_in(ParameterIn::Path)
                            .required(utoipa::openapi::Required::True),
                    );
                }
            }
            if let Some(c) = content(spec.request, &mut schemas) {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .content("application/json", c)
                        .build(),
                ));
            }
            let mut ok = ResponseBuilder::new().description("success");
            if let Some(c) = content(spec.response, &mut schemas) {
                ok = ok.content("application/json", c);
            }
            op = op.response(spec.status.to_string(), ok.build()).response(
                "default",
                ResponseBuilder::new()
                    .description("error: {\"error\": {\"code\", \"message\"}}")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(err.clone())))
                            .build(),
                    )
                    .build(),
            );
            if !matches!(spec.access, Access::Public) {
                op = op.security(SecurityRequirement::new("token", Vec::<String>::new()));
            }
            paths = paths.path(spec.path, PathItem::new(method, op.build()));
        }
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("zeitwork captain")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .schemas_from_iter(schemas)
                .security_scheme(
                    "token",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                )
                .build(),
        ))
        .build()
}

async fn openapi_json() -> Response {
    axum::Json(openapi()).into_response()
}

fn json<T: Serialize>(status: StatusCode, v: T) -> Response {
    (status, axum::Json(v)).into_response()
}

fn meta_err(e: MetaError) -> ApiError {
    match e.repo_error() {
        Some(RepoError::Invalid(v)) => ApiError::new(Code::InvalidRelease, v.to_string()),
        Some(RepoError::AlreadyExists { path }) => ApiError::new(
            Code::Conflict,
            format!("{path} exists in the meta repository"),
        ),
        _ => ApiError::internal("meta repository", &e),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::InvalidName,
            format!(
                "{what} {name:?} is not a DNS label: 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
            ),
        ))
    }
}

// ---------------------------------------------------------------- health

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub database: String,
    pub meta_head: Option<String>,
    /// How apps are reached: `{app}` and `{domain}` are replaced (e.g.
    /// `http://{app}.{domain}:8080` under `zw up`).
    pub app_url: String,
    /// Whether this captain builds (`POST /v1/builds`).
    pub builds: bool,
}

async fn health(State(st): State<AppState>) -> Result<Response, ApiError> {
    let head = st.meta.head().await.map_err(meta_err)?;
    Ok(json(
        StatusCode::OK,
        Health {
            status: "ok".into(),
            database: st.db.backend().to_string(),
            meta_head: head,
            app_url: st.config.app_url_template.clone(),
            builds: st.config.builder.is_some(),
        },
    ))
}

// ---------------------------------------------------------------- github oauth

#[derive(Serialize, ToSchema)]
pub struct GithubLogin {
    pub login: String,
    /// A user API token for this GitHub user (shown once).
    pub token: String,
}

#[derive(Deserialize)]
struct OauthQuery {
    code: Option<String>,
}

async fn auth_github(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<OauthQuery>,
) -> Result<Response, ApiError> {
    let (Some(id), Some(secret)) = (
        st.config.github_client_id.clone(),
        st.config.github_client_secret.clone(),
    ) else {
        return Err(ApiError::new(
            Code::GithubOauthNotConfigured,
            "GitHub OAuth is not configured: start the captain with a GitHub OAuth app's client id and secret",
        ));
    };
    let base = st.config.github_url.trim_end_matches('/').to_string();
    let Some(code) = q.code else {
        let url = format!("{base}/login/oauth/authorize?client_id={id}&scope=read:user");
        return Ok(Redirect::to(&url).into_response());
    };
    let client = reqwest::Client::new();
    let unreachable = |e: reqwest::Error| {
        ApiError::new(Code::NotConfigured, format!("GitHub is unreachable: {e}"))
    };
    let tok: serde_json::Value = client
        .post(format!("{base}/login/oauth/access_token"))
        .header("Accept", "application/json")
        .form(&[
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let Some(access) = tok.get("access_token").and_then(|v| v.as_str()) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            format!("GitHub refused the code: {tok}"),
        ));
    };
    let user: serde_json::Value = client
        .get(format!(
            "{}/user",
            st.config.github_api_url.trim_end_matches('/')
        ))
        .bearer_auth(access)
        .header("User-Agent", "zeitwork-captain")
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let Some(login) = user.get("login").and_then(|v| v.as_str()) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "GitHub did not return a user",
        ));
    };
    let (_, token) = auth::issue(&st.db, TokenKind::User, &format!("github:{login}"), None).await?;
    Ok(json(
        StatusCode::OK,
        GithubLogin {
            login: login.to_string(),
            token,
        },
    ))
}

/// The fields of a GitHub push event the captain reads.
#[derive(Deserialize, ToSchema)]
pub struct GithubPush {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub after: String,
    pub repository: GithubRepository,
}

#[derive(Deserialize, ToSchema)]
pub struct GithubRepository {
    pub clone_url: Option<String>,
    pub html_url: Option<String>,
    pub ssh_url: Option<String>,
    pub git_url: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookResult {
    pub event: String,
    /// Deployments recorded (a captain without a builder).
    pub deployments: Vec<DeploymentView>,
    /// Builds queued, each deploying its image.
    pub builds: Vec<crate::builds::BuildView>,
}

// ---------------------------------------------------------------- waitlist

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinWaitlist {
    pub email: String,
}

#[derive(Serialize, ToSchema)]
pub struct WaitlistResult {
    pub email: String,
    /// False when the address was on the list already.
    pub joined: bool,
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && !domain.contains('@')
        && meta_schema::layout::is_domain(&domain.to_ascii_lowercase())
}

async fn join_waitlist(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<JoinWaitlist>,
) -> Result<Response, ApiError> {
    let email = b.email.trim().to_string();
    if !is_email(&email) {
        return Err(ApiError::bad_request(format!(
            "{email:?} is not an email address"
        )));
    }
    let joined = st
        .db
        .join_waitlist(&meta_schema::new_id(), &email, meta_schema::now_millis())
        .await?;
    let status = if joined {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, WaitlistResult { email, joined }))
}

// ---------------------------------------------------------------- tokens

#[derive(Serialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub node_id: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl From<TokenRow> for TokenView {
    fn from(t: TokenRow) -> Self {
        TokenView {
            id: t.id,
            kind: t.kind,
            name: t.name,
            node_id: t.node_id,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    /// admin or user (node tokens are issued by node registration).
    pub kind: TokenKind,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    pub token: TokenView,
    /// The secret; shown once, only its hash is stored.
    pub secret: String,
}

async fn list_tokens(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<TokenView> = st
        .db
        .list_tokens()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, v))
}

async fn create_token(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateToken>,
) -> Result<Response, ApiError> {
    if b.kind == TokenKind::Node {
        return Err(ApiError::bad_request(
            "node tokens are issued by POST /v1/nodes",
        ));
    }
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::bad_request(
            "a token needs a name of 1-200 characters",
        ));
    }
    let (row, secret) = auth::issue(&st.db, b.kind, b.name.trim(), None).await?;
    Ok(json(
        StatusCode::CREATED,
        CreatedToken {
            token: row.into(),
            secret,
        },
    ))
}

async fn revoke_token(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    if st.db.revoke_token(&id, meta_schema::now_millis()).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("live token", &id))
    }
}

// ---------------------------------------------------------------- projects & apps

#[derive(Serialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    /// Git URL (or a local path in development).
    pub repo: String,
    pub branch: String,
    pub created_at: i64,
    pub apps: Vec<AppView>,
}

#[derive(Serialize, ToSchema)]
pub struct AppView {
    pub id: String,
    pub project_id: String,
    pub env: String,
    pub name: String,
    pub created_at: i64,
    /// Newest release present at the meta repo head.
    pub active_release: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub repo: String,
    /// Defaults to "main".
    pub branch: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    /// Defaults to "production".
    pub env: Option<String>,
}

async fn app_view(st: &AppState, a: AppRow) -> Result<AppView, ApiError> {
    let active = st.db.active_release(&a.id).await?;
    Ok(AppView {
        id: a.id,
        project_id: a.project_id,
        env: a.env,
        name: a.name,
        created_at: a.created_at,
        active_release: active,
    })
}

async fn project_view(st: &AppState, p: ProjectRow) -> Result<ProjectView, ApiError> {
    let mut apps = Vec::new();
    for a in st.db.apps_of_project(&p.id).await? {
        apps.push(app_view(st, a).await?);
    }
    Ok(ProjectView {
        id: p.id,
        name: p.name,
        repo: p.repo,
        branch: p.branch,
        created_at: p.created_at,
        apps,
    })
}

async fn list_projects(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for p in st.db.projects().await? {
        out.push(project_view(&st, p).await?);
    }
    Ok(json(StatusCode::OK, out))
}

fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 2048
        && !repo.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 255
        && !b.starts_with(['-', '/'])
        && !b.ends_with(['/', '.'])
        && !b.contains("..")
        && !b
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
}

async fn create_project(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateProject>,
) -> Result<Response, ApiError> {
    check_name("project name", &b.name)?;
    if !valid_repo(&b.repo) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a git URL or path",
            b.repo
        )));
    }
    let branch = b.branch.unwrap_or_else(|| "main".into());
    if !valid_branch(&branch) {
        return Err(ApiError::bad_request(format!(
            "{branch:?} is not a git branch name"
        )));
    }
    let row = ProjectRow {
        id: meta::project_id(&b.repo, &branch),
        name: b.name,
        repo: b.repo,
        branch,
        created_at: meta_schema::now_millis(),
    };
    if !st.db.insert_project(&row).await? {
        return Err(ApiError::new(
            Code::Conflict,
            format!(
                "a project for {} (branch {}) exists already: {}",
                row.repo, row.branch, row.id
            ),
        ));
    }
    Ok(json(StatusCode::CREATED, project_view(&st, row).await?))
}

async fn get_project(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = st
        .db
        .project(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("project", &id))?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?))
}

async fn list_apps(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = st
        .db
        .project(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("project", &id))?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?.apps))
}

async fn create_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<CreateApp>,
) -> Result<Response, ApiError> {
    let p = st
        .db
        .project(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("project", &id))?;
    check_name("app name", &b.name)?;
    let env = b.env.unwrap_or_else(|| "production".into());
    check_name("env name", &env)?;
    let row = AppRow {
        id: meta::app_id(&env, &b.name),
        project_id: p.id,
        env: env.clone(),
        name: b.name.clone(),
        created_at: meta_schema::now_millis(),
    };
    if st.db.app(&row.id).await?.is_some() {
        return Err(ApiError::new(
            Code::Conflict,
            format!("an app named {:?} exists in env {env:?}", b.name),
        ));
    }
    match st.db.insert_app(&row).await {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => {
            return Err(ApiError::new(
                Code::Conflict,
                format!("an app named {:?} exists in env {env:?}", b.name),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    st.meta
        .ensure_env(&env, &st.config.platform_domains, &st.db)
        .await
        .map_err(meta_err)?;
    Ok(json(StatusCode::CREATED, app_view(&st, row).await?))
}

async fn get_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = st
        .db
        .app(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("app", &id))?;
    Ok(json(StatusCode::OK, app_view(&st, a).await?))
}

async fn delete_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = st
        .db
        .app(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("app", &id))?;
    let paths = st
        .meta
        .release_paths(&a.env, &a.name)
        .await
        .map_err(meta_err)?;
    if !paths.is_empty() {
        let mut cs = ChangeSet::new();
        for p in paths {
            cs = cs.remove(p);
        }
        st.meta
            .commit(cs, format!("Delete app {} in {}", a.name, a.env))
            .await
            .map_err(meta_err)?;
    }
    st.db.delete_app(&a.id, meta_schema::now_millis()).await?;
    st.mirror_wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------- deployments

#[derive(Serialize, ToSchema)]
pub struct DeploymentView {
    /// Equals the id of the Release file in the meta repo.
    pub id: String,
    pub app_id: String,
    pub project_id: String,
    pub env: String,
    pub app: String,
    pub image_digest: String,
    pub source_commit: String,
    pub min_instances: i64,
    pub status: String,
    pub reason: String,
    /// The release file is present at the meta repo head (not reverted).
    pub present: bool,
    /// Meta repo path of the release.
    pub path: String,
    /// Commit that added the release (or the head at which the mirror saw it).
    pub commit: String,
    /// Statuses this deployment may move to.
    pub legal_next: Vec<Status>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<DeploymentRow> for DeploymentView {
    fn from(d: DeploymentRow) -> Self {
        let legal = Status::parse(&d.status)
            .map(|s| s.legal_next().to_vec())
            .unwrap_or_default();
        DeploymentView {
            path: release_path(&d.env, &d.app, &d.id),
            id: d.id,
            app_id: d.app_id,
            project_id: d.project_id,
            env: d.env,
            app: d.app,
            image_digest: d.image_digest,
            source_commit: d.source_commit,
            min_instances: d.min_instances,
            status: d.status,
            reason: d.reason,
            present: d.present,
            commit: d.commit_id,
            legal_next: legal,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub app_id: String,
    /// "sha256:<hex>" of a built image; or give `commit` to build.
    pub image_digest: Option<String>,
    /// Source commit to build (when no image digest).
    pub commit: Option<String>,
    pub port: Option<u32>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub min_instances: Option<u32>,
    pub health_check_path: Option<String>,
}

#[derive(Deserialize)]
struct DeploymentQuery {
    app_id: Option<String>,
    before: Option<String>,
    limit: Option<i64>,
}

async fn list_deployments(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<DeploymentQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1-10000"));
    }
    let rows = st
        .db
        .deployments(q.app_id.as_deref(), q.before.as_deref(), limit)
        .await?;
    let v: Vec<DeploymentView> = rows.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

/// Create a release for `app` and commit it; returns the new deployment.
pub async fn deploy(
    st: &AppState,
    app: &AppRow,
    b: CreateDeployment,
) -> Result<DeploymentView, ApiError> {
    let project = st
        .db
        .project(&app.project_id)
        .await?
        .ok_or_else(|| ApiError::not_found("project", &app.project_id))?;
    let digest = b.image_digest.unwrap_or_default();
    let commit = b.commit.unwrap_or_default();
    if digest.is_empty() && commit.is_empty() {
        return Err(ApiError::bad_request(
            "a deployment needs an image_digest or a source commit",
        ));
    }
    if !digest.is_empty()
        && !digest.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
    {
        return Err(ApiError::bad_request(format!(
            "image_digest {digest:?} is not sha256:<64 lowercase hex>"
        )));
    }
    let commit_ok =
        (4..=64).contains(&commit.len()) && commit.bytes().all(|c| c.is_ascii_hexdigit());
    if !commit.is_empty() && !commit_ok {
        return Err(ApiError::bad_request(format!(
            "commit {commit:?} is not a git commit id"
        )));
    }
    let (secret_refs, secrets_blob) = crate::secrets::current_refs(st, &app.env, &app.name).await?;
    let release = pb::Release {
        id: meta_schema::new_id(),
        secret_refs,
        secrets_blob,
        app: app.name.clone(),
        env: app.env.clone(),
        image_digest: digest.clone(),
        port: b.port.unwrap_or(0),
        env_vars: b.env_vars.unwrap_or_default(),
        min_instances: b.min_instances.unwrap_or(0),
        health_check: b.health_check_path.map(|p| pb::HealthCheck {
            kind: Some(pb::health_check::Kind::HttpPath(p)),
            interval_ms: 0,
            timeout_ms: 0,
        }),
        source: Some(pb::Source {
            repo: project.repo.clone(),
            branch: project.branch.clone(),
            commit: commit.clone(),
        }),
        created_at: meta_schema::now_millis(),
        ..Default::default()
    };
    // Field rules first, so a bad release is refused before any write.
    let mut check = meta_schema::MetaTree::new();
    check.insert(
        meta_schema::layout::env_path(&app.env),
        pb::Env {
            name: app.env.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let path = release_path(&app.env, &app.name, &release.id);
    check.insert(path.clone(), release.encode_to_vec());
    if let Err(e) = meta_schema::validate::validate_tree(&check) {
        return Err(ApiError::new(Code::InvalidRelease, e.to_string()));
    }
    st.meta
        .ensure_env(&app.env, &st.config.platform_domains, &st.db)
        .await
        .map_err(meta_err)?;
    let commit_id = st
        .meta
        .commit(
            ChangeSet::new().add(path, release.encode_to_vec()),
            format!("Release {} of {} in {}", release.id, app.name, app.env),
        )
        .await
        .map_err(meta_err)?;
    let (status, reason) = meta::initial_status(&st.db, &release, &[]).await?;
    let now = meta_schema::now_millis();
    let row = DeploymentRow {
        id: release.id.clone(),
        app_id: app.id.clone(),
        project_id: project.id.clone(),
        env: app.env.clone(),
        app: app.name.clone(),
        image_digest: digest,
        source_commit: commit,
        min_instances: i64::from(release.instances()),
        status: status.as_str().into(),
        reason,
        present: true,
        commit_id,
        created_at: release.created_at,
        updated_at: now,
    };
    st.db.upsert_deployment(&row).await?;
    st.mirror_wake.notify_one();
    let stored = st.db.deployment(&row.id).await?.unwrap_or(row);
    Ok(stored.into())
}

async fn create_deployment(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateDeployment>,
) -> Result<Response, ApiError> {
    let app = st
        .db
        .app(&b.app_id)
        .await?
        .ok_or_else(|| ApiError::not_found("app", &b.app_id))?;
    let d = deploy(&st, &app, b).await?;
    Ok(json(StatusCode::CREATED, d))
}

async fn get_deployment(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let d = st
        .db
        .deployment(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("deployment", &id))?;
    Ok(json(StatusCode::OK, DeploymentView::from(d)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStatus {
    pub status: Status,
    /// Required when the status is `failed`.
    pub reason: Option<String>,
}

async fn set_deployment_status(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<SetStatus>,
) -> Result<Response, ApiError> {
    let d = st
        .db
        .deployment(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("deployment", &id))?;
    let reason = b.reason.unwrap_or_default();
    if b.status == Status::Failed && reason.trim().is_empty() {
        return Err(ApiError::bad_request("a failed deployment needs a reason"));
    }
    let from = Status::parse(&d.status)
        .ok_or_else(|| ApiError::internal("deployment status", &UnknownStatus(d.status.clone())))?;
    let illegal = |from: Status| {
        let legal: Vec<&str> = from.legal_next().iter().map(|s| s.as_str()).collect();
        ApiError::new(
            Code::IllegalTransition,
            format!(
                "deployment {id} cannot go from {from} to {}; legal from {from}: [{}]",
                b.status,
                legal.join(", ")
            ),
        )
    };
    if !from.can_become(b.status) {
        return Err(illegal(from));
    }
    if !st
        .db
        .set_deployment_status(
            &id,
            from.as_str(),
            b.status.as_str(),
            reason.trim(),
            meta_schema::now_millis(),
        )
        .await?
    {
        let now = st
            .db
            .deployment(&id)
            .await?
            .and_then(|d| Status::parse(&d.status))
            .unwrap_or(from);
        return Err(illegal(now));
    }
    let d = st
        .db
        .deployment(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("deployment", &id))?;
    Ok(json(StatusCode::OK, DeploymentView::from(d)))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown deployment status {0:?} in the database")]
struct UnknownStatus(String);

// ---------------------------------------------------------------- nodes

#[derive(Serialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub address: String,
    pub region: String,
    pub cpus: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub age_recipient: String,
    pub api_url: String,
    pub proxy_addr: String,
    pub state: String,
    pub memory_used_bytes: i64,
    pub instances: i64,
    pub last_seen: i64,
    pub registered_at: i64,
    /// Meta repo commit the node's follower last applied.
    pub applied_commit: String,
    /// A head the follower refused (does not descend from what it applied).
    pub refused_commit: String,
    pub refused_reason: String,
}

impl From<NodeRow> for NodeView {
    fn from(n: NodeRow) -> Self {
        NodeView {
            id: n.id,
            address: n.address,
            region: n.region,
            cpus: n.cpus,
            memory_bytes: n.memory_bytes,
            disk_bytes: n.disk_bytes,
            age_recipient: n.age_recipient,
            api_url: n.api_url,
            proxy_addr: n.proxy_addr,
            state: n.state,
            memory_used_bytes: n.memory_used_bytes,
            instances: n.instances,
            last_seen: n.last_seen,
            registered_at: n.registered_at,
            applied_commit: n.applied_commit,
            refused_commit: n.refused_commit,
            refused_reason: n.refused_reason,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub region: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    #[serde(default)]
    pub age_recipient: String,
    #[serde(default)]
    pub api_url: String,
    #[serde(default)]
    pub proxy_addr: String,
}

#[derive(Serialize, ToSchema)]
pub struct RegisteredNode {
    pub node: NodeView,
    /// The node's token (shown once): it may call only node-facing endpoints.
    pub token: String,
    /// The key the captain calls the node's API with (shown once; the node
    /// accepts it until its next registration). Derived, never stored.
    pub api_key: String,
}

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Online,
    Draining,
    Offline,
}

impl NodeState {
    fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Draining => "draining",
            NodeState::Offline => "offline",
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub memory_used_bytes: u64,
    pub instances: u32,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeHeartbeat {
    pub state: NodeState,
    pub resources: Option<NodeResources>,
    pub meta: Option<NodeMetaStatus>,
}

/// Where the node's follower is in following the meta repo.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeMetaStatus {
    pub applied_commit: Option<String>,
    pub refused_commit: Option<String>,
    pub refused_reason: Option<String>,
}

fn to_i64(what: &str, v: u64) -> Result<i64, ApiError> {
    i64::try_from(v).map_err(|_| ApiError::bad_request(format!("{what} {v} is too large")))
}

async fn list_nodes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<NodeView> = st.db.nodes().await?.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

async fn register_node(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<RegisterNode>,
) -> Result<Response, ApiError> {
    check_name("node id", &b.id)?;
    if b.address.trim().is_empty() {
        return Err(ApiError::bad_request("a node needs an address"));
    }
    if !b.age_recipient.is_empty() && !b.age_recipient.starts_with("age1") {
        return Err(ApiError::bad_request(
            "age_recipient must be an age X25519 recipient (age1...)",
        ));
    }
    let now = meta_schema::now_millis();
    let row = NodeRow {
        id: b.id.clone(),
        address: b.address,
        region: b.region,
        cpus: i64::from(b.cpus),
        memory_bytes: to_i64("memory_bytes", b.memory_bytes)?,
        disk_bytes: to_i64("disk_bytes", b.disk_bytes)?,
        age_recipient: b.age_recipient,
        api_url: b.api_url,
        proxy_addr: b.proxy_addr,
        state: "online".into(),
        memory_used_bytes: 0,
        instances: 0,
        last_seen: now,
        registered_at: now,
        applied_commit: String::new(),
        refused_commit: String::new(),
        refused_reason: String::new(),
    };
    // A node that registers again (its follower restarted, maybe on new
    // ports) gets its row updated and a fresh token; its old tokens stop
    // working.
    let mut status = StatusCode::CREATED;
    match st.db.insert_node(&row).await {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => {
            if !st.db.reregister_node(&row).await? {
                return Err(ApiError::new(
                    Code::Conflict,
                    format!("node {:?} was removed while registering; try again", row.id),
                ));
            }
            st.db.revoke_node_tokens(&row.id, now).await?;
            status = StatusCode::OK;
            tracing::info!(node = %row.id, "node registered again; previous node tokens revoked");
        }
        Err(e) => return Err(e.into()),
    }
    if !row.age_recipient.is_empty() {
        crate::secrets::add_node_recipient(&st, &row.id, &row.age_recipient)
            .await
            .map_err(meta_err)?;
    }
    let (issued, token) = auth::issue(
        &st.db,
        TokenKind::Node,
        &format!("node {}", row.id),
        Some(&row.id),
    )
    .await?;
    let api_key = crate::nodelink::issue_key(&st.config.data_dir, &row.id, &issued.id)
        .map_err(|e| ApiError::internal("issuing the node's API key", &e))?;
    let node = st
        .db
        .node(&row.id)
        .await?
        .map(Into::into)
        .unwrap_or_else(|| row.into());
    Ok(json(
        status,
        RegisteredNode {
            node,
            token,
            api_key,
        },
    ))
}

async fn get_node(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let n = st
        .db
        .node(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("node", &id))?;
    Ok(json(StatusCode::OK, NodeView::from(n)))
}

async fn delete_node(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    // Recipient first: if that commit fails the node is still listed and
    // the DELETE can be retried (a no-op commit-wise when already removed).
    crate::secrets::remove_node_recipient(&st, &id)
        .await
        .map_err(meta_err)?;
    if !st.db.delete_node(&id).await? {
        return Err(ApiError::not_found("node", &id));
    }
    st.db
        .revoke_node_tokens(&id, meta_schema::now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn node_forbidden(caller: &Caller, node: &str) -> Result<(), ApiError> {
    if caller.may_act_for_node(node) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::Forbidden,
            format!(
                "this node token belongs to {:?}, not to node {node:?}",
                caller.node_id.as_deref().unwrap_or("")
            ),
        ))
    }
}

async fn node_heartbeat(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<NodeHeartbeat>,
) -> Result<Response, ApiError> {
    node_forbidden(&caller, &id)?;
    let res = match b.resources {
        Some(r) => Some((
            i64::from(r.cpus),
            to_i64("memory_bytes", r.memory_bytes)?,
            to_i64("disk_bytes", r.disk_bytes)?,
            to_i64("memory_used_bytes", r.memory_used_bytes)?,
            i64::from(r.instances),
        )),
        None => None,
    };
    let hb = crate::db::Heartbeat {
        state: b.state.as_str().to_string(),
        resources: res,
        meta: b.meta.map(|m| {
            (
                m.applied_commit.unwrap_or_default(),
                m.refused_commit.unwrap_or_default(),
                m.refused_reason.unwrap_or_default(),
            )
        }),
    };
    if !st.db.heartbeat(&id, &hb, meta_schema::now_millis()).await? {
        return Err(ApiError::not_found("node", &id));
    }
    let n = st
        .db
        .node(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("node", &id))?;
    Ok(json(StatusCode::OK, NodeView::from(n)))
}

// ---------------------------------------------------------------- instances

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Healthy,
    Unhealthy,
    Failed,
    Stopped,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Failed => "failed",
            InstanceState::Stopped => "stopped",
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub node_id: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release_id: String,
    pub state: String,
    pub reason: String,
    pub address: String,
    pub port: i64,
    pub attempts: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<InstanceRow> for InstanceView {
    fn from(x: InstanceRow) -> Self {
        InstanceView {
            id: x.id,
            node_id: x.node_id,
            env: x.env,
            app: x.app,
            rollout_id: x.rollout_id,
            release_id: x.release_id,
            state: x.state,
            reason: x.reason,
            address: x.address,
            port: x.port,
            attempts: x.attempts,
            created_at: x.created_at,
            updated_at: x.updated_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceReport {
    pub id: String,
    pub node_id: String,
    pub env: String,
    pub app: String,
    #[serde(default)]
    pub rollout_id: String,
    pub release_id: String,
    pub state: InstanceState,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub attempts: u32,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStateUpdate {
    pub state: InstanceState,
    #[serde(default)]
    pub reason: String,
}

#[derive(Deserialize)]
struct InstanceQuery {
    node_id: Option<String>,
}

async fn list_instances(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<InstanceQuery>,
) -> Result<Response, ApiError> {
    let v: Vec<InstanceView> = st
        .db
        .instances(q.node_id.as_deref())
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, v))
}

/// After an instance report: promote the release's deployment to running
/// once enough of its instances are healthy.
async fn check_running(st: &AppState, release_id: &str) -> Result<(), ApiError> {
    let Some(d) = st.db.deployment(release_id).await? else {
        return Ok(());
    };
    if d.status != Status::Starting.as_str() {
        return Ok(());
    }
    let healthy = st.db.healthy_instances_of_release(release_id).await?;
    if healthy >= d.min_instances.max(1)
        && st
            .db
            .set_deployment_status(&d.id, "starting", "running", "", meta_schema::now_millis())
            .await?
    {
        tracing::info!(deployment = %d.id, healthy, "deployment is running");
    }
    Ok(())
}

async fn report_instance(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<InstanceReport>,
) -> Result<Response, ApiError> {
    node_forbidden(&caller, &b.node_id)?;
    if b.id.is_empty() || b.id.len() > 128 || b.release_id.is_empty() {
        return Err(ApiError::bad_request(
            "an instance report needs an id (at most 128 characters) and a release_id",
        ));
    }
    check_name("env", &b.env)?;
    check_name("app", &b.app)?;
    let now = meta_schema::now_millis();
    let created = st
        .db
        .instance(&b.id)
        .await?
        .map(|x| x.created_at)
        .unwrap_or(now);
    let row = InstanceRow {
        id: b.id,
        node_id: b.node_id,
        env: b.env,
        app: b.app,
        rollout_id: b.rollout_id,
        release_id: b.release_id,
        state: b.state.as_str().into(),
        reason: b.reason,
        address: b.address,
        port: i64::from(b.port),
        attempts: i64::from(b.attempts),
        created_at: created,
        updated_at: now,
    };
    st.db.upsert_instance(&row).await?;
    check_running(&st, &row.release_id).await?;
    // A report can complete or fail a rollout and changes the routes.
    st.rollout_wake.notify_one();
    st.routes_wake.notify_one();
    Ok(json(StatusCode::OK, InstanceView::from(row)))
}

async fn get_instance(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let x = st
        .db
        .instance(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance", &id))?;
    Ok(json(StatusCode::OK, InstanceView::from(x)))
}

async fn delete_instance(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let x = st
        .db
        .instance(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance", &id))?;
    node_forbidden(&caller, &x.node_id)?;
    st.db.delete_instance(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_instance_state(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<InstanceStateUpdate>,
) -> Result<Response, ApiError> {
    let x = st
        .db
        .instance(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance", &id))?;
    node_forbidden(&caller, &x.node_id)?;
    st.db
        .set_instance_state(&id, b.state.as_str(), &b.reason, meta_schema::now_millis())
        .await?;
    check_running(&st, &x.release_id).await?;
    let x = st
        .db
        .instance(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance", &id))?;
    Ok(json(StatusCode::OK, InstanceView::from(x)))
}

// ---------------------------------------------------------------- images

#[derive(Serialize, ToSchema)]
pub struct ImageView {
    pub id: String,
    pub digest: String,
    pub size_bytes: i64,
    pub source_commit: String,
    pub created_at: i64,
}

impl From<ImageRow> for ImageView {
    fn from(x: ImageRow) -> Self {
        ImageView {
            id: x.id,
            digest: x.digest,
            size_bytes: x.size_bytes,
            source_commit: x.source_commit,
            created_at: x.created_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub digest: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub source_commit: String,
}

async fn list_images(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<ImageView> = st.db.images().await?.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

async fn create_image(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateImage>,
) -> Result<Response, ApiError> {
    let ok = b.digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    });
    if !ok {
        return Err(ApiError::bad_request(format!(
            "digest {:?} is not sha256:<64 lowercase hex>",
            b.digest
        )));
    }
    let row = ImageRow {
        id: meta_schema::new_id(),
        digest: b.digest,
        size_bytes: to_i64("size_bytes", b.size_bytes)?,
        source_commit: b.source_commit,
        created_at: meta_schema::now_millis(),
    };
    match st.db.insert_image(&row).await {
        Ok(()) => Ok(json(StatusCode::CREATED, ImageView::from(row))),
        Err(e) if e.is_unique_violation() => Err(ApiError::new(
            Code::Conflict,
            format!("image {} is recorded already", row.digest),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn get_image(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let x = st
        .db
        .image(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("image", &id))?;
    Ok(json(StatusCode::OK, ImageView::from(x)))
}

async fn delete_image(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    if st.db.delete_image(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("image", &id))
    }
}

/// Headers-only authentication for handlers that do their own (git).
pub async fn authenticate_git(st: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    auth::authenticate(st, headers)
        .await
        .map_err(|e| auth::unauthorized(e, "Basic"))
}

/// The request's content type, lower case.
pub fn content_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}
