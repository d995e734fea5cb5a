//! End to end through the actors: clustering the labelled photos, idempotent
//! redelivery, and the configured actor counts.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use media_clustering::startup::Mode;

use crate::helpers::*;

#[actix_rt::test]
async fn labelled_photos_cluster_by_scene_with_no_degraded_hero() {
    let app = spawn_app_with(Mode::Serve, &[("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "2")]).await;
    let rows = labels();
    assert_eq!(rows.len(), 45);
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let r = app.upload("scenes", &fixture_files(&names)).await;
    assert_eq!(r.status().as_u16(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    let ids: Vec<String> = body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image_id"].as_str().unwrap().to_owned())
        .collect();
    let by_id: HashMap<&str, &(String, String, bool)> =
        ids.iter().map(String::as_str).zip(&rows).collect();

    let job = app.wait_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let (s, c) = app.get_json("/v1/pets/scenes/clusters").await;
    assert_eq!(s, 200);
    assert_eq!(c["version"], 1);
    let clusters = c["clusters"].as_array().unwrap();
    // The partition must equal the scenes exactly.
    let got: BTreeSet<BTreeSet<String>> = clusters
        .iter()
        .map(|cl| {
            cl["image_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| by_id[i.as_str().unwrap()].1.clone() + "/" + &by_id[i.as_str().unwrap()].0)
                .collect()
        })
        .collect();
    let mut want: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for (file, scene, _) in &rows {
        want.entry(scene.as_str())
            .or_default()
            .insert(format!("{scene}/{file}"));
    }
    let want: BTreeSet<BTreeSet<String>> = want.into_values().collect();
    assert_eq!(got, want);
    for cl in clusters {
        let hero = by_id[cl["hero_image_id"].as_str().unwrap()];
        assert!(!hero.2, "degraded hero {} for scene {}", hero.0, hero.1);
        assert_eq!(
            cl["size"].as_u64().unwrap() as usize,
            cl["image_ids"].as_array().unwrap().len()
        );
    }
    // Every photo embedded once, with its quality scores, from what its upload prepared
    // (decoded once, by the API's check).
    assert_eq!(app.count("SELECT count(*) FROM image_embeddings").await, 45);
    let metrics = app.scrape().await;
    let input = |kind: &str| {
        sample(
            &metrics,
            &format!("media_cluster_embedder_inputs_total{{input=\"{kind}\"}}"),
        )
    };
    assert_eq!((input("prepared"), input("original")), (45.0, 0.0));
    app.cleanup().await;
}

#[actix_rt::test]
async fn a_redelivered_entry_writes_one_cluster_version() {
    let app = spawn_app().await;
    let names: Vec<String> = labels().iter().take(3).map(|r| r.0.clone()).collect();
    let r = app.upload("redeliver", &fixture_files(&names)).await;
    let body: serde_json::Value = r.json().await.unwrap();
    let job_id = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(app.wait_job(&job_id).await["status"], "succeeded");

    // Add the same entry again, as a redelivery would hand it over.
    let stream = &app.settings.redis.stream;
    let entries = app.entries(stream).await;
    let mut add = redis::cmd("XADD");
    add.arg(stream).arg("*");
    for (k, v) in &entries.ids[0].map {
        let v: String = redis::from_redis_value(v.clone()).unwrap();
        add.arg(k).arg(v);
    }
    let _: String = add.query_async(&mut app.redis.clone()).await.unwrap();

    // Wait until the group has consumed and acknowledged everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        let g = &info.groups[0];
        if g.pending == 0 && g.lag == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries not consumed: pending {} lag {:?}",
            g.pending,
            g.lag
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM cluster_versions WHERE job_id = '{job_id}'"
        ))
        .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM cluster_versions").await, 1);
    app.cleanup().await;
}

#[actix_rt::test]
async fn configured_actor_counts_are_the_counts_that_run() {
    let app = spawn_app_with(
        Mode::Worker,
        &[
            ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "3"),
            ("MEDIA_CLUSTERING__ACTORS__POSTGRES_WRITERS", "2"),
            ("MEDIA_CLUSTERING__ACTORS__CLUSTERERS", "1"),
            ("MEDIA_CLUSTERING__ACTORS__HERO_SELECTORS", "2"),
            ("MEDIA_CLUSTERING__ACTORS__STREAM_READERS", "1"),
        ],
    )
    .await;
    let want = [
        ("embedder", 3.0),
        ("postgres_writer", 2.0),
        ("clusterer", 1.0),
        ("hero_selector", 2.0),
        ("stream_reader", 1.0),
        ("supervisor", 1.0),
    ];
    // Instances start asynchronously: poll until they are all up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = app.scrape().await;
        let got: Vec<f64> = want
            .iter()
            .map(|(a, _)| {
                sample(
                    &text,
                    &format!("media_cluster_actor_instances{{actor=\"{a}\"}}"),
                )
            })
            .collect();
        if got.iter().zip(&want).all(|(g, (_, w))| g == w) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.cleanup().await;
}

/// Storage grows with the library, not with the jobs: only the last
/// `clustering.keep_versions` versions stay, and the latest is the one served.
#[actix_rt::test]
async fn old_cluster_versions_are_pruned_and_the_latest_is_served() {
    let app = spawn_app_with(
        Mode::Serve,
        &[("MEDIA_CLUSTERING__CLUSTERING__KEEP_VERSIONS", "3")],
    )
    .await;
    let names: Vec<String> = labels().iter().take(4).map(|r| r.0.clone()).collect();
    let up = app.upload("pruned", &fixture_files(&names)).await;
    let body: serde_json::Value = up.json().await.unwrap();
    assert_eq!(
        app.wait_job(body["job_id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let mut last = 1;
    for _ in 0..5 {
        let job = app.recluster("pruned").await;

        assert_eq!(job["status"], "succeeded", "{job}");
        let v = job["cluster_version"].as_i64().unwrap();
        assert!(v > last, "versions increase: {v} after {last}");
        last = v;
    }
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM cluster_versions WHERE pet_id = 'pruned' ORDER BY version",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(versions, vec![last - 2, last - 1, last]);
    // Nothing only the pruned versions saw is left behind.
    let unseen = app
        .count(
            "SELECT count(*) FROM clusters WHERE pet_id = 'pruned' AND until_version <= (SELECT min(version) FROM cluster_versions WHERE pet_id = 'pruned')",
        )
        .await;
    assert_eq!(unseen, 0);
    // Re-clustering the same photos changes nothing: each version stores only what changed,
    // so the four photos' member rows were written once.
    let members = app
        .count("SELECT count(*) FROM cluster_members m JOIN clusters c ON c.id = m.cluster WHERE c.pet_id = 'pruned'")
        .await;
    assert_eq!(members, 4, "four photos, stored once");
    let written: Vec<i64> =
        sqlx::query_scalar("SELECT DISTINCT first_version FROM clusters WHERE pet_id = 'pruned'")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(written, vec![1], "only the first version wrote clusters");

    let (s, c) = app.get_json("/v1/pets/pruned/clusters").await;
    assert_eq!(s, 200);
    assert_eq!(c["version"], last);
    let served: usize = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cl| cl["image_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(served, 4);
    app.cleanup().await;
}
