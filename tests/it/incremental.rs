//! Incremental clustering through the service: photos added job after job are assigned to
//! the clustering the worker holds, and the result is the one a full re-cluster gives.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;

/// The clusters as sets of image ids, with their cluster ids.
fn partition(c: &Value) -> BTreeSet<(String, BTreeSet<String>)> {
    c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cl| {
            (
                cl["cluster_id"].as_str().unwrap().to_owned(),
                cl["image_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn photos_added_job_by_job_are_assigned_as_a_full_recluster_would_cluster_them() {
    let app = spawn_app().await;
    let mut rows = labels();
    // Scenes interleaved (file names are `<scene>__<variant>`), so that most jobs add photos
    // to clusters that already exist.
    let variant = |name: &str| name.split_once("__").map_or(name, |(_, v)| v).to_owned();
    rows.sort_by_key(|r| (r.2, variant(&r.0), r.0.clone()));
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let chunks: Vec<&[String]> = names.chunks(6).collect();
    assert!(chunks.len() >= 5);
    for chunk in &chunks {
        let up = app.upload("growing", &fixture_files(chunk)).await;
        assert_eq!(up.status().as_u16(), 202);
        let body: Value = up.json().await.unwrap();
        let job = app.wait_job(body["job_id"].as_str().unwrap()).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let text = app.scrape().await;
    let assigned = |how: &str| {
        sample(
            &text,
            &format!("media_cluster_clusterings_total{{assigned=\"{how}\"}}"),
        )
    };
    // The first job found nothing held; every later one assigned its photos.
    assert_eq!(assigned("full_not_held"), 1.0);
    assert_eq!(assigned("incremental"), (chunks.len() - 1) as f64);
    assert!(sample(&text, "media_cluster_clusterings_held{measure=\"pets\"}") >= 1.0);
    let (s, grown) = app.get_json("/v1/pets/growing/clusters").await;
    assert_eq!(s, 200);
    let served: usize = partition(&grown).iter().map(|c| c.1.len()).sum();
    assert_eq!(served, names.len());

    // A full re-cluster of the same photos: the same clusters, under the same ids.
    assert_eq!(app.recluster("growing").await["status"], "succeeded");
    assert_eq!(
        sample(
            &app.scrape().await,
            "media_cluster_clusterings_total{assigned=\"full_asked\"}"
        ),
        1.0
    );
    let (_, full) = app.get_json("/v1/pets/growing/clusters").await;
    assert!(full["version"].as_i64() > grown["version"].as_i64());
    assert_eq!(partition(&full), partition(&grown));
    // Each scene of the labelled set is one cluster.
    let scenes: BTreeSet<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(partition(&full).len(), scenes.len());
    app.cleanup().await;
}

/// Adding a scene writes its new cluster's rows only; the cluster that did not change keeps
/// its rows, and the version is still served whole.

#[actix_rt::test]
async fn a_version_stores_only_the_clusters_that_changed() {
    let app = spawn_app().await;
    let rows = labels();
    let scene = |s: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r.1 == s)
            .map(|r| r.0.clone())
            .collect()
    };
    let mut all_scenes: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    all_scenes.dedup();
    let (first, second) = (all_scenes[0], all_scenes[1]);
    let up = app.upload("deltas", &fixture_files(&scene(first))).await;
    let body: Value = up.json().await.unwrap();
    assert_eq!(
        app.wait_job(body["job_id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let members_before = app
        .count("SELECT count(*) FROM cluster_members m JOIN clusters c ON c.id = m.cluster WHERE c.pet_id = 'deltas'")
        .await;
    let up = app.upload("deltas", &fixture_files(&scene(second))).await;
    let body: Value = up.json().await.unwrap();
    let job = app.wait_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded");
    // The second scene is a new cluster: its rows are written, the first scene's are not.
    let members_after = app
        .count("SELECT count(*) FROM cluster_members m JOIN clusters c ON c.id = m.cluster WHERE c.pet_id = 'deltas'")
        .await;
    assert_eq!(members_after - members_before, scene(second).len() as i64);
    let (_, c) = app.get_json("/v1/pets/deltas/clusters").await;
    assert_eq!(c["version"], job["cluster_version"]);
    let clusters = partition(&c);
    assert_eq!(clusters.len(), 2);
    assert_eq!(
        clusters.iter().map(|c| c.1.len()).sum::<usize>(),
        scene(first).len() + scene(second).len()
    );
    app.cleanup().await;
}
