//! Runs one case: builds its batchers on one simulated table, runs its operations, and
//! checks the invariants after every step, at every quiet point, at every `close`, and at
//! the end. A failure is a `String` saying which invariant broke, and where.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use metadata_batcher::{agent_ids, AddError, Batcher, Clock, CloseReport, Metadata, Stats};
use parking_lot::Mutex;
use uuid::Uuid;

use super::case::{Case, Op, AGENTS, KEYS};
use super::faults::Profile;
use super::model::Model;
use super::publisher::SimPublisher;
use super::store::{SimStore, Table, POISON};
use crate::common::{agent, at, TestClock};

/// Far longer than anything here takes once it may return: only a hang reaches it.
const HANG: Duration = Duration::from_secs(10);

/// How long a `close` may take, in real time, to return once its worker armed a timer
/// before the driver moves the clock to that timer.
const SETTLE: Duration = Duration::from_millis(20);

struct Replica {
    batcher: Arc<Batcher>,
    announced: Arc<Mutex<HashSet<Uuid>>>,
    report: Option<CloseReport>,
    /// `flush` and `sync` calls left running on threads of their own.
    callers: Vec<crossbeam_channel::Receiver<()>>,
    last: Stats,
}

pub struct Run<'a> {
    case: &'a Case,
    clock: TestClock,
    table: Arc<Mutex<Table>>,
    replicas: Vec<Replica>,
    model: Model,
    publisher_faulty: Arc<AtomicBool>,
    step: usize,
}

/// Keys of the simulated rows.
fn key_name(key: u8) -> String {
    format!("k{key}")
}

impl<'a> Run<'a> {
    pub fn new(case: &'a Case) -> Run<'a> {
        let config = &case.config;
        let clock = TestClock::new();
        let mut rows = std::collections::HashMap::new();
        for a in 0..AGENTS {
            for k in 0..KEYS {
                rows.insert((agent(a.into()), key_name(k)), (at(0), String::new()));
            }
        }
        let table = Arc::new(Mutex::new(Table {
            rows,
            written_agents: vec![HashSet::new(); config.batchers.len()],
            profile: Profile::Healthy,
            rates: config.rates,
            locked: HashSet::new(),
            final_flush_timeout: config.final_flush_timeout,
        }));
        let publisher_faulty = Arc::new(AtomicBool::new(false));
        let replicas = config
            .batchers
            .iter()
            .enumerate()
            .map(|(i, settings)| {
                let seed = case.seed.wrapping_mul(31).wrapping_add(i as u64);
                let store = SimStore::new(
                    i,
                    table.clone(),
                    clock.mock.clone(),
                    seed,
                    settings.max_batch_rows,
                    settings.parallel_batches,
                );
                let publisher = SimPublisher::new(!seed, config.publish, publisher_faulty.clone());
                let announced = publisher.announced.clone();
                let mut builder = Batcher::builder(store, publisher)
                    .clock(clock.clone())
                    .batch_size(settings.batch_size)
                    .interval(config.interval)
                    .channel_capacity(settings.channel_capacity)
                    .final_flush_timeout(config.final_flush_timeout)
                    .flush_mode(settings.flush_mode);
                if let Some(entries) = settings.max_pending {
                    builder = builder.max_pending(entries);
                }
                if let Some(bytes) = settings.max_pending_bytes {
                    builder = builder.max_pending_bytes(bytes);
                }
                Replica {
                    batcher: Arc::new(builder.build().expect("the case's settings are valid")),
                    announced,
                    report: None,
                    callers: Vec::new(),
                    last: Stats::default(),
                }
            })
            .collect();
        Run {
            case,
            clock,
            table,
            replicas,
            model: Model::default(),
            publisher_faulty,
            step: 0,
        }
    }

    /// Runs every operation, then closes what is open and judges the table.
    pub fn run(mut self, ops: &[Op]) -> Result<(), String> {
        for (step, op) in ops.iter().enumerate() {
            self.step = step;
            self.apply(op)
                .and_then(|()| self.check_always())
                .map_err(|error| format!("step {step} ({op}): {error}"))?;
        }
        self.step = ops.len();
        for b in 0..self.replicas.len() {
            self.close(b)
                .map_err(|error| format!("final close of b{b}: {error}"))?;
        }
        self.judge().map_err(|error| format!("at the end: {error}"))
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Add {
                batcher,
                agent: a,
                entries,
                invalid,
            } => self.add(*batcher, *a, entries, *invalid),
            Op::Advance(d) => {
                self.clock.mock.advance(*d);
                Ok(())
            }
            Op::Sync(b) => {
                self.replicas[*b].batcher.sync();
                Ok(())
            }
            Op::Flush(b) => {
                let report = self.replicas[*b].batcher.flush();
                if self.replicas[*b].report.is_some() && report.is_some() {
                    return Err("flush() after close() flushed".into());
                }
                Ok(())
            }
            Op::FlushInBackground(b) => {
                self.in_background(*b, |batcher| drop(batcher.flush()));
                Ok(())
            }
            Op::SyncInBackground(b) => {
                self.in_background(*b, |batcher| batcher.sync());
                Ok(())
            }
            Op::Store(profile) => {
                self.table.lock().profile = *profile;
                Ok(())
            }
            Op::PublisherFaults(on) => {
                self.publisher_faulty.store(*on, Relaxed);
                Ok(())
            }
            Op::Lock { agent: a, key } => {
                let row = (agent((*a).into()), key_name(*key));
                self.table.lock().locked.insert(row);
                Ok(())
            }
            Op::UnlockAll => {
                self.table.lock().locked.clear();
                Ok(())
            }
            Op::ClockPanic(thread) => {
                self.clock.panic_once_on(thread);
                Ok(())
            }
            Op::Quiesce => self.quiesce(),
            Op::Close(b) => self.close(*b),
        }
    }

    fn add(
        &mut self,
        b: usize,
        a: u8,
        entries: &[super::case::Entry],
        invalid: bool,
    ) -> Result<(), String> {
        let mut metadata: Vec<Metadata> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let value = if e.poison {
                    format!("{POISON}-b{b}-s{}-{i}", self.step)
                } else {
                    format!("b{b}-s{}-{i}", self.step)
                };
                Metadata::new(key_name(e.key), value, "", at(e.secs))
            })
            .collect();
        if invalid {
            metadata.push(Metadata::new("k0", "nul\0byte", "", at(1)));
        }
        let replica = &self.replicas[b];
        let result = replica.batcher.add(agent(a.into()), metadata.clone());
        match result {
            Err(AddError::Invalid { index, .. }) if invalid && index == entries.len() => Ok(()),
            Err(error) if invalid => Err(format!("an invalid call gave {error:?}")),
            Ok(_) if invalid => Err("an invalid call was accepted".into()),
            Err(AddError::Closed) => {
                if replica.report.is_some() || !replica.batcher.health().worker_alive {
                    Ok(())
                } else {
                    Err("add() refused as closed by an open batcher".into())
                }
            }
            Err(error) => Err(format!("add() refused a valid call: {error}")),
            Ok(_) if replica.report.is_some() => Err("add() accepted after close()".into()),
            Ok(report) => {
                if report.accepted + report.dropped != entries.len() {
                    return Err(format!(
                        "add() reported {report:?} for {} keys",
                        entries.len()
                    ));
                }
                for (m, e) in metadata.into_iter().zip(entries).take(report.accepted) {
                    self.model.accept(b, a, e.key, e.secs, m.value);
                }
                Ok(())
            }
        }
    }

    fn in_background(&mut self, b: usize, call: impl FnOnce(&Batcher) + Send + 'static) {
        let batcher = self.replicas[b].batcher.clone();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        thread::Builder::new()
            .name("sim-caller".into())
            .spawn(move || {
                call(&batcher);
                let _ = done_tx.send(());
            })
            .expect("a thread for a background call");
        self.replicas[b].callers.push(done);
    }

    /// Waits for every background call of replica `b` to return.
    fn join_callers(&mut self, b: usize) -> Result<(), String> {
        for done in self.replicas[b].callers.drain(..) {
            done.recv_timeout(HANG)
                .map_err(|_| format!("a flush() or sync() of b{b} did not return"))?;
        }
        Ok(())
    }

    /// What holds after every step, whatever is running: totals never go back. (The
    /// accounting is exact only at rest: a snapshot of totals that move is not.)
    fn check_always(&mut self) -> Result<(), String> {
        for (b, replica) in self.replicas.iter_mut().enumerate() {
            let now = replica.batcher.stats();
            let last = &replica.last;
            let monotonic = [
                ("flushed", last.flushed, now.flushed),
                ("superseded", last.superseded, now.superseded),
                ("dropped", last.dropped, now.dropped),
                ("rejected", last.rejected, now.rejected),
                (
                    "retention_dropped",
                    last.retention_dropped,
                    now.retention_dropped,
                ),
                ("lost_to_panics", last.lost_to_panics, now.lost_to_panics),
                ("store_errors", last.store_errors, now.store_errors),
                ("publish_errors", last.publish_errors, now.publish_errors),
                ("conflicts", last.conflicts, now.conflicts),
                ("panics", last.panics, now.panics),
            ];
            for (name, before, after) in monotonic {
                if after < before {
                    return Err(format!("b{b}: {name} went back from {before} to {after}"));
                }
            }
            replica.last = now;
        }
        Ok(())
    }

    /// Every open batcher synced until its totals stand still, background calls joined;
    /// then the exact accounting, health, and announcements.
    fn quiesce(&mut self) -> Result<(), String> {
        for b in 0..self.replicas.len() {
            self.join_callers(b)?;
        }
        for b in 0..self.replicas.len() {
            let replica = &self.replicas[b];
            if replica.report.is_some() {
                continue;
            }
            // A store that takes time moves the clock, which may start another flush.
            let mut stats = None;
            for _ in 0..50 {
                replica.batcher.sync();
                let first = replica.batcher.stats();
                replica.batcher.sync();
                if replica.batcher.stats() == first {
                    stats = Some(first);
                    break;
                }
            }
            let stats = stats.ok_or_else(|| format!("b{b}: never came to rest"))?;
            let waiting = stats.queued + stats.batched + stats.in_flight;
            if stats.accepted != waiting as u64 + stats.settled() {
                return Err(format!(
                    "b{b}: accepted keys unaccounted for at rest: {stats:?}"
                ));
            }
            let health = replica.batcher.health();
            if health.worker_alive {
                if health.store_call_age.is_some() {
                    return Err(format!("b{b}: a store call runs at rest: {health:?}"));
                }
                if health.oldest_unflushed_age.is_some() != (waiting > 0) {
                    return Err(format!("b{b}: {health:?} with {waiting} waiting"));
                }
                if stats.queued != 0 {
                    return Err(format!("b{b}: {} keys queued after sync", stats.queued));
                }
            }
            self.check_announced(b, &stats)?;
        }
        Ok(())
    }

    /// Every agent a statement of `b` wrote (and said so) was announced, unless its publish
    /// failed and was counted (a failed payload holds at most 363 agents), or a store call
    /// panicked after some of its statements wrote: the batcher cannot know what it wrote,
    /// and counts its rows in `lost_to_panics`.
    fn check_announced(&self, b: usize, stats: &Stats) -> Result<(), String> {
        let written = self.table.lock().written_agents[b].clone();
        let announced = self.replicas[b].announced.lock().clone();
        let missing = written.difference(&announced).count();
        let excused = stats.publish_errors as usize * agent_ids::MAX_IDS_PER_CHUNK
            + stats.lost_to_panics as usize;
        if missing > excused {
            return Err(format!(
                "b{b}: {missing} written agents never announced, {} publish errors",
                stats.publish_errors
            ));
        }
        Ok(())
    }

    /// Closes `b` on a thread of its own, moving the clock as a `close` in production sees
    /// time pass, but never past the deadline `close` armed; `close` must then return at
    /// once, and so must every call still waiting on `b`.
    fn close(&mut self, b: usize) -> Result<(), String> {
        let replica = &self.replicas[b];
        if let Some(first) = replica.report {
            let again = replica.batcher.close();
            return if again == first {
                Ok(())
            } else {
                Err(format!("close() again gave {again:?}, first {first:?}"))
            };
        }
        let batcher = replica.batcher.clone();
        let (report_tx, returned) = crossbeam_channel::bounded(1);
        let closer = format!("sim-close-{b}");
        thread::Builder::new()
            .name(closer.clone())
            .spawn(move || {
                let _ = report_tx.send(batcher.close());
            })
            .expect("a thread for close()");
        let timeout = self.case.config.final_flush_timeout;
        let deadline = self
            .clock
            .timer_armed_by(&closer, timeout)
            .ok_or("close() armed no deadline")?;
        // Time moves only when the shutdown waits for it (a retry's backoff) and `close`
        // has not returned in a moment of real time: what production's clock would give.
        let report = loop {
            crossbeam_channel::select! {
                recv(returned) -> report => break report.map_err(|_| "close() panicked")?,
                recv(self.clock.timers()) -> armed => {
                    let Ok(armed) = armed else { continue };
                    if armed.thread.as_deref() != Some("mdbatch-worker") {
                        continue;
                    }
                    if let Ok(report) = returned.recv_timeout(SETTLE) {
                        break report;
                    }
                    let now = self.clock.mock.now();
                    let target = (armed.at + armed.duration).min(deadline);
                    if target > now {
                        self.clock.mock.advance(target - now);
                    }
                    if self.clock.mock.now() >= deadline {
                        break returned.recv_timeout(HANG).map_err(|_| {
                            format!("close() did not return once its deadline ({timeout:?}) passed")
                        })?;
                    }
                },
                default(HANG) => {
                    let now = self.clock.mock.now();
                    if now < deadline {
                        self.clock.mock.advance(deadline - now);
                    }
                    break returned.recv_timeout(HANG).map_err(|_| {
                        format!("close() did not return once its deadline ({timeout:?}) passed")
                    })?;
                }
            }
        };
        self.replicas[b].report = Some(report);
        self.join_callers(b)
            .map_err(|error| format!("{error} after close() returned {report:?}"))?;
        let replica = &self.replicas[b];
        let stats = replica.batcher.stats();
        if std::env::var_os("MB_SIM_DEBUG").is_some() {
            eprintln!("close b{b}: {report:?} {stats:?}");
        }
        if report.unwritten != stats.unwritten_at_shutdown {
            return Err(format!("{report:?} against {stats:?}"));
        }
        if !report.deadline_hit && replica.batcher.health().worker_alive {
            return Err("the worker is alive after close()".into());
        }
        if replica.batcher.flush().is_some() {
            return Err("flush() after close() flushed".into());
        }
        replica.batcher.sync();
        if !report.deadline_hit {
            let waiting = stats.queued + stats.batched + stats.in_flight;
            if waiting != 0 || stats.accepted != stats.settled() {
                return Err(format!("unaccounted for after {report:?}: {stats:?}"));
            }
            self.check_announced(b, &stats)?;
        }
        Ok(())
    }

    /// The table against the model: every row behind its newest accepted value must be
    /// paid for by a counted loss, and no row may hold what was never accepted.
    fn judge(&self) -> Result<(), String> {
        let table = self.table.lock();
        let verdict = self.model.judge(|a, k| {
            let (collected_at, value) = &table.rows[&(agent(a.into()), key_name(k))];
            let secs = collected_at
                .duration_since(at(0))
                .ok()
                .map(|d| d.as_secs())
                .filter(|_| !value.is_empty());
            (value.clone(), secs)
        });
        if let Some(violation) = verdict.violations.first() {
            return Err(violation.clone());
        }
        let losses: u64 = self
            .replicas
            .iter()
            .map(|r| {
                let s = r.batcher.stats();
                s.rejected + s.retention_dropped + s.lost_to_panics + s.unwritten_at_shutdown
            })
            .sum();
        if verdict.behind as u64 > losses {
            return Err(format!(
                "{} rows behind their newest accepted value, but only {losses} losses counted",
                verdict.behind
            ));
        }
        Ok(())
    }
}
