//! Bearer tokens on `/v1/*` and the internal token on `/internal/metrics`.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use media_clustering::startup::Mode;

use crate::helpers::*;

fn token(secret: &str, claims: serde_json::Value, alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[actix_rt::test]
async fn v1_routes_need_a_valid_token_with_the_right_scope() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    let secret = app.settings.auth.jwt_secret.expose().to_owned();
    let now = chrono::Utc::now().timestamp();
    let read_only = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let expired = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now - 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let future = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now + 600, "nbf": now + 300, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let wrong_key = token(
        "another-secret",
        serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let hs512 = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}),
        Algorithm::HS512,
    );
    // alg "none": header and claims with an empty signature.
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    };
    let none = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}))
    );

    let path = format!("{}/v1/jobs/{}", app.base, uuid::Uuid::new_v4());
    let status = |auth: Option<String>| {
        let mut r = app.http.get(&path);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move { r.send().await.unwrap() }
    };
    for (what, header, want) in [
        ("none", None, 401),
        ("malformed", Some("Basic abc".to_owned()), 401),
        ("garbage", Some("Bearer not.a.jwt".to_owned()), 401),
        ("expired", Some(format!("Bearer {expired}")), 401),
        ("not yet valid", Some(format!("Bearer {future}")), 401),
        ("wrong key", Some(format!("Bearer {wrong_key}")), 401),
        ("HS512", Some(format!("Bearer {hs512}")), 401),
        ("alg none", Some(format!("Bearer {none}")), 401),
        ("valid", Some(format!("Bearer {read_only}")), 404),
    ] {
        let r = status(header).await;
        assert_eq!(r.status().as_u16(), want, "{what}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
    }
    // A read-only token cannot upload: 403.
    let r = app
        .http
        .post(format!("{}/v1/pets/p/recluster", app.base))
        .bearer_auth(&read_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    app.cleanup().await;
}

#[actix_rt::test]
async fn metrics_need_the_internal_token() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    let url = format!("{}/internal/metrics", app.base);
    assert_eq!(
        app.http.get(&url).send().await.unwrap().status().as_u16(),
        401
    );
    assert_eq!(
        app.http
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        app.http
            .get(&url)
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let r = app
        .http
        .get(&url)
        .bearer_auth(app.settings.auth.internal_token.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    app.cleanup().await;
}
