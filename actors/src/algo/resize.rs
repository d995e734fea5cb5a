//! SIMD resizing (SSE4.1/AVX2/NEON through `fast_image_resize`) for the model input and the
//! quality measures.
//!
//! The filter is a bilinear convolution whose support widens with the reduction, the same
//! kernel as the `image` crate's `Triangle`, so a downscale averages every source pixel it
//! covers instead of sampling a few.

use std::cell::RefCell;

use fast_image_resize::{
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
    images::{Image, ImageRef},
};
use image::{GrayImage, ImageBuffer, Pixel, RgbImage};

thread_local! {
    // A resizer keeps its scratch buffers between calls; one per thread avoids locking.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

fn resize_raw(src: &[u8], (w, h): (u32, u32), (nw, nh): (u32, u32), pt: PixelType) -> Vec<u8> {
    let src = ImageRef::new(w, h, src, pt).expect("an image buffer holds width x height pixels");
    let mut dst = Image::new(nw, nh, pt);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with_borrow_mut(|r| r.resize(&src, &mut dst, &options))
        .expect("source and destination share the pixel type");
    dst.into_vec()
}

fn resize<P: Pixel<Subpixel = u8>>(
    img: &ImageBuffer<P, Vec<u8>>,
    nw: u32,
    nh: u32,
    pt: PixelType,
) -> ImageBuffer<P, Vec<u8>> {
    if img.dimensions() == (nw, nh) {
        return img.clone();
    }
    let raw = resize_raw(img.as_raw(), img.dimensions(), (nw, nh), pt);
    ImageBuffer::from_raw(nw, nh, raw).expect("the resizer fills width x height pixels")
}

/// Resizes an RGB image to exactly `nw` x `nh`.
pub fn rgb(img: &RgbImage, nw: u32, nh: u32) -> RgbImage {
    resize(img, nw, nh, PixelType::U8x3)
}

/// Resizes a luminance image to exactly `nw` x `nh`.
pub fn gray(img: &GrayImage, nw: u32, nh: u32) -> GrayImage {
    resize(img, nw, nh, PixelType::U8)
}

/// The size whose shorter side is `short`, keeping the aspect ratio; neither side is below
/// `min`.
pub fn short_side_size((w, h): (u32, u32), short: u32, min: u32) -> (u32, u32) {
    let s = short as f32 / w.min(h).max(1) as f32;
    (
        ((w as f32 * s).round() as u32).max(min),
        ((h as f32 * s).round() as u32).max(min),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb, imageops};

    fn gradient(w: u32, h: u32) -> RgbImage {
        ImageBuffer::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn matches_the_image_crates_triangle_filter() {
        let src = gradient(640, 427);
        let ours = rgb(&src, 256, 171);
        let theirs = imageops::resize(&src, 256, 171, imageops::FilterType::Triangle);
        assert_eq!(ours.dimensions(), (256, 171));
        let diff: u64 = ours
            .as_raw()
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = diff as f64 / ours.as_raw().len() as f64;
        assert!(mean < 1.0, "mean difference {mean} levels");
    }

    #[test]
    fn downscaling_averages_instead_of_sampling() {
        // A one-pixel checkerboard must become flat grey, not keep a sampled pattern.
        let board = GrayImage::from_fn(400, 400, |x, y| {
            Luma([if (x + y) % 2 == 0 { 0 } else { 255 }])
        });
        let small = gray(&board, 50, 50);
        assert!(small.pixels().all(|p| (120..=135).contains(&p.0[0])));
    }

    #[test]
    fn short_side_size_keeps_the_aspect_ratio() {
        assert_eq!(short_side_size((4000, 3000), 300, 3), (400, 300));
        assert_eq!(short_side_size((1000, 2000), 256, 224), (256, 512));
        assert_eq!(short_side_size((1000, 10), 2, 3), (200, 3));
    }
}
