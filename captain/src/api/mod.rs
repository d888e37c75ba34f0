//! The REST API: one table of routes ([`routes`]) from which both the axum
//! router and the OpenAPI document are built, so neither can miss a route.
//! Each handler parses, authorizes and calls an operation of [`crate::app`];
//! the bodies are the wire types of the `api-types` crate.

pub mod builds;
pub mod cluster;
pub mod deployments;
pub mod github;
pub mod health;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod nodes;
pub mod projects;
pub mod routes_stream;
pub mod secrets;
pub mod spec;
pub mod tasks;
pub mod tokens;
pub mod waitlist;

use api_types::builds::{BuildLogLine, BuildView, CreateBuild, SourceView};
use api_types::cluster::{
    ClusterMemberView, CreateJoinToken, JoinRequest, JoinToken, Joined, RenewRequest, Renewed,
};
use api_types::deployments::{CreateDeployment, DeploymentView, SetStatus};
use api_types::images::{CreateImage, ImageView};
use api_types::logs::AppLogLine;
use api_types::misc::{GithubLogin, Health, JoinWaitlist, WaitlistEntry, WaitlistResult};
use api_types::nodes::{
    InstanceReport, InstanceStateUpdate, InstanceView, NodeHeartbeat, NodeView, RegisterNode,
    RegisteredNode, SetDrain,
};
use api_types::projects::{AddMember, AppView, CreateApp, CreateProject, MemberView, ProjectView};
use api_types::secrets::{SecretsView, SetSecrets};
use api_types::tasks::TaskStatus;
use api_types::tokens::{CreateToken, CreatedToken, TokenView, UserView};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodFilter;
use serde::Serialize;

pub use spec::{Body, Param, RouteSpec, SchemaFn};
use spec::{q, sch};

use crate::auth::{self, Access};
use crate::state::AppState;
use crate::webhook::{GithubPush, WebhookResult};

/// Largest JSON body the API accepts.
pub const BODY_LIMIT: usize = 1024 * 1024;
/// Largest git pack a push to `/meta.git` may send.
pub const MAX_PUSH_BODY: usize = 32 << 20;

macro_rules! route {
    ($m:ident $path:literal, $access:ident, $h:expr) => {
        RouteSpec::new(
            &Method::$m,
            $path,
            Access::$access,
            axum::routing::on(MethodFilter::$m, $h),
        )
    };
}

/// Every route of the captain.
pub fn routes() -> Vec<RouteSpec> {
    use Body::{List, None as No, One};
    vec![
        route!(GET "/v1/health", Public, health::health)
            .summary("Liveness and the indexed meta head")
            .answers(200, One(sch::<Health>)),
        RouteSpec {
            methods: &[Method::GET, Method::POST],
            ..RouteSpec::new(
                &Method::GET,
                "/v1/auth/github",
                Access::Public,
                axum::routing::get(github::auth_github).post(github::auth_github),
            )
        }
        .summary("GitHub OAuth: redirect to GitHub, or exchange the callback code for a user token")
        .query("code", q::string, "the code GitHub's callback carries")
        .query("state", q::string, "the state GitHub's callback carries (matches the cookie)")
        .answers(200, One(sch::<GithubLogin>))
        .also(302, No)
        .errors(&[400, 403, 404]),
        route!(POST "/v1/webhook/github", Public, crate::webhook::github)
            .summary("GitHub push webhook (HMAC X-Hub-Signature-256)")
            .takes(One(sch::<GithubPush>))
            .answers(202, One(sch::<WebhookResult>))
            .also(200, One(sch::<WebhookResult>))
            .errors(&[401, 404]),
        route!(POST "/v1/waitlist", Public, waitlist::join_waitlist)
            .summary("Join the waitlist")
            .takes(One(sch::<JoinWaitlist>))
            .answers(201, One(sch::<WaitlistResult>))
            .also(200, One(sch::<WaitlistResult>))
            .errors(&[429]),
        route!(GET "/v1/waitlist", Admin, waitlist::list_waitlist)
            .summary("The waitlist")
            .answers(200, List(sch::<WaitlistEntry>)),
        route!(POST "/v1/waitlist/{id}/admit", Admin, waitlist::admit)
            .param("id", Param::Ulid("waitlist entry"))
            .summary("Admit someone from the waitlist: their next GitHub sign-in gives them a token")
            .answers(204, No),
        route!(GET "/v1/users", Admin, tokens::list_users)
            .summary("List users")
            .answers(200, List(sch::<UserView>)),
        route!(GET "/v1/openapi.json", Public, openapi_json)
            .summary("This OpenAPI document")
            .answers(200, Body::AnyJson),
        route!(GET "/metrics", Node, metrics::render)
            .summary("Prometheus metrics (scrape with any token)")
            .answers(200, Body::Text("application/openmetrics-text")),
        route!(GET "/v1/admin/tasks", Admin, tasks::list_tasks)
            .summary("The captain's background tasks: last activation, outcome, next activation")
            .answers(200, List(sch::<TaskStatus>)),
        route!(GET "/v1/tokens", Admin, tokens::list_tokens)
            .summary("List API tokens")
            .answers(200, List(sch::<TokenView>)),
        route!(POST "/v1/tokens", Admin, tokens::create_token)
            .summary("Create an API token")
            .takes(One(sch::<CreateToken>))
            .answers(201, One(sch::<CreatedToken>))
            .errors(&[404]),
        route!(DELETE "/v1/tokens/{id}", Admin, tokens::revoke_token)
            .param("id", Param::Ulid("token"))
            .summary("Revoke an API token")
            .answers(204, No),
        route!(GET "/v1/projects", User, projects::list_projects)
            .summary("List projects")
            .answers(200, List(sch::<ProjectView>)),
        route!(POST "/v1/projects", User, projects::create_project)
            .summary("Create a project (a git source)")
            .takes(One(sch::<CreateProject>))
            .answers(201, One(sch::<ProjectView>))
            .errors(&[409, 422]),
        route!(GET "/v1/projects/{id}", User, projects::get_project)
            .param("id", Param::Project)
            .summary("Get a project and its apps")
            .answers(200, One(sch::<ProjectView>)),
        route!(GET "/v1/projects/{id}/apps", User, projects::list_apps)
            .param("id", Param::Project)
            .summary("List the apps of a project")
            .answers(200, List(sch::<AppView>)),
        route!(POST "/v1/projects/{id}/apps", User, projects::create_app)
            .param("id", Param::Project)
            .summary("Create an app in a project")
            .takes(One(sch::<CreateApp>))
            .answers(201, One(sch::<AppView>))
            .errors(&[409, 422]),
        route!(GET "/v1/projects/{id}/members", User, projects::list_members)
            .param("id", Param::Project)
            .summary("The members of a project")
            .answers(200, List(sch::<MemberView>)),
        route!(POST "/v1/projects/{id}/members", User, projects::add_member)
            .param("id", Param::Project)
            .summary("Add a user to a project (its owners and admins may)")
            .takes(One(sch::<AddMember>))
            .answers(201, One(sch::<MemberView>))
            .errors(&[409]),
        route!(DELETE "/v1/projects/{id}/members/{user_id}", User, projects::remove_member)
            .param("id", Param::Project)
            .param("user_id", Param::User)
            .summary("Remove a user from a project (its owners and admins may; not its last owner)")
            .answers(204, No)
            .errors(&[409]),
        route!(GET "/v1/apps/{id}", User, projects::get_app)
            .param("id", Param::App)
            .summary("Get an app and its active release")
            .answers(200, One(sch::<AppView>)),
        route!(DELETE "/v1/apps/{id}", User, projects::delete_app)
            .param("id", Param::App)
            .summary("Delete an app (removes its releases from the meta repo)")
            .answers(204, No)
            .errors(&[409, 422]),
        route!(GET "/v1/apps/{id}/secrets", User, secrets::get_secrets)
            .param("id", Param::App)
            .summary("Names and recipients of an app's secrets (never values)")
            .answers(200, One(sch::<SecretsView>)),
        route!(PUT "/v1/apps/{id}/secrets", User, secrets::put_secrets)
            .param("id", Param::App)
            .summary("Replace an app's secrets with the complete set given: encrypted to the env's nodes, committed with a new release")
            .takes(One(sch::<SetSecrets>))
            .answers(200, One(sch::<SecretsView>))
            .errors(&[409, 422]),
        route!(GET "/v1/apps/{id}/logs", User, logs::app_logs)
            .param("id", Param::App)
            .query("from", q::nanos, "log lines stamped after this (unix nanoseconds)")
            .query("limit", q::limit_10000, "at most this many lines (default 1000)")
            .query("instance", q::string, "only this instance of the app")
            .summary("An app's log lines stamped after ?from=<unix-nanos>, from its instances on their nodes, merged by time (?limit=, default 1000, max 10000; ?instance=); X-Last-Log-Nano is the next from; X-Log-Unreachable lists nodes that did not answer")
            .answers(200, List(sch::<AppLogLine>)),
        route!(PUT "/v1/apps/{id}/secrets/file", Node, secrets::put_secrets_file)
            .param("id", Param::App)
            .query("base", q::commit_40, "the meta commit whose secrets file was re-encrypted (409 when the file changed since)")
            .summary("A node re-encrypts the app's secrets file (sops YAML body) to exactly the env's recipients; idempotent; committed with a new release")
            .takes(Body::Text("application/yaml"))
            .answers(200, One(sch::<SecretsView>))
            .errors(&[409, 422]),
        route!(GET "/v1/deployments", User, deployments::list_deployments)
            .query("app_id", q::string, "only this app's")
            .query("before", q::string, "only those older than this deployment id")
            .query("limit", q::limit_10000, "at most this many (default 100)")
            .errors(&[404])
            .summary("List deployments, newest first")
            .answers(200, List(sch::<DeploymentView>)),
        route!(POST "/v1/deployments", User, deployments::create_deployment)
            .summary("Create a deployment: commits a new Release to the meta repo")
            .takes(One(sch::<CreateDeployment>))
            .answers(201, One(sch::<DeploymentView>))
            .errors(&[404, 409, 422]),
        route!(GET "/v1/deployments/{id}", User, deployments::get_deployment)
            .param("id", Param::Ulid("deployment"))
            .summary("Get a deployment")
            .answers(200, One(sch::<DeploymentView>)),
        route!(PUT "/v1/deployments/{id}/status", User, deployments::set_deployment_status)
            .param("id", Param::Ulid("deployment"))
            .summary("Move a deployment along the status machine")
            .takes(One(sch::<SetStatus>))
            .answers(200, One(sch::<DeploymentView>))
            .errors(&[409, 422]),
        route!(POST "/v1/cluster/join-tokens", Admin, cluster::create_join_token)
            .summary("Make a join token for a role (worker or edge): single use, expiring")
            .takes(One(sch::<CreateJoinToken>))
            .answers(201, One(sch::<JoinToken>)),
        route!(POST "/v1/cluster/join", Public, cluster::join)
            .summary("Join the cluster with a join token (Authorization: Bearer zwj_...): a certificate for the host's key (from its request) and a credential of the role")
            .takes(One(sch::<JoinRequest>))
            .answers(201, One(sch::<Joined>))
            .errors(&[401, 403, 409]),
        route!(POST "/v1/cluster/renew", Member, cluster::renew)
            .summary("Renew the calling host's certificate (refused once it was removed)")
            .takes(One(sch::<RenewRequest>))
            .answers(200, One(sch::<Renewed>))
            .errors(&[409]),
        route!(GET "/v1/cluster/members", Admin, cluster::list_members)
            .summary("List the hosts that joined the cluster (workers and edges), removed ones too")
            .answers(200, List(sch::<ClusterMemberView>)),
        route!(DELETE "/v1/cluster/members/{id}", Admin, cluster::remove_member)
            .param("id", Param::Label("member's host id"))
            .summary("Remove a host from the cluster: its credential is revoked, its certificate is not renewed")
            .answers(204, No),
        route!(PUT "/v1/nodes/{id}/drain", Admin, nodes::drain_node)
            .param("id", Param::Label("node id"))
            .summary("Drain a node (or stop): its instances move to other nodes, health-gated, and nothing new is placed on it")
            .takes(One(sch::<SetDrain>))
            .answers(200, One(sch::<NodeView>)),
        route!(GET "/v1/nodes", Admin, nodes::list_nodes)
            .summary("List nodes")
            .answers(200, List(sch::<NodeView>)),
        route!(POST "/v1/nodes", Admin, nodes::register_node)
            .summary("Register a node; returns its node token")
            .takes(One(sch::<RegisterNode>))
            .answers(201, One(sch::<RegisteredNode>))
            .also(200, One(sch::<RegisteredNode>))
            .errors(&[409, 422]),
        route!(GET "/v1/nodes/{id}", Admin, nodes::get_node)
            .param("id", Param::Label("node id"))
            .summary("Get a node")
            .answers(200, One(sch::<NodeView>)),
        route!(DELETE "/v1/nodes/{id}", Admin, nodes::delete_node)
            .param("id", Param::Label("node id"))
            .summary("Remove a node and revoke its tokens")
            .answers(204, No)
            .errors(&[409, 422]),
        route!(PUT "/v1/nodes/{id}/state", Node, nodes::node_heartbeat)
            .param("id", Param::Label("node id"))
            .summary("Node heartbeat: state and resources")
            .takes(One(sch::<NodeHeartbeat>))
            .answers(200, One(sch::<NodeView>))
            .errors(&[409, 422]),
        route!(GET "/v1/instances", Node, nodes::list_instances)
            .query("node_id", q::string, "only this node's")
            .summary("List instances as reported by followers")
            .answers(200, List(sch::<InstanceView>)),
        route!(POST "/v1/instances", Node, nodes::report_instance)
            .summary("Report an instance (upsert by id)")
            .takes(One(sch::<InstanceReport>))
            .answers(200, One(sch::<InstanceView>)),
        route!(GET "/v1/instances/{id}", Node, nodes::get_instance)
            .param("id", Param::Instance)
            .summary("Get an instance")
            .answers(200, One(sch::<InstanceView>)),
        route!(DELETE "/v1/instances/{id}", Node, nodes::delete_instance)
            .param("id", Param::Instance)
            .summary("Forget an instance")
            .answers(204, No),
        route!(PUT "/v1/instances/{id}/state", Node, nodes::set_instance_state)
            .param("id", Param::Instance)
            .summary("Update an instance's state")
            .takes(One(sch::<InstanceStateUpdate>))
            .answers(200, One(sch::<InstanceView>)),
        route!(GET "/v1/images", User, images::list_images)
            .summary("List image metadata")
            .answers(200, List(sch::<ImageView>)),
        route!(POST "/v1/images", Admin, images::create_image)
            .summary("Record an image's metadata")
            .takes(One(sch::<CreateImage>))
            .answers(201, One(sch::<ImageView>))
            .errors(&[409]),
        route!(GET "/v1/images/{id}", User, images::get_image)
            .param("id", Param::Image)
            .summary("Get an image by id or digest")
            .answers(200, One(sch::<ImageView>)),
        route!(DELETE "/v1/images/{id}", Admin, images::delete_image)
            .param("id", Param::Image)
            .summary("Forget an image")
            .answers(204, No),
        route!(GET "/v1/images/{id}/download", Node, images::download_image)
            .param("id", Param::Image)
            .query("part", q::part, "`rootfs` (default) or `config`")
            .summary("Stream an image's ext4 root filesystem (?part=config: its config.json) from the object store")
            .answers(200, Body::Bytes(&["application/octet-stream"]))
            .also(200, Body::AnyJson),
        route!(POST "/v1/sources", User, builds::upload_source)
            .summary("Upload a build source: a gzip'd tar with every entry under one top-level directory (Content-Type: application/gzip)")
            .takes(Body::Bytes(&["application/gzip", "application/x-gzip", "application/x-compressed-tar"]))
            .answers(201, One(sch::<SourceView>))
            .also(200, One(sch::<SourceView>))
            .errors(&[404]),
        route!(GET "/v1/builds", User, builds::list_builds)
            .query("app_id", q::string, "only this app's")
            .query("limit", q::limit_1000, "at most this many (default 100)")
            .errors(&[404])
            .summary("List builds, newest first (?app_id=, ?limit=)")
            .answers(200, List(sch::<BuildView>)),
        route!(POST "/v1/builds", User, builds::create_build)
            .summary("Queue a build of a git source or an uploaded source; optionally deploy its image")
            .takes(One(sch::<CreateBuild>))
            .answers(201, One(sch::<BuildView>))
            .errors(&[404, 409, 422]),
        route!(GET "/v1/builds/{id}", User, builds::get_build)
            .param("id", Param::Ulid("build"))
            .summary("Get a build")
            .answers(200, One(sch::<BuildView>)),
        route!(GET "/v1/builds/{id}/logs", User, builds::build_logs)
            .param("id", Param::Ulid("build"))
            .query("from", q::i64_any, "lines after this seq (default 0)")
            .query("limit", q::limit_10000, "at most this many lines (default 1000)")
            .summary("A build's log lines after ?from=<seq> (X-Last-Log-Seq), or as server-sent events with Accept: text/event-stream")
            .answers(200, List(sch::<BuildLogLine>))
            .also(200, Body::Text("text/event-stream")),
        route!(GET "/v1/routes/stream", Edge, routes_stream::stream)
            .summary("The edge's route table as server-sent events (edge::routes format)")
            .answers(200, Body::Text("text/event-stream")),
        route!(GET "/meta.git/info/refs", Git, crate::githttp::serve)
            .query("service", q::service, "the git service asked for")
            .summary("git smart HTTP: ref advertisement (Basic or Bearer token)")
            .answers(200, Body::Bytes(&["application/x-git-upload-pack-advertisement", "application/x-git-receive-pack-advertisement"])),
        route!(POST "/meta.git/git-upload-pack", Git, crate::githttp::serve)
            .summary("git smart HTTP: fetch")
            .takes(Body::Bytes(&["application/x-git-upload-pack-request"]))
            .answers(200, Body::Bytes(&["application/x-git-upload-pack-result"])),
        route!(POST "/meta.git/git-receive-pack", Git, crate::githttp::serve)
            .summary("git smart HTTP: push (validated by the pre-receive hook)")
            .takes(Body::Bytes(&["application/x-git-receive-pack-request"]))
            .answers(200, Body::Bytes(&["application/x-git-receive-pack-result"])),
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
        let mut handler = spec
            .handler
            .route_layer(axum::middleware::from_fn_with_state(
                (state.clone(), spec.access),
                auth::require,
            ))
            .layer(limit);
        if spec.path.ends_with("/git-receive-pack") {
            // A push of meta files is small: refuse a pack larger than this
            // before git stores it.
            handler = handler.layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_PUSH_BODY));
        }
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
    spec::openapi(&routes())
}

async fn openapi_json() -> Response {
    axum::Json(openapi()).into_response()
}

pub(crate) fn json<T: Serialize>(status: StatusCode, v: T) -> Response {
    (status, axum::Json(v)).into_response()
}
