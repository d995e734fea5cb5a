use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actors::algo::embed::ImageEncoder;
use actors::pipeline::PipelineHandle;
use media_clustering::api::auth::Jwt;
use media_clustering::config::Settings;
use media_clustering::startup::{Application, Mode, load_model};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use uuid::Uuid;

pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn model_path() -> PathBuf {
    std::env::var("MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/open-nsfw-int8.onnx")
        })
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos")
}

/// `labels.csv` rows: (file, scene, degraded).
pub fn labels() -> Vec<(String, String, bool)> {
    std::fs::read_to_string(fixtures().join("labels.csv"))
        .expect("labels.csv")
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_owned(), c[1].to_owned(), c[2].trim() == "1")
        })
        .collect()
}

pub struct TestApp {
    pub base: String,
    pub settings: Settings,
    pub db: PgPool,
    pub db_name: String,
    pub http: reqwest::Client,
    pub token: String,
    pub redis: redis::aio::MultiplexedConnection,
    pub storage_dir: tempfile::TempDir,
    pub pipeline: Option<PipelineHandle>,
}

/// Test settings: fresh database, stream and storage; `overrides` are extra variables.
pub fn test_vars(
    db_name: &str,
    storage: &Path,
    overrides: &[(&str, &str)],
) -> HashMap<String, String> {
    let ns = Uuid::new_v4().simple().to_string();
    let admin = url::Url::parse(&admin_db_url()).unwrap();
    let mut db_url = admin.clone();
    db_url.set_path(db_name);
    let mut v: HashMap<String, String> = [
        ("DATABASE_URL", db_url.to_string()),
        ("REDIS_URL", redis_url()),
        ("TELEMETRY_ENABLED", "false".into()),
        ("LOG_LEVEL", "warn".into()),
        ("MEDIA_CLUSTERING__SERVER__BIND", "127.0.0.1:0".into()),
        (
            "MEDIA_CLUSTERING__SERVER__INTERNAL_BIND",
            "127.0.0.1:0".into(),
        ),
        ("MEDIA_CLUSTERING__REDIS__STREAM", format!("test:{ns}:jobs")),
        (
            "MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM",
            format!("test:{ns}:deadletter"),
        ),
        ("MEDIA_CLUSTERING__REDIS__BLOCK_MS", "200".into()),
        (
            "MEDIA_CLUSTERING__STORAGE__URL",
            format!("file://{}", storage.display()),
        ),
        (
            "MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH",
            model_path().display().to_string(),
        ),
        // Tests poll hard; the rate-limit test turns the limit back on.
        (
            "MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND",
            "0".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, val) in overrides {
        v.insert((*k).to_owned(), (*val).to_owned());
    }
    v
}

/// The model, loaded once per test process.
pub async fn shared_model(settings: &Settings) -> Arc<dyn ImageEncoder> {
    static MODEL: OnceLock<Arc<dyn ImageEncoder>> = OnceLock::new();
    if let Some(m) = MODEL.get() {
        return m.clone();
    }
    let m = load_model(settings)
        .await
        .expect("model loads (run `make model`)");
    MODEL.get_or_init(|| m).clone()
}

pub async fn create_database() -> String {
    let name = format!("mc_test_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin_db_url())
        .await
        .expect("admin connection to Postgres");
    sqlx::query(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .execute(&mut conn)
        .await
        .expect("create test database");
    name
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Mode::Serve, &[]).await
}

/// Starts the application in this test's actix system.
pub async fn spawn_app_with(mode: Mode, overrides: &[(&str, &str)]) -> TestApp {
    let db_name = create_database().await;
    let storage_dir = tempfile::tempdir().unwrap();
    let settings = Settings::load_from(&test_vars(&db_name, storage_dir.path(), overrides))
        .expect("test settings");
    let model = if mode == Mode::Api {
        None
    } else {
        Some(shared_model(&settings).await)
    };
    let app = Application::build_with_model(settings.clone(), mode, model)
        .await
        .expect("application builds");
    let port = app.port();
    let (server, pipeline) = app.into_parts();
    actix_rt::spawn(server);
    let db = PgPool::connect(settings.postgres.url.expose())
        .await
        .unwrap();
    if mode == Mode::Api {
        media_clustering::startup::migrate(&db).await.unwrap();
    }
    let redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let token = Jwt::from_settings(&settings.auth).mint("test", "media:read media:write", 3600);
    TestApp {
        base: format!("http://127.0.0.1:{port}"),
        settings,
        db,
        db_name,
        http: test_http_client(),
        token,
        redis,
        storage_dir,
        pipeline,
    }
}

/// A multipart body with one `file` part per (name, bytes).
pub fn form(files: &[(String, Vec<u8>)]) -> reqwest::multipart::Form {
    files
        .iter()
        .fold(reqwest::multipart::Form::new(), |f, (name, bytes)| {
            f.part(
                "file",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
            )
        })
}

pub fn fixture_files(names: &[String]) -> Vec<(String, Vec<u8>)> {
    names
        .iter()
        .map(|n| (n.clone(), std::fs::read(fixtures().join(n)).unwrap()))
        .collect()
}

impl TestApp {
    pub async fn upload(&self, pet: &str, files: &[(String, Vec<u8>)]) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/pets/{pet}/images", self.base))
            .bearer_auth(&self.token)
            .multipart(form(files))
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.get(path).await;
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/pets/{pet}/recluster` with the test's token.
    pub async fn post_recluster(&self, pet: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/pets/{pet}/recluster", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// Asks for the pet to be re-clustered and waits for the job; returns its final JSON.
    pub async fn recluster(&self, pet: &str) -> Value {
        let r = self.post_recluster(pet).await;
        assert_eq!(r.status().as_u16(), 202);
        let b: Value = r.json().await.unwrap();
        self.wait_job(b["job_id"].as_str().unwrap()).await
    }

    /// Polls the job until it finishes; returns its final JSON.
    pub async fn wait_job(&self, job_id: &str) -> Value {
        self.wait_job_as(job_id, &self.token).await
    }

    /// Polls the job with `token` (its owner's) until it finishes.
    pub async fn wait_job_as(&self, job_id: &str, token: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let r = self
                .http
                .get(format!("{}/v1/jobs/{job_id}", self.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let j: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(s, 200, "job {job_id}: {j}");
            if ["succeeded", "failed", "dead_lettered"]
                .contains(&j["status"].as_str().unwrap_or(""))
            {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} did not finish: {j}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn xlen(&self, stream: &str) -> i64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    /// Every entry of a stream, oldest first.
    pub async fn entries(&self, stream: &str) -> redis::streams::StreamRangeReply {
        redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    pub fn stored_objects(&self) -> usize {
        fn walk(p: &Path) -> usize {
            std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| {
                            if e.path().is_dir() {
                                walk(&e.path())
                            } else {
                                1
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(self.storage_dir.path())
    }

    pub async fn scrape(&self) -> String {
        self.http
            .get(format!("{}/internal/metrics", self.base))
            .bearer_auth(self.settings.auth.internal_token.expose())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the pipeline and drops the database and streams.
    pub async fn cleanup(mut self) {
        if let Some(p) = self.pipeline.take() {
            p.shutdown(Duration::from_secs(10)).await;
        }
        self.db.close().await;
        let mut conn = PgConnection::connect(&admin_db_url()).await.unwrap();
        let _ = sqlx::query(AssertSqlSafe(format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.db_name
        )))
        .execute(&mut conn)
        .await;
        delete_stream_keys(
            &mut self.redis,
            &self.settings.redis.stream,
            &self.settings.redis.deadletter_stream,
        )
        .await;
    }
}

/// Deletes a test's streams and every key beside them (enqueue markers, pet locks).
pub async fn delete_stream_keys(
    r: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    deadletter: &str,
) {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{stream}:*"))
        .query_async(r)
        .await
        .unwrap_or_default();
    keys.extend([stream.to_owned(), deadletter.to_owned()]);
    let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(r).await;
}

/// Value of one sample in Prometheus text (`name{labels}`), 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A client that never reuses a connection the server may be closing: idle
/// connections are dropped before the server's keep-alive (5 s) ends.
pub fn test_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}
