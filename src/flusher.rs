//! One flush: write the batch with one statement, isolate refused rows, announce the agents.
//!
//! [`Flusher::flush`] runs on the flusher thread (or inline on the worker thread, in
//! [`FlushMode::Inline`](crate::FlushMode::Inline)) and owns the user's store and publisher,
//! so nothing else ever waits on the database. Its steps, each small:
//!
//! 1. [`Flusher::write`]: one `Store::batch_update` for the whole batch. When the database
//!    refuses the data, the batch is split in halves and each half written again, until the
//!    refused rows stand alone; only they are dropped (about `2·log2(n)` extra statements
//!    per refused row). When the store is unavailable, the unwritten rows are handed back
//!    to the worker to retry.
//! 2. [`Flusher::announce`]: the distinct agents of the stored rows, published in payloads
//!    of at most 363 IDs.
//! 3. [`Flusher::record`]: totals, metrics and the report, all timed on the injected clock.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::shared::Shared;
use crate::{
    agent_ids, FlushReason, FlushReport, Interrupt, MetadataBatch, Publisher, Store, StoreError,
    METADATA_BATCH_CHANNEL,
};

/// A batch handed to the flusher.
pub(crate) struct FlushJob {
    pub(crate) seq: u64,
    pub(crate) reason: FlushReason,
    pub(crate) batch: MetadataBatch,
}

/// What the worker needs back from a flush.
pub(crate) struct FlushOutcome {
    pub(crate) seq: u64,
    pub(crate) report: FlushReport,
    /// Rows not written because the store was unavailable; the worker merges them back.
    pub(crate) retained: MetadataBatch,
    /// The store was unavailable or panicked: the worker backs off before the next try.
    pub(crate) failed: bool,
}

impl FlushOutcome {
    /// A flush that could not run at all: every row is kept for the next one.
    pub(crate) fn not_attempted(job: FlushJob) -> Self {
        let count = job.batch.len();
        FlushOutcome {
            seq: job.seq,
            report: FlushReport {
                reason: job.reason,
                count,
                agents: 0,
                chunks: 0,
                elapsed: Duration::ZERO,
                stored: 0,
                updated: 0,
                rejected: 0,
                retained: count,
                statements: 0,
                publish_errors: 0,
                error: None,
            },
            retained: job.batch,
            failed: true,
        }
    }
}

/// Lets `close` stop a store call that outlives the final flush timeout.
#[derive(Debug, Default)]
pub(crate) struct Cancellation {
    state: Mutex<CancelState>,
}

#[derive(Debug, Default)]
struct CancelState {
    abandoned: bool,
    interrupt: Option<Interrupt>,
}

impl Cancellation {
    /// Holds the interrupt of the call about to start; false when `close` has given up,
    /// in which case the call must not start.
    fn arm(&self, interrupt: Option<Interrupt>) -> bool {
        let mut state = self.state.lock();
        state.interrupt = interrupt;
        !state.abandoned
    }

    fn disarm(&self) {
        self.state.lock().interrupt = None;
    }

    /// Gives up on the store: interrupts the call in flight and refuses further calls.
    pub(crate) fn abandon(&self) {
        let interrupt = {
            let mut state = self.state.lock();
            state.abandoned = true;
            state.interrupt.take()
        };
        // Fired outside the lock: a PostgreSQL cancel request opens a connection.
        if let Some(interrupt) = interrupt {
            interrupt.fire();
        }
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.state.lock().abandoned
    }
}

/// What the store calls of one flush came to.
#[derive(Default)]
struct Written {
    /// Agent IDs of the stored rows, one per row.
    agent_ids: Vec<Uuid>,
    updated: u64,
    rejected: usize,
    retained: MetadataBatch,
    statements: usize,
    error: Option<StoreError>,
    unavailable: bool,
    panicked: bool,
}

/// Runs flushes against the user's store and publisher.
pub(crate) struct Flusher {
    store: Box<dyn Store>,
    publisher: Box<dyn Publisher>,
    shared: Arc<Shared>,
    /// Keys per agent of the current flush; kept to reuse its allocation.
    keys_per_agent: HashMap<Uuid, u32, foldhash::fast::RandomState>,
}

impl Flusher {
    pub(crate) fn new(
        store: Box<dyn Store>,
        publisher: Box<dyn Publisher>,
        shared: Arc<Shared>,
    ) -> Self {
        Flusher {
            store,
            publisher,
            shared,
            keys_per_agent: HashMap::default(),
        }
    }

    /// The flusher thread: flush each job, report each outcome, until the worker hangs up.
    pub(crate) fn run(
        mut self,
        jobs: crossbeam_channel::Receiver<FlushJob>,
        done: crossbeam_channel::Sender<FlushOutcome>,
    ) {
        for job in jobs {
            if done.send(self.flush(job)).is_err() {
                return;
            }
        }
    }

    pub(crate) fn flush(&mut self, job: FlushJob) -> FlushOutcome {
        let count = job.batch.len();
        let start = self.shared.clock.now();
        tracing::debug!(
            reason = job.reason.as_str(),
            count,
            "flushing metadata batch"
        );
        // As Go: before the store call, for every agent of the batch.
        self.shared
            .metrics
            .observe_utilization(&job.batch.agent_ids, &mut self.keys_per_agent);
        let mut written = Written::default();
        self.write(job.batch, &mut written);
        let (agents, chunks, publish_errors) = self.announce(&written.agent_ids);
        let elapsed = self.shared.clock.now().saturating_duration_since(start);
        let report = FlushReport {
            reason: job.reason,
            count,
            agents,
            chunks,
            elapsed,
            stored: written.agent_ids.len(),
            updated: written.updated,
            rejected: written.rejected,
            retained: written.retained.len(),
            statements: written.statements,
            publish_errors,
            error: written.error.clone(),
        };
        let failed = written.unavailable || written.panicked;
        self.record(&report, failed);
        FlushOutcome {
            seq: job.seq,
            report,
            retained: written.retained,
            failed,
        }
    }

    /// Writes `batch`, splitting it while the database refuses its data.
    fn write(&mut self, mut batch: MetadataBatch, written: &mut Written) {
        if written.unavailable || written.panicked {
            // No point in more calls this flush; the rows wait for the retry.
            written.retained.append(&mut batch);
            return;
        }
        written.statements += 1;
        match self.call_store(&batch) {
            Ok(updated) => {
                written.updated += updated;
                written.agent_ids.append(&mut batch.agent_ids);
            }
            Err(StoreCall::Failed(StoreError::Rejected(message))) => {
                self.count_store_error();
                if batch.len() == 1 {
                    self.reject(&batch, &message);
                    written.rejected += 1;
                    written.error = Some(StoreError::Rejected(message));
                } else {
                    let second_half = batch.split_off(batch.len() / 2);
                    self.write(batch, written);
                    self.write(second_half, written);
                }
            }
            Err(StoreCall::Failed(error)) => {
                self.count_store_error();
                tracing::error!(
                    rows = batch.len(),
                    error = %error,
                    "metadata flush failed; the rows are kept and retried"
                );
                written.unavailable = true;
                written.error = Some(error);
                written.retained.append(&mut batch);
            }
            Err(StoreCall::Abandoned) => {
                written.unavailable = true;
                written.error = Some(StoreError::Canceled);
                written.retained.append(&mut batch);
            }
            Err(StoreCall::Panicked(message)) => {
                self.count_store_error();
                self.shared.counters.panics.fetch_add(1, Relaxed);
                self.shared
                    .counters
                    .lost_to_panics
                    .fetch_add(batch.len() as u64, Relaxed);
                tracing::error!(
                    rows = batch.len(),
                    panic = %message,
                    "metadata store panicked; the rows of this call are lost"
                );
                written.panicked = true;
                written.error = Some(StoreError::Unavailable(format!(
                    "store panicked: {message}"
                )));
            }
        }
    }

    fn call_store(&mut self, batch: &MetadataBatch) -> Result<u64, StoreCall> {
        let store = &mut self.store;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let interrupt = store.interrupt_handle();
            if !self.shared.cancellation.arm(interrupt) {
                return Err(StoreCall::Abandoned);
            }
            store.batch_update(batch).map_err(StoreCall::Failed)
        }));
        self.shared.cancellation.disarm();
        result.unwrap_or_else(|panic| Err(StoreCall::Panicked(panic_message(&*panic))))
    }

    fn count_store_error(&self) {
        self.shared.counters.store_errors.fetch_add(1, Relaxed);
        self.shared.metrics.store_errors.increment(1);
    }

    fn reject(&self, row: &MetadataBatch, message: &str) {
        self.shared.counters.rejected.fetch_add(1, Relaxed);
        self.shared.metrics.rejected.increment(1);
        tracing::warn!(
            agent_id = %row.agent_ids[0],
            key = %row.keys[0],
            error = %message,
            "the database refused a metadata row; it is dropped, the rest of the batch is written"
        );
    }

    /// Publishes the distinct agents of the stored rows; returns (agents, payloads, failures).
    fn announce(&mut self, stored_agent_ids: &[Uuid]) -> (usize, usize, usize) {
        self.keys_per_agent.clear();
        for &agent_id in stored_agent_ids {
            *self.keys_per_agent.entry(agent_id).or_insert(0) += 1;
        }
        let agents: Vec<Uuid> = self.keys_per_agent.keys().copied().collect();
        let payloads = agent_ids::encode_chunks(&agents);
        let mut failures = 0;
        for payload in &payloads {
            let publisher = &mut self.publisher;
            let result = catch_unwind(AssertUnwindSafe(|| {
                publisher.publish(METADATA_BATCH_CHANNEL, payload)
            }));
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error.to_string(),
                Err(panic) => {
                    self.shared.counters.panics.fetch_add(1, Relaxed);
                    format!("publisher panicked: {}", panic_message(&*panic))
                }
            };
            failures += 1;
            self.shared.counters.publish_errors.fetch_add(1, Relaxed);
            self.shared.metrics.publish_errors.increment(1);
            tracing::error!(
                error = %error,
                chunk_size = payload.len() / agent_ids::UUID_BASE64_LEN,
                payload_size = payload.len(),
                "failed to publish workspace agent metadata batch"
            );
        }
        (agents.len(), payloads.len(), failures)
    }

    fn record(&self, report: &FlushReport, failed: bool) {
        let c = &self.shared.counters;
        c.flushed.fetch_add(report.stored as u64, Relaxed);
        c.unmatched.fetch_add(
            (report.stored as u64).saturating_sub(report.updated),
            Relaxed,
        );
        self.shared.metrics.flushed.increment(report.stored as u64);
        if !failed {
            c.count_flush(report.reason);
            self.shared.metrics.batch_size.record(report.count as f64);
            self.shared.metrics.batches(report.reason).increment(1);
            self.shared
                .metrics
                .flush_duration(report.reason)
                .record(report.elapsed.as_secs_f64());
        }
        c.set_last_flush(report.clone());
        tracing::debug!(
            reason = report.reason.as_str(),
            count = report.count,
            stored = report.stored,
            retained = report.retained,
            rejected = report.rejected,
            elapsed = ?report.elapsed,
            "flush complete"
        );
    }
}

enum StoreCall {
    Failed(StoreError),
    /// `close` gave up before the call started.
    Abandoned,
    Panicked(String),
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
