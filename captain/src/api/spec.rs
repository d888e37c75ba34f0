//! What the route table says of each route, and the OpenAPI document built
//! from it: path and query parameters with the rules the handlers enforce
//! (`api_types::rules`), request and answer bodies with their media types,
//! every error answer with the error shape, and the role a route needs.
//! `tests/openapi_fuzz.rs` holds the captain to this document.

use axum::http::Method;
use axum::routing::MethodRouter;
use utoipa::ToSchema;
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, SchemaFormat,
    SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, Content, ContentBuilder, InfoBuilder, OpenApiBuilder, PathsBuilder, Ref,
    RefOr, Required, ResponseBuilder, Schema,
};

use crate::auth::Access;
use crate::error::{Code, ErrorBody};
use crate::state::AppState;

pub(crate) type Schemas = Vec<(String, RefOr<Schema>)>;
/// Registers a schema (and the schemas it refers to); returns its name.
pub type SchemaFn = fn(&mut Schemas) -> String;

pub(crate) fn sch<T: ToSchema>(v: &mut Schemas) -> String {
    v.push((T::name().into_owned(), T::schema()));
    T::schemas(v);
    T::name().into_owned()
}

/// A body in the OpenAPI document.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// One JSON value of a schema.
    One(SchemaFn),
    /// A JSON array of a schema.
    List(SchemaFn),
    /// Any JSON value (the OpenAPI document itself).
    AnyJson,
    /// Bytes of these media types (git, tarballs, images).
    Bytes(&'static [&'static str]),
    /// Text of a media type (sops YAML, metrics, event streams).
    Text(&'static str),
}

/// What a path parameter names: its schema is the rule of such ids.
#[derive(Clone, Copy, Debug)]
pub enum Param {
    /// `<app>.<env>`.
    App,
    /// `prj-...`.
    Project,
    /// `usr-...`.
    User,
    /// A ULID the captain made (releases, builds, tokens, waitlist entries).
    Ulid(&'static str),
    /// A DNS label (node ids, cluster members).
    Label(&'static str),
    /// An image's id (a ULID) or digest.
    Image,
    /// An instance id as its node reported it.
    Instance,
}

impl Param {
    fn schema(self) -> (Object, String) {
        use api_types::rules as r;
        let s = |p: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(p))
        };
        match self {
            Param::App => (
                s(r::APP_ID).max_length(Some(127)).build(),
                "An app: `<app>.<env>`.".into(),
            ),
            Param::Project => (s(r::PROJECT_ID).build(), "A project id.".into()),
            Param::User => (
                s("^usr-[0-9a-z]{26}$").build(),
                "A user id (`usr-...`).".into(),
            ),
            Param::Ulid(what) => (s(r::ULID).build(), format!("The {what}'s id (a ULID).")),
            Param::Label(what) => (
                s(r::DNS_LABEL)
                    .min_length(Some(1))
                    .max_length(Some(63))
                    .build(),
                format!("The {what} (a DNS label)."),
            ),
            Param::Image => (
                s("^([0-7][0-9A-HJKMNP-TV-Z]{25}|sha256:[0-9a-f]{64})$").build(),
                "An image's id or its digest (`sha256:<64 hex>`).".into(),
            ),
            Param::Instance => (
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(128))
                    .build(),
                "An instance id as its node reported it.".into(),
            ),
        }
    }
}

/// A query parameter.
#[derive(Clone, Copy)]
pub struct Query {
    pub name: &'static str,
    pub schema: fn() -> Object,
    pub description: &'static str,
}

/// The schemas of query parameters.
pub mod q {
    use utoipa::openapi::schema::{Object, ObjectBuilder, Type};

    fn int(min: i64, max: u64) -> Object {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(min as isize))
            .maximum(Some(max as usize))
            .build()
    }
    pub fn string() -> Object {
        ObjectBuilder::new().schema_type(Type::String).build()
    }
    pub fn limit_1000() -> Object {
        int(1, 1000)
    }
    pub fn limit_10000() -> Object {
        int(1, 10_000)
    }
    /// Any count (clamped by the handler).
    pub fn count() -> Object {
        int(0, i64::MAX as u64)
    }
    pub fn i64_any() -> Object {
        int(i64::MIN, i64::MAX as u64)
    }
    pub fn nanos() -> Object {
        int(0, i64::MAX as u64)
    }
    pub fn part() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["rootfs", "config"]))
            .build()
    }
    pub fn service() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["git-upload-pack", "git-receive-pack"]))
            .build()
    }
    pub fn commit_40() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9A-Fa-f]{40,}$"))
            .build()
    }
    pub fn ulid() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(api_types::rules::ULID))
            .build()
    }
}

/// One route of the API.
pub struct RouteSpec {
    pub methods: &'static [Method],
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub params: Vec<(&'static str, Param)>,
    pub query: Vec<Query>,
    pub request: Body,
    pub status: u16,
    pub response: Body,
    /// Other answers that are not errors (status, body): bodies of a
    /// status already listed are other media types of it.
    pub also: Vec<(u16, Body)>,
    /// Error answers beyond those every route of its kind has.
    pub errors: Vec<u16>,
    pub handler: MethodRouter<AppState>,
}

impl RouteSpec {
    pub(crate) fn new(
        method: &'static Method,
        path: &'static str,
        access: Access,
        handler: MethodRouter<AppState>,
    ) -> RouteSpec {
        RouteSpec {
            methods: std::slice::from_ref(method),
            path,
            access,
            summary: "",
            params: Vec::new(),
            query: Vec::new(),
            request: Body::None,
            status: 200,
            response: Body::None,
            also: Vec::new(),
            errors: Vec::new(),
            handler,
        }
    }

    pub(crate) fn summary(mut self, s: &'static str) -> RouteSpec {
        self.summary = s;
        self
    }

    pub(crate) fn param(mut self, name: &'static str, p: Param) -> RouteSpec {
        self.params.push((name, p));
        self
    }

    pub(crate) fn query(
        mut self,
        name: &'static str,
        schema: fn() -> Object,
        description: &'static str,
    ) -> RouteSpec {
        self.query.push(Query {
            name,
            schema,
            description,
        });
        self
    }

    pub(crate) fn takes(mut self, body: Body) -> RouteSpec {
        self.request = body;
        self
    }

    pub(crate) fn answers(mut self, status: u16, body: Body) -> RouteSpec {
        self.status = status;
        self.response = body;
        self
    }

    pub(crate) fn also(mut self, status: u16, body: Body) -> RouteSpec {
        self.also.push((status, body));
        self
    }

    pub(crate) fn errors(mut self, statuses: &[u16]) -> RouteSpec {
        self.errors.extend_from_slice(statuses);
        self
    }

    /// Every error status this route may answer, in order.
    pub fn error_statuses(&self) -> Vec<u16> {
        let mut v = vec![500];
        match self.access {
            Access::Public => {}
            Access::Git => v.extend([401, 403]),
            _ => v.extend([401, 403]),
        }
        if !self.params.is_empty() {
            v.extend([400, 404]);
        }
        if !self.query.is_empty() {
            v.push(400);
        }
        match self.request {
            Body::None => {}
            _ => v.extend([400, 413, 415]),
        }
        v.extend(self.errors.iter().copied());
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The error codes each error status carries (the error answer's
/// description).
fn codes_of(status: u16) -> Vec<Code> {
    Code::ALL
        .iter()
        .copied()
        .filter(|c| c.status().as_u16() == status)
        .collect()
}

fn describe_error(status: u16) -> String {
    let codes: Vec<&str> = codes_of(status).iter().map(|c| c.as_str()).collect();
    let what = match status {
        400 => "the request is malformed or breaks a rule",
        401 => "no valid credential",
        403 => "the credential's role may not do this",
        404 => {
            "no such thing (or another tenant's), or a feature this captain is not configured for"
        }
        405 => "the method is not allowed",
        409 => "it conflicts with the current state",
        413 => "the body is larger than the limit",
        415 => "the body's media type is not the one documented",
        422 => "what would be committed breaks a rule of the meta repository",
        429 => "too many requests; see Retry-After",
        500 => "the captain failed (its database or meta repository)",
        _ => "an error",
    };
    format!("{what} (error codes: {})", codes.join(", "))
}

fn binary() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("binary".into())))
        .build()
}

/// The media types and schemas of a body.
fn contents(b: Body, schemas: &mut Schemas) -> Vec<(&'static str, Content)> {
    let json = |s: RefOr<Schema>| {
        vec![(
            "application/json",
            ContentBuilder::new().schema(Some(s)).build(),
        )]
    };
    match b {
        Body::None => Vec::new(),
        Body::One(f) => json(Ref::from_schema_name(f(schemas)).into()),
        Body::List(f) => json(
            Schema::Array(
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(f(schemas)))
                    .build(),
            )
            .into(),
        ),
        Body::AnyJson => json(
            Schema::Object(
                ObjectBuilder::new()
                    .schema_type(SchemaType::AnyValue)
                    .build(),
            )
            .into(),
        ),
        Body::Bytes(types) => types
            .iter()
            .map(|t| (*t, ContentBuilder::new().schema(Some(binary())).build()))
            .collect(),
        Body::Text(t) => vec![(
            t,
            ContentBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String).build()))
                .build(),
        )],
    }
}

/// Rules across the fields of a request body that a field's own schema
/// cannot say: the component schema becomes `allOf` [itself, the rule].
fn cross_field_rules() -> Vec<(&'static str, Schema)> {
    let non_empty = |field: &str| {
        Schema::Object(
            ObjectBuilder::new()
                .property(
                    field,
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1)),
                )
                .required(field)
                .build(),
        )
    };
    let not_failed = Schema::Object(
        ObjectBuilder::new()
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["pending", "building", "starting", "running"])),
            )
            .build(),
    );
    let with_reason = Schema::Object(
        ObjectBuilder::new()
            .property(
                "reason",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(api_types::rules::NOT_BLANK)),
            )
            .required("reason")
            .build(),
    );
    let with = |field: &str| {
        Schema::Object(
            ObjectBuilder::new()
                .property(field, ObjectBuilder::new().schema_type(Type::Object))
                .required(field)
                .build(),
        )
    };
    let token_kind = |kind: &str, user: ObjectBuilder, required: bool| {
        let mut b = ObjectBuilder::new()
            .property(
                "kind",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([kind])),
            )
            .property("user_id", user);
        if required {
            b = b.required("user_id");
        }
        Schema::Object(b.build())
    };
    vec![
        (
            "CreateToken",
            Schema::OneOf(
                OneOfBuilder::new()
                    .item(token_kind(
                        "admin",
                        ObjectBuilder::new().schema_type(Type::Null),
                        false,
                    ))
                    .item(token_kind(
                        "user",
                        ObjectBuilder::new().schema_type(SchemaType::from_iter([
                            Type::String,
                            Type::Null,
                        ])),
                        false,
                    ))
                    .description(Some(
                        "an admin token belongs to no user; a user token to user_id, or to a new user named after it",
                    ))
                    .build(),
            ),
        ),
        (
            "CreateDeployment",
            Schema::AnyOf(
                AnyOfBuilder::new()
                    .item(non_empty("image_digest"))
                    .item(non_empty("commit"))
                    .description(Some("an image_digest or a source commit"))
                    .build(),
            ),
        ),
        (
            "SetStatus",
            Schema::AnyOf(
                AnyOfBuilder::new()
                    .item(not_failed)
                    .item(with_reason)
                    .description(Some("a failed deployment needs a reason"))
                    .build(),
            ),
        ),
        (
            "BuildSource",
            Schema::OneOf(
                OneOfBuilder::new()
                    .item(with("git"))
                    .item(Schema::Object(
                        ObjectBuilder::new()
                            .property("upload", ObjectBuilder::new().schema_type(Type::String))
                            .required("upload")
                            .build(),
                    ))
                    .description(Some("exactly one of git and upload"))
                    .build(),
            ),
        ),
    ]
}

/// The OpenAPI document of `routes`.
pub fn openapi(routes: &[RouteSpec]) -> utoipa::openapi::OpenApi {
    let mut schemas: Schemas = Vec::new();
    let err = sch::<ErrorBody>(&mut schemas);
    sch::<Code>(&mut schemas);
    let mut paths = PathsBuilder::new();
    for spec in routes {
        let declared: Vec<&str> = spec.params.iter().map(|(n, _)| *n).collect();
        let in_path: Vec<&str> = spec
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        assert_eq!(
            declared, in_path,
            "{}: declare every path parameter, in order, with .param()",
            spec.path
        );
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
                .description(Some(spec.access.describe()))
                .extensions(Some(
                    utoipa::openapi::extensions::ExtensionsBuilder::new()
                        .add("x-zeitwork-role", spec.access.role())
                        .build(),
                ))
                .operation_id(Some(format!(
                    "{}_{}",
                    m.as_str().to_lowercase(),
                    spec.path
                        .trim_start_matches('/')
                        .replace(['/', '{', '}', '.'], "_")
                )));
            for (name, p) in &spec.params {
                let (schema, description) = p.schema();
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(*name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .description(Some(description))
                        .schema(Some(schema)),
                );
            }
            for q in &spec.query {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(q.name)
                        .parameter_in(ParameterIn::Query)
                        .required(Required::False)
                        .description(Some(q.description))
                        .schema(Some((q.schema)())),
                );
            }
            let body = contents(spec.request, &mut schemas);
            if !body.is_empty() {
                let mut rb = RequestBodyBuilder::new().required(Some(Required::True));
                for (t, c) in body {
                    rb = rb.content(t, c);
                }
                op = op.request_body(Some(rb.build()));
            }
            let mut answers: Vec<(u16, Body)> = vec![(spec.status, spec.response)];
            answers.extend(spec.also.iter().copied());
            let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
            statuses.dedup();
            statuses.sort_unstable();
            statuses.dedup();
            for status in statuses {
                let mut r = ResponseBuilder::new().description(match status {
                    302 => "redirect (Location)",
                    204 => "done; no body",
                    _ => "success",
                });
                for (_, b) in answers.iter().filter(|(s, _)| *s == status) {
                    for (t, c) in contents(*b, &mut schemas) {
                        r = r.content(t, c);
                    }
                }
                op = op.response(status.to_string(), r.build());
            }
            for status in spec.error_statuses() {
                let mut r = ResponseBuilder::new()
                    .description(describe_error(status))
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(err.clone())))
                            .build(),
                    );
                if spec.access == Access::Git && matches!(status, 400 | 403 | 404 | 415 | 500) {
                    // git http-backend's own refusals are plain text.
                    r = r.content(
                        "text/plain",
                        ContentBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String).build()))
                            .build(),
                    );
                }
                op = op.response(status.to_string(), r.build());
            }
            if !matches!(spec.access, Access::Public) {
                op = op.security(SecurityRequirement::new("token", Vec::<String>::new()));
            }
            paths = paths.path(spec.path, PathItem::new(method, op.build()));
        }
    }
    // The error shape names its codes.
    for (name, s) in schemas.iter_mut() {
        if name == "ErrorDetail"
            && let RefOr::T(Schema::Object(o)) = s
        {
            o.properties
                .insert("code".into(), Ref::from_schema_name(Code::name()).into());
        }
    }
    for (name, rule) in cross_field_rules() {
        for (n, s) in schemas.iter_mut() {
            if n == name {
                let whole = std::mem::replace(s, RefOr::T(Schema::default()));
                *s = RefOr::T(Schema::AllOf(
                    AllOfBuilder::new().item(whole).item(rule.clone()).build(),
                ));
            }
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
