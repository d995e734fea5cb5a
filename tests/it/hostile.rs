//! Hostile uploads and requests against the real binary (real Redis and Postgres), one test
//! per class: the process stays up, each rejection answers its documented status and JSON
//! error, memory stays within the decoding budget, and nothing is left in storage, Postgres
//! or the stream.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::AsyncWriteExt;

use crate::helpers::*;
use crate::process::*;

/// A black `w`x`h` grey PNG: a few hundred bytes whatever its size.
fn thin_png(w: u32, h: u32) -> Vec<u8> {
    encode(
        &image::DynamicImage::ImageLuma8(image::GrayImage::new(w, h)),
        image::ImageFormat::Png,
    )
}

fn encode(img: &image::DynamicImage, f: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

fn objects(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("media/images"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(db)
        .await
        .unwrap()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Asserts a documented rejection: the status and the JSON error shape.
fn assert_error(status: u16, body: &serde_json::Value, want: u16, needle: &str) {
    assert_eq!(status, want, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(msg.contains(needle), "`{needle}` not in {body}");
}

#[actix_rt::test]
async fn extreme_aspect_ratios_are_refused_and_the_process_stays_up() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    for (w, h) in [(200_000u32, 1u32), (3000, 1), (1, 4000)] {
        let png = thin_png(w, h);
        let (s, b) = client
            .try_upload("thin", &[("thin.png".into(), png)], None)
            .await;
        assert_error(s, &b, 422, "max_aspect_ratio");
    }
    // Still serving, and nothing stored.
    let up = client
        .upload("thin", &fixture_files(&[labels()[0].0.clone()]), None)
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM images").await, 1);
    assert_eq!(objects(env.dir.path()), 1);
    db.close().await;
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn concurrent_large_decodes_stay_within_the_decoding_budget() {
    let budget_mib = 128.0;
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__SERVER__DECODE_MEMORY_BUDGET_MIB", "128"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
    ])
    .await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    // Warm up (the model, thread pools), then the baseline.
    let up = client
        .upload("warm", &fixture_files(&[labels()[1].0.clone()]), None)
        .await;
    client.wait_job(up["job_id"].as_str().unwrap()).await;
    let pid = serve.child.id();
    let baseline = rss_mib(pid);
    // 2800x2800 16-bit RGB PNGs, a few KiB each on the wire, ~121 MiB each to decode and
    // analyse: six requests of three at once.
    let big = |shade: u16| {
        let img =
            image::DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(2800, 2800, |x, _| {
                image::Rgb([shade, (x % 7) as u16 * 900, 4000])
            }));
        encode(&img, image::ImageFormat::Png)
    };
    let files: Vec<Vec<(String, Vec<u8>)>> = (0..6)
        .map(|r| {
            (0..3)
                .map(|k| (format!("b{k}.png"), big(1000 * (r * 3 + k) as u16)))
                .collect()
        })
        .collect();
    let watch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (w, peak) = (
        watch.clone(),
        std::sync::Arc::new(std::sync::Mutex::new(0f64)),
    );
    let p = peak.clone();
    let sampler = std::thread::spawn(move || {
        while w.load(std::sync::atomic::Ordering::Relaxed) {
            let r = rss_mib(pid);
            let mut m = p.lock().unwrap();
            *m = m.max(r);
            drop(m);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let uploads = files.iter().enumerate().map(|(i, f)| {
        let c = &client;
        async move { c.try_upload(&format!("big-{i}"), f, None).await }
    });
    let answers = futures::future::join_all(uploads).await;
    let mut jobs = Vec::new();
    for (s, b) in &answers {
        assert_eq!(*s, 202, "{b}");
        jobs.push(b["job_id"].as_str().unwrap().to_owned());
    }
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    watch.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let grown = *peak.lock().unwrap() - baseline;
    assert!(
        grown < budget_mib + 64.0,
        "resident memory grew by {grown:.0} MiB with a {budget_mib} MiB decoding budget"
    );
    // A photo needing more than the whole budget is refused from its header.
    let huge = image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
        4000,
        4000,
        image::Rgb([9u16, 9, 9]),
    ));
    let (s, b) = client
        .try_upload(
            "huge",
            &[("huge.png".into(), encode(&huge, image::ImageFormat::Png))],
            None,
        )
        .await;
    assert_error(s, &b, 422, "decode_memory_budget_mib");
    drop(serve);
    env.cleanup().await;
}

/// Sampling layouts (`cjpeg -sample`), progressive or not, restart intervals, grey and RGB.
fn jpeg_layouts(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let ppm = dir.join("base.ppm");
    let mut f = std::fs::File::create(&ppm).unwrap();
    let (w, h) = (331u32, 229u32);
    writeln!(f, "P6 {w} {h} 255").unwrap();
    for y in 0..h {
        for x in 0..w {
            f.write_all(&[(x * 7 + y) as u8, (x * 3) as u8, (y * 5) as u8])
                .unwrap();
        }
    }
    drop(f);
    let samples = [
        "1x1",
        "2x1",
        "1x2",
        "2x2",
        "4x1",
        "1x4",
        "3x1",
        "1x3",
        "3x3",
        "4x2",
        "2x4",
        "4x4",
        "2x2,1x1,1x1",
        "1x1,2x2,1x1",
        "2x1,1x2,1x1",
        "2x2,2x1,1x2",
        "4x1,2x1,1x1",
        "1x1,1x1,2x2",
        "3x2,1x1,1x1",
    ];
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        for extra in [&[][..], &["-progressive"][..], &["-restart", "1"][..]] {
            let path = dir.join(format!("l{i}-{}.jpg", extra.len()));
            let ok = Command::new("cjpeg")
                .args(["-sample", s])
                .args(extra)
                .arg("-outfile")
                .arg(&path)
                .arg(&ppm)
                .output()
                .expect("cjpeg (make test installs libjpeg-turbo-progs)")
                .status
                .success();
            // Some layouts are not encodable at all ("sampling factors too large").
            if ok {
                out.push((format!("{s}{extra:?}"), std::fs::read(&path).unwrap()));
            }
        }
    }
    for args in [&["-grayscale"][..], &["-rgb"][..], &["-arithmetic"][..]] {
        let path = dir.join("x.jpg");
        let status = Command::new("cjpeg")
            .args(args)
            .arg("-outfile")
            .arg(&path)
            .arg(&ppm)
            .status()
            .unwrap();
        assert!(status.success());
        out.push((format!("{args:?}"), std::fs::read(&path).unwrap()));
    }
    out
}

#[actix_rt::test]
async fn every_jpeg_layout_the_api_accepts_is_processed_and_poisons_nobody() {
    let env = ProcEnv::new(&[]).await;
    let layouts = jpeg_layouts(env.dir.path());
    assert!(layouts.len() >= 35, "{} layouts", layouts.len());
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let (mut accepted, mut refused) = (0, 0);
    let mut photos = std::collections::HashSet::new();
    for (name, bytes) in &layouts {
        let (s, b) = client
            .try_upload("layouts", &[(format!("{name}.jpg"), bytes.clone())], None)
            .await;
        match s {
            202 => {
                accepted += 1;
                // Equivalent layouts encode to the same bytes: one photo.
                photos.insert(b["images"][0]["image_id"].as_str().unwrap().to_owned());
                let j = b["job_id"].as_str().unwrap();
                assert_eq!(client.wait_job(j).await, "succeeded", "{name}");
            }
            422 => {
                refused += 1;
                // Beyond both decoders: horizontal sampling of 3 and arithmetic coding. They
                // are refused at the upload, with the reason, never accepted and failed later.
                let beyond = name.starts_with("3x") || name.contains("arithmetic");
                assert!(beyond, "{name} refused: {b}");
                let why = b["error"]["message"].as_str().unwrap_or_default();
                assert!(why.contains("cannot be decoded"), "{b}");
            }
            other => panic!("{name}: {other} {b}"),
        }
    }
    assert!(
        accepted >= 40,
        "accepted {accepted} of {} ({refused} refused)",
        layouts.len()
    );
    // Nothing accepted failed in the worker: no photo of the pet is unprocessable.
    let r = client
        .http
        .get(format!("{}/v1/pets/layouts/clusters", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    let c: serde_json::Value = r.json().await.unwrap();
    assert_eq!(c["unprocessable"], serde_json::json!([]), "{c}");
    let members: usize = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["size"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(members, photos.len());
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_photo_that_fails_in_the_worker_is_quarantined_and_its_pet_goes_on() {
    // Nothing held between jobs: a worker that holds the pet's clustering still has the
    // lost embedding in memory and would not need to embed the photo again.
    let env = ProcEnv::new(&[("MEDIA_CLUSTERING__CLUSTERING__CACHE_MIB", "0")]).await;

    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    // Two photos clustered; then one's object and cached embedding are lost, so the next job
    // must embed it again and cannot.
    let rows = labels();
    let up = client
        .upload(
            "bella",
            &fixture_files(&[rows[0].0.clone(), rows[9].0.clone()]),
            None,
        )
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let gone = up["images"][1]["image_id"].as_str().unwrap().to_owned();
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    sqlx::query("DELETE FROM image_embeddings WHERE image_id = $1::uuid")
        .bind(&gone)
        .execute(&db)
        .await
        .unwrap();
    std::fs::remove_file(env.dir.path().join(format!("media/images/{gone}"))).unwrap();
    // The next job of the pet cannot embed that photo: it is quarantined, the job succeeds.
    let up2 = client
        .upload("bella", &fixture_files(&[rows[18].0.clone()]), None)
        .await;
    let job = up2["job_id"].as_str().unwrap();
    assert_eq!(client.wait_job(job).await, "succeeded");
    let c: serde_json::Value = client
        .http
        .get(format!("{}/v1/pets/bella/clusters", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["unprocessable"][0]["image_id"], gone.as_str(), "{c}");
    assert!(
        c["unprocessable"][0]["error"]
            .as_str()
            .unwrap()
            .contains("missing"),
        "{c}"
    );
    let members: usize = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["size"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(members, 2, "the pet's other photos cluster");
    // The first job lists it as unprocessable too (it was one of its photos).
    let j: serde_json::Value = client
        .http
        .get(format!(
            "{}/v1/jobs/{}",
            client.base,
            up["job_id"].as_str().unwrap()
        ))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["unprocessable"][0]["image_id"], gone.as_str(), "{j}");
    // Later jobs go on.
    let up3 = client
        .upload("bella", &fixture_files(&[rows[27].0.clone()]), None)
        .await;
    assert_eq!(
        client.wait_job(up3["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    db.close().await;
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn made_up_methods_get_405_and_add_no_series() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("media_cluster_http_requests_total{"))
            .count()
    };
    let before = series(&client.scrape("dev-internal-token").await);
    for i in 0..300 {
        let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        let r = client
            .http
            .request(method, format!("{}/healthz", serve.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405);
        let b: serde_json::Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "method_not_allowed");
    }
    let after = series(&client.scrape("dev-internal-token").await);
    assert!(after <= before + 2, "{before} series before, {after} after");
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn multipart_framing_counts_and_a_trickling_upload_is_cut_off() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__SERVER__UPLOAD_TIMEOUT_MS", "3000"),
        ("MEDIA_CLUSTERING__SERVER__REQUEST_TIMEOUT_MS", "1000"),
    ])
    .await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let addr = serve.base.trim_start_matches("http://").to_owned();
    let pid = serve.child.id();
    let baseline = rss_mib(pid);
    // A 200 MiB "preamble": refused after a few KiB and never buffered. (What the client
    // sends after the answer is discarded while the connection closes, for at most
    // `server.disconnect_timeout_ms`.)
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/pets/framed/images HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\n\r\n",
        client.token,
        200u64 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let junk = vec![b'p'; 64 * 1024];
    let mut sent = 0u64;
    while sent < 200 << 20 {
        if s.write_all(&junk).await.is_err() {
            break; // the server closed the connection
        }
        sent += junk.len() as u64;
    }
    let grown = rss_mib(pid) - baseline;
    assert!(grown < 32.0, "grew by {grown:.0} MiB");
    let mut answer = vec![0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut answer)
        .await
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("16384 bytes"),
        "{text}"
    );
    // A body that trickles a byte a second never completes: 408 at the upload deadline.
    let mut t = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/pets/framed/images HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n",
        client.token
    );
    t.write_all(head.as_bytes()).await.unwrap();
    let trickle = async {
        for _ in 0..20 {
            if t.write_all(b"\xFF").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(12), trickle).await;
    let mut answer = vec![0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut t, &mut answer)
        .await
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // Nothing stored, and still serving.
    let up = client
        .upload("framed", &fixture_files(&[labels()[2].0.clone()]), None)
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    assert_eq!(objects(env.dir.path()), 1);
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_same_photos_in_opposite_orders_never_deadlock_or_leave_objects() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &serve.base);
    let rows = labels();
    for round in 0..30 {
        let pet = format!("race-{round}");
        let files = fixture_files(&[
            rows[round % 40].0.clone(),
            rows[round % 40 + 1].0.clone(),
            rows[round % 40 + 2].0.clone(),
        ]);
        let mut reversed = files.clone();
        reversed.reverse();
        let (a, b) = futures::join!(
            client.try_upload(&pet, &files, None),
            client.try_upload(&pet, &reversed, None)
        );
        assert_eq!((a.0, b.0), (202, 202), "round {round}: {} / {}", a.1, b.1);
        // One image id per photo, whichever upload inserted it.
        let ids = |v: &serde_json::Value| {
            let mut i: Vec<String> = v["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["image_id"].as_str().unwrap().to_owned())
                .collect();
            i.sort();
            i
        };
        assert_eq!(ids(&a.1), ids(&b.1));
    }
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    let rows_n = count(&db, "SELECT count(*) FROM images").await as usize;
    assert_eq!(rows_n, 90);
    // The losing upload's objects are removed at once (in the background): objects follow rows.
    eventually(10, "objects and rows to agree", async || {
        (objects(env.dir.path()) == rows_n).then_some(())
    })
    .await;
    db.close().await;
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_readiness_flood_is_cheap_and_limited_per_peer() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let flood = (0..400).map(|_| {
        let c = &client;
        async move {
            c.http
                .get(format!("{}/readyz", c.base))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    let statuses = futures::future::join_all(flood).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, statuses.len(), "{statuses:?}");
    assert!(ok >= 50 && limited > 0, "{ok} ready, {limited} limited");
    // The API goes on meanwhile.
    let up = client
        .upload("flooded", &fixture_files(&[labels()[3].0.clone()]), None)
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn development_settings_refuse_to_listen_beyond_loopback() {
    let env = ProcEnv::new(&[]).await;
    let out = env
        .command("serve", &[("MEDIA_CLUSTERING__SERVER__BIND", "0.0.0.0:0")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.bind") && err.contains("loopback"),
        "{err}"
    );
    env.cleanup().await;
}
