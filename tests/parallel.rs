//! A store that writes several statements at once (`Store::parallel_batches`): how the
//! flusher hands a backlog over in groups, and reads each statement's result on its own.
//! (`PgStore`'s sessions doing it against a real server: tests/postgres_store.rs.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use common::{agent, md, ScriptedStore};
use metadata_batcher::{
    BatchResult, Batcher, Capabilities, MemoryPubsub, MemoryStore, MetadataBatch, MockClock, Store,
    StoreError, StoreErrorKind, Written,
};
use parking_lot::Mutex;

fn registered(agents: u128) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..agents {
        store.register(agent(i), ["k"]);
    }
    store
}

/// A batcher of `batch_size` 100 over `store`, with `rows` rows pending (one per agent) that
/// an outage of `table` kept back, so the next flush holds them all.
fn backlog(store: ScriptedStore, table: &MemoryStore, rows: u128) -> Batcher {
    // The interval never passes: only the test's flushes write.
    let clock = MockClock::new();
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(100)
        .build()
        .unwrap();
    table.set_outage(Some(StoreError::unavailable("down")));
    for i in 0..rows {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    b.sync();
    table.set_outage(None);
    b
}

/// Releases a row lock when dropped.
struct Unlock(Arc<AtomicBool>);

impl Drop for Unlock {
    fn drop(&mut self) {
        self.0.store(false, SeqCst);
    }
}

fn writing_to(table: &MemoryStore) -> ScriptedStore {
    let mut table = table.clone();
    ScriptedStore::new(move |batch| table.batch_update(batch))
}

#[test]
fn a_backlog_goes_out_in_groups_of_parallel_batches() {
    let table = registered(350);
    let (store, groups) = writing_to(&table).with_parallel_batches(2);
    let calls = store.calls.clone();
    let b = backlog(store, &table, 350);
    groups.lock().clear();
    calls.lock().clear();

    let report = b.flush().unwrap();
    assert_eq!(
        (report.stored, report.retained, report.statements),
        (350, 0, 4)
    );
    // Four statements of at most batch_size rows, two per call.
    assert_eq!(*groups.lock(), [2, 2]);
    let sizes: Vec<usize> = calls.lock().iter().map(MetadataBatch::len).collect();
    assert_eq!(sizes, [100, 100, 100, 50]);
    for i in 0..350 {
        assert_eq!(table.get(agent(i), "k").unwrap().value, "v");
    }
    // A flush of one statement's rows is one `batch_update`, as before.
    b.add(agent(0), vec![md("k", "w", 2)]).unwrap();
    assert_eq!(b.flush().unwrap().stored, 1);
    assert_eq!(*groups.lock(), [2, 2]);
}

#[test]
fn each_statement_of_a_group_is_split_or_kept_on_its_own() {
    // Agent 10's row is refused, agent 250's is locked: in different statements of one
    // call, each handled as its own call's result would be.
    let table = registered(300);
    let mut writer = table.clone();
    let locked = Arc::new(AtomicBool::new(true));
    let held = locked.clone();
    let store = ScriptedStore::new(move |batch: &MetadataBatch| {
        if batch.agent_ids.contains(&agent(10)) {
            return Err(StoreError::rejected("value out of range"));
        }
        if held.load(SeqCst) && batch.agent_ids.contains(&agent(250)) {
            return Err(StoreError::canceled());
        }
        writer.batch_update(batch)
    });
    let (store, groups) = store.with_parallel_batches(3);
    let b = backlog(store, &table, 300);
    // Dropped before the batcher, whose close then writes the kept row, whatever fails.
    let _unlock = Unlock(locked);
    groups.lock().clear();

    let report = b.flush().unwrap();
    assert_eq!(
        (report.stored, report.rejected, report.retained),
        (298, 1, 1),
        "{report:?}"
    );
    // One call of three; the halves of the refused and the canceled chunk went one by one.
    assert_eq!(groups.lock()[0], 3);
    assert!(groups.lock()[1..].is_empty(), "{:?}", groups.lock());
    assert!(table.get(agent(10), "k").unwrap().value.is_empty());
    assert!(table.get(agent(250), "k").unwrap().value.is_empty());
    for i in (0..300).filter(|i| ![10, 250].contains(i)) {
        assert_eq!(table.get(agent(i), "k").unwrap().value, "v", "agent {i}");
    }
    assert_eq!(b.stats().batched, 1, "the locked row is kept for the retry");
}

#[test]
fn an_outage_in_a_group_keeps_the_rest_of_the_flush() {
    let table = registered(400);
    let mut writer = table.clone();
    // Armed after the backlog is built: the second statement then finds the database gone.
    let calls = Arc::new(Mutex::new(None::<u32>));
    let counted = calls.clone();
    let store = ScriptedStore::new(move |batch: &MetadataBatch| {
        if let Some(calls) = counted.lock().as_mut() {
            *calls += 1;
            if *calls == 2 {
                return Err(StoreError::unavailable("connection reset"));
            }
        }
        writer.batch_update(batch)
    });
    let (store, groups) = store.with_parallel_batches(2);
    let b = backlog(store, &table, 400);
    groups.lock().clear();
    *calls.lock() = Some(0);

    let report = b.flush().unwrap();
    // The first statement of the first call was written; the second failed, and the
    // store stopped there: nothing more this flush.
    assert_eq!((report.stored, report.retained), (100, 300), "{report:?}");
    assert_eq!(*groups.lock(), [2]);
    assert_eq!(
        report.error.map(|e| e.kind()),
        Some(StoreErrorKind::Unavailable)
    );
    assert_eq!(b.stats().batched, 300);

    // The next flush writes the rest.
    let report = b.flush().unwrap();
    assert_eq!((report.stored, report.retained), (300, 0), "{report:?}");
    assert_eq!(b.stats().batched, 0);
    for i in 0..400 {
        assert_eq!(table.get(agent(i), "k").unwrap().value, "v", "agent {i}");
    }
}

#[test]
fn batches_a_store_did_not_try_are_kept() {
    let table = registered(200);
    let (store, groups) = writing_to(&table).with_parallel_batches(2);
    let b = backlog(store.trying_only(1), &table, 200);
    groups.lock().clear();

    let report = b.flush().unwrap();
    assert_eq!((report.stored, report.retained), (100, 100), "{report:?}");
    assert_eq!(report.statements, 1);
    let Some(error) = &report.error else {
        panic!("{report:?}");
    };
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(error.message().contains("tried 1 of"), "{error}");
    assert_eq!(b.stats().batched, 100);
}

#[test]
fn the_default_writes_one_batch_after_another_and_stops_at_an_outage() {
    /// Implements `batch_update` alone.
    struct Failing(u32);

    impl Store for Failing {
        fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
            self.0 += 1;
            match self.0 {
                1 => Ok(Written::rows(batch.len() as u64)),
                2 => Err(StoreError::canceled()),
                _ => Err(StoreError::unavailable("down")),
            }
        }
    }

    let mut one = MetadataBatch::default();
    one.push(agent(1), md("k", "v", 1));
    let batches = vec![one; 5];
    let mut store = Failing(0);
    assert_eq!(store.capabilities(), Capabilities::default());
    assert_eq!(
        store.batch_update_many(&batches),
        [
            BatchResult::Written(Written::rows(1)),
            BatchResult::Failed(StoreError::canceled()),
            BatchResult::Failed(StoreError::unavailable("down")),
            BatchResult::NotTried,
            BatchResult::NotTried,
        ]
    );
    assert_eq!(store.0, 3, "nothing tried after the outage");
}
