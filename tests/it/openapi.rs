//! `GET /openapi.json`: every route, method and documented status, and the
//! response schemas checked against what the real response types serialise to.

use std::time::{Duration, Instant};

use media_clustering::adapters::postgres::{
    ClusterView, ClusteringView, JobView, MemberView, ScoreView, Unprocessable,
};
use media_clustering::startup::Mode;
use serde_json::{Value, json};

use crate::helpers::*;

/// (path, method, statuses) the document must describe.
const ROUTES: &[(&str, &str, &[&str])] = &[
    (
        "/v1/pets/{pet_id}/images",
        "post",
        &[
            "202", "400", "401", "403", "408", "413", "415", "422", "429", "503",
        ],
    ),
    (
        "/v1/pets/{pet_id}/recluster",
        "post",
        &["202", "400", "401", "403", "404", "429", "503"],
    ),
    (
        "/v1/jobs/{job_id}",
        "get",
        &["200", "400", "401", "403", "404", "429", "503"],
    ),
    (
        "/v1/pets/{pet_id}/clusters",
        "get",
        &["200", "400", "401", "403", "404", "429", "503"],
    ),
    (
        "/v1/pets/{pet_id}/clusters/{cluster_id}/hero",
        "put",
        &[
            "200", "400", "401", "403", "404", "408", "409", "429", "503",
        ],
    ),
    (
        "/v1/images/{image_id}",
        "get",
        &["200", "400", "401", "403", "404", "429", "503"],
    ),
    ("/healthz", "get", &["200", "429"]),
    ("/readyz", "get", &["200", "429", "503"]),
    ("/internal/metrics", "get", &["200", "401"]),
    ("/openapi.json", "get", &["200"]),
];

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            doc,
            doc.pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {r}")),
        ),
        None => v,
    }
}

/// Checks `value` against a JSON schema of the document (the subset utoipa emits:
/// `$ref`, `type` including `null`, `oneOf`/`anyOf`, `enum`, `properties`,
/// `required`, `items`, `format` uuid/date-time, `pattern`). Returns the problems.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let fits = alts.iter().any(|alt| {
                let mut p = Vec::new();
                check(doc, alt, value, at, &mut p);
                p.is_empty()
            });
            if !fits {
                problems.push(format!("{at}: {value} fits no alternative of {key}"));
            }
            return;
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !ok {
            problems.push(format!("{at}: {actual} where the schema says {types:?}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Value::String(s) = value {
        match schema.get("format").and_then(Value::as_str) {
            Some("uuid") if uuid::Uuid::parse_str(s).is_err() => {
                problems.push(format!("{at}: {s} is not a uuid"))
            }
            Some("date-time") if chrono::DateTime::parse_from_rfc3339(s).is_err() => {
                problems.push(format!("{at}: {s} is not a date-time"))
            }
            _ => {}
        }
    }
    if let (Value::Object(obj), Some(props)) =
        (value, schema.get("properties").and_then(Value::as_object))
    {
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !obj.contains_key(req) {
                problems.push(format!("{at}: required `{req}` is missing"));
            }
        }
        for (k, v) in obj {
            match props.get(k) {
                Some(s) => check(doc, s, v, &format!("{at}.{k}"), problems),
                None => problems.push(format!("{at}: `{k}` is not in the schema")),
            }
        }
        // Every documented property is produced (optional ones as null), so the
        // schema and the type cannot drift apart in either direction.
        for k in props.keys() {
            if !obj.contains_key(k) {
                problems.push(format!("{at}: the schema's `{k}` is never serialised"));
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(doc, item_schema, v, &format!("{at}[{i}]"), problems);
        }
    }
}

fn assert_fits(doc: &Value, schema_name: &str, value: &Value) {
    let schema = json!({ "$ref": format!("#/components/schemas/{schema_name}") });
    let mut problems = Vec::new();
    check(doc, &schema, value, schema_name, &mut problems);
    assert!(problems.is_empty(), "{value}\n{}", problems.join("\n"));
}

/// The JSON schema of a response of an operation.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: &str) -> &'a Value {
    let op = &doc["paths"][path][method];
    let resp = resolve(doc, &op["responses"][status]);
    &resp["content"]["application/json"]["schema"]
}

#[actix_rt::test]
async fn the_document_lists_every_route_method_and_status() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    // No token needed.
    let r = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'), "{doc}");
    assert_eq!(doc, media_clustering::api::openapi::document());

    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), ROUTES.len(), "{:?}", paths.keys());
    for (path, method, statuses) in ROUTES {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let documented: Vec<&str> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(&documented, statuses, "{method} {path}");
        for status in documented.iter().filter(|s| s.starts_with(['4', '5'])) {
            let schema = response_schema(&doc, path, method, status);
            assert_eq!(
                schema["$ref"], "#/components/schemas/ErrorBody",
                "{method} {path} {status}"
            );
        }
        // Security: JWT scopes on /v1, the internal token on /internal, none elsewhere.
        let security = &op["security"];
        if path.starts_with("/v1/") {
            let scope = if *method == "post" || *method == "put" {
                "media:write"
            } else {
                "media:read"
            };
            assert_eq!(security, &json!([{ "jwt": [scope] }]), "{method} {path}");
        } else if path.starts_with("/internal/") {
            assert_eq!(security, &json!([{ "internal_token": [] }]), "{path}");
        } else {
            assert_eq!(security, &json!([{}]), "{path}");
        }
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["jwt"]["scheme"], "bearer");
    assert_eq!(schemes["jwt"]["bearerFormat"], "JWT");
    assert_eq!(schemes["internal_token"]["scheme"], "bearer");

    // Parameters: the pet_id rule and UUID ids.
    for path in [
        "/v1/pets/{pet_id}/images",
        "/v1/pets/{pet_id}/recluster",
        "/v1/pets/{pet_id}/clusters",
    ] {
        let method = if path.ends_with("clusters") {
            "get"
        } else {
            "post"
        };
        let p = &doc["paths"][path][method]["parameters"][0];
        assert_eq!(
            (p["name"].as_str(), p["in"].as_str()),
            (Some("pet_id"), Some("path"))
        );
        assert_eq!(p["required"], true);
        assert_eq!(p["schema"]["pattern"], "^[A-Za-z0-9_-]{1,64}$", "{path}");
    }
    for (path, name) in [
        ("/v1/jobs/{job_id}", "job_id"),
        ("/v1/images/{image_id}", "image_id"),
    ] {
        let p = &doc["paths"][path]["get"]["parameters"][0];
        assert_eq!(p["name"], name);
        assert_eq!(p["schema"]["format"], "uuid", "{path}");
    }

    // Upload bodies: multipart `file` parts and raw images.
    let body = &doc["paths"]["/v1/pets/{pet_id}/images"]["post"]["requestBody"];
    assert_eq!(body["required"], true, "{body}");
    let content = body["content"].as_object().unwrap();
    for ct in [
        "multipart/form-data",
        "image/jpeg",
        "image/png",
        "image/webp",
    ] {
        assert!(content.contains_key(ct), "upload lacks {ct}");
    }
    let form = resolve(&doc, &content["multipart/form-data"]["schema"]);
    assert_eq!(form["properties"]["file"]["type"], "array");
    assert_eq!(form["required"], json!(["file"]));
    // Headers of the answers that carry them.
    let upload = &doc["paths"]["/v1/pets/{pet_id}/images"]["post"]["responses"];
    assert!(upload["202"]["headers"]["Location"].is_object());
    let limited = resolve(&doc, &upload["429"]);
    assert!(limited["headers"]["Retry-After"].is_object(), "{limited}");
    let image = &doc["paths"]["/v1/images/{image_id}"]["get"]["responses"]["200"]["content"];
    for ct in ["image/jpeg", "image/png", "image/webp"] {
        assert!(image[ct].is_object(), "image lacks {ct}");
    }
    app.cleanup().await;
}

#[actix_rt::test]
async fn real_response_types_match_their_schemas() {
    let doc = media_clustering::api::openapi::document();
    let now = chrono::Utc::now();
    let id = uuid::Uuid::now_v7;
    for job in [
        JobView {
            job_id: id(),
            pet_id: "rex".into(),
            status: "queued".into(),
            attempts: 0,
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            cluster_version: None,
            trace_id: None,
            unprocessable: vec![],
        },
        JobView {
            job_id: id(),
            pet_id: "rex".into(),
            status: "failed".into(),
            attempts: 5,
            error: Some("image 1 cannot be decoded".into()),
            created_at: now,
            started_at: Some(now),
            finished_at: Some(now),
            cluster_version: Some(4),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            unprocessable: vec![Unprocessable {
                image_id: id(),
                error: "image cannot be decoded".into(),
            }],
        },
    ] {
        assert_fits(&doc, "Job", &serde_json::to_value(&job).unwrap());
    }
    let hero = id();
    let clustering = ClusteringView {
        pet_id: "rex".into(),
        version: 3,
        model_version: "open-nsfw-eef41e25-dn6s1-gem2-lp5x128".into(),
        clusters: vec![ClusterView {
            cluster_id: id(),
            hero_image_id: hero,
            hero_pinned: true,
            image_ids: vec![hero, id()],
            size: 2,
            members: vec![
                MemberView {
                    image_id: hero,
                    score: Some(ScoreView {
                        sharpness: 1.0,
                        noise: 0.9,
                        exposure: 0.8,
                        resolution: 1.0,
                        centrality: 0.99,
                        total: 0.71,
                    }),
                    near_duplicate_of: None,
                },
                MemberView {
                    image_id: id(),
                    score: None,
                    near_duplicate_of: Some(hero),
                },
            ],
        }],
        unprocessable: vec![Unprocessable {
            image_id: id(),
            error: "photo missing from storage".into(),
        }],
    };
    assert_fits(
        &doc,
        "Clustering",
        &serde_json::to_value(&clustering).unwrap(),
    );
    // The checker itself catches drift.
    let mut bad = serde_json::to_value(&clustering).unwrap();
    bad["clusters"][0].as_object_mut().unwrap().remove("size");
    bad["extra"] = json!(1);
    let mut problems = Vec::new();
    check(
        &doc,
        &json!({"$ref": "#/components/schemas/Clustering"}),
        &bad,
        "Clustering",
        &mut problems,
    );
    assert_eq!(problems.len(), 3, "{problems:?}");

    // And the live answers of a running API.
    let app = spawn_app_with(Mode::Api, &[]).await;
    let png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::new_rgb8(16, 16)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let r = app.upload("rex", &[("a.png".into(), png)]).await;
    assert_eq!(r.status().as_u16(), 202);
    let accepted: Value = r.json().await.unwrap();
    assert_fits(&doc, "UploadAccepted", &accepted);
    let (s, job) = app
        .get_json(&format!(
            "/v1/jobs/{}",
            accepted["job_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, 200);
    assert_fits(&doc, "Job", &job);
    let r = app.post_recluster("rex").await;
    assert_eq!(r.status().as_u16(), 202);
    assert_fits(&doc, "ReclusterAccepted", &r.json().await.unwrap());
    let (s, err) = app.get_json("/v1/pets/rex/clusters").await;
    assert_eq!(s, 404);
    assert_fits(&doc, "ErrorBody", &err);
    for path in ["/healthz", "/readyz"] {
        let (s, body) = app.get_json(path).await;
        assert_eq!(s, 200, "{path}");
        assert_fits(&doc, "Health", &body);
    }
    app.cleanup().await;
}

#[actix_rt::test]
async fn callers_over_the_rate_limit_get_429_with_retry_after() {
    let app = spawn_app_with(
        Mode::Api,
        &[
            ("MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND", "1"),
            ("MEDIA_CLUSTERING__RATE_LIMIT__BURST", "3"),
        ],
    )
    .await;
    let path = format!("/v1/jobs/{}", uuid::Uuid::new_v4());
    let mut limited = None;
    for _ in 0..10 {
        let r = app.get(&path).await;
        match r.status().as_u16() {
            404 => {}
            429 => {
                limited = Some(r);
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let r = limited.expect("10 quick requests against burst 3 are limited");
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");

    // Another caller has its own budget; health is never limited.
    let other = media_clustering::api::auth::Jwt::from_settings(&app.settings.auth).mint(
        "someone-else",
        "media:read",
        600,
    );
    let r = app
        .http
        .get(format!("{}{path}", app.base))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    for _ in 0..5 {
        let (s, _) = app.get_json("/healthz").await;
        assert_eq!(s, 200);
    }

    // After Retry-After the caller is served again.
    let told = Instant::now();
    let deadline = told + Duration::from_secs(retry_after) + Duration::from_secs(2);
    loop {
        let s = app.get(&path).await.status().as_u16();
        if s == 404 {
            break;
        }
        assert_eq!(s, 429);
        assert!(
            Instant::now() < deadline,
            "still limited {retry_after} s after Retry-After"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(told.elapsed() <= Duration::from_secs(retry_after) + Duration::from_secs(2));
    app.cleanup().await;
}
