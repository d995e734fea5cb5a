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
    #[error(
        "image of {width}x{height} pixels is more than {max} times as long as it is wide; \
         the limit is server.max_aspect_ratio"
    )]
    AspectRatio { width: u32, height: u32, max: u32 },
    #[error(
        "image needs {needed_mib} MiB to decode, more than the whole decoding budget of \
         {budget_mib} MiB (server.decode_memory_budget_mib)"
    )]
    OverBudget { needed_mib: u64, budget_mib: u64 },
    #[error("image cannot be decoded: {0}")]
    Undecodable(String),
}

/// What an image may be: checked from its header before anything is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Width times height.
    pub max_pixels: u64,
    /// Longer side over shorter side. Past it, fitting the shorter side to what the model
    /// needs would blow the longer one up (a 200000x1 image scaled to 256 rows is 51 Gpx).
    pub max_aspect_ratio: u32,
}

impl DecodeLimits {
    /// The service's default aspect ratio limit (`server.max_aspect_ratio`).
    pub const DEFAULT_ASPECT_RATIO: u32 = 20;
}

impl From<u64> for DecodeLimits {
    /// `max_pixels` with the default aspect ratio limit.
    fn from(max_pixels: u64) -> Self {
        DecodeLimits {
            max_pixels,
            max_aspect_ratio: Self::DEFAULT_ASPECT_RATIO,
        }
    }
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
    /// Bytes per pixel of what the decoder produces at full size.
    pub decoded_bytes_per_pixel: u8,
    /// A progressive JPEG, whose decoder keeps every coefficient until the last scan.
    pub progressive: bool,
}

impl ImageInfo {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Bytes per pixel of everything derived from a decoded image while it is analysed: an RGB
/// copy (3), luminance (1), its median-filtered copy (1), and room for resizing buffers.
const DERIVED_BYTES_PER_PIXEL: u64 = 8;

/// What decoding this image at `1/reduction` scale and analysing it may allocate, in bytes,
/// from its header alone (a conservative estimate).
pub fn decode_cost(info: &ImageInfo, reduction: u32) -> u64 {
    let k = u64::from(reduction.max(1));
    let (w, h) = (u64::from(info.width), u64::from(info.height));
    let decoded = w.div_ceil(k) * h.div_ceil(k);
    let codec = match info.format {
        // All DCT coefficients (i16) of up to three components until the last scan.
        Format::Jpeg if info.progressive => w * h * 6,
        // A few rows of blocks.
        Format::Jpeg => w * 64,
        // Row buffers (current and previous, for unfiltering) plus the codec's own.
        Format::Png => w * u64::from(info.decoded_bytes_per_pixel) * 2 + PNG_CODEC_BUDGET,
        Format::WebP => w * 16,
    };
    decoded * (u64::from(info.decoded_bytes_per_pixel) + DERIVED_BYTES_PER_PIXEL) + codec
}

fn image_limits(max_pixels: u64) -> Limits {
    let mut l = Limits::default();
    // Room for the largest allowed image at 16 bits per channel with alpha, plus codec state.
    l.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

fn reader(bytes: &[u8], format: Format, max_pixels: u64) -> ImageReader<Cursor<&[u8]>> {
    let mut r = ImageReader::with_format(Cursor::new(bytes), format.image_format());
    r.limits(image_limits(max_pixels));
    r
}

/// Sniffs the format and reads the dimensions from the header only.
pub fn probe(bytes: &[u8], limits: impl Into<DecodeLimits>) -> Result<ImageInfo, DecodeError> {
    let limits = limits.into();
    let max_pixels = limits.max_pixels;
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
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * u64::from(limits.max_aspect_ratio.max(1)) {
        return Err(DecodeError::AspectRatio {
            width,
            height,
            max: limits.max_aspect_ratio,
        });
    }
    let (decoded_bytes_per_pixel, progressive) = match format {
        Format::Png => (png_bytes_per_pixel(bytes), false),
        Format::Jpeg => jpeg_layout(bytes),
        Format::WebP => (4, false),
    };
    Ok(ImageInfo {
        format,
        width,
        height,
        decoded_bytes_per_pixel,
        progressive,
    })
}

/// Bytes per pixel the PNG decoder produces, from IHDR's bit depth and colour type (palette
/// images expand to RGBA).
fn png_bytes_per_pixel(bytes: &[u8]) -> u8 {
    let (depth, colour) = (
        bytes.get(24).copied().unwrap_or(16),
        bytes.get(25).copied().unwrap_or(6),
    );
    let channels = match colour {
        0 => 1,
        2 => 3,
        4 => 2,
        _ => 4,
    };
    channels * if depth == 16 { 2 } else { 1 }
}

/// Output bytes per pixel and whether the JPEG is progressive, from its frame header (SOFn);
/// the worst case when there is none before the data.
fn jpeg_layout(bytes: &[u8]) -> (u8, bool) {
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            break;
        }
        let marker = bytes[at + 1];
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if sof {
            let components = bytes.get(at + 9).copied().unwrap_or(3);
            let progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
            // Grey stays one byte; CMYK and colour come out as RGB.
            let bpp = if components == 1 { 1 } else { 3 };
            return (bpp, progressive);
        }
        if marker == 0xDA {
            break;
        }
        at += 2 + len;
    }
    (3, true)
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
pub fn decode(bytes: &[u8], limits: impl Into<DecodeLimits>) -> Result<DynamicImage, DecodeError> {
    // No shorter side is small enough to allow a reduction: the full-size decode.
    decode_reduced(bytes, limits, u32::MAX).map(|d| d.image)
}

/// [`decode_reduced`] within a memory budget: the decode's cost ([`decode_cost`]) is
/// reserved from the header before anything is allocated, waiting while the budget is
/// spent; the reservation lives as long as the caller keeps it (while it analyses the image).
pub fn decode_within<'b>(
    bytes: &[u8],
    limits: impl Into<DecodeLimits>,
    min_short: u32,
    budget: &'b super::budget::MemoryBudget,
) -> Result<(Decoded, super::budget::Reservation<'b>), DecodeError> {
    let limits = limits.into();
    let info = probe(bytes, limits)?;
    let cost = decode_cost(&info, jpeg_reduction(info, min_short));
    let reservation = budget.reserve(cost).ok_or(DecodeError::OverBudget {
        needed_mib: cost.div_ceil(1 << 20),
        budget_mib: budget.total() >> 20,
    })?;
    let decoded = decode_probed(bytes, info, limits.max_pixels, min_short)?;
    Ok((decoded, reservation))
}

/// A photo decoded for analysis, possibly at a reduced scale, with its format and the
/// size of the original (both sizes after the EXIF orientation).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: DynamicImage,
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

impl Decoded {
    fn full(image: DynamicImage, format: Format) -> Self {
        Decoded {
            width: image.width(),
            height: image.height(),
            format,
            image,
        }
    }

    /// Width times height of the original photo.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Like [`decode`], but lets the codec skip work when the caller needs no more than a
/// shorter side of `min_short` pixels: a large JPEG is decoded by DCT scaling at 1/2, 1/4
/// or 1/8 of its size (the largest reduction that keeps the shorter side at least
/// `min_short`), which skips most of the inverse transform, colour conversion and memory.
/// Other formats, and JPEGs the scaled decoder does not handle (CMYK, 12-bit, lossless),
/// decode at full size. The whole entropy-coded stream is still read, so a corrupt file
/// fails here as it does in [`decode`].
pub fn decode_reduced(
    bytes: &[u8],
    limits: impl Into<DecodeLimits>,
    min_short: u32,
) -> Result<Decoded, DecodeError> {
    let limits = limits.into();
    let info = probe(bytes, limits)?;
    decode_probed(bytes, info, limits.max_pixels, min_short)
}

fn decode_probed(
    bytes: &[u8],
    info: ImageInfo,
    max_pixels: u64,
    min_short: u32,
) -> Result<Decoded, DecodeError> {
    if info.format == Format::Jpeg && !jpeg_complete(bytes) {
        return Err(DecodeError::Undecodable(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    let reduction = jpeg_reduction(info, min_short);
    // A decoder that panics on malformed data (zune-jpeg on some chroma sampling
    // factors, found by fuzzing) must cost a 422, not the request or the thread.
    std::panic::catch_unwind(|| {
        // Every JPEG goes through jpeg-decoder first, at any scale: it handles chroma
        // sampling layouts the other decoder rejects, and what the API accepts this way the
        // worker decodes the same way. The other decoder is the fallback (CMYK, 12-bit).
        if info.format == Format::Jpeg
            && let Some(decoded) = jpeg_scaled(bytes, info, reduction)
        {
            return Ok(decoded);
        }
        decode_checked(bytes, info, max_pixels).map(|img| Decoded::full(img, info.format))
    })
    .unwrap_or_else(|_| {
        Err(DecodeError::Undecodable(
            "the decoder failed on malformed data".into(),
        ))
    })
}

/// The largest of 8, 4 and 2 by which a JPEG can be reduced with its shorter side staying
/// at least `min_short`; 1 when none can (or the photo is not a JPEG).
fn jpeg_reduction(info: ImageInfo, min_short: u32) -> u32 {
    if info.format != Format::Jpeg {
        return 1;
    }
    let short = info.width.min(info.height);
    [8, 4, 2]
        .into_iter()
        .find(|k| short.div_ceil(*k) >= min_short.max(1))
        .unwrap_or(1)
}

/// Decodes a JPEG at `1/k` scale with jpeg-decoder; `None` when it cannot (unsupported
/// colour type, or an error the full decoder may still get past), so the caller falls back
/// to a full decode.
fn jpeg_scaled(bytes: &[u8], info: ImageInfo, k: u32) -> Option<Decoded> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    // The scaled output is at most a quarter of the full image; the full decoder's limit
    // holds for the coefficient planes jpeg-decoder keeps for progressive files.
    decoder.set_max_decoding_buffer_size(
        usize::try_from(u64::from(info.width) * u64::from(info.height) * 4).ok()?,
    );
    let requested = (
        u16::try_from(info.width.div_ceil(k)).ok()?,
        u16::try_from(info.height.div_ceil(k)).ok()?,
    );
    let (w, h) = decoder.scale(requested.0, requested.1).ok()?;
    let pixels = decoder.decode().ok()?;
    let format = decoder.info()?.pixel_format;
    let (w, h) = (u32::from(w), u32::from(h));
    let mut image = match format {
        jpeg_decoder::PixelFormat::RGB24 => {
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, pixels)?)
        }
        jpeg_decoder::PixelFormat::L8 => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, pixels)?)
        }
        jpeg_decoder::PixelFormat::L16 | jpeg_decoder::PixelFormat::CMYK32 => return None,
    };
    // A broken EXIF block is not worth rejecting a photo for, as in `decode`.
    let orientation = decoder
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    image.apply_orientation(orientation);
    let (width, height) = match orientation {
        image::metadata::Orientation::Rotate90
        | image::metadata::Orientation::Rotate270
        | image::metadata::Orientation::Rotate90FlipH
        | image::metadata::Orientation::Rotate270FlipH => (info.height, info.width),
        _ => (info.width, info.height),
    };
    Some(Decoded {
        image,
        format: Format::Jpeg,
        width,
        height,
    })
}

fn decode_checked(
    bytes: &[u8],
    info: ImageInfo,
    max_pixels: u64,
) -> Result<DynamicImage, DecodeError> {
    let undecodable = |e: image::ImageError| DecodeError::Undecodable(e.to_string());
    if info.format == Format::Png {
        // The png crate's own allocations (row buffers, and ancillary chunks such as an
        // iCCP profile, which it inflates) get a budget of their own; the image buffer
        // keeps the pixel-based limit. With one limit for both, a small upload could
        // inflate a deflate bomb in iCCP to the whole image budget (464 MiB at 50 Mpx).
        let mut codec_limits = Limits::default();
        codec_limits.max_alloc = Some(PNG_CODEC_BUDGET + 16 * u64::from(info.width));
        let mut decoder =
            image::codecs::png::PngDecoder::with_limits(Cursor::new(bytes), codec_limits)
                .map_err(undecodable)?;
        decoder
            .set_limits(image_limits(max_pixels))
            .map_err(undecodable)?;
        return finish(decoder).map_err(undecodable);
    }
    let decoder = reader(bytes, info.format, max_pixels)
        .into_decoder()
        .map_err(undecodable)?;
    finish(decoder).map_err(undecodable)
}

/// What the png crate may allocate besides its row buffers: ancillary chunks (an ICC
/// profile, text, EXIF) are well under this in real photos.
const PNG_CODEC_BUDGET: u64 = 16 << 20;

/// Reads the pixels and applies the EXIF orientation.
fn finish(mut decoder: impl ImageDecoder) -> image::ImageResult<DynamicImage> {
    // A broken EXIF block is not worth rejecting a photo for.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, ImageBuffer, Rgb};

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
            c.extend_from_slice(&crc32fast::hash(&[t, d].concat()).to_be_bytes());
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

    /// `jpeg` with an EXIF block saying orientation 6 (rotate 90 degrees clockwise).
    pub(crate) fn with_orientation_6(jpeg: &[u8]) -> Vec<u8> {
        // Exif header, big-endian TIFF with one IFD entry: Orientation (0x0112) SHORT = 6.
        let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
        tiff.extend_from_slice(&[
            0x00, 0x01, 0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
        ]);
        tiff.extend_from_slice(&[0, 0, 0, 0]);
        let mut payload = b"Exif\x00\x00".to_vec();
        payload.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend(payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn applies_exif_orientation() {
        // A 4x2 JPEG with EXIF orientation 6 must come out 2x4.
        let jpeg = encode(
            &DynamicImage::ImageRgb8(ImageBuffer::from_pixel(4, 2, Rgb([9, 9, 9]))),
            ImageFormat::Jpeg,
        );
        let img = decode(&with_orientation_6(&jpeg), 1_000_000).unwrap();
        assert_eq!((img.width(), img.height()), (2, 4));
    }

    /// A smooth, textured photo-like RGB image.
    fn photo(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let v = |a: f32, b: f32| (128.0 + 90.0 * (fx * a).sin() * (fy * b).cos()) as u8;
            Rgb([v(7.0, 5.0), v(3.0, 11.0), v(13.0, 2.0)])
        }))
    }

    #[test]
    fn reduced_decoding_takes_the_largest_reduction_that_keeps_the_short_side() {
        let jpeg = encode(&photo(1600, 1200), ImageFormat::Jpeg);
        for (min_short, expect) in [
            (100, (200, 150)),
            (300, (400, 300)),
            (301, (800, 600)),
            (600, (800, 600)),
            (700, (1600, 1200)),
            (5000, (1600, 1200)),
        ] {
            let d = decode_reduced(&jpeg, 50_000_000, min_short).unwrap();
            assert_eq!(d.image.dimensions(), expect, "min_short {min_short}");
            assert_eq!((d.width, d.height), (1600, 1200), "the original's size");
            assert_eq!(d.pixels(), 1600 * 1200);
        }
        // Other formats decode at full size.
        let png = encode(&photo(800, 600), ImageFormat::Png);
        let d = decode_reduced(&png, 50_000_000, 100).unwrap();
        assert_eq!(d.image.dimensions(), (800, 600));
    }

    #[test]
    fn reduced_decoding_keeps_the_content() {
        let original = photo(1600, 1200);
        let jpeg = encode(&original, ImageFormat::Jpeg);
        let reduced = decode_reduced(&jpeg, 50_000_000, 300).unwrap().image;
        let full = decode(&jpeg, 50_000_000).unwrap().to_rgb8();
        let expected = crate::algo::resize::rgb(&full, 400, 300);
        let diff: u64 = reduced
            .to_rgb8()
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = diff as f64 / expected.as_raw().len() as f64;
        assert!(mean < 2.0, "mean difference {mean} levels");
    }

    #[test]
    fn reduced_decoding_applies_orientation_and_handles_grey() {
        let jpeg = with_orientation_6(&encode(&photo(1600, 800), ImageFormat::Jpeg));
        let d = decode_reduced(&jpeg, 50_000_000, 200).unwrap();
        assert_eq!(d.image.dimensions(), (200, 400));
        assert_eq!((d.width, d.height), (800, 1600));

        let grey = DynamicImage::ImageLuma8(photo(1600, 1200).to_luma8());
        let d = decode_reduced(&encode(&grey, ImageFormat::Jpeg), 50_000_000, 300).unwrap();
        assert_eq!(d.image.dimensions(), (400, 300));
        assert!(d.image.as_luma8().is_some());
    }

    #[test]
    fn reduced_decoding_rejects_what_decoding_rejects() {
        let jpeg = encode(&photo(1600, 1200), ImageFormat::Jpeg);
        let cut = &jpeg[..jpeg.len() / 2];
        assert!(matches!(
            decode_reduced(cut, 50_000_000, 300),
            Err(DecodeError::Undecodable(_))
        ));
        assert!(matches!(
            decode_reduced(&jpeg, 1_000_000, 300),
            Err(DecodeError::TooManyPixels { .. })
        ));
        assert_eq!(
            decode_reduced(b"", 1_000_000, 300).unwrap_err(),
            DecodeError::Empty
        );
    }
}
