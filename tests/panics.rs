//! Panics in the batcher's own threads, from user code they run (a `Clock`, a metrics
//! recorder, a tracing subscriber): what they lose is counted, every caller is answered,
//! and `add` says when the batcher can take no more. (Store and publisher panics are in
//! tests/batcher.rs.)

mod common;

use common::{agent, md, TestClock};
use metadata_batcher::{AddError, Batcher, MemoryPubsub, MemoryStore, METADATA_BATCH_CHANNEL};

fn registered(agents: u128) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..agents {
        store.register(agent(i), ["a"]);
    }
    store
}

/// Issue 21's third confirmed case: a `Clock` that panicked on the worker thread killed
/// it; 601 accepted updates were lost while `add` kept accepting, `health()` said the
/// worker was alive, and neither `stats()` nor `close()` counted anything lost.
#[test]
fn a_worker_killed_by_a_panicking_clock_closes_the_batcher_and_counts_what_it_held() {
    let clock = TestClock::new();
    let store = registered(601);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .build()
        .unwrap();
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    b.sync();
    clock.panic_once_on("mdbatch-worker");
    let mut accepted = 1;
    for i in 1..601 {
        match b.add(agent(i), vec![md("a", "v", 1)]) {
            Ok(report) => accepted += report.accepted as u64,
            Err(AddError::Closed) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    // 601 entries pass the batch size (500): the capacity flush reads the clock, by the
    // end of this `sync` at the latest. The worker may die while handling it, so its
    // answer may come before the worker has ended; the next `sync` is answered after.
    b.sync();
    b.sync();
    assert!(!b.health().worker_alive);
    assert_eq!(
        b.add(agent(0), vec![md("a", "w", 2)]),
        Err(AddError::Closed)
    );
    assert!(b.flush().is_none());
    let report = b.close();
    let stats = b.stats();
    assert_eq!(stats.accepted, accepted);
    assert_eq!(stats.panics, 1);
    assert_eq!(report.unwritten, stats.unwritten_at_shutdown);
    assert_eq!(report.unwritten + stats.flushed, accepted, "{stats:?}");
    assert_eq!(stats.settled(), stats.accepted, "{stats:?}");
    assert_eq!((stats.queued, stats.batched, stats.in_flight), (0, 0, 0));
    assert!(!report.deadline_hit);
}

/// A panic on the flusher thread outside the store (here the clock, read as the flush
/// starts) loses that flush's rows, counted, and the next flush writes as usual. (Before,
/// the flusher thread died, and its rows were lost uncounted.)
#[test]
fn a_flush_that_panics_outside_the_store_loses_its_rows_counted_and_the_next_one_writes() {
    {
        let clock = TestClock::new();
        let store = registered(10);
        let b = Batcher::builder(store.clone(), MemoryPubsub::new())
            .clock(clock.clone())
            .build()
            .unwrap();
        for i in 0..10 {
            b.add(agent(i), vec![md("a", "lost", 1)]).unwrap();
        }
        b.sync();
        clock.panic_once_on("mdbatch-flush");
        let failed = b.flush().expect("the flush reports");
        assert_eq!((failed.stored, failed.retained), (0, 0));
        assert!(failed.error.is_some());
        let stats = b.stats();
        assert_eq!((stats.lost_to_panics, stats.panics), (10, 1));
        assert_eq!(stats.in_flight, 0);
        assert!(b.health().worker_alive);

        b.add(agent(0), vec![md("a", "written", 2)]).unwrap();
        // The failed flush backs off; a manual flush does not wait for it.
        let written = b.flush().expect("the next flush reports");
        assert_eq!(written.stored, 1);
        assert_eq!(store.get(agent(0), "a").unwrap().value, "written");
        let report = b.close();
        assert_eq!(report.unwritten, 0);
        let stats = b.stats();
        assert_eq!(stats.settled(), stats.accepted, "{stats:?}");
    }
}

/// Found by the simulation (seed 227): a clock that panicked when read after a store call
/// threw the call's results away, so rows it wrote were counted lost and never announced.
#[test]
fn a_clock_that_panics_after_a_store_call_keeps_its_results() {
    let clock = TestClock::new();
    let store = registered(1);
    let pubsub = MemoryPubsub::new();
    let announced = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let b = Batcher::builder(store.clone(), pubsub)
        .clock(clock.clone())
        .build()
        .unwrap();
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    b.sync();
    // The flusher reads the clock as the flush starts, before the store call and after
    // it: the third reading is the one after.
    clock.panic_on_reading("mdbatch-flush", 3);
    let report = b.flush().expect("the flush reports");
    assert_eq!((report.stored, report.agents), (1, 1));
    assert_eq!(store.get(agent(0), "a").unwrap().value, "v");
    assert!(
        announced.try_recv().is_ok(),
        "the stored agent is announced"
    );
    let stats = b.stats();
    assert_eq!(
        (stats.flushed, stats.lost_to_panics, stats.panics),
        (1, 0, 1)
    );
}

/// Found by the simulation (seed 1087): a worker dying while a flush was in flight
/// answered `sync()` before it had counted what it held, so a caller saw rows in flight
/// and none unwritten after the sync. Looped: the bug needed the sync to arrive while
/// the flush was still held.
#[test]
fn a_sync_to_a_dying_worker_returns_once_it_has_counted() {
    for _ in 0..50 {
        let clock = TestClock::new();
        let (store, gate) = common::ScriptedStore::gated();
        let b = std::sync::Arc::new(
            Batcher::builder(store, MemoryPubsub::new())
                .clock(clock.clone())
                .batch_size(1)
                .build()
                .unwrap(),
        );
        let gate = gate;
        b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
        gate.entered.recv().unwrap(); // the capacity flush is held in the store
        clock.panic_once_on("mdbatch-worker");
        b.add(agent(1), vec![md("a", "v", 1)]).unwrap();
        let syncer = b.clone();
        let (synced_tx, synced) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            syncer.sync();
            let _ = synced_tx.send(syncer.stats());
        });
        gate.open();
        let stats = synced
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("sync() returned");
        if !b.health().worker_alive {
            assert_eq!(stats.settled(), stats.accepted, "{stats:?}");
            assert_eq!((stats.queued, stats.batched, stats.in_flight), (0, 0, 0));
        }
        b.close();
        let stats = b.stats();
        assert_eq!(stats.settled(), stats.accepted, "{stats:?}");
    }
}

/// Found by the simulation (seed 1489): a worker that panicked in its shutdown, while
/// taking in the updates it had drained from the channel, left their keys counted as
/// queued. Inline, with the flush held in the store, updates and `close` queue up behind
/// it; the fourth reading of the clock after the store returns is the first take-in's,
/// in the shutdown half the time (the select picks `close` or an update), so the loop
/// reaches it.
#[test]
fn a_worker_that_dies_in_its_shutdown_counts_the_updates_it_drained() {
    for _ in 0..20 {
        let clock = TestClock::new();
        let (store, gate) = common::ScriptedStore::gated();
        let b = std::sync::Arc::new(
            Batcher::builder(store, MemoryPubsub::new())
                .clock(clock.clone())
                .flush_mode(metadata_batcher::FlushMode::Inline)
                .build()
                .unwrap(),
        );
        let gate = gate;
        b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
        let flusher = b.clone();
        std::thread::spawn(move || flusher.flush());
        gate.entered.recv().unwrap(); // the manual flush is held in the store
        for i in 1..20 {
            b.add(agent(i), vec![md("a", "v", 1)]).unwrap();
        }
        // Read after the store returns: the call's time, the flush's, the gauges', then
        // the first take-in's.
        clock.panic_on_reading("mdbatch-worker", 4);
        let closer = b.clone();
        let closed = std::thread::spawn(move || closer.close());
        // `close` closes intake before it sends its request: once `add` is refused, the
        // request is queued behind the updates.
        while b.add(agent(99), vec![md("a", "v", 1)]).is_ok() {
            std::thread::yield_now();
        }
        gate.open();
        let report = closed.join().unwrap();
        let stats = b.stats();
        assert_eq!(stats.queued, 0, "{stats:?}");
        assert_eq!(stats.settled(), stats.accepted, "{stats:?}");
        assert_eq!(
            report.unwritten + stats.flushed,
            stats.accepted,
            "{stats:?}"
        );
    }
}
