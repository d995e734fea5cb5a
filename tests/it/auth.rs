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

/// Collects everything the process logs, at every level, with span fields.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Bounded, in case other tests of the same process log through it (cargo test).
        let mut kept = self.0.lock().unwrap();
        if kept.len() < 32 << 20 {
            kept.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_rt::test]
async fn tokens_never_appear_in_answers_or_logs() {
    use tracing_subscriber::fmt::format::FmtSpan;

    let logs = Captured::default();
    let sink = logs.clone();
    // nextest runs each test in its own process, so this test owns the global subscriber.
    let capturing = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            // Everything of the crates that see requests, at every level.
            .with_env_filter(
                "info,media_clustering=trace,actix_web=trace,actix_http=trace,\
                 actix_server=trace,tracing_actix_web=trace",
            )
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish(),
    )
    .is_ok();

    let app = spawn_app_with(Mode::Api, &[("LOG_LEVEL", "trace")]).await;
    let secret = app.settings.auth.jwt_secret.expose().to_owned();
    let now = chrono::Utc::now().timestamp();
    let expired = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now - 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let forged = token(
        "not-the-secret-but-long-enough-0123456789",
        serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let garbage = "S3CR3T-looking-garbage-token-0123456789".to_owned();
    let read_only = token(
        &secret,
        serde_json::json!({"sub": "t", "exp": now + 600, "scope": "media:read"}),
        Algorithm::HS256,
    );
    let internal_guess = "guessed-internal-token-0123456789".to_owned();
    let tokens = [&expired, &forged, &garbage, &read_only, &internal_guess];
    let requests = [
        (
            app.http
                .get(format!("{}/v1/jobs/{}", app.base, uuid::Uuid::new_v4()))
                .bearer_auth(&expired),
            401,
        ),
        (
            app.http
                .get(format!("{}/v1/pets/rex/clusters", app.base))
                .bearer_auth(&forged),
            401,
        ),
        (
            app.http
                .post(format!("{}/v1/pets/rex/recluster", app.base))
                .header("authorization", format!("Bearer {garbage}")),
            401,
        ),
        (
            app.http
                .post(format!("{}/v1/pets/rex/images", app.base))
                .header("authorization", format!("Token {garbage}")),
            401,
        ),
        (
            app.http
                .post(format!("{}/v1/pets/rex/recluster", app.base))
                .bearer_auth(&read_only),
            403,
        ),
        (
            app.http
                .get(format!("{}/internal/metrics", app.base))
                .bearer_auth(&internal_guess),
            401,
        ),
    ];
    for (req, want) in requests {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), want);
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        for t in tokens {
            assert!(!body.contains(t.as_str()), "answer echoes a token: {body}");
            assert!(
                !headers.contains(t.as_str()),
                "headers echo a token: {headers}"
            );
            // Nor the signature part alone.
            let sig = t.rsplit('.').next().unwrap();
            assert!(
                sig.len() < 8 || !body.contains(sig),
                "answer echoes a signature"
            );
        }
    }
    app.cleanup().await;

    if capturing {
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        // The requests were logged (so the check below has teeth)...
        assert!(
            text.contains("/v1/pets/rex/recluster"),
            "no request logs captured"
        );
        // ...and no token, nor its signature, is in them.
        for t in tokens {
            assert!(!text.contains(t.as_str()), "a token is in the logs");
            let sig = t.rsplit('.').next().unwrap();
            assert!(
                sig.len() < 8 || !text.contains(sig),
                "a signature is in the logs"
            );
        }
    } else {
        eprintln!("another test owns the global subscriber; log check skipped (run under nextest)");
    }
}
