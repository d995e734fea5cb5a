//! Fault injection for tests and drills: makes chosen points panic a set number of times, so
//! that restarts, escalation and the release of a job's resources can be shown on a real
//! process. Empty (one relaxed atomic load per message) unless configured.

use std::sync::atomic::{AtomicU32, Ordering};

use super::ActorKind;

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The handler of a message of this actor kind.
    Actor(ActorKind),
    /// One iteration of the read loop.
    ReadLoop,
    /// A job, after it has taken its pet's lock and started.
    Job,
}

impl FaultPoint {
    const ALL: [FaultPoint; 9] = [
        FaultPoint::Actor(ActorKind::Supervisor),
        FaultPoint::Actor(ActorKind::StreamReader),
        FaultPoint::Actor(ActorKind::PetScheduler),
        FaultPoint::Actor(ActorKind::Embedder),
        FaultPoint::Actor(ActorKind::Clusterer),
        FaultPoint::Actor(ActorKind::HeroSelector),
        FaultPoint::Actor(ActorKind::PostgresWriter),
        FaultPoint::ReadLoop,
        FaultPoint::Job,
    ];

    fn name(self) -> &'static str {
        match self {
            FaultPoint::Actor(k) => k.as_str(),
            FaultPoint::ReadLoop => "read_loop",
            FaultPoint::Job => "job",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|p| *p == self).expect("listed")
    }
}

/// How many more times each point panics.
#[derive(Debug, Default)]
pub struct Faults {
    remaining: [AtomicU32; 9],
}

impl Faults {
    /// `point=count,...`, e.g. `embedder=2,read_loop=1,job=1`; points are the actor kinds,
    /// `read_loop` and `job`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, n) = item.split_once('=').unwrap_or((item, "1"));
            let point = FaultPoint::ALL
                .iter()
                .find(|p| p.name() == name.trim())
                .ok_or_else(|| format!("unknown fault point `{name}`"))?;
            let n: u32 = n
                .trim()
                .parse()
                .map_err(|_| format!("`{item}`: the count must be a number"))?;
            f.remaining[point.index()].fetch_add(n, Ordering::Relaxed);
        }
        Ok(f)
    }

    /// Makes the next `n` hits of `point` panic.
    pub fn arm(&self, point: FaultPoint, n: u32) {
        self.remaining[point.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.remaining
            .iter()
            .all(|r| r.load(Ordering::Relaxed) == 0)
    }

    /// Panics if `point` has injected faults left.
    pub fn hit(&self, point: FaultPoint) {
        let r = &self.remaining[point.index()];
        if r.load(Ordering::Relaxed) > 0
            && r.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
        {
            panic!("injected fault at {}", point.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts_down() {
        let f = Faults::parse("embedder=2, job").unwrap();
        assert!(!f.is_empty());
        for _ in 0..2 {
            let p = std::panic::catch_unwind(|| f.hit(FaultPoint::Actor(ActorKind::Embedder)));
            assert!(p.is_err());
        }
        f.hit(FaultPoint::Actor(ActorKind::Embedder));
        assert!(std::panic::catch_unwind(|| f.hit(FaultPoint::Job)).is_err());
        f.hit(FaultPoint::Job);
        assert!(f.is_empty());
        assert!(Faults::parse("nowhere=1").is_err());
        assert!(Faults::parse("job=x").is_err());
    }
}
