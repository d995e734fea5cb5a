//! The upload input rules: every rejected upload answers its status and the JSON
//! error, and leaves no row, no object and no stream entry.

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};
use media_clustering::startup::Mode;

use crate::helpers::*;

fn encode(img: DynamicImage, f: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

fn rgb(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 3) as u8, (y * 5) as u8, 77])
    }))
}

fn png_chunk(t: &[u8], d: &[u8]) -> Vec<u8> {
    let mut c = (d.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(t);
    c.extend_from_slice(d);
    let mut crc = 0xFFFF_FFFFu32;
    for &b in t.iter().chain(d) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    c.extend_from_slice(&(!crc).to_be_bytes());
    c
}

/// A PNG header declaring 100000 x 100000 pixels, with almost no data behind it.
fn png_bomb() -> Vec<u8> {
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", b""));
    png
}

/// A valid 1x1 GIF.
const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

#[actix_rt::test]
async fn rejected_uploads_answer_their_status_and_leave_nothing_behind() {
    // A small limit keeps the over-limit body cheap; the rule is the same at 25 MiB.
    let app = spawn_app_with(
        Mode::Api,
        &[("MEDIA_CLUSTERING__SERVER__MAX_UPLOAD_BYTES", "1048576")],
    )
    .await;
    let jpeg = encode(rgb(320, 240), ImageFormat::Jpeg);
    let mut huge = jpeg.clone();
    huge.resize(3 * 1024 * 1024, 0);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("empty.jpg", vec![], 400, "empty_file"),
        (
            "truncated.jpg",
            jpeg[..jpeg.len() / 3].to_vec(),
            422,
            "unprocessable_image",
        ),
        (
            "text.jpg",
            b"hello, this is not an image\n".repeat(20),
            415,
            "unsupported_media_type",
        ),
        (
            "html.png",
            b"<html><script>alert(1)</script></html>".to_vec(),
            415,
            "unsupported_media_type",
        ),
        ("bomb.png", png_bomb(), 422, "unprocessable_image"),
        ("anim.gif", GIF.to_vec(), 415, "unsupported_media_type"),
        (
            "x.svg",
            br#"<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        ("huge.jpg", huge, 413, "payload_too_large"),
    ];
    for (name, bytes, status, code) in cases {
        let r = app.upload("hostile-pet", &[(name.to_owned(), bytes)]).await;
        assert_eq!(r.status().as_u16(), status, "{name}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
    }
    // One bad file among good ones rejects the whole request.
    let r = app
        .upload(
            "hostile-pet",
            &[
                ("ok.jpg".into(), jpeg.clone()),
                ("bad.png".into(), png_bomb()),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 422);

    assert_eq!(app.count("SELECT count(*) FROM images").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM jobs").await, 0);
    assert_eq!(app.stored_objects(), 0);
    assert_eq!(app.xlen(&app.settings.redis.stream).await, 0);
    app.cleanup().await;
}

#[actix_rt::test]
async fn bad_pet_id_is_400_and_unknown_routes_are_json_404() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    let png = encode(rgb(8, 8), ImageFormat::Png);
    for pet in ["has.dot", "x%20y", &"a".repeat(65)] {
        let r = app.upload(pet, &[("a.png".into(), png.clone())]).await;
        assert_eq!(r.status().as_u16(), 400, "{pet}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_pet_id");
    }
    let (s, body) = app.get_json("/v1/nothing-here").await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (s, _) = app.get_json("/v1/jobs/not-a-uuid").await;
    assert_eq!(s, 400);
    let (s, _) = app
        .get_json(&format!("/v1/jobs/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(s, 404);
    let (s, _) = app.get_json("/v1/pets/nobody/clusters").await;
    assert_eq!(s, 404);
    assert_eq!(app.post_recluster("nobody").await.status().as_u16(), 404);
    assert_eq!(app.xlen(&app.settings.redis.stream).await, 0);
    app.cleanup().await;
}

#[actix_rt::test]
async fn unusual_valid_photos_and_raw_bodies_are_accepted() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    let gray = encode(
        DynamicImage::ImageLuma8(ImageBuffer::from_pixel(30, 20, Luma([128]))),
        ImageFormat::Png,
    );
    let alpha = encode(
        DynamicImage::ImageRgba8(ImageBuffer::from_pixel(30, 20, Rgba([10, 200, 30, 100]))),
        ImageFormat::Png,
    );
    let deep = encode(
        DynamicImage::ImageRgb16(ImageBuffer::from_pixel(30, 20, Rgb([1000, 30000, 65000]))),
        ImageFormat::Png,
    );
    let webp = encode(rgb(30, 20), ImageFormat::WebP);
    let tiny = encode(rgb(1, 1), ImageFormat::Png);
    let files: Vec<(String, Vec<u8>)> = [
        ("gray.png", gray),
        ("alpha.png", alpha),
        ("deep.png", deep),
        ("x.webp", webp),
        ("tiny.png", tiny),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_owned(), b))
    .collect();
    let r = app.upload("unusual", &files).await;
    assert_eq!(r.status().as_u16(), 202);
    let location = r
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/jobs/{}", body["job_id"].as_str().unwrap())
    );
    assert_eq!(body["images"].as_array().unwrap().len(), 5);

    // A raw body, and the same bytes again: same image id, marked duplicate.
    let jpeg = encode(rgb(64, 48), ImageFormat::Jpeg);
    let mut ids = Vec::new();
    for expect_dup in [false, true] {
        let r = app
            .http
            .post(format!("{}/v1/pets/unusual/images", app.base))
            .bearer_auth(&app.token)
            .header("content-type", "image/jpeg")
            .body(jpeg.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let b: serde_json::Value = r.json().await.unwrap();
        assert_eq!(b["images"][0]["duplicate"], expect_dup);
        ids.push(b["images"][0]["image_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(app.count("SELECT count(*) FROM images").await, 6);
    assert_eq!(app.stored_objects(), 6);
    assert_eq!(app.xlen(&app.settings.redis.stream).await, 3);

    // The original bytes come back with their content type.
    let r = app.get(&format!("/v1/images/{}", ids[0])).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers().get("content-type").unwrap(), "image/jpeg");
    assert_eq!(r.bytes().await.unwrap().as_ref(), jpeg.as_slice());

    // The stream entry carries every field of the contract.
    let entries = app.entries(&app.settings.redis.stream).await;
    let first = &entries.ids[0].map;
    for f in [
        "schema",
        "job_id",
        "pet_id",
        "kind",
        "image_ids",
        "enqueued_at",
        "attempt",
    ] {
        assert!(first.contains_key(f), "entry lacks {f}");
    }
    app.cleanup().await;
}

#[actix_rt::test]
async fn every_enqueued_upload_records_its_stream_entry_on_its_job() {
    // Uploads record their stream ids in batches off the request path; concurrent ones too.
    let app = spawn_app_with(Mode::Api, &[]).await;
    let uploads = (0..12u32).map(|i| {
        let photo = encode(rgb(40 + i, 30), ImageFormat::Png);
        let app = &app;
        async move {
            let r = app.upload("recorded", &[(format!("{i}.png"), photo)]).await;
            assert_eq!(r.status().as_u16(), 202);
            let b: serde_json::Value = r.json().await.unwrap();
            b["job_id"].as_str().unwrap().to_owned()
        }
    });
    let jobs = futures::future::join_all(uploads).await;
    let recorded: Vec<(uuid::Uuid, String)> =
        crate::process::eventually(30, "every job's stream id", async || {
            let rows: Vec<(uuid::Uuid, Option<String>)> =
                sqlx::query_as("SELECT id, stream_id FROM jobs WHERE pet_id = 'recorded'")
                    .fetch_all(&app.db)
                    .await
                    .unwrap();
            rows.into_iter()
                .map(|(id, sid)| Some((id, sid?)))
                .collect::<Option<Vec<_>>>()
        })
        .await;
    assert_eq!(recorded.len(), jobs.len());
    let entries = app.entries(&app.settings.redis.stream).await;
    let on_stream: std::collections::HashMap<String, String> = entries
        .ids
        .iter()
        .map(|e| (e.get::<String>("job_id").unwrap(), e.id.clone()))
        .collect();
    for (job, stream_id) in &recorded {
        assert!(
            jobs.contains(&job.to_string()),
            "job {job} was not answered"
        );
        assert_eq!(
            on_stream.get(&job.to_string()),
            Some(stream_id),
            "job {job}'s stream id"
        );
    }
    app.cleanup().await;
}

/// An upload's rows for the commit functions; photos are named by a letter, their sha256
/// that letter 64 times.
fn upload_rows(
    claimant: Option<&str>,
    pet: &str,
    new: Vec<media_clustering::adapters::postgres::NewImage>,
    known: &[(&str, uuid::Uuid)],
    photos: &[&str],
) -> media_clustering::adapters::postgres::UploadRows {
    media_clustering::adapters::postgres::UploadRows {
        claimant: claimant.map(str::to_owned),
        pet_id: pet.into(),
        new,
        known: known.iter().map(|(s, id)| (s.repeat(64), *id)).collect(),
        photos: photos.iter().map(|s| s.repeat(64)).collect(),
        job_id: uuid::Uuid::now_v7(),
        trace_id: None,
    }
}

#[actix_rt::test]
async fn uploads_committed_together_claim_insert_and_refuse_each_on_its_own() {
    use media_clustering::adapters::postgres::{NewImage, NotOwner, commit_uploads};
    let app = spawn_app_with(Mode::Api, &[]).await;
    let row = |sha: &str| {
        let id = uuid::Uuid::now_v7();
        NewImage {
            id,
            sha256: sha.repeat(64),
            content_type: "image/png",
            byte_size: 10,
            width: 4,
            height: 3,
            storage_key: format!("images/{id}"),
            captured_at_ms: None,
        }
    };
    let upload = |claimant, pet, new, photos| upload_rows(claimant, pet, new, &[], photos);
    let (a1, a2, b1, shared_a, shared_b) = (row("a"), row("b"), row("c"), row("d"), row("d"));
    let (a1_id, a2_id, shared_a_id) = (a1.id, a2.id, shared_a.id);
    let batch = vec![
        // alice takes the new pet `p1`; bob, later in the same batch, is refused.
        upload(Some("alice"), "p1", vec![a1, a2], &["a", "b", "a"]),
        upload(Some("bob"), "p1", vec![b1], &["c"]),
        // Two uploads of the same new photo of `p2`: the first inserts it.
        upload(Some("alice"), "p2", vec![shared_a], &["d"]),
        upload(Some("alice"), "p2", vec![shared_b], &["d"]),
        // An admin writes to an unowned pet without claiming it.
        upload(None, "p3", vec![row("e")], &["e"]),
    ];
    let out = commit_uploads(&app.db, &batch).await.unwrap();
    assert_eq!(
        out[0],
        Ok(vec![(a1_id, true), (a2_id, true), (a1_id, true)]),
        "photos in the request's order"
    );
    assert_eq!(out[1], Err(NotOwner));
    assert_eq!(out[2], Ok(vec![(shared_a_id, true)]));
    assert_eq!(out[3], Ok(vec![(shared_a_id, false)]));
    assert!(matches!(&out[4], Ok(v) if v[0].1));
    let owners: Vec<(String, String)> =
        sqlx::query_as("SELECT pet_id, owner FROM pet_owners ORDER BY pet_id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        owners,
        vec![("p1".into(), "alice".into()), ("p2".into(), "alice".into())]
    );
    // Every admitted upload has its job, with its photos in order; the refused one has none.
    for (i, u) in batch.iter().enumerate() {
        let ids: Option<Vec<uuid::Uuid>> =
            sqlx::query_scalar("SELECT image_ids FROM jobs WHERE id = $1")
                .bind(u.job_id)
                .fetch_optional(&app.db)
                .await
                .unwrap();
        let expected = out[i]
            .as_ref()
            .ok()
            .map(|v| v.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        assert_eq!(ids, expected, "upload {i}'s job");
    }
    assert_eq!(app.count("SELECT count(*) FROM images").await, 4);
    assert_eq!(
        app.count("SELECT count(*) FROM images WHERE sha256 = repeat('c', 64)")
            .await,
        0
    );
    app.cleanup().await;
}

#[actix_rt::test]
async fn an_upload_the_database_refuses_fails_alone_in_its_batch() {
    use media_clustering::adapters::postgres::{CommitError, commit_batch};
    let app = spawn_app_with(Mode::Api, &[]).await;
    let known = [("f", uuid::Uuid::now_v7())];
    let upload = |claimant, pet| upload_rows(Some(claimant), pet, vec![], &known, &["f"]);
    // Postgres refuses a NUL in text: the batch's transaction fails on the second upload.
    let batch = vec![
        upload("alice", "first"),
        upload("bad\0owner", "second"),
        upload("carol", "third"),
    ];
    let out = commit_batch(&app.db, &batch).await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert!(
        matches!(out[1], Err(CommitError::Database(_))),
        "{:?}",
        out[1]
    );
    assert!(out[2].is_ok(), "{:?}", out[2]);
    assert_eq!(app.count("SELECT count(*) FROM jobs").await, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM pet_owners WHERE pet_id IN ('first', 'third')")
            .await,
        2
    );
    app.cleanup().await;
}

#[actix_rt::test]
async fn a_60_mb_upload_against_the_default_limit_is_413_and_the_server_carries_on() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    assert_eq!(app.settings.server.max_upload_bytes, 25 * 1024 * 1024);
    // A JPEG header followed by 60 MB: only the count, never the bytes, grows past the limit.
    let mut big = encode(rgb(32, 32), ImageFormat::Jpeg);
    big.resize(60_000_000, 0xAB);
    let raw = app
        .http
        .post(format!("{}/v1/pets/big/images", app.base))
        .bearer_auth(&app.token)
        .header("content-type", "image/jpeg")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 413);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // The same as a multipart form.
    let r = app.upload("big", &[("big.jpg".into(), big)]).await;
    assert_eq!(r.status().as_u16(), 413);
    // The next normal upload is served.
    let r = app
        .upload(
            "big",
            &[("ok.png".into(), encode(rgb(16, 16), ImageFormat::Png))],
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(app.count("SELECT count(*) FROM images").await, 1);
    assert_eq!(app.stored_objects(), 1);
    app.cleanup().await;
}

#[actix_rt::test]
async fn wrong_methods_are_405_with_allow_and_the_json_error() {
    let app = spawn_app_with(Mode::Api, &[]).await;
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/v1/pets/rex/images", "POST"),
        (reqwest::Method::GET, "/v1/pets/rex/recluster", "POST"),
        (reqwest::Method::DELETE, "/v1/jobs/0", "GET"),
        (reqwest::Method::POST, "/v1/pets/rex/clusters", "GET"),
        (reqwest::Method::PATCH, "/v1/images/0", "GET"),
        (reqwest::Method::POST, "/healthz", "GET"),
        (reqwest::Method::DELETE, "/openapi.json", "GET"),
    ] {
        let r = app
            .http
            .request(method.clone(), format!("{}{path}", app.base))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {path}"
        );
    }
    app.cleanup().await;
}

#[actix_rt::test]
async fn slow_clients_are_cut_off_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_with(
        Mode::Api,
        &[("MEDIA_CLUSTERING__SERVER__REQUEST_TIMEOUT_MS", "500")],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Reads until the connection closes or a whole answer (head and body) has arrived.
    let read_all = |mut s: tokio::net::TcpStream| async move {
        let mut out = Vec::new();
        let complete = |out: &[u8]| {
            let text = String::from_utf8_lossy(out);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            body.len() >= len
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if complete(&out) {
                    break;
                }
            }
        })
        .await;
        String::from_utf8_lossy(&out).into_owned()
    };

    // A body that starts and then stalls.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut head = format!(
        "POST /v1/pets/slow/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n",
        app.token
    )
    .into_bytes();
    head.extend_from_slice(&[0xFF, 0xD8, 0xFF]);
    s.write_all(&head).await.unwrap();
    let answer = read_all(s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A request head that never ends.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let answer = read_all(s).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    assert_eq!(app.count("SELECT count(*) FROM images").await, 0);
    app.cleanup().await;
}

#[actix_rt::test]
async fn a_recluster_while_the_pets_last_one_is_queued_joins_it() {
    // No worker runs here, so a recluster stays queued until the test starts it by hand.
    let app = spawn_app_with(Mode::Api, &[]).await;
    let photo = encode(rgb(64, 48), ImageFormat::Png);
    assert_eq!(
        app.upload("joined", &[("a.png".into(), photo)])
            .await
            .status()
            .as_u16(),
        202
    );
    let post = || async {
        let r = app.post_recluster("joined").await;
        assert_eq!(r.status().as_u16(), 202);
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let job: serde_json::Value = r.json().await.unwrap();
        let job = job["job_id"].as_str().unwrap().to_owned();
        assert_eq!(location, format!("/v1/jobs/{job}"));
        job
    };
    let stream = app.settings.redis.stream.clone();
    let first = post().await;
    let entries = app.xlen(&stream).await;
    assert_eq!(
        post().await,
        first,
        "a second recluster while one is queued"
    );
    assert_eq!(
        app.xlen(&stream).await,
        entries,
        "the joined request enqueued again"
    );
    let recluster_jobs = "SELECT count(*) FROM jobs WHERE pet_id = 'joined' AND kind = 'recluster'";
    assert_eq!(app.count(recluster_jobs).await, 1);

    // Once a worker has started it, a new request is a new run (photos may have changed).
    sqlx::query("UPDATE jobs SET status = 'running', started_at = now() WHERE id = $1::uuid")
        .bind(&first)
        .execute(&app.db)
        .await
        .unwrap();
    let second = post().await;
    assert_ne!(second, first);
    assert_eq!(app.xlen(&stream).await, entries + 1);
    assert_eq!(app.count(recluster_jobs).await, 2);
    app.cleanup().await;
}
