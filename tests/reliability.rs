//! Failure handling, deterministically: outages, refused rows, bounds, shutdown, panics.
//! (The same faults against a real server are in tests/postgres_*.rs.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{agent, at, md, ScriptedStore};
use metadata_batcher::{
    Batcher, CloseReport, FlushReason, Interrupt, MemoryPubsub, MemoryStore, MockClock, Store,
    StoreError, StoreErrorKind, METADATA_BATCH_CHANNEL,
};
use proptest::prelude::*;

const INTERVAL: Duration = Duration::from_secs(5);

fn down() -> Option<StoreError> {
    Some(StoreError::unavailable("connection refused"))
}

fn registered(agents: u128, keys: &[&str]) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..agents {
        store.register(agent(i), keys.iter().copied());
    }
    store
}

#[test]
fn outage_keeps_rows_retries_with_backoff_and_newest_values_win() {
    let clock = MockClock::new();
    let store = registered(100, &["a", "b"]);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(50)
        .build()
        .unwrap();
    store.set_outage(down());
    for i in 0..40 {
        b.add(agent(i), vec![md("a", "old", 1), md("b", "old", 1)])
            .unwrap();
    }
    b.sync(); // 80 entries ≥ 50: one capacity flush, which fails
    assert_eq!(store.statements(), 1);
    let stats = b.stats();
    assert_eq!(
        (stats.store_errors, stats.batched, stats.flushed),
        (1, 80, 0)
    );
    assert_eq!(b.health().consecutive_store_failures, 1);

    // While the store fails, more entries do not trigger capacity flushes: only the
    // backoff timer does (250 ms, then 500 ms, ...).
    for i in 0..100 {
        b.add(agent(i), vec![md("a", "new", 2)]).unwrap();
    }
    b.sync();
    assert_eq!(store.statements(), 1, "no capacity flush during an outage");
    clock.advance(Duration::from_millis(249));
    b.sync();
    assert_eq!(store.statements(), 1);
    clock.advance(Duration::from_millis(1));
    b.sync();
    assert_eq!(store.statements(), 2, "first retry after 250 ms");
    clock.advance(Duration::from_millis(499));
    b.sync();
    assert_eq!(store.statements(), 2);
    clock.advance(Duration::from_millis(1));
    b.sync();
    assert_eq!(store.statements(), 3, "second retry after 500 ms");

    store.set_outage(None);
    clock.advance(Duration::from_secs(1));
    b.sync();
    // The retained 140 go out in statements of at most `batch_size` (50).
    assert_eq!(store.statements(), 6);
    for i in 0..100 {
        assert_eq!(store.get(agent(i), "a").unwrap().value, "new");
        let b_value = store.get(agent(i), "b").unwrap().value;
        assert_eq!(b_value, if i < 40 { "old" } else { "" });
    }
    let stats = b.stats();
    assert_eq!(stats.dropped + stats.retention_dropped, 0);
    assert_eq!((stats.flushed, stats.batched), (140, 0));
    assert_eq!(b.health().consecutive_store_failures, 0);

    // Back to the normal interval, and capacity flushes resume.
    clock.advance(INTERVAL - Duration::from_millis(1));
    b.add(agent(0), vec![md("a", "later", 3)]).unwrap();
    b.sync();
    assert_eq!(store.statements(), 6);
    clock.advance(Duration::from_millis(1));
    b.sync();
    assert_eq!(store.statements(), 7);
}

#[test]
fn manual_flush_does_not_wait_out_the_backoff() {
    let clock = MockClock::new();
    let store = registered(1, &["a"]);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .build()
        .unwrap();
    store.set_outage(down());
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    let failed = b.flush().unwrap();
    assert_eq!((failed.stored, failed.retained), (0, 1));
    assert_eq!(
        failed.error.as_ref().map(StoreError::kind),
        Some(StoreErrorKind::Unavailable)
    );
    store.set_outage(None);
    let report = b.flush().unwrap();
    assert_eq!((report.reason, report.stored), (FlushReason::Manual, 1));
    assert_eq!(store.get(agent(0), "a").unwrap().value, "v");
}

#[test]
fn canceled_statements_are_retried() {
    let clock = MockClock::new();
    let mut calls = 0;
    let store = ScriptedStore::new(move |batch| {
        calls += 1;
        if calls == 1 {
            Err(StoreError::canceled())
        } else {
            Ok(batch.len() as u64)
        }
    });
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .build()
        .unwrap();
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    assert_eq!(b.flush().unwrap().retained, 1);
    assert_eq!(b.flush().unwrap().stored, 1);
}

#[test]
fn past_the_bound_exactly_the_oldest_are_dropped() {
    let clock = MockClock::new();
    let store = registered(1500, &["k"]);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(100)
        .max_pending(1000)
        .build()
        .unwrap();
    store.set_outage(down());
    // Agent i's entry is collected at second i: the oldest are the lowest agents.
    for i in 0..1500u64 {
        b.add(agent(i as u128), vec![md("k", "v", i)]).unwrap();
        if i % 100 == 99 {
            b.sync();
        }
    }
    b.sync();
    store.set_outage(None);
    let report = b.flush().unwrap();
    assert_eq!(report.stored, 1000);
    let stats = b.stats();
    assert_eq!(stats.retention_dropped, 500);
    assert_eq!(stats.dropped, 0);
    for i in 0..1500u128 {
        let row = store.get(agent(i), "k").unwrap();
        if i < 500 {
            assert_eq!(
                row.collected_at,
                std::time::SystemTime::UNIX_EPOCH,
                "agent {i}"
            );
        } else {
            assert_eq!(row.collected_at, at(i as u64), "agent {i}");
        }
    }
}

#[test]
fn a_refused_row_is_isolated_and_the_rest_written_in_the_same_flush() {
    for (poisoned, max_statements) in [(vec![137usize], 19u64), (vec![0, 250, 499], 55)] {
        let clock = MockClock::new();
        let store = registered(500, &["k"]);
        store.set_check(|_, _, value| {
            if value == "poison" {
                Err("new row violates check constraint \"no_poison\"".into())
            } else {
                Ok(())
            }
        });
        let pubsub = MemoryPubsub::new();
        let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
        let b = Batcher::builder(store.clone(), pubsub)
            .clock(clock.clone())
            .build()
            .unwrap();
        for i in 0..500 {
            let value = if poisoned.contains(&i) {
                "poison"
            } else {
                "ok"
            };
            b.add(agent(i as u128), vec![md("k", value, 1)]).unwrap();
        }
        b.sync(); // the 500th entry triggers the capacity flush
        let report = b.stats().last_flush.unwrap();
        assert_eq!(report.reason, FlushReason::Capacity);
        assert_eq!(report.stored, 500 - poisoned.len());
        assert_eq!(report.rejected, poisoned.len());
        assert_eq!(report.retained, 0);
        // One statement, then at most 2·⌈log2 500⌉ = 18 more per refused row.
        let statements = store.statements();
        assert_eq!(report.statements as u64, statements);
        assert!(statements <= max_statements, "{statements} statements");
        let stats = b.stats();
        assert_eq!(
            (stats.rejected, stats.flushed),
            (poisoned.len() as u64, report.stored as u64)
        );
        for i in 0..500 {
            let expected = if poisoned.contains(&i) { "" } else { "ok" };
            assert_eq!(store.get(agent(i as u128), "k").unwrap().value, expected);
        }
        let announced: usize = announcements
            .try_iter()
            .map(|p| metadata_batcher::agent_ids::decode_chunk(&p).unwrap().len())
            .sum();
        assert_eq!(
            announced,
            500 - poisoned.len(),
            "refused agents are not announced"
        );
        // The refused rows are gone, not retried.
        clock.advance(INTERVAL);
        b.sync();
        assert_eq!(store.statements(), statements);
    }
}

/// A batcher over `store` on `clock` (final flush timeout 15 s), given one entry for each
/// of ten agents, then closed.
fn ten_entries_then_close(store: ScriptedStore, clock: &MockClock) -> (Batcher, CloseReport) {
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .final_flush_timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    for i in 0..10 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    let report = b.close();
    (b, report)
}

#[test]
fn close_during_an_outage_retries_until_its_deadline_and_reports_what_it_could_not_write() {
    let clock = MockClock::new();
    let store_clock = clock.clone();
    // Each failed call takes a second of the outage's time.
    let store = ScriptedStore::new(move |_| {
        store_clock.advance(Duration::from_secs(1));
        Err::<u64, _>(StoreError::unavailable("connection refused"))
    });
    let calls = store.calls.clone();
    let (b, report) = ten_entries_then_close(store, &clock);
    assert!(report.deadline_hit);
    assert_eq!((report.written, report.unwritten), (0, 10));
    let stats = b.stats();
    assert_eq!(stats.unwritten_at_shutdown, 10);
    assert_eq!(stats.flushes.shutdown, 0);
    // A call a second, each retried at once (its second is longer than the backoff):
    // the final flush and 14 retries fill the 15 s. (A few more may start before `close`'s
    // thread, woken by the deadline, gives up: they fail all the same.)
    let calls = calls.lock().len();
    assert!(calls >= 15, "{calls} calls");
}

#[test]
fn close_retries_what_the_final_flush_could_not_write() {
    // A deadlock, a failover, a pooler restart: the first calls at close fail, the next
    // ones go through, well within the final flush timeout.
    let clock = MockClock::new();
    let store_clock = clock.clone();
    let table = registered(10, &["k"]);
    let mut writer = table.clone();
    let mut failures = 3;
    let store = ScriptedStore::new(move |batch| {
        if failures > 0 {
            failures -= 1;
            store_clock.advance(Duration::from_secs(1));
            return Err(StoreError::unavailable("the server is restarting"));
        }
        writer.batch_update(batch)
    });
    let calls = store.calls.clone();
    let (b, report) = ten_entries_then_close(store, &clock);
    assert!(!report.deadline_hit);
    assert_eq!((report.written, report.unwritten), (10, 0));
    assert_eq!(calls.lock().len(), 4, "the final flush and three retries");
    assert_eq!(b.stats().flushes.shutdown, 1);
    for i in 0..10 {
        assert_eq!(table.get(agent(i), "k").unwrap().value, "v");
    }
}

#[test]
fn close_waits_out_the_retry_backoff_on_the_injected_clock() {
    // A store that fails fast: the retry waits for the backoff (250 ms, then 500 ms), by
    // the injected clock, so the test decides when it comes.
    let clock = MockClock::new();
    let (failed_tx, failed) = crossbeam_channel::unbounded();
    let table = registered(1, &["k"]);
    let mut writer = table.clone();
    let mut failures = 2;
    let store = ScriptedStore::new(move |batch| {
        if failures > 0 {
            failures -= 1;
            failed_tx.send(()).unwrap();
            return Err(StoreError::unavailable("connection refused"));
        }
        writer.batch_update(batch)
    });
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .build()
        .unwrap();
    b.add(agent(0), vec![md("k", "v", 1)]).unwrap();
    std::thread::scope(|scope| {
        let closing = scope.spawn(|| b.close());
        // Advances in steps of 1 ms until the next call or the end of `close`; how far.
        let advance_until_next_call = || {
            let mut advanced = 0;
            while failed.is_empty() && !closing.is_finished() {
                clock.advance(Duration::from_millis(1));
                advanced += 1;
                std::thread::yield_now();
            }
            advanced
        };
        failed.recv().unwrap();
        // Nothing has moved the clock since the final flush started, so the first retry
        // cannot come before 250 ms of it have passed.
        let advanced = advance_until_next_call();
        assert!(advanced >= 250, "retried after {advanced} ms");
        // The second (after 500 ms) then writes: the clock moved while it was handed to the
        // flusher thread, so only that it comes is certain.
        failed.recv().unwrap();
        advance_until_next_call();
        let report = closing.join().unwrap();
        assert_eq!((report.written, report.unwritten), (1, 0));
    });
    assert_eq!(table.get(agent(0), "k").unwrap().value, "v");
}

#[test]
fn close_interrupts_a_hung_store_at_the_final_flush_timeout() {
    let clock = MockClock::new();
    let (interrupt_tx, interrupted) = crossbeam_channel::unbounded::<()>();
    let (fired_tx, fired) = crossbeam_channel::unbounded::<()>();
    let store_clock = clock.clone();
    let store = ScriptedStore::new(move |_| {
        // A database that hangs: the time passes, and only an interrupt ends the call.
        store_clock.advance(Duration::from_secs(15));
        interrupted.recv().ok();
        Err::<u64, _>(StoreError::canceled())
    })
    .with_interrupt(move || {
        let interrupt_tx = interrupt_tx.clone();
        let fired_tx = fired_tx.clone();
        Interrupt::new(move || {
            fired_tx.send(()).unwrap();
            interrupt_tx.send(()).unwrap();
        })
    });
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .final_flush_timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    for i in 0..7 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    b.close();
    fired.recv().unwrap();
    assert_eq!(b.stats().unwritten_at_shutdown, 7);
}

#[test]
fn close_returns_even_when_the_store_cannot_be_interrupted() {
    let clock = MockClock::new();
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    let store_clock = clock.clone();
    let store = ScriptedStore::new(move |batch| {
        store_clock.advance(Duration::from_secs(2));
        released.recv().ok();
        Ok(batch.len() as u64)
    });
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .final_flush_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    b.add(agent(0), vec![md("k", "v", 1)]).unwrap();
    b.close();
    assert_eq!(b.stats().unwritten_at_shutdown, 1);
    drop(release); // lets the abandoned flusher thread finish
}

#[test]
fn health_reports_the_oldest_unflushed_entry() {
    let clock = MockClock::new();
    let store = registered(2, &["k"]);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .build()
        .unwrap();
    assert_eq!(b.health().oldest_unflushed_age, None);
    b.add(agent(0), vec![md("k", "v", 1)]).unwrap();
    b.sync();
    clock.advance(Duration::from_secs(3));
    b.add(agent(1), vec![md("k", "v", 1)]).unwrap();
    b.sync();
    let health = b.health();
    assert!(health.worker_alive);
    assert_eq!(health.oldest_unflushed_age, Some(Duration::from_secs(3)));
    store.set_outage(down());
    b.flush();
    // Less than the 250 ms retry backoff, so no retry runs while the test looks.
    clock.advance(Duration::from_millis(200));
    assert_eq!(
        b.health().oldest_unflushed_age,
        Some(Duration::from_millis(3200))
    );
    assert_eq!(b.health().consecutive_store_failures, 1);
    store.set_outage(None);
    b.flush();
    assert_eq!(b.health().oldest_unflushed_age, None);
}

#[derive(Debug, Clone)]
enum Op {
    Add { agent: u8, key: u8, secs: u8 },
    Outage(bool),
    Tick,
    Flush,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, 0u8..3, 0u8..20).prop_map(|(agent, key, secs)| Op::Add { agent, key, secs }),
        1 => any::<bool>().prop_map(Op::Outage),
        2 => Just(Op::Tick),
        1 => Just(Op::Flush),
        1 => Just(Op::Sync),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// For any interleaving of adds, failures, recoveries and flushes, the table ends with
    /// the newest value per key among all accepted updates (the later one on equal
    /// timestamps), with nothing counted as dropped.
    #[test]
    fn store_ends_with_the_newest_accepted_value(ops in prop::collection::vec(op(), 1..60)) {
        let clock = MockClock::new();
        let keys = ["x", "y", "z"];
        let store = registered(4, &keys);
        let b = Batcher::builder(store.clone(), MemoryPubsub::new())
            .clock(clock.clone())
            .batch_size(3)
            .max_pending(1000)
            .channel_capacity(1000)
            .build()
            .unwrap();
        let mut newest: HashMap<(u8, u8), (u8, String)> = HashMap::new();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Add { agent: a, key, secs } => {
                    let value = format!("op{n}");
                    let report = b
                        .add(agent(a.into()), vec![md(keys[key as usize], &value, secs.into())])
                        .unwrap();
                    prop_assert_eq!(report.accepted, 1);
                    let entry = newest.entry((a, key)).or_insert((secs, value.clone()));
                    if secs >= entry.0 {
                        *entry = (secs, value);
                    }
                }
                Op::Outage(on) => store.set_outage(if on { down() } else { None }),
                Op::Tick => {
                    clock.advance(INTERVAL);
                    b.sync();
                }
                Op::Flush => {
                    b.flush();
                }
                Op::Sync => b.sync(),
            }
        }
        store.set_outage(None);
        b.flush();
        let stats = b.stats();
        prop_assert_eq!(stats.dropped + stats.retention_dropped + stats.rejected, 0);
        for a in 0..4u8 {
            for (k, key) in keys.iter().enumerate() {
                let stored = store.get(agent(a.into()), key).unwrap();
                match newest.get(&(a, k as u8)) {
                    Some((secs, value)) => {
                        prop_assert_eq!(&stored.value, value);
                        prop_assert_eq!(stored.collected_at, at((*secs).into()));
                    }
                    None => prop_assert_eq!(stored.value, ""),
                }
            }
        }
    }
}
