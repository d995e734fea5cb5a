//! The memory budget of image decoding: every decode (and the buffers derived from it)
//! reserves its cost, computed from the image's header before anything is allocated, and
//! waits while the budget is spent instead of exceeding it. One budget per process covers
//! the API's checks and the embedders.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Bytes of decoding memory the process may use at once.
#[derive(Debug)]
pub struct MemoryBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// A reservation: returned to the budget when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

impl MemoryBudget {
    pub fn new(total: u64) -> Self {
        MemoryBudget {
            total,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// No limit (tools and tests that decode one photo at a time).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `bytes` fit and reserves them; `None` if they never can (more than the
    /// whole budget). Blocks the calling thread: call it from a blocking context.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        if bytes > self.total {
            return None;
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > self.total {
            // A timed wait, so a lost wake-up can never hang a decoder.
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += bytes;
        Some(Reservation {
            budget: self,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn reservations_never_exceed_the_budget_and_wait_for_room() {
        let budget = Arc::new(MemoryBudget::new(100));
        assert!(budget.reserve(101).is_none(), "more than the whole budget");
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, peak) = (budget.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let r = b.reserve(40).unwrap();
                        peak.fetch_max(b.used(), Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        drop(r);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 100);
        assert_eq!(budget.used(), 0);
    }
}
