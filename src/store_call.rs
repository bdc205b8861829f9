//! One call of the user's store, guarded: armed for `close`'s interrupt, timed on the
//! injected clock, its panics caught, and its answer made one [`BatchResult`] per chunk.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::panic::panic_message;
use crate::shared::Shared;
use crate::{BatchResult, MetadataBatch, Store};

/// What a store call answered.
pub(crate) struct Answered {
    /// One per chunk, in order; a chunk the store gave no answer for is `NotTried`.
    pub(crate) results: Vec<BatchResult>,
    /// How long the call took; `None` when the clock panicked after it.
    pub(crate) took: Option<Duration>,
    /// Statements the store ran again after a conflict with another writer.
    pub(crate) conflicts: u64,
}

/// Why a store call gave no results.
pub(crate) enum NoAnswer {
    /// `close` gave up before the call started.
    Abandoned,
    /// The store panicked, with this message.
    Panicked(String),
}

/// One store call for `chunks`: `batch_update` for one, `batch_update_many` for more.
pub(crate) fn call(
    store: &mut dyn Store,
    shared: &Shared,
    chunks: &[MetadataBatch],
) -> Result<Answered, NoAnswer> {
    let telemetry = &shared.telemetry;
    // Read before the call: a clock that panics here has cost no write.
    let started = shared.clock.now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let interrupt = store.interrupt_handle();
        if !shared.cancellation.arm(interrupt) {
            return None;
        }
        telemetry.set_store_call_started(Some(started));
        Some(match chunks {
            [chunk] => vec![BatchResult::from(store.batch_update(chunk))],
            _ => store.batch_update_many(chunks),
        })
    }));
    telemetry.set_store_call_started(None);
    shared.cancellation.disarm();
    let mut results = match result {
        Ok(Some(results)) => results,
        Ok(None) => return Err(NoAnswer::Abandoned),
        Err(panic) => return Err(NoAnswer::Panicked(panic_message(&*panic))),
    };
    if results.len() < chunks.len() {
        tracing::warn!(
            batches = chunks.len(),
            results = results.len(),
            "the metadata store answered fewer results than batches; the batches without \
             one are read as not tried and kept (answer BatchResult::NotTried for them)"
        );
    }
    results.resize(chunks.len(), BatchResult::NotTried);
    // What the store answered stands whatever the clock does after it: rows it wrote are
    // counted and announced.
    let took = match catch_unwind(AssertUnwindSafe(|| shared.clock.now())) {
        Ok(now) => Some(now.saturating_duration_since(started)),
        Err(panic) => {
            telemetry.panics.fetch_add(1, Relaxed);
            tracing::error!(
                panic = %panic_message(&*panic),
                "the clock panicked after a store call; its results are kept"
            );
            None
        }
    };
    let conflicts = results.iter().map(conflicts_of).sum();
    Ok(Answered {
        results,
        took,
        conflicts,
    })
}

/// Statements a result says the store ran again after a conflict.
fn conflicts_of(result: &BatchResult) -> u64 {
    match result {
        BatchResult::Written(written) => written.conflicts(),
        BatchResult::Failed(error) => error.conflicts(),
        BatchResult::NotTried => 0,
    }
}
