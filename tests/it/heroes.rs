//! The owner's hero: each member's scores and near-duplicates in `GET …/clusters`, a pin by
//! `PUT …/clusters/{cluster_id}/hero` that survives re-clustering, and its refusals.

use serde_json::{Value, json};

use crate::helpers::*;

async fn put_hero(app: &TestApp, pet: &str, cluster: &str, body: Value, tok: &str) -> (u16, Value) {
    let r = app
        .http
        .put(format!(
            "{}/v1/pets/{pet}/clusters/{cluster}/hero",
            app.base
        ))
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[actix_rt::test]
async fn members_carry_their_scores_and_a_pinned_hero_survives_reclustering() {
    let app = spawn_app().await;
    // One scene's nine shots (the original and its degraded and edited copies): one cluster.
    let rows: Vec<(String, String, bool)> =
        labels().into_iter().filter(|r| r.1 == "chelsea").collect();
    assert_eq!(rows.len(), 9);
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let up = app.upload("heroic", &fixture_files(&names)).await;
    let body: Value = up.json().await.unwrap();
    let by_id: std::collections::HashMap<String, (String, bool)> = body["images"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&rows)
        .map(|(i, r)| {
            (
                i["image_id"].as_str().unwrap().to_owned(),
                (r.0.clone(), r.2),
            )
        })
        .collect();
    assert_eq!(
        app.wait_job(body["job_id"].as_str().unwrap()).await["status"],
        "succeeded"
    );

    let (s, c) = app.get_json("/v1/pets/heroic/clusters").await;
    assert_eq!(s, 200);
    let cluster = &c["clusters"][0];
    assert_eq!(c["clusters"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(cluster["hero_pinned"], false);
    let members = cluster["members"].as_array().unwrap();
    assert_eq!(members.len(), 9);
    // Best-scored first, each factor in [0, 1], the total their product; the hero is the first.
    let totals: Vec<f64> = members
        .iter()
        .map(|m| m["score"]["total"].as_f64().unwrap())
        .collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{totals:?}");
    for m in members {
        let sc = &m["score"];
        let f: Vec<f64> = ["sharpness", "noise", "exposure", "resolution", "centrality"]
            .iter()
            .map(|k| sc[*k].as_f64().unwrap())
            .collect();
        assert!(f.iter().all(|v| (0.0..=1.0).contains(v)), "{sc}");
        let product: f64 = f.iter().product();
        assert!(
            (product - sc["total"].as_f64().unwrap()).abs() < 1e-9,
            "{sc}"
        );
        // A near-duplicate points at a better-scored member of the same cluster.
        if let Some(of) = m["near_duplicate_of"].as_str() {
            let better = members
                .iter()
                .find(|x| x["image_id"] == of)
                .expect("a member");
            assert!(
                better["score"]["total"].as_f64() >= sc["total"].as_f64(),
                "{m}"
            );
        }
    }
    assert_eq!(cluster["hero_image_id"], members[0]["image_id"]);
    assert!(
        !by_id[members[0]["image_id"].as_str().unwrap()].1,
        "a degraded hero"
    );

    // The owner pins a shot that is not the best: it is the hero now and after reclusters.
    let cluster_id = cluster["cluster_id"].as_str().unwrap().to_owned();
    let chosen = members[4]["image_id"].as_str().unwrap().to_owned();
    let (s, pinned) = put_hero(
        &app,
        "heroic",
        &cluster_id,
        json!({"image_id": chosen}),
        &app.token,
    )
    .await;
    assert_eq!(s, 200, "{pinned}");
    assert_eq!(pinned["hero_image_id"], chosen.as_str());
    assert_eq!(pinned["hero_pinned"], true);
    assert_eq!(pinned["cluster_id"], cluster_id.as_str());
    for _ in 0..2 {
        assert_eq!(app.recluster("heroic").await["status"], "succeeded");
        let (_, c) = app.get_json("/v1/pets/heroic/clusters").await;
        let cl = &c["clusters"][0];
        assert_eq!(
            cl["cluster_id"],
            cluster_id.as_str(),
            "the cluster keeps its id"
        );
        assert_eq!(cl["hero_image_id"], chosen.as_str(), "the pin survives");
        assert_eq!(cl["hero_pinned"], true);
    }

    // Refusals, each with its code: not a member, no such cluster, a bad body, another owner.
    let other = app
        .upload("elsewhere", &fixture_files(&[labels()[0].0.clone()]))
        .await;
    let other: Value = other.json().await.unwrap();
    let stranger = other["images"][0]["image_id"].as_str().unwrap().to_owned();
    app.wait_job(other["job_id"].as_str().unwrap()).await;
    let (s, b) = put_hero(
        &app,
        "heroic",
        &cluster_id,
        json!({"image_id": stranger}),
        &app.token,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("not_a_member")),
        "{b}"
    );
    let ghost = uuid::Uuid::now_v7().to_string();
    let (s, b) = put_hero(
        &app,
        "heroic",
        &ghost,
        json!({"image_id": chosen}),
        &app.token,
    )
    .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = put_hero(
        &app,
        "heroic",
        &cluster_id,
        json!({"image": chosen}),
        &app.token,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{b}"
    );
    let (s, b) = put_hero(
        &app,
        "heroic",
        "not-a-uuid",
        json!({"image_id": chosen}),
        &app.token,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let bob = media_clustering::api::auth::Jwt::from_settings(&app.settings.auth).mint_claims(
        media_clustering::api::auth::Claims {
            sub: "bob".into(),
            exp: chrono::Utc::now().timestamp() as u64 + 600,
            nbf: None,
            iat: None,
            scope: "media:read media:write".into(),
            owner: None,
            iss: None,
        },
    );
    let (s, b) = put_hero(
        &app,
        "heroic",
        &cluster_id,
        json!({"image_id": chosen}),
        &bob,
    )
    .await;
    assert_eq!(s, 404, "another owner's pet does not exist for bob: {b}");
    let (_, c) = app.get_json("/v1/pets/heroic/clusters").await;
    assert_eq!(
        c["clusters"][0]["hero_image_id"],
        chosen.as_str(),
        "nothing changed"
    );
    app.cleanup().await;
}
