//! The OpenAPI document says what the captain enforces: path parameters
//! with their schema, the rules of names and digests, every error answer
//! with the error shape, the media types of non-JSON routes and the role
//! each route needs (issue 15 item 10). Pure: no captain is started
//! (`tests/openapi_fuzz.rs` holds a running captain to this document).

use serde_json::Value;

fn doc() -> Value {
    serde_json::to_value(captain::api::openapi()).unwrap()
}

fn op<'a>(d: &'a Value, method: &str, path: &str) -> &'a Value {
    let o = &d["paths"][path][method];
    assert!(o.is_object(), "{method} {path} missing");
    o
}

fn param<'a>(o: &'a Value, name: &str) -> &'a Value {
    o["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no parameter {name} in {o}"))
}

/// Resolves `$ref`s of component schemas.
fn resolve<'a>(d: &'a Value, s: &'a Value) -> &'a Value {
    match s["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            &d["components"]["schemas"][name]
        }
        None => s,
    }
}

/// A property's schema in a component (through `allOf`).
fn property<'a>(d: &'a Value, component: &str, field: &str) -> &'a Value {
    let c = &d["components"]["schemas"][component];
    let mut candidates = vec![c];
    if let Some(all) = c["allOf"].as_array() {
        candidates.extend(all.iter());
    }
    for c in candidates {
        let c = resolve(d, c);
        if !c["properties"][field].is_null() {
            return &c["properties"][field];
        }
    }
    panic!("{component}.{field} not in {c}");
}

#[test]
fn every_path_parameter_has_a_schema_and_every_operation_its_errors_and_role() {
    let d = doc();
    let paths = d["paths"].as_object().unwrap();
    let mut ops = 0;
    for (path, item) in paths {
        for (method, o) in item.as_object().unwrap() {
            ops += 1;
            let names: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            for n in names {
                let p = param(o, n);
                assert_eq!(p["in"], "path", "{method} {path} {n}");
                assert_eq!(p["required"], true, "{method} {path} {n}");
                assert_eq!(p["schema"]["type"], "string", "{method} {path} {n}: {p}");
                assert!(
                    p["schema"]["pattern"].is_string() || p["schema"]["maxLength"].is_number(),
                    "{method} {path} {n}: a path parameter says its rule: {p}"
                );
            }
            assert!(o["x-zeitwork-role"].is_string(), "{method} {path}");
            let responses = o["responses"].as_object().unwrap();
            assert!(
                !responses.contains_key("default"),
                "{method} {path}: exact statuses"
            );
            assert!(responses.contains_key("500"), "{method} {path}");
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}: the error shape"
                    );
                }
            }
            if o["x-zeitwork-role"] != "public" {
                assert!(responses.contains_key("401"), "{method} {path}");
                assert!(responses.contains_key("403"), "{method} {path}");
                assert!(o["security"].is_array(), "{method} {path}");
            }
            if o["requestBody"].is_object() {
                for s in ["400", "413", "415"] {
                    assert!(responses.contains_key(s), "{method} {path} {s}");
                }
            }
        }
    }
    assert!(ops >= 60, "{ops} operations");
}

#[test]
fn rules_the_handlers_enforce_are_in_the_document() {
    let d = doc();
    // Digests: sha256 and 64 lowercase hex.
    let img = param(op(&d, "get", "/v1/images/{id}"), "id");
    let pat = img["schema"]["pattern"].as_str().unwrap();
    assert!(pat.contains("sha256:[0-9a-f]{64}"), "{pat}");
    // Node ids are DNS labels.
    let node = param(op(&d, "get", "/v1/nodes/{id}"), "id");
    assert_eq!(node["schema"]["maxLength"], 63);
    assert_eq!(node["schema"]["pattern"], api_types::rules::DNS_LABEL);
    // Query parameters with their bounds and enums.
    let o = op(&d, "get", "/v1/deployments");
    assert_eq!(param(o, "limit")["schema"]["maximum"], 10_000);
    assert_eq!(param(o, "limit")["schema"]["minimum"], 1);
    let part = param(op(&d, "get", "/v1/images/{id}/download"), "part");
    assert_eq!(
        part["schema"]["enum"],
        serde_json::json!(["rootfs", "config"])
    );
    // Bodies: names are DNS labels, digests digests.
    let name = property(&d, "CreateProject", "name");
    assert_eq!(name["pattern"], api_types::rules::DNS_LABEL, "{name}");
    let node_id = property(&d, "RegisterNode", "id");
    assert_eq!(node_id["pattern"], api_types::rules::DNS_LABEL, "{node_id}");
    let digest = property(&d, "CreateImage", "digest");
    assert_eq!(digest["pattern"], api_types::rules::DIGEST, "{digest}");
    // Cross-field rules: a deployment names an image or a commit.
    let cd = &d["components"]["schemas"]["CreateDeployment"];
    assert!(cd["allOf"].is_array(), "{cd}");
    // The error shape names its codes, and not-configured features are a 404.
    let codes = &d["components"]["schemas"]["Code"]["enum"];
    assert!(
        codes.as_array().unwrap().contains(&"not_configured".into()),
        "{codes}"
    );
    let ed = &d["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["$ref"];
    assert_eq!(ed, "#/components/schemas/Code");
    let gh = op(&d, "get", "/v1/auth/github");
    let nf = gh["responses"]["404"]["description"].as_str().unwrap();
    assert!(nf.contains("github_oauth_not_configured"), "{nf}");
    let b = op(&d, "post", "/v1/builds");
    let nf = b["responses"]["404"]["description"].as_str().unwrap();
    assert!(nf.contains("not_configured"), "{nf}");
    for o in d["paths"].as_object().unwrap().values() {
        for o in o.as_object().unwrap().values() {
            assert!(
                o["responses"]["503"].is_null(),
                "no 503 of the captain: {o}"
            );
        }
    }
}

#[test]
fn non_json_routes_say_their_media_types() {
    let d = doc();
    let content = |o: &Value, key: &str| -> Vec<String> {
        let c = if key == "request" {
            &o["requestBody"]["content"]
        } else {
            &o["responses"][key]["content"]
        };
        c.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let push = op(&d, "post", "/meta.git/git-receive-pack");
    assert_eq!(
        content(push, "request"),
        ["application/x-git-receive-pack-request"]
    );
    assert_eq!(
        content(push, "200"),
        ["application/x-git-receive-pack-result"]
    );
    let fetch = op(&d, "post", "/meta.git/git-upload-pack");
    assert_eq!(
        content(fetch, "request"),
        ["application/x-git-upload-pack-request"]
    );
    let refs = op(&d, "get", "/meta.git/info/refs");
    assert!(
        content(refs, "200")
            .iter()
            .all(|t| t.ends_with("-advertisement"))
    );
    assert_eq!(
        content(op(&d, "put", "/v1/apps/{id}/secrets/file"), "request"),
        ["application/yaml"]
    );
    let src = content(op(&d, "post", "/v1/sources"), "request");
    assert!(src.contains(&"application/gzip".to_string()), "{src:?}");
    let logs = content(op(&d, "get", "/v1/builds/{id}/logs"), "200");
    assert!(logs.contains(&"text/event-stream".to_string()), "{logs:?}");
    assert!(logs.contains(&"application/json".to_string()), "{logs:?}");
    assert_eq!(
        content(op(&d, "get", "/v1/routes/stream"), "200"),
        ["text/event-stream"]
    );
    let dl = content(op(&d, "get", "/v1/images/{id}/download"), "200");
    assert!(
        dl.contains(&"application/octet-stream".to_string()),
        "{dl:?}"
    );
    // JSON routes stay JSON.
    assert_eq!(
        content(op(&d, "post", "/v1/projects"), "request"),
        ["application/json"]
    );
}
