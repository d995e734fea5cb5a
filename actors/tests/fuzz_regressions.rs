//! Hostile inputs for the two parsers that see untrusted bytes: uploads through
//! `decode::probe`/`decode::decode`, and Redis stream entries through `JobEntry::parse`.
//!
//! Every input must come back as `Ok` or `Err`, never a panic; an upload that decodes
//! stays within the pixel limit and has the probed dimensions. The inputs are the files
//! saved under `tests/fuzz-regressions/<target>/` (minimised findings of the fuzz targets
//! in `fuzz/`, see `scripts/fuzz.sh`) plus the hand-written cases below.
//!
//! A saved input that needs more than "no panic" (a memory bound) is listed in
//! `KNOWN_FAILING` and checked by the test named there. One that still fails until its
//! fix lands goes there too, with `#[ignore = "reason"]` on that test until it is fixed.

use std::collections::HashMap;
use std::io::Cursor;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use actors::algo::decode::{self, DecodeError, ImageInfo};
use actors::job::{JobEntry, valid_pet_id};
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, Rgb};

/// The fuzz target's limit (fuzz/fuzz_targets/upload_image.rs).
const MAX_PIXELS: u64 = 4_000_000;

/// Saved inputs that exhausted memory before their fix in decode.rs, each checked in a child
/// process by the test named here: (target, file name, test that covers it).
const KNOWN_FAILING: &[(&str, &str, &str)] = &[
    (
        "upload_image",
        "oom-webp-exif-chunk-4gib",
        "webp_exif_chunk_declaring_4_gib_is_not_allocated",
    ),
    (
        "upload_image",
        "oom-webp-exif-chunk-fuzzer-found",
        "webp_exif_chunk_declaring_4_gib_is_not_allocated",
    ),
];

// ---------------------------------------------------------------------------
// Checks shared by saved and hand-written inputs.

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

type Outcome = (
    Result<ImageInfo, DecodeError>,
    Result<(u32, u32), DecodeError>,
);

/// Probes and decodes `bytes` (fully, and at reduced scale); `Err` describes a panic or a
/// broken invariant.
fn run_upload(bytes: &[u8]) -> Result<Outcome, String> {
    let (probed, decoded, reduced) = panic::catch_unwind(AssertUnwindSafe(|| {
        let probed = decode::probe(bytes, MAX_PIXELS);
        let decoded = decode::decode(bytes, MAX_PIXELS).map(|img| (img.width(), img.height()));
        // As the API checks uploads (1/8) and as the embedder decodes (a larger scale).
        let reduced =
            [1, 300].map(|min_short| decode::decode_reduced(bytes, MAX_PIXELS, min_short));
        (probed, decoded, reduced)
    }))
    .map_err(|p| format!("panicked: {}", panic_message(p.as_ref())))?;

    for r in &reduced {
        match (&probed, r) {
            (Ok(info), Ok(d)) => {
                let original = (d.width, d.height);
                if original != (info.width, info.height) && original != (info.height, info.width) {
                    return Err(format!(
                        "reduced decode reports {original:?}, probed {info:?}"
                    ));
                }
                if d.image.width() > d.width || d.image.height() > d.height {
                    return Err(format!("reduced decode is larger than {original:?}"));
                }
            }
            (Err(p), Ok(_)) => {
                return Err(format!(
                    "reduced decode succeeded although probe said {p:?}"
                ));
            }
            (Err(p), Err(e)) if p != e => {
                return Err(format!(
                    "probe failed with {p:?} but decode_reduced with {e:?}"
                ));
            }
            (Ok(info), Err(e)) if !matches!(e, DecodeError::Undecodable(_)) => {
                return Err(format!(
                    "probe accepted {info:?} but decode_reduced failed with {e:?}"
                ));
            }
            _ => {}
        }
    }

    if let Ok(info) = &probed {
        if decode::sniff(bytes) != Some(info.format) {
            return Err(format!("probe says {info:?}, sniff disagrees"));
        }
        if info.width == 0 || info.height == 0 {
            return Err(format!("probe accepted a zero-sized image: {info:?}"));
        }
        if u64::from(info.width) * u64::from(info.height) > MAX_PIXELS {
            return Err(format!("probe accepted {info:?} over the limit"));
        }
    }
    match (&probed, &decoded) {
        (Ok(info), Ok((w, h))) => {
            let probed_dims = (info.width, info.height);
            if (*w, *h) != probed_dims && (*h, *w) != probed_dims {
                return Err(format!("decoded {w}x{h}, probed {info:?}"));
            }
            if u64::from(*w) * u64::from(*h) > MAX_PIXELS {
                return Err(format!("decoded {w}x{h}, over the limit"));
            }
        }
        (Err(p), Ok((w, h))) => return Err(format!("decoded {w}x{h} although probe said {p:?}")),
        (Err(p), Err(d)) if p != d => {
            return Err(format!("probe failed with {p:?} but decode with {d:?}"));
        }
        (Ok(info), Err(d)) if !matches!(d, DecodeError::Undecodable(_)) => {
            return Err(format!(
                "probe accepted {info:?} but decode failed with {d:?}"
            ));
        }
        _ => {}
    }
    Ok((probed, decoded))
}

#[track_caller]
fn upload(name: &str, bytes: &[u8]) -> Outcome {
    run_upload(bytes).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Splits a stream_entry input as the fuzz target does (fuzz/fuzz_targets/stream_entry.rs):
/// `key NUL value NUL key NUL value ...`, lossy UTF-8, later keys win.
fn fields_of(data: &[u8]) -> HashMap<String, String> {
    let mut parts = data
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut fields = HashMap::new();
    while let Some(k) = parts.next() {
        fields.insert(k, parts.next().unwrap_or_default());
    }
    fields
}

fn written(entry: &JobEntry) -> HashMap<String, String> {
    entry
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Parses `fields`; `Err` describes a panic or a failed round trip.
fn run_entry(fields: &HashMap<String, String>) -> Result<Option<JobEntry>, String> {
    panic::catch_unwind(AssertUnwindSafe(|| {
        let Ok(entry) = JobEntry::parse(fields) else {
            return Ok(None);
        };
        if !valid_pet_id(&entry.pet_id) || entry.attempt == 0 {
            return Err(format!("accepted an invalid entry: {entry:?}"));
        }
        match JobEntry::parse(&written(&entry)) {
            Ok(again) if again == entry => Ok(Some(entry)),
            other => Err(format!("round trip of {entry:?} gave {other:?}")),
        }
    }))
    .map_err(|p| format!("panicked: {}", panic_message(p.as_ref())))?
}

#[track_caller]
fn entry(name: &str, fields: &HashMap<String, String>) -> Option<JobEntry> {
    run_entry(fields).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---------------------------------------------------------------------------
// Saved inputs.

/// The files saved for `target`, with their names; a missing directory has none.
fn saved(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(target);
    let Ok(read) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = read
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with('.') && !name.ends_with(".md")
        })
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

fn known_failing(target: &str, name: &str) -> bool {
    KNOWN_FAILING
        .iter()
        .any(|(t, n, _)| *t == target && *n == name)
}

/// Runs every saved input of `target` except the known failures; reports all failures at once.
fn check_saved(target: &str, check: impl Fn(&[u8]) -> Result<(), String>) {
    let failures: Vec<String> = saved(target)
        .into_iter()
        .filter(|(name, _)| !known_failing(target, name))
        .filter_map(|(name, bytes)| check(&bytes).err().map(|e| format!("{target}/{name}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn saved_upload_image_inputs() {
    check_saved("upload_image", |b| run_upload(b).map(drop));
}

#[test]
fn saved_stream_entry_inputs() {
    check_saved("stream_entry", |b| run_entry(&fields_of(b)).map(drop));
}

#[test]
fn known_failing_entries_name_saved_files() {
    for (target, name, _) in KNOWN_FAILING {
        assert!(
            saved(target).iter().any(|(n, _)| n == name),
            "KNOWN_FAILING names {target}/{name}, which is not saved"
        );
    }
}

/// Fuzz finding (saved as `upload_image/crash-zune-jpeg-idct-sampling-factors`, 1092
/// bytes, minimised with `cargo fuzz tmin`): a baseline JPEG, 150x100, whose components
/// have sampling factors Y 2x2, Cb 1x1, Cr 4x1, so a chroma component is sampled finer
/// than luma. `probe` accepts it; `decode` panics inside zune-jpeg 0.5.15 while writing
/// an IDCT block past its component buffer: `range end index 8 out of range for slice of
/// length 0` (idct/scalar.rs:37) in this build, `called Option::unwrap() on a None value`
/// (idct/avx2.rs:378) in the fuzz build. Bounds-checked, so a panic, not memory
/// corruption; in the API it escapes `web::block` as a 500 instead of a 422.
/// Upstream: etemesi254/zune-image#361 (open). Un-ignore once `decode` turns a
/// decoder panic into `Undecodable`.
#[test]
fn jpeg_with_chroma_sampled_finer_than_luma_does_not_panic() {
    let name = "crash-zune-jpeg-idct-sampling-factors";
    let (_, bytes) = saved("upload_image")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap();
    let (probed, decoded) = upload(name, &bytes);
    assert!(probed.is_ok(), "{probed:?}");
    assert!(
        matches!(decoded, Err(DecodeError::Undecodable(_))),
        "{decoded:?}"
    );
}

// ---------------------------------------------------------------------------
// Hand-written uploads.

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn sample() -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 30, |x, y| {
        Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    }))
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = u32::try_from(data.len()).unwrap().to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&crc32fast::hash(&[kind.as_slice(), data].concat()).to_be_bytes());
    c
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A PNG whose header declares `width` x `height` 8-bit RGB pixels, with almost no data.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = PNG_MAGIC.to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", b""));
    png
}

fn riff(body: &[u8]) -> Vec<u8> {
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(body);
    out
}

fn webp_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = kind.to_vec();
    c.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
    c.extend_from_slice(data);
    if data.len() % 2 == 1 {
        c.push(0);
    }
    c
}

/// The VP8L chunk (header and data) of a lossless WebP of the sample.
fn sample_vp8l_chunk() -> Vec<u8> {
    let webp = encode(&sample(), ImageFormat::WebP);
    let at = webp.windows(4).position(|w| w == b"VP8L").unwrap();
    webp[at..].to_vec()
}

/// A VP8X header chunk declaring a `width` x `height` canvas with the given flags.
fn vp8x(flags: u8, width: u32, height: u32) -> Vec<u8> {
    let mut data = vec![flags, 0, 0, 0];
    data.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    data.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    webp_chunk(b"VP8X", &data)
}

/// Deterministic garbage (xorshift), so failures reproduce.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn empty_and_unknown_uploads() {
    assert_eq!(upload("empty", b"").0, Err(DecodeError::Empty));
    for (name, bytes) in [
        ("one byte", &b"\xff"[..]),
        ("two JPEG magic bytes", b"\xff\xd8"),
        ("PNG magic minus one byte", &PNG_MAGIC[..7]),
        ("RIFF without WEBP", b"RIFF\0\0\0\0WEB"),
        ("GIF", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"),
        ("NUL bytes", &[0; 64]),
    ] {
        assert_eq!(
            upload(name, bytes).0,
            Err(DecodeError::Unsupported),
            "{name}"
        );
    }
}

#[test]
fn bare_magic_bytes_are_undecodable() {
    for (name, bytes) in [
        ("JPEG magic", &b"\xff\xd8\xff"[..]),
        ("JPEG SOI and EOI", b"\xff\xd8\xff\xd9"),
        ("PNG magic", PNG_MAGIC),
        ("RIFF WEBP", b"RIFF\x04\0\0\0WEBP"),
        ("RIFF WEBP VP8", b"RIFF\x0c\0\0\0WEBPVP8 \0\0\0\0"),
        ("RIFF WEBP VP8L", b"RIFF\x0c\0\0\0WEBPVP8L\0\0\0\0"),
        ("RIFF WEBP VP8X", b"RIFF\x0c\0\0\0WEBPVP8X\0\0\0\0"),
    ] {
        let (probed, decoded) = upload(name, bytes);
        assert!(
            matches!(probed, Err(DecodeError::Undecodable(_))),
            "{name}: {probed:?}"
        );
        assert!(decoded.is_err(), "{name}");
    }
}

#[test]
fn truncated_uploads_never_decode() {
    for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
        let bytes = encode(&sample(), format);
        assert_eq!(upload("whole", &bytes).1, Ok((40, 30)), "{format:?}");
        for cut in 1..bytes.len() {
            let name = format!("{format:?} cut at {cut} of {}", bytes.len());
            let (_, decoded) = upload(&name, &bytes[..cut]);
            // The tail of a PNG (IEND) or a WebP (padding) carries no pixels.
            if cut <= bytes.len() * 2 / 3 {
                assert!(decoded.is_err(), "{name}: {decoded:?}");
            }
        }
    }
}

fn too_many(r: &Result<ImageInfo, DecodeError>) -> bool {
    matches!(r, Err(DecodeError::TooManyPixels { max, .. }) if *max == MAX_PIXELS)
}

#[test]
fn headers_over_the_pixel_limit_are_rejected_before_decoding() {
    for (w, h) in [(100_000, 100_000), (1, 2_000_000_000), (65_536, 65_536)] {
        let name = format!("PNG declaring {w}x{h}");
        let (probed, decoded) = upload(&name, &png_declaring(w, h));
        assert!(too_many(&probed), "{name}: {probed:?}");
        assert!(decoded.is_err(), "{name}");
    }
    // The largest PNG: the png crate itself refuses the row size (so this is `Undecodable`,
    // not `TooManyPixels`; both are rejections before any pixel is decoded).
    let name = "PNG declaring 2^31-1 x 2^31-1";
    let (probed, _) = upload(name, &png_declaring(0x7FFF_FFFF, 0x7FFF_FFFF));
    assert!(
        too_many(&probed) || matches!(probed, Err(DecodeError::Undecodable(_))),
        "{name}: {probed:?}"
    );
    // Just over and at the limit (the latter fails later, for lack of data).
    assert!(too_many(
        &upload("PNG 2001x2000", &png_declaring(2001, 2000)).0
    ));
    assert!(!too_many(
        &upload("PNG 2000x2000", &png_declaring(2000, 2000)).0
    ));

    // A real JPEG whose frame header is patched to 65500x65500.
    let mut jpeg = encode(&sample(), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    let (probed, _) = upload("JPEG declaring 65500x65500", &jpeg);
    assert!(too_many(&probed), "{probed:?}");

    // A lossless WebP whose VP8L header is patched to 16000x16000. (Not 16384: image-webp
    // computes the size as `(1 + bits) & 0x3FFF`, so the largest lossless size reads as 0,
    // which `probe` rejects as zero-sized.)
    for (side, expected_too_many) in [(16_000u32, true), (16_384, false)] {
        let mut vp8l = sample_vp8l_chunk();
        let bits: u32 = (side - 1) | ((side - 1) << 14);
        vp8l[9..13].copy_from_slice(&bits.to_le_bytes());
        let name = format!("VP8L declaring {side}x{side}");
        let (probed, _) = upload(&name, &riff(&vp8l));
        if expected_too_many {
            assert!(too_many(&probed), "{name}: {probed:?}");
        } else {
            assert!(probed.is_err(), "{name}: {probed:?}");
        }
    }

    // Extended WebPs declaring a large canvas around a small image. Over 2^32 pixels
    // image-webp refuses the header itself ("image too large").
    for (side, expected_too_many) in [(8_192, true), (1 << 24, false)] {
        let webp = riff(&[vp8x(0, side, side), sample_vp8l_chunk()].concat());
        let name = format!("VP8X declaring {side}x{side}");
        let (probed, _) = upload(&name, &webp);
        if expected_too_many {
            assert!(too_many(&probed), "{name}: {probed:?}");
        } else {
            assert!(
                matches!(probed, Err(DecodeError::Undecodable(_))),
                "{name}: {probed:?}"
            );
        }
    }
}

#[test]
fn garbage_after_valid_magic_bytes() {
    let prefixes: [(&str, Vec<u8>); 7] = [
        ("JPEG", b"\xff\xd8\xff".to_vec()),
        ("JPEG SOF0", b"\xff\xd8\xff\xc0\x00\x11\x08".to_vec()),
        ("PNG", PNG_MAGIC.to_vec()),
        ("PNG IHDR", [PNG_MAGIC, b"\0\0\0\x0dIHDR"].concat()),
        ("WebP VP8", b"RIFF\xff\xff\xff\xffWEBPVP8 ".to_vec()),
        (
            "WebP VP8L",
            b"RIFF\xff\xff\xff\xffWEBPVP8L\xff\xff\x00\x00\x2f".to_vec(),
        ),
        (
            "WebP VP8X",
            b"RIFF\xff\xff\xff\xffWEBPVP8X\x0a\0\0\0".to_vec(),
        ),
    ];
    for (name, prefix) in prefixes {
        for seed in 0..64 {
            let bytes = [prefix.clone(), garbage(seed, 1 + 37 * seed as usize)].concat();
            let (probed, _) = upload(&format!("{name} + garbage #{seed}"), &bytes);
            // The only errors possible after a recognised magic are these two.
            assert!(
                !matches!(probed, Err(DecodeError::Empty | DecodeError::Unsupported)),
                "{name} #{seed}: {probed:?}"
            );
        }
    }
    // Garbage with a valid JPEG's end-of-image marker, so the truncation check passes.
    let jpeg = encode(&sample(), ImageFormat::Jpeg);
    for seed in 0..64 {
        let mut bytes = jpeg.clone();
        let n = bytes.len();
        let junk = garbage(seed, n / 2);
        bytes[n / 4..n / 4 + junk.len()].copy_from_slice(&junk);
        let _ = upload(&format!("JPEG with garbage in the middle #{seed}"), &bytes);
    }
}

// ---------------------------------------------------------------------------
// Hand-written stream entries.

fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const JOB_ID: &str = "0198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a01";
const IMAGE_ID: &str = "0198c6a2-7d1f-7aa0-8b1c-3e2f4a5b6c7d";

fn valid() -> Vec<(&'static str, String)> {
    vec![
        ("schema", "1".into()),
        ("job_id", JOB_ID.into()),
        ("pet_id", "rex_01".into()),
        ("kind", "image_added".into()),
        ("image_ids", IMAGE_ID.into()),
        ("enqueued_at", "1700000000000".into()),
        ("attempt", "1".into()),
    ]
}

fn with(changes: &[(&'static str, Option<&str>)]) -> HashMap<String, String> {
    let mut f: HashMap<String, String> = valid()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (k, v) in changes {
        match v {
            Some(v) => f.insert((*k).to_owned(), (*v).to_owned()),
            None => f.remove(*k),
        };
    }
    f
}

#[test]
fn malformed_stream_entries_are_rejected_without_panicking() {
    assert!(entry("empty", &HashMap::new()).is_none());
    assert!(entry("only NULs", &fields_of(&[0; 16])).is_none());
    assert!(entry("only schema", &fields(&[("schema", "1")])).is_none());
    let big = "9".repeat(100_000);
    let many_commas = ",".repeat(10_000);
    let rejected: Vec<(&'static str, Option<&str>)> = vec![
        ("schema", Some("")),
        ("schema", Some("1 ")),
        ("schema", Some("\u{0}1")),
        ("job_id", Some("")),
        ("job_id", Some("0198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a0")),
        ("job_id", Some("0198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a011")),
        ("job_id", Some("\u{e9}198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a0")),
        ("pet_id", Some("\u{e9}")),
        ("pet_id", Some("x\u{0}")),
        ("kind", Some("IMAGE_ADDED")),
        ("image_ids", Some(",")),
        ("image_ids", Some(many_commas.as_str())),
        ("image_ids", Some("0198c6a2-7d1f-7aa0-8b1c-3e2f4a5b6c7d,")),
        ("enqueued_at", Some("")),
        ("enqueued_at", Some("9223372036854775808")),
        ("enqueued_at", Some(big.as_str())),
        ("attempt", Some("-1")),
        ("attempt", Some("4294967296")),
        ("attempt", Some("1.0")),
        ("attempt", Some(big.as_str())),
    ];
    for (k, v) in rejected {
        let name = format!("{k}={:?}", v.map(|v| &v[..v.len().min(40)]));
        assert!(
            entry(&name, &with(&[(k, v)])).is_none(),
            "{name} was accepted"
        );
    }
}

#[test]
fn odd_but_valid_stream_entries_round_trip() {
    let ids = vec![IMAGE_ID; 5_000].join(",");
    let pet = "x".repeat(64);
    let accepted: Vec<Vec<(&'static str, Option<&str>)>> = vec![
        vec![],
        vec![("image_ids", Some("")), ("kind", Some("recluster"))],
        vec![("image_ids", Some(ids.as_str()))],
        vec![("pet_id", Some(pet.as_str()))],
        vec![("job_id", Some("{0198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a01}"))],
        vec![(
            "job_id",
            Some("urn:uuid:0198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a01"),
        )],
        vec![("job_id", Some("0198C6A27D1E7CC39A4B2F6D3E1B5A01"))],
        vec![("enqueued_at", Some("-9223372036854775808"))],
        vec![("enqueued_at", Some("+0"))],
        vec![("attempt", Some("4294967295"))],
        vec![("attempt", Some("+7"))],
        vec![("attempt", Some("0001"))],
        vec![("traceparent", Some("")), ("tracestate", Some(""))],
        vec![
            ("traceparent", Some("\u{0}\u{fffd}")),
            ("tracestate", Some("x")),
        ],
        vec![("unknown", Some("ignored"))],
    ];
    for changes in accepted {
        let name = format!("{changes:?}");
        let parsed = entry(&name, &with(&changes));
        assert!(parsed.is_some(), "{name} was rejected");
    }
    // Duplicate keys in a raw entry: the later value wins, as in the fuzz target.
    let raw = b"schema\x002\x00schema\x001\x00job_id\x000198c6a2-7d1e-7cc3-9a4b-2f6d3e1b5a01\x00\
        pet_id\x00a\x00kind\x00recluster\x00image_ids\x00\x00enqueued_at\x000\x00attempt\x001";
    assert!(entry("duplicate schema", &fields_of(raw)).is_some());
}

// ---------------------------------------------------------------------------
// Memory: hostile headers and compressed metadata must not drive allocations past the
// limits. Measured from /proc/self/status, one test at a time.

/// Serialises the tests that measure the process's memory.
static MEASURING: Mutex<()> = Mutex::new(());

/// A field of /proc/self/status in bytes (`VmPeak`: peak virtual size, `VmHWM`: peak RSS).
#[cfg(target_os = "linux")]
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// How much `field` grew while `f` ran.
#[cfg(target_os = "linux")]
fn growth_of<T>(field: &str, f: impl FnOnce() -> T) -> (T, u64) {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // Resets the peak RSS (VmHWM) to the current RSS where the kernel allows it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = proc_status_bytes(field);
    let out = f();
    (out, proc_status_bytes(field).saturating_sub(before))
}

const MIB: u64 = 1 << 20;

/// Fuzz finding (saved as `upload_image/oom-webp-exif-chunk-fuzzer-found`, 444 bytes, as
/// found from the python_lossy_alpha.webp seed, and `oom-webp-exif-chunk-4gib`, 52 bytes,
/// minimised by hand): an extended WebP with an EXIF chunk header declaring up to 4 GiB
/// that the file does not hold. `decode` asks the decoder for the orientation, and
/// image-webp's `read_chunk` does `vec![0; declared]` before reading, because image
/// 0.25.10 never passes `Limits` on to image-webp (its memory limit stays `usize::MAX`).
/// Under libFuzzer: `out-of-memory (malloc(2860243388))` / `malloc(4294967280)`. In
/// production the zeroed allocation is only reserved (no RSS) where overcommit allows
/// it, and aborts the process where it does not. Fixed in decode.rs: `probe` refuses a
/// WebP whose chunks run past the bytes received (to the end of the file, not of the
/// RIFF size: the fuzzer's input puts the EXIF chunk just past it, where image-webp
/// still reads).
#[test]
#[cfg(target_os = "linux")]
fn webp_exif_chunk_declaring_4_gib_is_not_allocated() {
    const TEST: &str = "webp_exif_chunk_declaring_4_gib_is_not_allocated";
    const FILE_VAR: &str = "FUZZ_REGRESSION_FILE";
    // The peak virtual size cannot be reset, so each file runs in a child process: this
    // test binary, running only this test with the file named in FILE_VAR.
    if let Ok(name) = std::env::var(FILE_VAR) {
        let (_, bytes) = saved("upload_image")
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("upload_image/{name} is not saved"));
        // Refusing the file (the chunk runs past its end) and reading it within bounds are
        // both fine; `upload` checks the outcome's invariants.
        let (_, grown) = growth_of("VmPeak", || upload(&name, &bytes));
        assert!(
            grown < 1024 * MIB,
            "{name}: peak virtual size grew by {} MiB",
            grown / MIB
        );
        return;
    }
    for (_, name, _) in KNOWN_FAILING.iter().filter(|(_, _, t)| *t == TEST) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--include-ignored", "--test-threads=1"])
            .env(FILE_VAR, name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A zlib stream inflating to `1 + 258 * copies` zero bytes: one literal, then `copies`
/// times <length 258, distance 1>, in one fixed-Huffman block (13 bits per 258 bytes).
fn zlib_zeros(copies: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        /// Header fields and extra bits go least significant bit first.
        fn put(&mut self, value: u32, len: u32) {
            for i in 0..len {
                self.acc |= ((value >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    (self.acc, self.n) = (0, 0);
                }
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
    }
    let mut bits = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // last block
    bits.put(1, 2); // fixed Huffman codes
    bits.code(0b0011_0000, 8); // literal 0
    for _ in 0..copies {
        bits.code(0b1100_0101, 8); // length code 285: 258 bytes
        bits.code(0, 5); // distance code 0: distance 1
    }
    bits.code(0, 7); // end of block
    if bits.n > 0 {
        bits.out.push(bits.acc as u8);
    }
    let len = 1 + 258 * copies as u64;
    let adler = (u32::try_from(len % 65521).unwrap() << 16) | 1;
    bits.out.extend_from_slice(&adler.to_be_bytes());
    bits.out
}

/// A 1x1 PNG whose iCCP chunk inflates to about `profile_bytes` zero bytes.
fn png_with_iccp_bomb(profile_bytes: u64) -> Vec<u8> {
    let copies = usize::try_from(profile_bytes / 258).unwrap();
    let mut ihdr = 1u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = PNG_MAGIC.to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"iCCP",
        &[b"icc\0\0".as_slice(), &zlib_zeros(copies)].concat(),
    ));
    // One row: filter byte 0 and one black RGB pixel, stored (uncompressed) in zlib.
    png.extend(png_chunk(
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x04, 0x00, 0xfb, 0xff, 0, 0, 0, 0, 0x00, 0x04, 0x00, 0x01,
        ],
    ));
    png.extend(png_chunk(b"IEND", b""));
    png
}

#[test]
fn png_with_a_small_iccp_profile_decodes() {
    let png = png_with_iccp_bomb(MIB);
    // The generated stream really inflates to the profile (so the bomb below is one).
    let mut decoder = image::ImageReader::with_format(Cursor::new(&png[..]), ImageFormat::Png)
        .into_decoder()
        .unwrap();
    let profile = decoder.icc_profile().unwrap().expect("an ICC profile");
    assert_eq!(profile.len(), 1 + 258 * (MIB as usize / 258));
    assert!(profile.iter().all(|&b| b == 0));
    let (probed, decoded) = upload("PNG with a 1 MiB iCCP profile", &png);
    assert!(probed.is_ok(), "{probed:?}");
    assert_eq!(decoded, Ok((1, 1)));
}

/// Found by review and confirmed with the upload_image fuzz target (a 3 MB file, too large
/// for the fuzzer's inputs): `probe` reads the header with `no_limits()`, so the png crate
/// inflates an iCCP profile without bound before the pixel check: about 1000x the upload,
/// 25 GiB for a 25 MiB upload. Under libFuzzer: `out-of-memory (malloc(2214592512))` in
/// `fdeflate::decompress_to_vec_bounded` from `png::..::parse_iccp_raw`, from
/// `decode::probe`. Fixed in decode.rs: `probe` reads a PNG's size from IHDR itself, and
/// `decode` gives the png crate a budget of its own (16 MiB plus row buffers) instead of the
/// image's, and the png crate drops a profile that would exceed it. Before that it inflated
/// the profile up to the whole image budget (96 MiB here, 464 MiB at the service's default
/// 50 Mpx; measured +442 MiB of peak RSS there).
#[test]
#[cfg(target_os = "linux")]
fn png_iccp_deflate_bomb_is_bounded() {
    let png = png_with_iccp_bomb(768 * MIB);
    assert!(png.len() < 6 * MIB as usize, "{} bytes", png.len());
    let (outcome, grown) = growth_of("VmHWM", || upload("PNG with an iCCP bomb", &png));
    assert!(outcome.0.is_ok(), "{outcome:?}");
    // The png crate drops a profile over its budget and decodes the pixels.
    assert_eq!(outcome.1, Ok((1, 1)), "{outcome:?}");
    // At the service's default limit, where the image budget is 464 MiB.
    let (decoded, grown_50mpx) = growth_of("VmHWM", || decode::decode(&png, 50_000_000));
    assert_eq!(decoded.map(|img| (img.width(), img.height())), Ok((1, 1)));
    for (limit, grown) in [("4 Mpx", grown), ("50 Mpx", grown_50mpx)] {
        assert!(
            grown < 48 * MIB,
            "{limit}: peak RSS grew by {} MiB",
            grown / MIB
        );
    }
}

// ---------------------------------------------------------------------------
// Accepted means processable: what the API's check accepts, the embedder decodes.

/// A model stand-in that records nothing and answers a constant vector.
struct Constant;

impl actors::algo::embed::ImageEncoder for Constant {
    fn model_version(&self) -> &str {
        "constant"
    }
    fn embed(&self, _: &DynamicImage) -> Result<Vec<f32>, actors::algo::embed::EmbedError> {
        Ok(vec![1.0, 0.0])
    }
    fn input_short_side(&self) -> u32 {
        256
    }
}

/// Every saved fuzz input, each fixture photo and generated photos of every format and
/// colour type, plus a thousand seeded byte mutations of them: whenever the upload check
/// accepts an input, the embedder's analysis of the same bytes succeeds.
#[test]
fn accepted_uploads_always_decode_in_the_worker() {
    use actors::algo::budget::MemoryBudget;
    use actors::algo::photo;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let budget = MemoryBudget::new(256 << 20);
    let limits = decode::DecodeLimits::from(MAX_PIXELS);
    let mut inputs: Vec<Vec<u8>> = saved("upload_image").into_iter().map(|(_, b)| b).collect();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/photos");
    for e in std::fs::read_dir(fixtures).unwrap().filter_map(Result::ok) {
        if e.path().extension().is_some_and(|x| x != "csv") {
            inputs.push(std::fs::read(e.path()).unwrap());
        }
    }
    let base = DynamicImage::ImageRgb8(ImageBuffer::from_fn(300, 200, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    }));
    for img in [
        base.clone(),
        DynamicImage::ImageLuma8(base.to_luma8()),
        DynamicImage::ImageRgba8(base.to_rgba8()),
        DynamicImage::ImageRgb16(base.to_rgb16()),
    ] {
        for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let mut out = Cursor::new(Vec::new());
            if img.write_to(&mut out, f).is_ok() {
                inputs.push(out.into_inner());
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(12);
    let originals = inputs.clone();
    for _ in 0..1000 {
        let mut b = originals[rng.random_range(0..originals.len())].clone();
        for _ in 0..rng.random_range(1..8) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        inputs.push(b);
    }
    let (mut accepted, mut refused) = (0, 0);
    for bytes in &inputs {
        let check = panic::catch_unwind(AssertUnwindSafe(|| {
            photo::check(bytes, limits, 256, &budget)
        }));
        let Ok(Ok(_)) = check else {
            refused += 1;
            continue;
        };
        accepted += 1;
        let analysed = panic::catch_unwind(AssertUnwindSafe(|| {
            photo::analyse(bytes, limits, &Constant, &budget)
        }));
        assert!(
            matches!(analysed, Ok(Ok(_))),
            "accepted by the check, refused by the embedder: {:?}",
            analysed.map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        );
    }
    assert!(
        accepted > 40 && refused > 100,
        "accepted {accepted}, refused {refused}"
    );
    assert_eq!(budget.used(), 0, "every reservation was returned");
}

#[test]
fn extreme_aspect_ratios_are_refused_from_the_header() {
    // 200000 x 1 and 3000 x 1 PNGs of a few bytes: fitting their short side to the model would
    // allocate gigabytes.
    for (w, h) in [(200_000u32, 1u32), (3000, 1), (1, 3000), (21, 1)] {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let chunk = |t: &[u8], d: &[u8]| {
            let mut c = (d.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(t);
            c.extend_from_slice(d);
            c.extend_from_slice(&crc32fast::hash(&[t, d].concat()).to_be_bytes());
            c
        };
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IEND", b""));
        let e = decode::probe(&png, 50_000_000).unwrap_err();
        assert!(
            matches!(e, DecodeError::AspectRatio { .. }),
            "{w}x{h}: {e:?}"
        );
        assert!(e.to_string().contains("server.max_aspect_ratio"), "{e}");
    }
    // Up to the limit is fine.
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(400, 20, Rgb([1, 2, 3])));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    assert!(decode::probe(&out.into_inner(), 50_000_000).is_ok());
}

#[test]
fn a_photo_that_needs_more_than_the_whole_budget_is_refused_before_decoding() {
    use actors::algo::budget::MemoryBudget;
    let img = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(
        1500,
        1000,
        image::Rgb([9u16, 9, 9]),
    ));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    let bytes = out.into_inner();
    let info = decode::probe(&bytes, 50_000_000).unwrap();
    assert_eq!(info.decoded_bytes_per_pixel, 6, "16-bit RGB from IHDR");
    let cost = decode::decode_cost(&info, 1);
    assert!(cost > 1500 * 1000 * 14, "{cost}");
    let small = MemoryBudget::new(cost - 1);
    let e = decode::decode_within(&bytes, 50_000_000, 1, &small).unwrap_err();
    assert!(matches!(e, DecodeError::OverBudget { .. }), "{e:?}");
    assert_eq!(small.used(), 0);
    let enough = MemoryBudget::new(cost);
    let (d, reserved) = decode::decode_within(&bytes, 50_000_000, 1, &enough).unwrap();
    assert_eq!((d.width, d.height), (1500, 1000));
    assert_eq!(enough.used(), cost);
    drop(reserved);
    assert_eq!(enough.used(), 0);
}
