//! The service as real processes: the binary, spawned with its own database,
//! streams and storage, for tests where a process must export, die or drain.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_media-clustering");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings shared by the processes of one test.
pub struct ProcEnv {
    pub db_name: String,
    pub vars: HashMap<String, String>,
    pub dir: tempfile::TempDir,
}

impl ProcEnv {
    pub async fn new(overrides: &[(&str, &str)]) -> Self {
        let db_name = create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let mut vars = test_vars(&db_name, &dir.path().join("media"), overrides);
        vars.insert("LOG_LEVEL".into(), "info".into());
        let env = ProcEnv { db_name, vars, dir };
        let out = env.command("migrate", &[]).output().unwrap();
        assert!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    pub fn command(&self, sub: &str, extra: &[(&str, &str)]) -> Command {
        let mut c = Command::new(BIN);
        c.args(sub.split_whitespace())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        c.envs(&self.vars);
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    /// Starts `serve`, `api` or `worker` and waits for `/healthz`.
    pub fn spawn(&self, sub: &str, name: &str, extra: &[(&str, &str)]) -> Proc {
        let port = free_port();
        let bind = format!("127.0.0.1:{port}");
        let key = if sub == "worker" {
            "MEDIA_CLUSTERING__SERVER__INTERNAL_BIND"
        } else {
            "MEDIA_CLUSTERING__SERVER__BIND"
        };
        let log = self.dir.path().join(format!("{name}.log"));
        let mut cmd = self.command(sub, extra);
        cmd.env(key, &bind)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join(format!("{name}.err"))).unwrap(),
            ));
        let child = cmd.spawn().unwrap();
        let mut p = Proc {
            child,
            base: format!("http://{bind}"),
            log,
        };
        p.wait_healthy();
        p
    }

    pub async fn cleanup(self) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_db_url())
            .await
            .unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.db_name
        )))
        .execute(&mut conn)
        .await;
        let mut r = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        delete_stream_keys(
            &mut r,
            &self.vars["MEDIA_CLUSTERING__REDIS__STREAM"],
            &self.vars["MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM"],
        )
        .await;
    }
}

pub struct Proc {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Proc {
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("process exited at start ({status}): {}", self.log_text());
            }
            if std::net::TcpStream::connect(self.base.trim_start_matches("http://")).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no listener within 60 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OTLP/HTTP receiver (`oteltap`) writing every span it gets as a JSON line.
pub struct Receiver {
    child: Child,
    pub port: u16,
    pub out: PathBuf,
}

impl Receiver {
    pub fn start(dir: &std::path::Path) -> Self {
        let exe = std::env::var("OTELTAP").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/pytools/bin/oteltap").to_owned()
        });
        assert!(
            std::path::Path::new(&exe).exists(),
            "oteltap not found at {exe}: `make test` installs it"
        );
        let port = free_port();
        let out = dir.join(format!("spans-{port}.ndjson"));
        let child = Command::new(&exe)
            .arg("--port")
            .arg(port.to_string())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "oteltap did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Receiver { child, port, out }
    }

    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("spanId").is_some())
            .collect()
    }

    /// Every metric received, as OTLP/JSON (`name`, and `sum`, `gauge` or `histogram`).
    pub fn metrics(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v.get("name").is_some()
                    && ["sum", "gauge", "histogram"]
                        .iter()
                        .any(|k| v.get(*k).is_some_and(|d| !d.is_null()))
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `secs`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of a spawned process.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

impl Client {
    pub fn new(env: &ProcEnv, base: &str) -> Self {
        let auth = media_clustering::config::Settings::load_from(&env.vars)
            .unwrap()
            .auth;
        let token = media_clustering::api::auth::Jwt::from_settings(&auth).mint(
            "test",
            "media:read media:write",
            3600,
        );
        Client {
            base: base.to_owned(),
            http: test_http_client(),
            token,
        }
    }

    pub async fn upload(
        &self,
        pet: &str,
        files: &[(String, Vec<u8>)],
        traceparent: Option<&str>,
    ) -> serde_json::Value {
        let (status, body) = self.try_upload(pet, files, traceparent).await;
        assert_eq!(status, 202, "{body}");
        body
    }

    pub async fn try_upload(
        &self,
        pet: &str,
        files: &[(String, Vec<u8>)],
        traceparent: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut r = self
            .http
            .post(format!("{}/v1/pets/{pet}/images", self.base))
            .bearer_auth(&self.token)
            .multipart(form(files));
        if let Some(tp) = traceparent {
            r = r.header("traceparent", tp);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    pub async fn job_status(&self, job_id: &str) -> String {
        let r = self
            .http
            .get(format!("{}/v1/jobs/{job_id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "GET /v1/jobs/{job_id}");
        let j: serde_json::Value = r.json().await.unwrap();
        j["status"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn wait_job(&self, job_id: &str) -> String {
        eventually(60, "the job to finish", async || {
            let s = self.job_status(job_id).await;
            ["succeeded", "failed", "dead_lettered"]
                .contains(&s.as_str())
                .then_some(s)
        })
        .await
    }

    pub async fn scrape(&self, token: &str) -> String {
        self.http
            .get(format!("{}/internal/metrics", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A Redis of the test's own, persisting to an append-only file so a restart keeps the stream.
pub struct OwnRedis {
    child: std::process::Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    pub fn start(dir: &std::path::Path, port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--dir", dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        OwnRedis {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    pub fn restart(&mut self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown"])
            .status();
        let _ = self.child.wait();
        *self = OwnRedis::start(&self.dir.clone(), self.port);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
