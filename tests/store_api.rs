//! The `Store` API's promises: conflicts come back with each result and are counted, and
//! `Observe` forwards everything a wrapper must.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use common::{agent, md, ScriptedStore};
use metadata_batcher::{
    BatchResult, Batcher, Capabilities, Interrupt, MemoryPubsub, MemoryStore, MockClock, Observe,
    Store, StoreCall, StoreError, Written,
};

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
