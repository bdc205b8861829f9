//! A case: the settings of its batchers and store, drawn from its seed, and the list of
//! operations the driver runs (also drawn from the seed, and shrunk when the case fails).

use std::fmt;
use std::time::Duration;

use metadata_batcher::FlushMode;

use super::faults::{Profile, PublishRates, Rates};
use super::rng::Rng;

pub const AGENTS: u8 = 6;
pub const KEYS: u8 = 4;

/// The settings of one batcher (a replica).
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub batch_size: usize,
    pub channel_capacity: usize,
    pub max_pending: Option<usize>,
    pub max_pending_bytes: Option<usize>,
    pub flush_mode: FlushMode,
    pub max_batch_rows: Option<usize>,
    pub parallel_batches: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub batchers: Vec<BatcherConfig>,
    pub interval: Duration,
    pub final_flush_timeout: Duration,
    pub rates: Rates,
    pub publish: PublishRates,
}

/// One entry of an `add`.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub key: u8,
    pub secs: u64,
    pub poison: bool,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// `add`; `invalid` puts an entry with a NUL byte at the end, which refuses the call.
    Add {
        batcher: usize,
        agent: u8,
        entries: Vec<Entry>,
        invalid: bool,
    },
    Advance(Duration),
    Sync(usize),
    Flush(usize),
    /// `flush` or `sync` on a thread of its own, left running.
    FlushInBackground(usize),
    SyncInBackground(usize),
    Store(Profile),
    PublisherFaults(bool),
    Lock {
        agent: u8,
        key: u8,
    },
    UnlockAll,
    /// The next reading of the clock on this thread panics.
    ClockPanic(&'static str),
    /// Every batcher synced, background callers joined, and the exact accounting checked.
    Quiesce,
    Close(usize),
}

pub struct Case {
    pub seed: u64,
    pub config: Config,
    pub ops: Vec<Op>,
}

impl Case {
    pub fn generate(seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let replicas = if rng.chance(650) {
            1
        } else {
            rng.range(2, 3) as usize
        };
        let batchers = (0..replicas).map(|_| batcher_config(&mut rng)).collect();
        let config = Config {
            batchers,
            interval: Duration::from_millis(rng.pick(&[50, 1000, 5000])),
            final_flush_timeout: Duration::from_millis(rng.pick(&[200, 500, 2000])),
            rates: Rates::draw(&mut rng),
            publish: PublishRates::draw(&mut rng),
        };
        let count = rng.range(1, 80) as usize;
        let ops = (0..count).map(|_| op(&mut rng, replicas)).collect();
        Case { seed, config, ops }
    }
}

fn batcher_config(rng: &mut Rng) -> BatcherConfig {
    let batch_size = rng.pick(&[1, 2, 3, 5, 8, 500]);
    BatcherConfig {
        batch_size,
        channel_capacity: rng.pick(&[3, 16, 1000]),
        max_pending: rng
            .chance(250)
            .then(|| batch_size.max(rng.range(1, 12) as usize)),
        // About 6 to 30 entries of the sizes used here.
        max_pending_bytes: rng.chance(250).then(|| rng.range(2_000, 10_000) as usize),
        flush_mode: if rng.chance(700) {
            FlushMode::Pipelined
        } else {
            FlushMode::Inline
        },
        max_batch_rows: rng.chance(500).then(|| rng.range(1, 20) as usize),
        parallel_batches: rng.range(1, 3) as usize,
    }
}

fn op(rng: &mut Rng, replicas: usize) -> Op {
    let batcher = rng.below(replicas as u64) as usize;
    match rng.below(1000) {
        0..=449 => {
            let count = rng.range(1, 6);
            Op::Add {
                batcher,
                agent: rng.below(AGENTS.into()) as u8,
                entries: (0..count)
                    .map(|_| Entry {
                        key: rng.below(KEYS.into()) as u8,
                        secs: rng.range(1, 30),
                        poison: rng.chance(40),
                    })
                    .collect(),
                invalid: rng.chance(20),
            }
        }
        450..=589 => Op::Advance(Duration::from_millis(
            rng.pick(&[1, 20, 100, 250, 1000, 6000]),
        )),
        590..=649 => Op::Sync(batcher),
        650..=699 => Op::Flush(batcher),
        700..=739 => Op::FlushInBackground(batcher),
        740..=769 => Op::SyncInBackground(batcher),
        770..=839 => Op::Store(rng.pick(&[
            Profile::Healthy,
            Profile::Chaos,
            Profile::Chaos,
            Profile::Outage,
            Profile::TableLocked,
        ])),
        840..=859 => Op::PublisherFaults(rng.chance(500)),
        860..=879 => Op::Lock {
            agent: rng.below(AGENTS.into()) as u8,
            key: rng.below(KEYS.into()) as u8,
        },
        880..=894 => Op::UnlockAll,
        895..=899 => Op::ClockPanic(rng.pick(&["mdbatch-worker", "mdbatch-flush"])),
        900..=969 => Op::Quiesce,
        _ => Op::Close(batcher),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Add {
                batcher,
                agent,
                entries,
                invalid,
            } => {
                write!(f, "add b{batcher} agent{agent} [")?;
                for e in entries {
                    let poison = if e.poison { "!" } else { "" };
                    write!(f, " k{}@{}{poison}", e.key, e.secs)?;
                }
                write!(f, " ]{}", if *invalid { " +invalid" } else { "" })
            }
            other => write!(f, "{other:?}"),
        }
    }
}
