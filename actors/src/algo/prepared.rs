//! A photo prepared at upload: the pixels the model sees (its [`crop`](embed::crop)) and its
//! quality measures, so that the embedder runs inference without reading and decoding the
//! photo a second time.
//!
//! The API decodes every upload anyway, to check it with the embedder's own decode
//! ([`super::photo::check`]); keeping what that decode yields costs a crop and the quality
//! measures and saves the worker the read, the decode and the measures. What is kept lives
//! in a [`PreparedCache`] in the process's memory, shared by the API and the embedders of a
//! `serve` process; it is never stored, so storage holds exactly the photos. It is a cache:
//! an embedder that finds nothing there (another process took the upload, the cache was
//! full, the entry expired, the process restarted) decodes the original, with the same
//! embedding and measures either way.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use image::DynamicImage;
use uuid::Uuid;

use super::embed::{self, Preprocess};
use super::quality::{self, Quality};

/// What the embedder needs of a photo, prepared from its decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub crop: embed::ModelCrop,
    pub quality: Quality,
}

impl Prepared {
    /// Crops and measures a photo decoded as the embedder decodes it (`pixels`: the
    /// original's, which the hero score uses).
    pub fn from_decoded(image: &DynamicImage, pixels: u64, p: &Preprocess) -> Self {
        let quality = quality::measure_scaled(image, pixels);
        Prepared {
            crop: embed::crop(image, p, quality.noise),
            quality,
        }
    }

    fn bytes(&self) -> usize {
        self.crop.pixels.as_raw().len() + std::mem::size_of::<Self>()
    }
}

/// Prepared photos by image id, within a byte budget.
///
/// Bounded two ways: an entry that would exceed the budget is refused (not the oldest
/// evicted: jobs are handled in order, so the oldest entries are the next to be used), and
/// an entry left longer than `ttl` (its job failed, its photo was a duplicate, or another
/// process embedded it) is dropped at the next insert. Written by hand because it is a map
/// and a queue under one lock; the caching crates evict by recency, which is the wrong end.
pub struct PreparedCache {
    budget: usize,
    ttl: Duration,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<Uuid, Entry>,
    /// Insertion order, for expiry; ids already taken are skipped.
    order: VecDeque<(Instant, Uuid)>,
    bytes: usize,
}

struct Entry {
    at: Instant,
    /// The preprocessing geometry it was made for (`input_size`, `resize_to`).
    geometry: (u32, u32),
    prepared: Prepared,
}

impl PreparedCache {
    /// A cache of at most `budget` bytes (0: it keeps nothing) whose entries live `ttl`.
    pub fn new(budget: usize, ttl: Duration) -> Self {
        PreparedCache {
            budget,
            ttl,
            inner: Mutex::new(Entries::default()),
        }
    }

    /// Keeps `prepared` for `image_id`; false when it does not fit the budget.
    pub fn insert(&self, image_id: Uuid, p: &Preprocess, prepared: Prepared) -> bool {
        let size = prepared.bytes();
        let now = Instant::now();
        let mut e = self.inner.lock().expect("prepared cache lock");
        e.expire(now, self.ttl);
        if e.bytes + size > self.budget {
            return false;
        }
        let entry = Entry {
            at: now,
            geometry: (p.input_size, p.resize_to),
            prepared,
        };
        if let Some(old) = e.by_id.insert(image_id, entry) {
            e.bytes -= old.prepared.bytes();
        }
        e.bytes += size;
        e.order.push_back((now, image_id));
        true
    }

    /// Takes what was prepared of `image_id` for the preprocessing `p`, if anything.
    pub fn take(&self, image_id: Uuid, p: &Preprocess) -> Option<Prepared> {
        let mut e = self.inner.lock().expect("prepared cache lock");
        let entry = e.by_id.remove(&image_id)?;
        e.bytes -= entry.prepared.bytes();
        (entry.geometry == (p.input_size, p.resize_to)).then_some(entry.prepared)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("prepared cache lock").bytes
    }
}

impl Entries {
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some(&(at, id)) = self.order.front() {
            if now.duration_since(at) < ttl {
                break;
            }
            self.order.pop_front();
            // Only the entry this queue slot was made for (an id inserted again is newer).
            if self.by_id.get(&id).is_some_and(|x| x.at == at) {
                let gone = self.by_id.remove(&id).expect("present");
                self.bytes -= gone.prepared.bytes();
            }
        }
        // Slots of ids already taken keep the queue growing only until they expire, so it
        // holds at most the inserts of one `ttl`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::quality::tests::scene;

    fn prepared(side: u32) -> Prepared {
        Prepared::from_decoded(
            &scene(side, side),
            u64::from(side) * u64::from(side),
            &Preprocess::OPEN_NSFW,
        )
    }

    #[test]
    fn a_prepared_photo_is_the_models_crop_and_the_photos_measures() {
        let p = Preprocess::OPEN_NSFW;
        let img = scene(640, 480);
        let prepared = Prepared::from_decoded(&img, 640 * 480, &p);
        assert_eq!(prepared.crop.pixels.dimensions(), (224, 224));
        assert_eq!(prepared.quality, quality::measure_scaled(&img, 640 * 480));
        assert_eq!(prepared.crop, embed::crop(&img, &p, prepared.quality.noise));
    }

    #[test]
    fn the_cache_hands_an_entry_out_once_and_only_for_its_geometry() {
        let p = Preprocess::OPEN_NSFW;
        let cache = PreparedCache::new(8 << 20, Duration::from_secs(60));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(cache.insert(a, &p, prepared(300)));
        assert!(cache.insert(b, &p, prepared(300)));
        assert!(cache.bytes() > 2 * 224 * 224 * 3);
        assert_eq!(cache.take(a, &p), Some(prepared(300)));
        assert_eq!(cache.take(a, &p), None, "taken once");
        let mut other = p.clone();
        other.input_size = 256;
        assert_eq!(cache.take(b, &other), None, "made for another model");
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_cache_refuses_what_exceeds_its_budget_and_forgets_what_expires() {
        let p = Preprocess::OPEN_NSFW;
        let one = prepared(300).bytes();
        let cache = PreparedCache::new(2 * one, Duration::from_millis(50));
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        assert!(cache.insert(ids[0], &p, prepared(300)));
        assert!(cache.insert(ids[1], &p, prepared(300)));
        assert!(!cache.insert(ids[2], &p, prepared(300)), "over budget");
        assert!(cache.bytes() <= 2 * one);
        // The oldest expires first; the next insert drops it and fits.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut fitted = false;
        while Instant::now() < deadline && !fitted {
            fitted = cache.insert(ids[2], &p, prepared(300));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(fitted, "an expired entry made room");
        assert!(cache.bytes() <= 2 * one);
        assert_eq!(cache.take(ids[0], &p), None, "the oldest went first");
        assert!(cache.take(ids[2], &p).is_some());

        let off = PreparedCache::new(0, Duration::from_secs(60));
        assert!(
            !off.insert(ids[0], &p, prepared(300)),
            "a budget of 0 keeps nothing"
        );
    }
}
