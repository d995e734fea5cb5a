//! When a photo was taken: EXIF `DateTimeOriginal`, with `SubSecTimeOriginal` and
//! `OffsetTimeOriginal` when present, read at upload by kamadak-exif (JPEG, PNG, WebP, TIFF).
//!
//! The result is Unix milliseconds: of the instant when the photo carries its offset, and of
//! the camera's local wall-clock time read as UTC when it does not (most cameras). Photos of
//! one pet are compared with each other, for which the wall clock is what counts: a burst is
//! seconds apart either way, and a few hours of unknown offset do not matter to "days apart".
//!
//! kamadak-exif reads chunk payloads only as far as the data goes (a huge length in a small
//! file allocates nothing), and the upload's size is already within its budget. A file whose
//! EXIF is missing, blank, malformed or out of range (before 1970, after 2200, 30 February)
//! simply has no capture time; this never fails an upload.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use exif::{DateTime, In, Tag, Value};

/// The capture time of `bytes` in Unix milliseconds, if the file states a valid one.
pub fn capture_time_ms(bytes: &[u8]) -> Option<i64> {
    // A parser bug on a hostile file must stay that file's problem.
    catch_unwind(AssertUnwindSafe(|| read(bytes)))
        .ok()
        .flatten()
}

fn ascii(exif: &exif::Exif, tag: Tag) -> Option<Vec<u8>> {
    match &exif.get_field(tag, In::PRIMARY)?.value {
        Value::Ascii(parts) => parts.first().cloned(),
        _ => None,
    }
}

fn read(bytes: &[u8]) -> Option<i64> {
    let exif = exif::Reader::new()
        .read_from_container(&mut Cursor::new(bytes))
        .ok()?;
    let mut t = DateTime::from_ascii(&ascii(&exif, Tag::DateTimeOriginal)?).ok()?;
    if let Some(sub) = ascii(&exif, Tag::SubSecTimeOriginal) {
        // A malformed fraction leaves the whole seconds.
        let _ = t.parse_subsec(&sub);
    }
    if let Some(offset) = ascii(&exif, Tag::OffsetTimeOriginal) {
        let _ = t.parse_offset(&offset);
    }
    to_unix_ms(&t)
}

/// The EXIF date as Unix milliseconds; `None` for an impossible or implausible date.
pub fn to_unix_ms(t: &DateTime) -> Option<i64> {
    if !(1970..=2200).contains(&t.year) {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(t.year.into(), t.month.into(), t.day.into())?;
    let time = chrono::NaiveTime::from_hms_opt(t.hour.into(), t.minute.into(), t.second.into())?;
    let local = date.and_time(time).and_utc().timestamp_millis();
    let fraction = i64::from(t.nanosecond.unwrap_or(0) / 1_000_000);
    let offset = t
        .offset
        .filter(|m| m.abs() <= 18 * 60)
        .map_or(0, |m| i64::from(m) * 60_000);
    Some(local + fraction - offset)
}

/// Test and tool support: a minimal big-endian TIFF (EXIF) block: IFD0 pointing at an EXIF IFD holding the
/// given ASCII fields (tag, text).
fn tiff(fields: &[(u16, &str)]) -> Vec<u8> {
    let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
    // IFD0 at 8: one entry, ExifIFDPointer (0x8769, LONG) -> 26.
    t.extend_from_slice(&1u16.to_be_bytes());
    t.extend_from_slice(&0x8769u16.to_be_bytes());
    t.extend_from_slice(&4u16.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&26u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(t.len(), 26);
    let n = fields.len();
    let data_start = 26 + 2 + 12 * n + 4;
    let mut data = Vec::new();
    t.extend_from_slice(&(n as u16).to_be_bytes());
    for (tag, text) in fields {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        t.extend_from_slice(&tag.to_be_bytes());
        t.extend_from_slice(&2u16.to_be_bytes()); // ASCII
        t.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        if bytes.len() <= 4 {
            bytes.resize(4, 0);
            t.extend_from_slice(&bytes);
        } else {
            t.extend_from_slice(&((data_start + data.len()) as u32).to_be_bytes());
            data.extend_from_slice(&bytes);
        }
    }
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&data);
    t
}

/// Test and tool support: `jpeg` with an APP1 EXIF segment of ASCII `fields` (tag, text) in the
/// EXIF IFD, inserted after its SOI, e.g. `(`[`DATE_TIME_ORIGINAL`]`, "2024:06:01 12:30:05")`.
pub fn with_exif(jpeg: &[u8], fields: &[(u16, &str)]) -> Vec<u8> {
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff(fields));
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// EXIF tag numbers of the capture time.
pub const DATE_TIME_ORIGINAL: u16 = 0x9003;
pub const OFFSET_TIME_ORIGINAL: u16 = 0x9011;
pub const SUB_SEC_TIME_ORIGINAL: u16 = 0x9291;

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([90, 120, 200]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    }

    #[test]
    fn the_original_time_with_sub_seconds_and_offset_is_read() {
        let f = with_exif(
            &jpeg(),
            &[
                (DATE_TIME_ORIGINAL, "2024:06:01 12:30:05"),
                (OFFSET_TIME_ORIGINAL, "+02:00"),
                (SUB_SEC_TIME_ORIGINAL, "25"),
            ],
        );
        // 2024-06-01T10:30:05.250Z
        assert_eq!(capture_time_ms(&f), Some(1_717_237_805_250));
        // The file still decodes as the image it was.
        assert!(image::load_from_memory(&f).is_ok());
    }

    #[test]
    fn without_an_offset_the_wall_clock_time_is_read_as_utc() {
        let f = with_exif(&jpeg(), &[(DATE_TIME_ORIGINAL, "2024:06:01 12:30:05")]);
        assert_eq!(capture_time_ms(&f), Some(1_717_245_005_000));
    }

    #[test]
    fn missing_blank_malformed_and_impossible_times_are_none() {
        assert_eq!(capture_time_ms(&jpeg()), None, "no EXIF");
        assert_eq!(capture_time_ms(b"not an image at all"), None);
        assert_eq!(capture_time_ms(&[]), None);
        for bad in [
            "    :  :     :  :  ",
            "0000:00:00 00:00:00",
            "2024:02:30 12:00:00",
            "2024:06:01 25:00:00",
            "1850:01:01 00:00:00",
            "2024-06-01 12:30:05",
            "yesterday",
        ] {
            let f = with_exif(&jpeg(), &[(DATE_TIME_ORIGINAL, bad)]);
            assert_eq!(capture_time_ms(&f), None, "{bad}");
        }
        // A bad fraction or offset keeps the whole seconds of local time.
        let f = with_exif(
            &jpeg(),
            &[
                (DATE_TIME_ORIGINAL, "2024:06:01 12:30:05"),
                (SUB_SEC_TIME_ORIGINAL, "x1"),
                (OFFSET_TIME_ORIGINAL, "??"),
            ],
        );
        assert_eq!(capture_time_ms(&f), Some(1_717_245_005_000));
    }

    #[test]
    fn truncated_or_corrupt_exif_is_none_and_never_panics() {
        let good = with_exif(&jpeg(), &[(DATE_TIME_ORIGINAL, "2024:06:01 12:30:05")]);
        for cut in [4, 8, 12, 20, 30, 40, 60] {
            let mut f = good.clone();
            f.truncate(cut);
            assert_eq!(capture_time_ms(&f), None, "cut at {cut}");
        }
        // Every byte of the EXIF block flipped in turn.
        for i in 6..60 {
            let mut f = good.clone();
            f[i] ^= 0xFF;
            let _ = capture_time_ms(&f);
        }
    }
}
