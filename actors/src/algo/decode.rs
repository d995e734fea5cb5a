//! Format sniffing, header checks and decoding of uploaded photos.
//!
//! The format comes from the bytes, never from a file name or header; the
//! pixel limit is checked from the image header before anything is decoded,
//! and decoding runs under the `image` crate's memory limits.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// The formats the service accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
}

impl Format {
    pub const fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::WebP => "image/webp",
        }
    }

    pub fn from_mime(mime: &str) -> Option<Self> {
        match mime {
            "image/jpeg" => Some(Format::Jpeg),
            "image/png" => Some(Format::Png),
            "image/webp" => Some(Format::WebP),
            _ => None,
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            Format::Jpeg => ImageFormat::Jpeg,
            Format::Png => ImageFormat::Png,
            Format::WebP => ImageFormat::WebP,
        }
    }
}

/// Accepted types, as named in 415 answers.
pub const ACCEPTED_TYPES: &str = "image/jpeg, image/png, image/webp";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the file is empty")]
    Empty,
    #[error("unsupported image format; accepted types are {ACCEPTED_TYPES}")]
    Unsupported,
    #[error("image of {width}x{height} pixels exceeds the limit of {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("image cannot be decoded: {0}")]
    Undecodable(String),
}

/// Identifies the format from the leading bytes.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Format::WebP)
    } else {
        None
    }
}

/// What an upload's header says, checked against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

fn limits(max_pixels: u64) -> Limits {
    let mut l = Limits::default();
    // Room for the largest allowed image at 16 bits per channel with alpha, plus codec state.
    l.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

fn reader(bytes: &[u8], format: Format, max_pixels: u64) -> ImageReader<Cursor<&[u8]>> {
    let mut r = ImageReader::with_format(Cursor::new(bytes), format.image_format());
    r.limits(limits(max_pixels));
    r
}

/// Sniffs the format and reads the dimensions from the header only.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = sniff(bytes).ok_or(DecodeError::Unsupported)?;
    let (width, height) = match format {
        // Read from IHDR directly: the png crate would inflate ancillary chunks (an iCCP
        // profile can be a deflate bomb) before reporting the size.
        Format::Png => png_dimensions(bytes)
            .ok_or_else(|| DecodeError::Undecodable("PNG without a valid IHDR chunk".into()))?,
        Format::WebP if !webp_chunks_fit(bytes) => {
            // image-webp allocates a chunk's declared size before reading it.
            return Err(DecodeError::Undecodable(
                "truncated WebP (a chunk runs past the end)".into(),
            ));
        }
        _ => {
            // Only the header is read here; the memory limits apply when decoding.
            let mut header = ImageReader::with_format(Cursor::new(bytes), format.image_format());
            header.no_limits();
            header
                .into_dimensions()
                .map_err(|e| DecodeError::Undecodable(e.to_string()))?
        }
    };
    if width == 0 || height == 0 {
        return Err(DecodeError::Undecodable("zero-sized image".into()));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            max: max_pixels,
        });
    }
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// Width and height from a PNG's IHDR chunk, which must come first.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let ihdr = bytes.get(8..24)?;
    if ihdr[0..8] != [0, 0, 0, 13, b'I', b'H', b'D', b'R'] {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&ihdr[8..12]), be(&ihdr[12..16])))
}

/// Whether every chunk of a WebP's RIFF container lies within the bytes received.
fn webp_chunks_fit(bytes: &[u8]) -> bool {
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let Some(riff) = bytes.get(4..8).map(le) else {
        return false;
    };
    let end = riff.saturating_add(8);
    if end > bytes.len() {
        return false;
    }
    // The decoder also reads chunks past the RIFF size, so every chunk header in the
    // bytes received must describe data that is there.
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let size = le(&bytes[at + 4..at + 8]);
        if size > bytes.len() - (at + 8) {
            return false;
        }
        at += 8 + size + (size & 1);
    }
    true
}

/// Whether a JPEG's last scan is followed by its end-of-image marker. The JPEG
/// decoder fills a truncated scan with grey instead of failing, so a cut-off
/// upload is caught here. In entropy-coded data a 0xFF byte is always followed
/// by 0x00 or a restart marker, so `FF DA` (start of scan) and `FF D9` (end of
/// image) found this way are real markers.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(i) => bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Probes, then decodes fully, applying the EXIF orientation.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, DecodeError> {
    let info = probe(bytes, max_pixels)?;
    if info.format == Format::Jpeg && !jpeg_complete(bytes) {
        return Err(DecodeError::Undecodable(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    // A decoder that panics on malformed data (zune-jpeg on some chroma sampling
    // factors, found by fuzzing) must cost a 422, not the request or the thread.
    std::panic::catch_unwind(|| decode_checked(bytes, info, max_pixels)).unwrap_or_else(|_| {
        Err(DecodeError::Undecodable(
            "the decoder failed on malformed data".into(),
        ))
    })
}

fn decode_checked(
    bytes: &[u8],
    info: ImageInfo,
    max_pixels: u64,
) -> Result<DynamicImage, DecodeError> {
    let undecodable = |e: image::ImageError| DecodeError::Undecodable(e.to_string());
    let mut decoder = reader(bytes, info.format, max_pixels)
        .into_decoder()
        .map_err(undecodable)?;
    // A broken EXIF block is not worth rejecting a photo for.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    img.apply_orientation(orientation);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgb};

    fn encode(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, f).unwrap();
        out.into_inner()
    }

    fn sample() -> DynamicImage {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 30, |x, y| {
            Rgb([x as u8 * 6, y as u8 * 8, 90])
        }))
    }

    #[test]
    fn sniffs_formats_from_bytes() {
        assert_eq!(
            sniff(&encode(&sample(), ImageFormat::Png)),
            Some(Format::Png)
        );
        assert_eq!(
            sniff(&encode(&sample(), ImageFormat::Jpeg)),
            Some(Format::Jpeg)
        );
        assert_eq!(
            sniff(&encode(&sample(), ImageFormat::WebP)),
            Some(Format::WebP)
        );
        assert_eq!(sniff(b"GIF89a...."), None);
        assert_eq!(sniff(b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn decodes_valid_images_with_dimensions() {
        for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let img = decode(&encode(&sample(), f), 1_000_000).unwrap();
            assert_eq!((img.width(), img.height()), (40, 30), "{f:?}");
        }
    }

    #[test]
    fn rejects_truncated_and_empty() {
        for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let bytes = encode(&sample(), f);
            let cut = &bytes[..bytes.len() * 2 / 3];
            assert!(
                matches!(decode(cut, 1_000_000), Err(DecodeError::Undecodable(_))),
                "{f:?}"
            );
        }
        assert_eq!(decode(b"", 1_000_000), Err(DecodeError::Empty));
        assert_eq!(decode(b"hello", 1_000_000), Err(DecodeError::Unsupported));
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        // A PNG whose header declares 100000 x 100000 pixels and carries almost no data.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let chunk = |t: &[u8], d: &[u8]| {
            let mut c = (d.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(t);
            c.extend_from_slice(d);
            c.extend_from_slice(&crc32(&[t, d].concat()).to_be_bytes());
            c
        };
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(chunk(b"IEND", b""));
        assert!(matches!(
            probe(&png, 50_000_000),
            Err(DecodeError::TooManyPixels { .. })
        ));
    }

    #[test]
    fn applies_exif_orientation() {
        // A 4x2 JPEG with EXIF orientation 6 (rotate 90 degrees clockwise) must come out 2x4.
        let jpeg = encode(
            &DynamicImage::ImageRgb8(ImageBuffer::from_pixel(4, 2, Rgb([9, 9, 9]))),
            ImageFormat::Jpeg,
        );
        let exif_app1: Vec<u8> = {
            // Exif header, big-endian TIFF with one IFD entry: Orientation (0x0112) SHORT = 6.
            let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
            tiff.extend_from_slice(&[
                0x00, 0x01, 0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
            ]);
            tiff.extend_from_slice(&[0, 0, 0, 0]);
            let mut payload = b"Exif\x00\x00".to_vec();
            payload.extend(tiff);
            let mut seg = vec![0xFF, 0xE1];
            seg.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
            seg.extend(payload);
            seg
        };
        let mut with_exif = jpeg[..2].to_vec();
        with_exif.extend(exif_app1);
        with_exif.extend_from_slice(&jpeg[2..]);
        let img = decode(&with_exif, 1_000_000).unwrap();
        assert_eq!((img.width(), img.height()), (2, 4));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
