//! What the simulated store and publisher may do, and how often: drawn per case from its
//! seed, and switched between profiles by the case's operations.

use super::rng::Rng;

/// Per-statement fault rates, in per mille, while the store runs the `Chaos` profile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rates {
    /// The database is down: `Unavailable`, nothing written.
    pub unavailable: u32,
    /// The commit went through but the answer was lost: written, yet `Unavailable`.
    pub lost_commit: u32,
    /// A statement timeout: `Canceled` after the store's statement time.
    pub canceled: u32,
    /// A deadlock the store retried: counted in `conflicts()`, then written.
    pub conflict: u32,
    /// Conflict retries ran out: counted, then `Canceled`.
    pub conflicts_exhausted: u32,
    /// `batch_update_many` answers for fewer batches than it was given.
    pub short_results: u32,
    /// The statement takes mock-clock time, short of the deadline.
    pub slow: u32,
    /// The statement takes mock-clock time up to three final flush timeouts, unless
    /// interrupted first.
    pub hang: u32,
    /// The store panics before writing.
    pub panic: u32,
}

impl Rates {
    /// Each kind on or off for the case, and its rate when on.
    pub fn draw(rng: &mut Rng) -> Rates {
        let mut rate = |on: u32, max: u64| {
            if rng.chance(on) {
                rng.range(1, max) as u32
            } else {
                0
            }
        };
        Rates {
            unavailable: rate(500, 200),
            lost_commit: rate(300, 100),
            canceled: rate(400, 150),
            conflict: rate(400, 200),
            conflicts_exhausted: rate(200, 60),
            short_results: rate(400, 300),
            slow: rate(400, 200),
            hang: rate(250, 40),
            panic: rate(150, 30),
        }
    }
}

/// How the store behaves now; operations switch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Writes everything (refusing poisoned rows, waiting on locked ones).
    Healthy,
    /// Faults at the case's rates.
    Chaos,
    /// Every statement fails `Unavailable`.
    Outage,
    /// Every statement waits for a table lock and is `Canceled`.
    TableLocked,
}

/// The publisher's faults, in per mille per payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishRates {
    pub fail: u32,
    pub panic: u32,
}

impl PublishRates {
    pub fn draw(rng: &mut Rng) -> PublishRates {
        PublishRates {
            fail: if rng.chance(300) {
                rng.range(1, 300) as u32
            } else {
                0
            },
            panic: if rng.chance(100) {
                rng.range(1, 50) as u32
            } else {
                0
            },
        }
    }
}

/// How often each fault happened, over every case of the run: the closing line of a run
/// quotes them, so a fault kind that no case reached shows.
pub mod seen {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    pub const KINDS: [&str; 14] = [
        "unavailable",
        "lost commit",
        "canceled",
        "conflict",
        "conflicts exhausted",
        "short results",
        "slow",
        "hang",
        "hang interrupted",
        "store panic",
        "row refused",
        "row locked",
        "publish failed",
        "publisher panic",
    ];

    static COUNTS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

    pub fn count(kind: &str) {
        let i = KINDS.iter().position(|k| *k == kind).expect("a known kind");
        COUNTS[i].fetch_add(1, Relaxed);
    }

    pub fn report() -> String {
        KINDS
            .iter()
            .zip(&COUNTS)
            .map(|(kind, n)| format!("{kind} {}", n.load(Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn missing() -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(&COUNTS)
            .filter(|(_, n)| n.load(Relaxed) == 0)
            .map(|(kind, _)| *kind)
            .collect()
    }
}
