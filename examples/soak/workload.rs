//! The fleet's load (loadgen's generators, one per replica) run in segments, so a quiet
//! checkpoint can stop it, have the batchers write everything they accepted, read every
//! row back, and start it again.
//!
//! A segment's generators record, per key, the newest update their batcher accepted; the
//! segments' records are merged per replica (the shared clock makes later updates newer),
//! so the check at a checkpoint and the one at the end both see every update since the
//! start.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use metadata_batcher::Batcher;

use super::load::{self, Offered};
use super::reconnecting::Reconnecting;

/// How long a checkpoint waits for the batchers to write what they hold.
const DRAIN_PATIENCE: Duration = Duration::from_secs(60);
/// Between tries of a drain whose flush failed (a session still reconnecting).
const DRAIN_RETRY: Duration = Duration::from_millis(100);

/// The load's fixed parts; see the module docs.
pub struct Workload {
    batchers: Vec<Arc<Batcher>>,
    clock: Arc<load::Clock>,
    agents: usize,
    key_names: Vec<String>,
    /// Updates per second, per replica.
    rate: f64,
    ends_at: Instant,
    pub offered: Arc<AtomicU64>,
    /// The running segment's stop flag, and its generators.
    stop: Arc<AtomicBool>,
    running: Vec<JoinHandle<Result<Offered, String>>>,
    /// The finished segments, merged per replica.
    merged: Vec<Option<Offered>>,
}

/// One quiet checkpoint: when the load stopped and started again, and what the read-back
/// found.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint {
    pub paused: Instant,
    pub resumed: Instant,
    pub checked: u64,
    pub wrong: u64,
}

impl Workload {
    /// Starts the load: `rate` updates per second over every replica, for `duration`.
    pub fn start(
        batchers: Vec<Arc<Batcher>>,
        clock: Arc<load::Clock>,
        agents: usize,
        key_names: Vec<String>,
        rate: f64,
        duration: Duration,
    ) -> Result<Workload, String> {
        let replicas = batchers.len();
        let mut workload = Workload {
            batchers,
            clock,
            agents,
            key_names,
            rate: rate / replicas as f64,
            ends_at: Instant::now() + duration,
            offered: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            running: Vec::new(),
            merged: (0..replicas).map(|_| None).collect(),
        };
        workload.spawn()?;
        Ok(workload)
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.stop = Arc::new(AtomicBool::new(false));
        let replicas = self.batchers.len();
        for (replica, batcher) in self.batchers.iter().enumerate() {
            let generator = load::Generator {
                replica,
                batcher: batcher.clone(),
                clock: self.clock.clone(),
                order: load::VisitOrder::of(replica, replicas, self.agents),
                agents: self.agents,
                key_names: self.key_names.clone(),
                rate: self.rate,
                duration: self.ends_at.saturating_duration_since(Instant::now()),
                offered: self.offered.clone(),
                stop: self.stop.clone(),
            };
            self.running.push(
                thread::Builder::new()
                    .name(format!("soak-load-r{replica}"))
                    .spawn(move || generator.run())
                    .map_err(|err| format!("starting replica {replica}'s generator: {err}"))?,
            );
        }
        Ok(())
    }

    /// Ends the running segment early (an interrupt).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Waits for the running segment's generators and merges what they offered.
    fn join(&mut self) -> Result<(), String> {
        let offers = load::join_generators(std::mem::take(&mut self.running))?;
        for (slot, offer) in self.merged.iter_mut().zip(offers) {
            *slot = Some(match slot.take() {
                None => offer,
                Some(mut sum) => {
                    sum.accepted += offer.accepted;
                    sum.dropped += offer.dropped;
                    sum.elapsed += offer.elapsed;
                    sum.add_ns
                        .add(&offer.add_ns)
                        .map_err(|err| format!("merging the add histograms: {err}"))?;
                    for (newest, micros) in sum.newest.iter_mut().zip(offer.newest) {
                        *newest = (*newest).max(micros);
                    }
                    sum
                }
            });
        }
        Ok(())
    }

    /// A quiet checkpoint: stops the load, waits until every batcher has written all it
    /// accepted, reads every row back on `session`, and starts the load again (unless its
    /// time is up).
    pub fn checkpoint(&mut self, session: &mut Reconnecting) -> Result<Checkpoint, String> {
        let paused = Instant::now();
        self.stop();
        self.join()?;
        let deadline = paused + DRAIN_PATIENCE;
        for (replica, batcher) in self.batchers.iter().enumerate() {
            loop {
                batcher.sync();
                batcher.flush();
                let stats = batcher.stats();
                if stats.queued + stats.batched + stats.in_flight == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "checkpoint: replica {replica} still holds {} rows after {DRAIN_PATIENCE:?}",
                        stats.queued + stats.batched + stats.in_flight
                    ));
                }
                // The flush failed (a session reconnecting): try again shortly.
                thread::sleep(DRAIN_RETRY);
            }
        }
        let (checked, wrong) = load::verify(session, &self.key_names, &self.newest())?;
        if Instant::now() < self.ends_at {
            self.spawn()?;
        }
        Ok(Checkpoint {
            paused,
            resumed: Instant::now(),
            checked,
            wrong,
        })
    }

    /// Per (agent, key): the newest update accepted so far, as `load::newest_by_key`.
    pub fn newest(&self) -> Vec<(u64, usize)> {
        let mut newest = vec![(0u64, 0usize); self.agents * self.key_names.len()];
        for (replica, offer) in self.merged.iter().enumerate() {
            let Some(offer) = offer else { continue };
            for (slot, &micros) in newest.iter_mut().zip(&offer.newest) {
                if micros > slot.0 {
                    *slot = (micros, replica);
                }
            }
        }
        newest
    }

    /// Waits for the load to end (its duration, or [`Workload::stop`]); every replica's
    /// offers over the whole run, in replica order.
    pub fn finish(mut self) -> Result<Vec<Offered>, String> {
        self.join()?;
        Ok(self.merged.into_iter().flatten().collect())
    }
}
