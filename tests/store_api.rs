//! The `Store` API's promises: conflicts come back with each result and are counted,
//! `Observe` forwards everything a wrapper must, and a row that conflicts
//! (`ConflictsExhausted`) is split out and kept as a canceled one is.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::{agent, md, ScriptedStore};
use metadata_batcher::{
    BatchResult, Batcher, Capabilities, Interrupt, MemoryPubsub, MemoryStore, MetadataBatch,
    MockClock, Observe, Store, StoreCall, StoreError, Written,
};
use uuid::Uuid;

fn registered(agents: u128) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..agents {
        store.register(agent(i), ["k"]);
    }
    store
}

fn batcher(store: impl Store) -> Batcher {
    Batcher::builder(store, MemoryPubsub::new())
        .clock(MockClock::new())
        .build()
        .unwrap()
}

#[test]
fn conflicts_in_results_are_counted() {
    let mut table = registered(4);
    let store = ScriptedStore::new(move |batch| {
        let written = table.batch_update(batch)?;
        Ok::<_, StoreError>(written.with_conflicts(2))
    });
    let b = batcher(store);
    for i in 0..4 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    let report = b.flush().unwrap();
    assert_eq!((report.stored, report.error), (4, None));
    assert_eq!(b.stats().conflicts, 2);
}

#[test]
fn observe_forwards_capabilities_interrupts_and_many() {
    let fired = Arc::new(AtomicUsize::new(0));
    let fire = fired.clone();
    let (inner, _groups) = ScriptedStore::new(|batch| Ok::<_, StoreError>(batch.len() as u64))
        .with_max_batch_rows(1_000)
        .with_interrupt(move || {
            let fire = fire.clone();
            Interrupt::new(move || {
                fire.fetch_add(1, SeqCst);
            })
        })
        .with_parallel_batches(3);
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let mut store = Observe::new(inner, move |call: &StoreCall<'_>| {
        count.fetch_add(call.results.len(), SeqCst);
    });
    assert_eq!(
        store.capabilities(),
        Capabilities::default()
            .with_max_batch_rows(1_000)
            .with_parallel_batches(3)
    );
    store.interrupt_handle().expect("forwarded").fire();
    assert_eq!(fired.load(SeqCst), 1);
    let mut one = metadata_batcher::MetadataBatch::default();
    one.push(agent(1), md("k", "v", 1));
    let results = store.batch_update_many(&[one.clone(), one.clone()]);
    assert_eq!(results, vec![BatchResult::Written(Written::rows(1)); 2]);
    assert_eq!(store.batch_update(&one), Ok(Written::rows(1)));
    assert_eq!(seen.load(SeqCst), 3);
}

/// Runs `f` on a thread of its own and fails the test, saying what hung, if it has not
/// returned within 10 s of real time; a passing test never waits for it.
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, answer) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    answer
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} did not return within 10 s"))
}

/// A store that fails every statement holding `locked`'s row with `error` while the lock
/// is held, as a row another writer keeps locked does, and writes the others to `table`.
fn locking(
    table: &MemoryStore,
    locked: Uuid,
    error: fn() -> StoreError,
) -> (ScriptedStore, Arc<AtomicBool>) {
    let held = Arc::new(AtomicBool::new(true));
    let lock = held.clone();
    let mut table = table.clone();
    let store = ScriptedStore::new(move |batch: &MetadataBatch| {
        if lock.load(SeqCst) && batch.agent_ids.contains(&locked) {
            return Err(error());
        }
        table.batch_update(batch)
    });
    (store, held)
}

/// Lets the locked row go when dropped: declared after the batcher, it runs first, so a
/// failing assertion does not leave the batcher's close retrying a row that stays locked
/// (on a mock clock that never reaches close's deadline).
struct Unlock(Arc<AtomicBool>);

impl Drop for Unlock {
    fn drop(&mut self) {
        self.0.store(false, SeqCst);
    }
}

/// One row of eight fails with `error` whenever it is in the statement: the other seven
/// are written, the row is kept (never refused), retried on the backoff, and written once
/// its lock goes. Each failed statement carries `conflicts`.
fn the_lone_row_is_split_out_kept_and_retried(error: fn() -> StoreError, conflicts: u64) {
    let table = registered(8);
    let (store, held) = locking(&table, agent(5), error);
    let clock = MockClock::new();
    let b = Arc::new(
        Batcher::builder(store, MemoryPubsub::new())
            .clock(clock.clone())
            .build()
            .unwrap(),
    );
    let _unlock = Unlock(held.clone());
    for i in 0..8 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    let flushing = b.clone();
    let report = within_10s("the first flush", move || flushing.flush()).expect("a flush");
    assert_eq!(
        (report.stored, report.retained, report.rejected),
        (7, 1, 0),
        "{report:?}"
    );
    assert_eq!(report.error.map(|e| e.kind()), Some(error().kind()));
    for i in (0..8).filter(|&i| i != 5) {
        assert_eq!(table.get(agent(i), "k").unwrap().value, "v");
    }
    assert_eq!(table.get(agent(5), "k").unwrap().value, "");
    // The whole chunk, the half, the quarter and the row failed.
    let stats = b.stats();
    assert_eq!(
        (
            stats.flushed,
            stats.rejected,
            stats.batched,
            stats.store_errors
        ),
        (7, 0, 1, 4),
        "{stats:?}"
    );
    assert_eq!(stats.conflicts, 4 * conflicts);
    assert_eq!(b.health().consecutive_store_failures, 1);

    // Retried on the backoff (250 ms), not before: one statement, the row alone.
    clock.advance(Duration::from_millis(249));
    b.sync();
    assert_eq!(b.stats().store_errors, 4);
    clock.advance(Duration::from_millis(1));
    b.sync();
    let stats = b.stats();
    assert_eq!(
        (stats.store_errors, stats.batched, stats.rejected),
        (5, 1, 0),
        "{stats:?}"
    );
    assert_eq!(stats.conflicts, 5 * conflicts);

    held.store(false, SeqCst);
    let flushing = b.clone();
    let report =
        within_10s("the flush after the lock went", move || flushing.flush()).expect("a flush");
    assert_eq!((report.stored, report.retained), (1, 0), "{report:?}");
    assert_eq!(table.get(agent(5), "k").unwrap().value, "v");
    let stats = b.stats();
    assert_eq!(
        (stats.flushed, stats.rejected, stats.batched),
        (8, 0, 0),
        "{stats:?}"
    );
    assert_eq!(b.health().consecutive_store_failures, 0);
}

#[test]
fn conflicts_exhausted_is_split_and_the_lone_row_kept() {
    the_lone_row_is_split_out_kept_and_retried(
        || StoreError::conflicts_exhausted().with_conflicts(3),
        3,
    );
}

#[test]
fn canceled_is_split_and_the_lone_row_kept() {
    the_lone_row_is_split_out_kept_and_retried(StoreError::canceled, 0);
}
