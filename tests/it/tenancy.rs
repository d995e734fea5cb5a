//! Pets belong to their owner, on every `/v1` route: another owner gets exactly what a pet
//! that does not exist gets (404, no existence leak); the `owner` claim groups subjects; a
//! `media:admin` token acts on any pet; pets written before owners were recorded are taken by
//! their next writer. Tokens without a subject, or living too long, are refused.

use media_clustering::api::auth::{Claims, Jwt};
use serde_json::Value;

use crate::helpers::*;

fn token(app: &TestApp, sub: &str, owner: Option<&str>, scope: &str, ttl: u64) -> String {
    let now = chrono::Utc::now().timestamp() as u64;
    Jwt::from_settings(&app.settings.auth).mint_claims(Claims {
        sub: sub.into(),
        exp: now + ttl,
        nbf: None,
        iat: Some(now),
        scope: scope.into(),
        owner: owner.map(str::to_owned),
        iss: None,
    })
}

const RW: &str = "media:read media:write";

async fn call(app: &TestApp, method: &str, path: &str, tok: &str) -> (u16, Value) {
    let r = app
        .http
        .request(method.parse().unwrap(), format!("{}{path}", app.base))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn upload_as(app: &TestApp, pet: &str, tok: &str, file: usize) -> (u16, Value) {
    let r = app
        .http
        .post(format!("{}/v1/pets/{pet}/images", app.base))
        .bearer_auth(tok)
        .multipart(form(&fixture_files(&[labels()[file].0.clone()])))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// The error of a 404, with the pet named in it replaced, to compare with a missing pet's.
fn shape(body: &Value, pet: &str) -> String {
    format!("{}|{}", body["error"]["code"], body["error"]["message"]).replace(pet, "PET")
}

#[actix_rt::test]
async fn another_owner_gets_404_on_every_route_exactly_as_for_a_missing_pet() {
    let app = spawn_app().await;
    let alice = token(&app, "alice", None, RW, 3600);
    let bob = token(&app, "bob", None, RW, 3600);
    let (s, up) = upload_as(&app, "rex", &alice, 0).await;
    assert_eq!(s, 202, "{up}");
    let job = up["job_id"].as_str().unwrap().to_owned();
    let image = up["images"][0]["image_id"].as_str().unwrap().to_owned();
    let done = app.wait_job_as(&job, &alice).await;
    assert_eq!(done["status"], "succeeded");

    let ghost_id = uuid::Uuid::now_v7().to_string();
    let cases = [
        (
            "GET",
            "/v1/pets/rex/clusters".to_owned(),
            "/v1/pets/ghost/clusters".to_owned(),
        ),
        (
            "GET",
            format!("/v1/jobs/{job}"),
            format!("/v1/jobs/{ghost_id}"),
        ),
        (
            "GET",
            format!("/v1/images/{image}"),
            format!("/v1/images/{ghost_id}"),
        ),
    ];
    for (method, path, missing) in &cases {
        let (s, mine) = call(&app, method, path, &alice).await;
        assert_eq!(s, 200, "{method} {path} for its owner: {mine}");
        let (s, theirs) = call(&app, method, path, &bob).await;
        assert_eq!(s, 404, "{method} {path} for another owner: {theirs}");
        let (s, none) = call(&app, method, missing, &bob).await;
        assert_eq!(s, 404);
        let strip = |b: &Value| {
            shape(b, "rex")
                .replace("ghost", "PET")
                .replace(&job, "ID")
                .replace(&image, "ID")
                .replace(&ghost_id, "ID")
        };
        assert_eq!(
            strip(&theirs),
            strip(&none),
            "{method} {path} tells another owner it exists"
        );
    }
    // Writes: an upload or a recluster to someone else's pet is refused, and stores nothing.
    let before = app.count("SELECT count(*) FROM images").await;
    let (s, b) = upload_as(&app, "rex", &bob, 1).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = call(&app, "POST", "/v1/pets/rex/recluster", &bob).await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(app.count("SELECT count(*) FROM images").await, before);
    assert_eq!(app.count("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(app.stored_objects(), 1);
    // Bob's own pet is his.
    let (s, _) = upload_as(&app, "fido", &bob, 2).await;
    assert_eq!(s, 202);
    let (s, _) = call(&app, "POST", "/v1/pets/fido/recluster", &alice).await;
    assert_eq!(s, 404);
    app.cleanup().await;
}

#[actix_rt::test]
async fn the_owner_claim_groups_subjects_and_admins_act_on_any_pet() {
    let app = spawn_app().await;
    let phone = token(&app, "alice-phone", Some("household-7"), RW, 3600);
    let tablet = token(&app, "alice-tablet", Some("household-7"), RW, 3600);
    let admin = token(&app, "back-office", None, "media:admin", 3600);
    let (s, up) = upload_as(&app, "luna", &phone, 3).await;
    assert_eq!(s, 202);
    let job = up["job_id"].as_str().unwrap().to_owned();
    app.wait_job_as(&job, &phone).await;
    // The same household, another device.
    assert_eq!(
        call(&app, "GET", "/v1/pets/luna/clusters", &tablet).await.0,
        200
    );
    assert_eq!(upload_as(&app, "luna", &tablet, 4).await.0, 202);
    // An admin reads and writes any pet, and writing does not make the pet the admin's.
    assert_eq!(
        call(&app, "GET", "/v1/pets/luna/clusters", &admin).await.0,
        200
    );
    assert_eq!(
        call(&app, "GET", &format!("/v1/jobs/{job}"), &admin)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, "POST", "/v1/pets/luna/recluster", &admin)
            .await
            .0,
        202
    );
    assert_eq!(upload_as(&app, "stray", &admin, 5).await.0, 202);
    let owner: Option<String> =
        sqlx::query_scalar("SELECT owner FROM pet_owners WHERE pet_id = 'stray'")
            .fetch_optional(&app.db)
            .await
            .unwrap();
    assert_eq!(owner, None);
    // ... so its first ordinary writer takes it.
    assert_eq!(upload_as(&app, "stray", &phone, 6).await.0, 202);
    let bob = token(&app, "bob", None, RW, 3600);
    assert_eq!(
        call(&app, "GET", "/v1/pets/stray/clusters", &bob).await.0,
        404
    );
    app.cleanup().await;
}

#[actix_rt::test]
async fn pets_from_before_owners_are_taken_by_their_next_writer() {
    let app = spawn_app().await;
    let alice = token(&app, "alice", None, RW, 3600);
    let (s, _) = upload_as(&app, "old", &alice, 7).await;
    assert_eq!(s, 202);
    // As if the pet had been written before owners were recorded.
    sqlx::query("DELETE FROM pet_owners")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(
        call(&app, "GET", "/v1/pets/old/clusters", &alice).await.0,
        404
    );
    let bob = token(&app, "bob", None, RW, 3600);
    assert_eq!(upload_as(&app, "old", &bob, 8).await.0, 202);
    assert_eq!(
        call(&app, "GET", "/v1/pets/old/clusters", &alice).await.0,
        404
    );
    app.cleanup().await;
}

#[actix_rt::test]
async fn tokens_without_a_subject_or_living_too_long_are_refused() {
    let app = spawn_app().await;
    for (tok, why) in [
        (token(&app, "", None, RW, 3600), "empty subject"),
        (token(&app, "  ", None, RW, 3600), "empty subject"),
        (
            token(&app, "alice", None, RW, 100 * 365 * 86_400),
            "lifetime",
        ),
    ] {
        let (s, b) = call(&app, "GET", "/v1/pets/rex/clusters", &tok).await;
        assert_eq!(s, 401, "{b}");
        assert!(b["error"]["message"].as_str().unwrap().contains(why), "{b}");
    }
    app.cleanup().await;
}

#[actix_rt::test]
async fn two_owners_racing_for_a_new_pet_leave_it_to_exactly_one() {
    let app = spawn_app_with(media_clustering::startup::Mode::Api, &[]).await;
    let alice = token(&app, "alice", None, RW, 3600);
    let bob = token(&app, "bob", None, RW, 3600);
    for round in 0..6 {
        let pet = format!("contested-{round}");
        let ((a, _), (b, _)) = futures::join!(
            upload_as(&app, &pet, &alice, 2 * round),
            upload_as(&app, &pet, &bob, 2 * round + 1)
        );
        let owner: String = sqlx::query_scalar("SELECT owner FROM pet_owners WHERE pet_id = $1")
            .bind(&pet)
            .fetch_one(&app.db)
            .await
            .unwrap();
        let (winner, loser) = if owner == "alice" { (a, b) } else { (b, a) };
        assert_eq!((winner, loser), (202, 404), "{pet}, owned by {owner}");
        let jobs = format!("SELECT count(*) FROM jobs WHERE pet_id = '{pet}'");
        assert_eq!(
            app.count(&jobs).await,
            1,
            "{pet}: only the owner's upload is kept"
        );
    }
    app.cleanup().await;
}
