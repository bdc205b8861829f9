//! The load the examples offer a fleet of batchers, shared by `loadgen` and the soak
//! (`examples/soak/`): the agents, one clock for every replica's `collected_at`, each
//! replica's visiting order and paced generator, and the check that every row ends at the
//! newest value any replica's batcher accepted.
//!
//! Every update carries `collected_at` = the wall-clock instant just before its `add`, in
//! whole microseconds (what `timestamptz` keeps) and strictly increasing across the
//! replicas, and a value that names that instant and its replica: per key "the newest
//! update any replica accepted" is well defined, and [`verify`] can tell which one a row
//! holds.

#![allow(dead_code)] // each example uses a different part

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use metadata_batcher::{Batcher, Metadata, MetadataBatch};
use uuid::Uuid;

use super::reconnecting::Reconnecting;

/// The generator's pacing step: it issues what is due, then sleeps this long.
pub const PACING_STEP: Duration = Duration::from_micros(500);

/// Agent `i` of the fleet, and back.
pub fn agent(i: usize) -> Uuid {
    Uuid::from_u128(0x6c67_0000_0000_0000_0000_0000_0000_0000 | (i as u128 + 1))
}
pub fn agent_index(id: Uuid) -> Option<usize> {
    let n = id.as_u128();
    (n >> 112 == 0x6c67)
        .then_some((n & 0xffff_ffff) as usize)
        .and_then(|i| i.checked_sub(1))
}

/// One clock for every replica's `collected_at`: whole microseconds (what `timestamptz`
/// keeps), strictly increasing across all replicas, so that per key the newest update any
/// replica accepted is well defined and is the one the table must end with.
#[derive(Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// The next instant, in microseconds since the epoch: now, or one more than the last.
    pub fn next_micros(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_micros() as u64);
        // The closure never refuses, so both arms hold the previous value.
        let (Ok(previous) | Err(previous)) = self
            .0
            .fetch_update(Relaxed, Relaxed, |last| Some(now.max(last + 1)));
        now.max(previous + 1)
    }
}

pub fn micros_to_time(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

/// The value a call writes: its `collected_at` and its replica, so the check can tell which
/// update a row holds.
pub fn value_of(micros: u64, replica: usize) -> String {
    format!("{micros}/r{replica}")
}

/// The order replica `r` visits the agents in: call `i` goes to agent
/// `(offset + (i mod agents) × stride) mod agents`. Replica 0 goes 0, 1, 2, ... (what
/// loadgen did before it had replicas); the others start elsewhere and stride by a number
/// coprime with the fleet size, so each still visits every agent once per round, but next
/// to other neighbours than any other replica: their flushes hold different mixes of the
/// same rows.
#[derive(Clone, Copy, Debug)]
pub struct VisitOrder {
    offset: usize,
    stride: usize,
}

impl VisitOrder {
    pub fn of(replica: usize, replicas: usize, agents: usize) -> VisitOrder {
        if replica == 0 || agents < 2 {
            return VisitOrder {
                offset: 0,
                stride: 1,
            };
        }
        let start = 1 + replica * agents / (replicas + 1);
        // Among any `agents` consecutive numbers one is ≡ 1 (mod agents), so coprime: this
        // finds a stride within `agents` steps.
        let stride = (start..start + agents)
            .map(|candidate| candidate % agents)
            .find(|&candidate| candidate > 0 && gcd(candidate, agents) == 1)
            .unwrap_or(1);
        VisitOrder {
            offset: replica * agents / replicas,
            stride,
        }
    }

    pub fn agent(&self, call: u64, agents: usize) -> usize {
        let i = (call % agents as u64) as usize;
        // i < agents and stride < agents: the product fits in a u64 for any fleet that fits
        // in memory.
        ((self.offset as u64 + i as u64 * self.stride as u64) % agents as u64) as usize
    }
}

pub fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What one replica's generator offered and how its `add` calls went.
pub struct Offered {
    pub accepted: u64,
    pub dropped: u64,
    /// Per (agent, key): the `collected_at` (µs) of the newest update this replica's batcher
    /// accepted; 0 for none.
    pub newest: Vec<u64>,
    pub elapsed: Duration,
    pub add_ns: Histogram<u64>,
}

/// One replica's generator: its agents in its own order, paced to `rate`.
pub struct Generator {
    pub replica: usize,
    pub batcher: Arc<Batcher>,
    pub clock: Arc<Clock>,
    pub order: VisitOrder,
    pub agents: usize,
    pub key_names: Vec<String>,
    pub rate: f64,
    pub duration: Duration,
    pub offered: Arc<AtomicU64>,
    /// Set to end the load before `duration` (the soak, interrupted).
    pub stop: Arc<AtomicBool>,
}

impl Generator {
    pub fn run(self) -> Result<Offered, String> {
        let keys = self.key_names.len();
        let mut newest = vec![0u64; self.agents * keys];
        let (mut accepted, mut dropped) = (0u64, 0u64);
        // How long each `add` call takes, waking the worker included (two clock reads of
        // ~20 ns each are in it too).
        let mut add_ns =
            Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds");
        let calls_per_second = self.rate / keys as f64;
        let start = Instant::now();
        let mut issued = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= self.duration || self.stop.load(Relaxed) {
                break;
            }
            let due = (elapsed.as_secs_f64() * calls_per_second) as u64;
            while issued < due {
                let a = self.order.agent(issued, self.agents);
                let micros = self.clock.next_micros();
                let value = value_of(micros, self.replica);
                let collected_at = micros_to_time(micros);
                let metadata: Vec<Metadata> = self
                    .key_names
                    .iter()
                    .map(|key| Metadata::new(key.clone(), value.clone(), "", collected_at))
                    .collect();
                let called = Instant::now();
                let added = self.batcher.add(agent(a), metadata);
                add_ns.saturating_record(called.elapsed().as_nanos() as u64);
                let report =
                    added.map_err(|err| format!("replica {}: add failed: {err}", self.replica))?;
                accepted += report.accepted as u64;
                dropped += report.dropped as u64;
                // The call's first `accepted` entries are the kept ones.
                for slot in &mut newest[a * keys..a * keys + report.accepted] {
                    *slot = micros;
                }
                issued += 1;
                self.offered.fetch_add(keys as u64, Relaxed);
            }
            thread::sleep(PACING_STEP);
        }
        Ok(Offered {
            accepted,
            dropped,
            newest,
            elapsed: start.elapsed(),
            add_ns,
        })
    }
}

/// Waits for every replica's generator; what each offered, in replica order.
pub fn join_generators(
    generators: Vec<thread::JoinHandle<Result<Offered, String>>>,
) -> Result<Vec<Offered>, String> {
    generators
        .into_iter()
        .enumerate()
        .map(|(replica, generator)| {
            generator
                .join()
                .map_err(|_| format!("replica {replica}'s generator panicked"))?
        })
        .collect()
}

/// Records the freshness of each row of `batch` committed at `committed` (commit instant −
/// `collected_at`, the add instant), in µs, into `histogram`.
pub fn record_freshness(
    histogram: &mut Histogram<u64>,
    batch: &MetadataBatch,
    committed: SystemTime,
) {
    for &collected_at in &batch.collected_at {
        let age = committed.duration_since(collected_at).unwrap_or_default();
        histogram.saturating_record(age.as_micros().max(1) as u64);
    }
}

/// Per (agent, key): the newest update any replica's batcher accepted, as (collected_at
/// µs, replica); (0, 0) for none. The shared [`Clock`] makes the maximum unique.
pub fn newest_by_key(offers: &[Offered], slots: usize) -> Vec<(u64, usize)> {
    let mut newest = vec![(0u64, 0usize); slots];
    for (replica, offer) in offers.iter().enumerate() {
        for (slot, &micros) in newest.iter_mut().zip(&offer.newest) {
            if micros > slot.0 {
                *slot = (micros, replica);
            }
        }
    }
    newest
}

/// Reads every row back on `session` (unnamed, so it works through a transaction pooler)
/// and counts the rows checked and those not at their newest value (`newest`, from
/// [`newest_by_key`]).
pub fn verify(
    session: &mut Reconnecting,
    key_names: &[String],
    newest: &[(u64, usize)],
) -> Result<(u64, u64), String> {
    let key_index: HashMap<&str, usize> = key_names
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let keys = key_names.len();
    let rows = session.run("--verify: reading the table", |client| {
        client.query_typed(
            "SELECT workspace_agent_id, key, value FROM workspace_agent_metadata",
            &[],
        )
    })?;
    let (mut checked, mut wrong) = (0u64, 0u64);
    for row in rows {
        let read = |err: postgres::Error| format!("--verify: reading a row: {err}");
        let id: Uuid = row.try_get(0).map_err(read)?;
        let key: String = row.try_get(1).map_err(read)?;
        let value: String = row.try_get(2).map_err(read)?;
        let (Some(a), Some(&k)) = (agent_index(id), key_index.get(key.as_str())) else {
            continue;
        };
        let Some(&(micros, replica)) = newest.get(a * keys + k) else {
            continue;
        };
        let expected = match micros {
            0 => String::new(),
            _ => value_of(micros, replica),
        };
        checked += 1;
        if value != expected {
            wrong += 1;
        }
    }
    Ok((checked, wrong))
}
