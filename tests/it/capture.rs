//! EXIF capture time: read at upload, stored with the photo, and a photo without one or with a
//! broken one is accepted just the same.

use crate::helpers::*;
use actors::algo::capture::{DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL, with_exif};

#[actix_rt::test]
async fn the_capture_time_is_stored_at_upload_and_a_missing_or_bad_one_is_null() {
    let app = spawn_app().await;
    let jpgs: Vec<String> = labels()
        .into_iter()
        .map(|r| r.0)
        .filter(|f| f.ends_with(".jpg"))
        .take(3)
        .collect();
    assert_eq!(jpgs.len(), 3, "three JPEG fixtures");
    let files = fixture_files(&jpgs);
    let dated = with_exif(
        &files[0].1,
        &[
            (DATE_TIME_ORIGINAL, "2024:06:01 12:30:05"),
            (OFFSET_TIME_ORIGINAL, "+02:00"),
        ],
    );
    let broken = with_exif(&files[1].1, &[(DATE_TIME_ORIGINAL, "2024:13:45 99:99:99")]);
    let upload = vec![
        ("dated.jpg".to_owned(), dated),
        ("broken.jpg".to_owned(), broken),
        ("plain.jpg".to_owned(), files[2].1.clone()),
    ];
    let r = app.upload("exif-pet", &upload).await;
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    let job = app.wait_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let id =
        |i: usize| uuid::Uuid::parse_str(body["images"][i]["image_id"].as_str().unwrap()).unwrap();
    let taken = |i: usize| {
        let db = app.db.clone();
        let image = id(i);
        async move {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT captured_at FROM images WHERE id = $1",
            )
            .bind(image)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        taken(0).await.map(|t| t.to_rfc3339()),
        Some("2024-06-01T10:30:05+00:00".to_owned())
    );
    assert_eq!(taken(1).await, None);
    assert_eq!(taken(2).await, None);
    app.cleanup().await;
}
