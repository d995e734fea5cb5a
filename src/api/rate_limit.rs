//! A per-caller token bucket on `/v1/*` (`[rate_limit]`): callers are keyed by
//! their JWT `sub`, or by peer address when they present no valid token. Over
//! the limit: 429 with `Retry-After` and the JSON error (`rate_limited`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, ResponseError, web};

use super::auth::caller_key;
use super::error::ApiError;
use crate::startup::AppState;

/// Above this many tracked callers, buckets that have refilled are dropped (they are
/// the same as absent ones), so memory follows the callers of the last moments.
const PRUNE_ABOVE: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets: `burst` requests at once, refilled at `rate` per second.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `None` when `rate` is 0 (disabled).
    pub fn new(rate: f64, burst: u32) -> Option<Self> {
        (rate > 0.0).then(|| RateLimiter {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token of `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// Whole seconds to announce in `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The middleware of the `/v1` scope.
pub async fn limit(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if let Some(state) = req.app_data::<web::Data<AppState>>()
        && let Some(limiter) = &state.limiter
    {
        let key = caller_key(req.request(), &state.jwt);
        if let Err(wait) = limiter.check(&key, Instant::now()) {
            let res = ApiError::RateLimited(retry_after_secs(wait)).error_response();
            return Ok(req.into_response(res).map_into_right_body());
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = RateLimiter::new(2.0, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check("a", t0).is_ok());
        }
        let wait = l.check("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        // Another caller has its own bucket.
        assert!(l.check("b", t0).is_ok());
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.check("a", t1).is_ok());
        assert!(l.check("a", t1).is_err());
        // Long idle refills to the burst, never past it.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.check("a", t2).is_ok());
        }
        assert!(l.check("a", t2).is_err());
    }

    #[test]
    fn slow_rates_announce_whole_seconds() {
        let l = RateLimiter::new(0.25, 1).unwrap();
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_ok());
        assert_eq!(retry_after_secs(l.check("a", t0).unwrap_err()), 4);
    }

    #[test]
    fn zero_rate_disables() {
        assert!(RateLimiter::new(0.0, 100).is_none());
    }

    #[test]
    fn refilled_buckets_are_pruned() {
        let l = RateLimiter::new(100.0, 1).unwrap();
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            l.check(&format!("k{i}"), t0).unwrap();
        }
        assert_eq!(l.tracked(), PRUNE_ABOVE + 1);
        l.check("late", t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(l.tracked(), 1);
    }
}
