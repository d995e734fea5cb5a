//! Uploaded bytes through `decode::probe`, `decode::decode`, and `decode::decode_reduced`
//! at the API's scale (1/8) and at a scale the embedder asks for.
//!
//! Invariants, beyond "no panic, no hang, no OOM":
//! - `probe` succeeds only for a sniffed JPEG/PNG/WebP, with non-zero dimensions
//!   within the pixel limit;
//! - `decode` fails exactly when `probe` fails (with the same error), or with
//!   `Undecodable` after a successful probe;
//! - a decoded image has the probed dimensions (swapped by a 90° EXIF
//!   orientation) and so never exceeds the pixel limit;
//! - `decode_reduced` fails like `decode` when `probe` fails, otherwise only with
//!   `Undecodable`; when it succeeds it reports the probed size (oriented) as the
//!   original's and its image is no larger than that;
//! - what the API's check (`photo::check`) accepts, the embedder (`photo::analyse`) analyses,
//!   and every budget reservation is returned.

#![no_main]

use actors::algo::budget::MemoryBudget;
use actors::algo::decode::{self, DecodeError, Format};
use actors::algo::photo;
use libfuzzer_sys::fuzz_target;

/// Small, so that the limit itself gets exercised by fuzzed headers.
const MAX_PIXELS: u64 = 4_000_000;

fuzz_target!(|data: &[u8]| {
    let sniffed = decode::sniff(data);
    let probed = decode::probe(data, MAX_PIXELS);
    match &probed {
        Ok(info) => {
            assert!(
                matches!(info.format, Format::Jpeg | Format::Png | Format::WebP),
                "{info:?}"
            );
            assert_eq!(Some(info.format), sniffed, "probe and sniff disagree");
            assert!(info.width > 0 && info.height > 0, "{info:?}");
            assert!(
                u64::from(info.width) * u64::from(info.height) <= MAX_PIXELS,
                "probe accepted {info:?} over the limit"
            );
            let (long, short) = (info.width.max(info.height), info.width.min(info.height));
            assert!(long <= short * 20, "probe accepted {info:?} past the aspect ratio");
        }
        Err(DecodeError::Empty) => assert!(data.is_empty()),
        Err(DecodeError::Unsupported) => assert_eq!(sniffed, None),
        Err(DecodeError::TooManyPixels { width, height, max }) => {
            assert_eq!(*max, MAX_PIXELS);
            assert!(u64::from(*width) * u64::from(*height) > MAX_PIXELS);
        }
        Err(DecodeError::AspectRatio { width, height, max }) => {
            let (long, short) = ((*width).max(*height), (*width).min(*height));
            assert!(u64::from(long) > u64::from(short) * u64::from(*max));
        }
        Err(DecodeError::Undecodable(_)) => assert!(sniffed.is_some()),
        // Only a budgeted decode reports this; probe never does.
        Err(e @ DecodeError::OverBudget { .. }) => panic!("probe reported {e:?}"),
    }

    match decode::decode(data, MAX_PIXELS) {
        Ok(img) => {
            let info = probed
                .as_ref()
                .expect("decode succeeded where probe failed");
            let (w, h) = (img.width(), img.height());
            assert!(
                (w, h) == (info.width, info.height) || (h, w) == (info.width, info.height),
                "decoded {w}x{h}, probed {}x{} ({:?})",
                info.width,
                info.height,
                info.format
            );
            assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS);
        }
        Err(e) => match &probed {
            Err(p) => assert_eq!(&e, p, "decode and probe fail differently"),
            Ok(info) => assert!(
                matches!(e, DecodeError::Undecodable(_)),
                "probe accepted {info:?}, decode failed with {e:?}"
            ),
        },
    }

    for min_short in [1, 300] {
        match decode::decode_reduced(data, MAX_PIXELS, min_short) {
            Ok(d) => {
                let info = probed
                    .as_ref()
                    .expect("decode_reduced succeeded where probe failed");
                assert!(
                    (d.width, d.height) == (info.width, info.height)
                        || (d.height, d.width) == (info.width, info.height),
                    "reduced decode reports {}x{}, probed {}x{}",
                    d.width,
                    d.height,
                    info.width,
                    info.height
                );
                assert!(d.image.width() <= d.width && d.image.height() <= d.height);
            }
            Err(e) => match &probed {
                Err(p) => assert_eq!(&e, p, "decode_reduced and probe fail differently"),
                Ok(info) => assert!(
                    matches!(e, DecodeError::Undecodable(_)),
                    "probe accepted {info:?}, decode_reduced failed with {e:?}"
                ),
            },
        }
    }
    // Accepted means processable: whatever the API's check accepts, the embedder analyses.
    let budget = MemoryBudget::new(256 << 20);
    if photo::check(data, MAX_PIXELS.into(), 256, &budget).is_ok() {
        let analysed = photo::analyse(data, MAX_PIXELS.into(), &Constant, &budget);
        assert!(analysed.is_ok(), "accepted by the check, refused by the embedder: {:?}", analysed.err());
    }
    assert_eq!(budget.used(), 0);
});

/// A model stand-in answering a constant vector.
struct Constant;

impl actors::algo::embed::ImageEncoder for Constant {
    fn model_version(&self) -> &str {
        "constant"
    }
    fn embed(&self, _: &image::DynamicImage) -> Result<Vec<f32>, actors::algo::embed::EmbedError> {
        Ok(vec![1.0, 0.0])
    }
    fn input_short_side(&self) -> u32 {
        256
    }
}
