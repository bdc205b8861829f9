//! [`SimStore`]: a store that fails in every way a real one can, on the mock clock.
//!
//! Every replica's store writes one shared [`Table`] with PostgreSQL's guard (never an
//! older `collected_at`), refuses rows whose value is poisoned (a check violation, so the
//! batcher must isolate them), waits on locked rows until its lock timeout, and, in the
//! `Chaos` profile, draws a fault per statement from the case's [`Rates`]. Time it takes
//! is mock-clock time it moves itself, as a slow database's time passes; a statement that
//! takes long stops early when its interrupt fires, as a PostgreSQL cancel request does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metadata_batcher::{
    BatchResult, Capabilities, Interrupt, MetadataBatch, MockClock, Store, StoreError,
    StoreErrorKind, Written,
};
use parking_lot::Mutex;
use uuid::Uuid;

use super::faults::{seen, Profile, Rates};
use super::rng::Rng;

/// Values that start with this are refused by the table's check constraint.
pub const POISON: &str = "poison";

/// How long a statement waits on a lock before it is canceled (`lock_timeout`).
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(100);

/// The step in which a long statement moves the mock clock, checking its interrupt
/// between steps.
const STEP: Duration = Duration::from_millis(20);

/// The table every replica writes, and what the test reads back.
pub struct Table {
    /// (agent, key) → (collected_at, value); every row the case uses is registered.
    pub rows: HashMap<(Uuid, String), (SystemTime, String)>,
    /// Per batcher: the agents of the rows its successful statements wrote.
    pub written_agents: Vec<HashSet<Uuid>>,
    pub profile: Profile,
    pub rates: Rates,
    /// Rows held locked by another transaction.
    pub locked: HashSet<(Uuid, String)>,
    /// The final flush timeout of the batchers: a hang may run up to three of them.
    pub final_flush_timeout: Duration,
}

pub struct SimStore {
    batcher: usize,
    table: Arc<Mutex<Table>>,
    clock: MockClock,
    rng: Rng,
    conflicts: u64,
    max_batch_rows: Option<usize>,
    parallel: usize,
    /// The interrupt of the coming call: fired, it ends a long statement.
    interrupted: Option<crossbeam_channel::Receiver<()>>,
}

/// What one statement does, drawn before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Unavailable,
    LostCommit,
    Canceled,
    Conflict,
    ConflictsExhausted,
    Slow,
    Hang,
    Panic,
}

impl Fault {
    fn kind(self) -> Option<&'static str> {
        Some(match self {
            Fault::None => return None,
            Fault::Unavailable => "unavailable",
            Fault::LostCommit => "lost commit",
            Fault::Canceled => "canceled",
            Fault::Conflict => "conflict",
            Fault::ConflictsExhausted => "conflicts exhausted",
            Fault::Slow => "slow",
            Fault::Hang => "hang",
            Fault::Panic => "store panic",
        })
    }
}

impl SimStore {
    pub fn new(
        batcher: usize,
        table: Arc<Mutex<Table>>,
        clock: MockClock,
        seed: u64,
        max_batch_rows: Option<usize>,
        parallel: usize,
    ) -> Self {
        SimStore {
            batcher,
            table,
            clock,
            rng: Rng::new(seed),
            conflicts: 0,
            max_batch_rows,
            parallel,
            interrupted: None,
        }
    }

    fn draw(&mut self) -> Fault {
        let (profile, rates) = {
            let table = self.table.lock();
            (table.profile, table.rates)
        };
        match profile {
            Profile::Healthy => return Fault::None,
            Profile::Outage => return Fault::Unavailable,
            Profile::TableLocked => return Fault::Canceled,
            Profile::Chaos => {}
        }
        let r = self.rng.below(1000) as u32;
        let kinds = [
            (rates.unavailable, Fault::Unavailable),
            (rates.lost_commit, Fault::LostCommit),
            (rates.canceled, Fault::Canceled),
            (rates.conflict, Fault::Conflict),
            (rates.conflicts_exhausted, Fault::ConflictsExhausted),
            (rates.slow, Fault::Slow),
            (rates.hang, Fault::Hang),
            (rates.panic, Fault::Panic),
        ];
        let mut upto = 0;
        for (rate, fault) in kinds {
            upto += rate;
            if r < upto {
                return fault;
            }
        }
        Fault::None
    }

    /// Moves the mock clock by `d` in steps, as a statement that runs that long; false if
    /// its interrupt fired first (the statement was canceled).
    fn take_time(&mut self, d: Duration) -> bool {
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(STEP);
            self.clock.advance(step);
            left -= step;
            if let Some(interrupted) = &self.interrupted {
                // A short real wait between steps lets the batcher's threads see the
                // time pass (a close's deadline, say) before more of it passes.
                if interrupted.recv_timeout(Duration::from_micros(200)).is_ok() {
                    return false;
                }
            }
        }
        true
    }

    /// One statement; its result carries the conflicts it ran into.
    fn statement(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        self.conflicts = 0;
        match self.run(batch) {
            Ok(updated) => Ok(Written::rows(updated).with_conflicts(self.conflicts)),
            Err(error) => Err(error.with_conflicts(self.conflicts)),
        }
    }

    fn run(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
        let fault = self.draw();
        let timeout = self.table.lock().final_flush_timeout;
        if let Some(kind) = fault.kind() {
            seen::count(kind);
        }
        match fault {
            Fault::Unavailable => return Err(StoreError::unavailable("sim: connection refused")),
            Fault::Panic => panic!("sim: store panicked"),
            Fault::Canceled => {
                self.take_time(LOCK_TIMEOUT);
                return Err(StoreError::canceled());
            }
            Fault::ConflictsExhausted => {
                self.conflicts += 3;
                return Err(StoreError::conflicts_exhausted());
            }
            Fault::Slow => {
                let d = Duration::from_millis(self.rng.range(1, 100));
                if !self.take_time(d) {
                    return Err(StoreError::canceled());
                }
            }
            Fault::Hang => {
                let d = timeout.mul_f64(self.rng.range(1, 300) as f64 / 100.0);
                if !self.take_time(d) {
                    seen::count("hang interrupted");
                    return Err(StoreError::canceled());
                }
            }
            Fault::Conflict => self.conflicts += 1,
            Fault::None | Fault::LostCommit => {}
        }
        let mut table = self.table.lock();
        for i in 0..batch.len() {
            if batch.values[i].starts_with(POISON) {
                seen::count("row refused");
                return Err(StoreError::rejected(format!(
                    "sim: check violation on {}/{}",
                    batch.agent_ids[i], batch.keys[i]
                )));
            }
        }
        let locked = (0..batch.len()).any(|i| {
            table
                .locked
                .contains(&(batch.agent_ids[i], batch.keys[i].clone()))
        });
        if locked {
            seen::count("row locked");
            drop(table);
            if !self.take_time(LOCK_TIMEOUT) {
                return Err(StoreError::canceled());
            }
            return Err(StoreError::canceled());
        }
        let mut updated = 0;
        for i in 0..batch.len() {
            let Some(row) = table
                .rows
                .get_mut(&(batch.agent_ids[i], batch.keys[i].clone()))
            else {
                continue;
            };
            if row.0 <= batch.collected_at[i] {
                *row = (batch.collected_at[i], batch.values[i].clone());
                updated += 1;
            }
        }
        if fault == Fault::LostCommit {
            return Err(StoreError::unavailable(
                "sim: connection lost after the commit",
            ));
        }
        let agents = batch.agent_ids.iter().copied();
        table.written_agents[self.batcher].extend(agents);
        Ok(updated)
    }
}

impl Store for SimStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        let result = self.statement(batch);
        self.interrupted = None;
        result
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        let (fire, fired) = crossbeam_channel::bounded(1);
        self.interrupted = Some(fired);
        Some(Interrupt::new(move || {
            let _ = fire.try_send(());
        }))
    }

    fn capabilities(&self) -> Capabilities {
        let capabilities = Capabilities::default().with_parallel_batches(self.parallel);
        match self.max_batch_rows {
            Some(rows) => capabilities.with_max_batch_rows(rows),
            None => capabilities,
        }
    }

    /// In `Chaos`, sometimes answers for only the first batches: the batcher must read the
    /// missing answers as "not tried".
    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        let short = {
            let table = self.table.lock();
            table.profile == Profile::Chaos && self.rng.chance(table.rates.short_results)
        };
        if short {
            seen::count("short results");
        }
        let tries = if short {
            self.rng.below(batches.len() as u64) as usize
        } else {
            batches.len()
        };
        let mut results = Vec::with_capacity(tries);
        for batch in &batches[..tries] {
            let result = BatchResult::from(self.statement(batch));
            let unavailable = matches!(&result, BatchResult::Failed(error) if error.kind() == StoreErrorKind::Unavailable);
            results.push(result);
            if unavailable {
                break;
            }
        }
        self.interrupted = None;
        results
    }
}
