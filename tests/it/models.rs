//! Model versions and cluster identities across re-clusterings.

use serde_json::Value;

use crate::helpers::*;
use crate::process::*;

fn files(names: &[&str]) -> Vec<(String, Vec<u8>)> {
    fixture_files(&names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
}

async fn clusters(client: &Client, pet: &str) -> Value {
    let r = client
        .http
        .get(format!("{}/v1/pets/{pet}/clusters", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

async fn recluster(client: &Client, pet: &str) -> String {
    let r = client
        .http
        .post(format!("{}/v1/pets/{pet}/recluster", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let b: Value = r.json().await.unwrap();
    b["job_id"].as_str().unwrap().to_owned()
}

async fn embeddings(db: &sqlx::PgPool, version: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM image_embeddings WHERE model_version = $1")
        .bind(version)
        .fetch_one(db)
        .await
        .unwrap()
}

#[actix_rt::test]
async fn a_new_model_version_re_embeds_lazily_and_once_and_reembed_runs_ahead() {
    let env = ProcEnv::new(&[]).await;
    let db = sqlx::PgPool::connect(&env.vars["DATABASE_URL"])
        .await
        .unwrap();
    let photos = files(&["chelsea__orig.png", "chelsea__flip.png", "coffee__orig.png"]);
    {
        let serve = env.spawn("serve", "serve1", &[]);
        let client = Client::new(&env, &serve.base);
        let up = client.upload("model-pet", &photos, None).await;
        assert_eq!(
            client.wait_job(up["job_id"].as_str().unwrap()).await,
            "succeeded"
        );
        assert_eq!(
            clusters(&client, "model-pet").await["model_version"],
            "open-nsfw-eef41e25-dn6s1-gem2-lp5x128"
        );
    }
    assert_eq!(
        embeddings(&db, "open-nsfw-eef41e25-dn6s1-gem2-lp5x128").await,
        3
    );

    // The same weights under another name: a new model version.
    let renamed = [("MEDIA_CLUSTERING__EMBEDDER__NAME", "open-nsfw-v2")];
    let serve = env.spawn("serve", "serve2", &renamed);
    let client = Client::new(&env, &serve.base);
    for _ in 0..2 {
        let job = recluster(&client, "model-pet").await;
        assert_eq!(client.wait_job(&job).await, "succeeded");
    }
    assert_eq!(
        clusters(&client, "model-pet").await["model_version"],
        "open-nsfw-v2-eef41e25-dn6s1-gem2-lp5x128"
    );
    assert_eq!(
        embeddings(&db, "open-nsfw-v2-eef41e25-dn6s1-gem2-lp5x128").await,
        3
    );
    let text = client.scrape("dev-internal-token").await;
    let embedded = sample(
        &text,
        r#"media_cluster_embedding_duration_seconds_count{model_version="open-nsfw-v2-eef41e25-dn6s1-gem2-lp5x128"}"#,
    );
    assert_eq!(
        embedded, 3.0,
        "two jobs under the new version embedded each photo once"
    );
    drop(serve);

    // reembed does it ahead of any job, and only once.
    let v3 = [("MEDIA_CLUSTERING__EMBEDDER__NAME", "open-nsfw-v3")];
    let out = env
        .command("reembed --pet model-pet", &v3)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 photos to embed"));
    assert_eq!(
        embeddings(&db, "open-nsfw-v3-eef41e25-dn6s1-gem2-lp5x128").await,
        3
    );
    let again = env.command("reembed", &v3).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 photos to embed"));
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_cluster_that_gains_photos_keeps_its_id() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let up = client
        .upload(
            "ids",
            &files(&[
                "chelsea__orig.png",
                "chelsea__flip.png",
                "chelsea__crop.png",
            ]),
            None,
        )
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let first = clusters(&client, "ids").await;
    assert_eq!(first["clusters"].as_array().unwrap().len(), 1);
    let cat_id = first["clusters"][0]["cluster_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let up = client
        .upload(
            "ids",
            &files(&[
                "chelsea__rot.jpg",
                "chelsea__bright.jpg",
                "coffee__orig.png",
                "coffee__flip.jpg",
            ]),
            None,
        )
        .await;
    let coffee_ids: Vec<String> = up["images"].as_array().unwrap()[2..]
        .iter()
        .map(|i| i["image_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let second = clusters(&client, "ids").await;
    assert_eq!(second["version"], 2);
    let cl = second["clusters"].as_array().unwrap();
    assert_eq!(cl.len(), 2);
    let cat = cl
        .iter()
        .find(|c| c["size"] == 5)
        .expect("the cat cluster with five photos");
    assert_eq!(
        cat["cluster_id"],
        cat_id.as_str(),
        "the grown cluster kept its id"
    );
    let coffee = cl.iter().find(|c| c["size"] == 2).unwrap();
    assert_ne!(coffee["cluster_id"], cat_id.as_str());
    let mut got: Vec<String> = coffee["image_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut want = coffee_ids.clone();
    want.sort();
    assert_eq!(got, want);
    drop(serve);
    env.cleanup().await;
}

/// ONNX Runtime is the default backend; without its library (missing, or not a library) the
/// built-in tract backend embeds instead, the same model version, rather than start-up failing.
#[actix_rt::test]
async fn the_embedder_falls_back_to_tract_without_onnx_runtime() {
    let storage = tempfile::tempdir().unwrap();
    let not_a_library = storage.path().join("libonnxruntime.so");
    std::fs::write(&not_a_library, b"not a shared object").unwrap();
    let load = |library: String| {
        let mut vars = test_vars("unused", storage.path(), &[]);
        vars.insert(
            "MEDIA_CLUSTERING__EMBEDDER__ONNXRUNTIME_LIBRARY".into(),
            library,
        );
        async move {
            let settings = media_clustering::config::Settings::load_from(&vars).unwrap();
            assert_eq!(settings.embedder.backend, "onnxruntime", "the default");
            media_clustering::startup::load_model(&settings)
                .await
                .unwrap()
        }
    };
    let garbage = load(not_a_library.display().to_string()).await;
    let missing = load("/nonexistent/libonnxruntime.so".into()).await;
    let real = load(
        std::env::var("ORT_DYLIB_PATH")
            .unwrap_or_else(|_| "models/libonnxruntime.so.1.32.0".into()),
    )
    .await;
    assert_eq!(garbage.backend(), "tract");
    assert_eq!(missing.backend(), "tract");
    assert_eq!(real.backend(), "onnxruntime");
    assert_eq!(garbage.model_version(), real.model_version());
}

/// What the upload prepared embeds to exactly what the embedder's own decode does, for every
/// labelled photo (so whether a photo was prepared never changes its clusters or hero).
#[actix_rt::test]
async fn a_prepared_photo_embeds_and_scores_as_its_original() {
    use actors::algo::{budget::MemoryBudget, photo};
    let storage = tempfile::tempdir().unwrap();
    let vars = test_vars("unused", storage.path(), &[]);
    let settings = media_clustering::config::Settings::load_from(&vars).unwrap();
    let model = shared_model(&settings).await;
    let pre = model
        .crop_preprocess()
        .cloned()
        .expect("a model that embeds crops");
    let (limits, budget) = (settings.server.decode_limits(), MemoryBudget::unlimited());
    let names: Vec<String> = labels().into_iter().map(|r| r.0).collect();
    for (name, bytes) in fixture_files(&names) {
        let (.., prepared) = photo::prepare(&bytes, limits, &pre, &budget).unwrap();
        let (vector, quality) = photo::analyse(&bytes, limits, model.as_ref(), &budget).unwrap();
        assert_eq!(prepared.quality, quality, "{name}");
        assert_eq!(model.embed_crop(&prepared.crop).unwrap(), vector, "{name}");
    }
}
