//! The core batcher, deterministically: a mock clock and `sync`/`flush`, never a sleep.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{agent, at, md, rows, ScriptedStore};
use metadata_batcher::{
    agent_ids, AddError, Batcher, FlushMode, FlushReason, InvalidMetadata, MemoryPubsub,
    MemoryStore, Metadata, MetadataField, MockClock, METADATA_BATCH_CHANNEL,
};

const INTERVAL: Duration = Duration::from_secs(5);

fn batcher(store: ScriptedStore, pubsub: &MemoryPubsub, clock: &MockClock) -> Batcher {
    Batcher::builder(store, pubsub.clone())
        .clock(clock.clone())
        .build()
        .unwrap()
}

fn announced(rx: &crossbeam_channel::Receiver<Vec<u8>>) -> Vec<Vec<uuid::Uuid>> {
    rx.try_iter()
        .map(|payload| agent_ids::decode_chunk(&payload).unwrap())
        .collect()
}

#[test]
fn empty_interval_flushes_nothing() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &pubsub, &clock);
    for _ in 0..3 {
        clock.advance(INTERVAL);
        b.sync();
    }
    assert!(calls.lock().is_empty());
    assert!(announcements.try_recv().is_err());
    let stats = b.stats();
    assert_eq!(stats.flushes, Default::default());
    assert_eq!(stats.last_flush, None);
    assert_eq!(b.flush(), None);
}

#[test]
fn one_agent_two_keys_flush_on_schedule() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &pubsub, &clock);
    let report = b
        .add(agent(1), vec![md("cpu", "10%", 1), md("mem", "2G", 1)])
        .unwrap();
    assert_eq!((report.accepted, report.dropped), (2, 0));

    clock.advance(INTERVAL - Duration::from_millis(1));
    b.sync();
    assert!(calls.lock().is_empty(), "no flush before the interval");
    assert_eq!(b.stats().batched, 2);

    clock.advance(Duration::from_millis(1));
    b.sync();
    assert_eq!(calls.lock().len(), 1);
    assert_eq!(announced(&announcements), vec![vec![agent(1)]]);
    let stats = b.stats();
    assert_eq!(
        (stats.flushes.scheduled, stats.flushed, stats.batched),
        (1, 2, 0)
    );
    let last = stats.last_flush.unwrap();
    assert_eq!(last.reason, FlushReason::Scheduled);
    assert_eq!((last.count, last.agents, last.chunks), (2, 1, 1));
}

#[test]
fn two_agents_five_entries_exact_columns() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &pubsub, &clock);
    b.add(
        agent(1),
        vec![
            Metadata::new("a", "1", "", at(1)),
            Metadata::new("b", "2", "oops", at(2)),
            Metadata::new("c", "3", "", at(3)),
        ],
    )
    .unwrap();
    b.add(
        agent(2),
        vec![
            Metadata::new("a", "x", "", at(4)),
            Metadata::new("z", "y", "e", at(5)),
        ],
    )
    .unwrap();
    clock.advance(INTERVAL);
    b.sync();

    let calls = calls.lock();
    assert_eq!(calls.len(), 1);
    let batch = &calls[0];
    assert_eq!(batch.len(), 5);
    for column_len in [
        batch.keys.len(),
        batch.values.len(),
        batch.errors.len(),
        batch.collected_at.len(),
    ] {
        assert_eq!(column_len, 5);
    }
    let s = String::from;
    assert_eq!(
        rows(batch),
        vec![
            (agent(1), s("a"), s("1"), s(""), at(1)),
            (agent(1), s("b"), s("2"), s("oops"), at(2)),
            (agent(1), s("c"), s("3"), s(""), at(3)),
            (agent(2), s("a"), s("x"), s(""), at(4)),
            (agent(2), s("z"), s("y"), s("e"), at(5)),
        ]
    );
    let mut ids: Vec<_> = announced(&announcements).concat();
    ids.sort();
    assert_eq!(ids, vec![agent(1), agent(2)]);
    assert_eq!(b.stats().last_flush.unwrap().agents, 2);
}

#[test]
fn capacity_flush_at_exactly_batch_size_rearms_timer() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = Batcher::builder(store, pubsub)
        .clock(clock.clone())
        .batch_size(10)
        .build()
        .unwrap();
    // Half an interval in, so a timer that was not re-armed would fire too early.
    clock.advance(INTERVAL / 2);
    for i in 0..9 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    b.sync();
    assert!(calls.lock().is_empty(), "9 of 10: no flush yet");
    b.add(agent(9), vec![md("k", "v", 1), md("k2", "v", 1)])
        .unwrap();
    b.sync();
    {
        let calls = calls.lock();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].len(), 10, "exactly batch_size entries");
    }
    assert_eq!(b.stats().flushes.capacity, 1);
    assert_eq!(b.stats().batched, 1);

    // The original timer would fire at INTERVAL; the re-armed one at 1.5 × INTERVAL.
    clock.advance(INTERVAL / 2);
    b.sync();
    assert_eq!(
        calls.lock().len(),
        1,
        "timer re-armed after the capacity flush"
    );
    clock.advance(INTERVAL / 2);
    b.sync();
    assert_eq!(calls.lock().len(), 2);
    assert_eq!(b.stats().flushes.scheduled, 1);
}

#[test]
fn full_channel_drops_and_counts() {
    let clock = MockClock::new();
    let (store, gate) = ScriptedStore::gated();
    let calls = store.calls.clone();
    // Inline flushes block intake, so a blocked store fills the channel.
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(2)
        .channel_capacity(10)
        .flush_mode(FlushMode::Inline)
        .build()
        .unwrap();
    let gate = gate;
    b.add(agent(0), vec![md("a", "v", 1), md("b", "v", 1)])
        .unwrap();
    gate.entered.recv().unwrap(); // the worker is now inside the store

    let first = b
        .add(
            agent(1),
            (0..8).map(|i| md(&format!("k{i}"), "v", 1)).collect(),
        )
        .unwrap();
    assert_eq!((first.accepted, first.dropped), (8, 0));
    let second = b
        .add(
            agent(2),
            (0..5).map(|i| md(&format!("k{i}"), "v", 1)).collect(),
        )
        .unwrap();
    assert_eq!((second.accepted, second.dropped), (2, 3));
    let third = b.add(agent(3), vec![md("k", "v", 1)]).unwrap();
    assert_eq!((third.accepted, third.dropped), (0, 1));
    let stats = b.stats();
    assert_eq!((stats.dropped, stats.queued, stats.accepted), (4, 10, 12));

    gate.open();
    b.sync();
    let stats = b.stats();
    assert_eq!(stats.queued, 0);
    assert_eq!(
        stats.flushed, 12,
        "the first flush's 2 and the 10 accepted meanwhile"
    );
    assert_eq!(calls.lock().len(), 6);
    assert_eq!(stats.dropped, 4);
}

#[test]
fn dedup_keeps_newest_and_later_arrival_on_ties() {
    let clock = MockClock::new();
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &MemoryPubsub::new(), &clock);
    b.add(agent(1), vec![md("same", "first", 10)]).unwrap();
    b.add(agent(1), vec![md("same", "second", 11)]).unwrap();
    b.add(agent(1), vec![md("same", "older", 9)]).unwrap();
    b.add(agent(1), vec![md("tie", "early", 20)]).unwrap();
    b.add(agent(1), vec![md("tie", "late", 20)]).unwrap();
    b.add(agent(2), vec![md("same", "other agent", 1)]).unwrap();
    b.add(
        agent(1),
        vec![
            md("mixed", "m1", 5),
            md("same", "too old", 10),
            md("mixed", "m2", 6),
        ],
    )
    .unwrap();
    let report = b.flush().unwrap();
    assert_eq!(report.reason, FlushReason::Manual);
    assert_eq!(report.count, 4);
    let s = String::from;
    assert_eq!(
        rows(&calls.lock()[0]),
        vec![
            (agent(1), s("mixed"), s("m2"), s(""), at(6)),
            (agent(1), s("same"), s("second"), s(""), at(11)),
            (agent(1), s("tie"), s("late"), s(""), at(20)),
            (agent(2), s("same"), s("other agent"), s(""), at(1)),
        ]
    );
}

#[test]
fn six_hundred_agents_capacity_then_scheduled() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &pubsub, &clock);
    for i in 0..600 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    b.sync();
    let capacity = b.stats().last_flush.unwrap();
    assert_eq!(capacity.reason, FlushReason::Capacity);
    assert_eq!(
        (capacity.count, capacity.agents, capacity.chunks),
        (500, 500, 2)
    );
    let payloads = announced(&announcements);
    assert_eq!(
        payloads.iter().map(Vec::len).collect::<Vec<_>>(),
        [363, 137]
    );

    clock.advance(INTERVAL);
    b.sync();
    let scheduled = b.stats().last_flush.unwrap();
    assert_eq!(scheduled.reason, FlushReason::Scheduled);
    assert_eq!((scheduled.count, scheduled.chunks), (100, 1));
    let mut all: Vec<_> = payloads.concat();
    all.extend(announced(&announcements).concat());
    all.sort();
    assert_eq!(all, (0..600).map(agent).collect::<Vec<_>>());
    assert_eq!(calls.lock().len(), 2);
    let stats = b.stats();
    assert_eq!((stats.flushes.capacity, stats.flushes.scheduled), (1, 1));
}

#[test]
fn twenty_threads_same_three_keys_keep_newest() {
    let clock = MockClock::new();
    let store = MemoryStore::new();
    store.register(agent(1), ["a", "b", "c"]);
    let b = Arc::new(
        Batcher::builder(store.clone(), MemoryPubsub::new())
            .clock(clock.clone())
            // Room for every key of every thread, so the outcome cannot depend on how
            // fast the worker drains.
            .channel_capacity(20 * 50 * 3)
            .build()
            .unwrap(),
    );
    thread::scope(|scope| {
        for t in 0..20u64 {
            let b = &b;
            scope.spawn(move || {
                for round in 0..50u64 {
                    // Timestamps interleave across threads; the newest overall is
                    // thread 19's last round.
                    let secs = round * 20 + t;
                    let value = format!("t{t}r{round}");
                    let report = b
                        .add(
                            agent(1),
                            ["a", "b", "c"].map(|k| md(k, &value, secs)).to_vec(),
                        )
                        .unwrap();
                    assert_eq!(report.dropped, 0);
                }
            });
        }
    });
    b.flush().unwrap();
    for key in ["a", "b", "c"] {
        let row = store.get(agent(1), key).unwrap();
        assert_eq!(row.value, "t19r49");
        assert_eq!(row.collected_at, at(49 * 20 + 19));
    }
}

#[test]
fn flush_duration_uses_the_injected_clock() {
    let clock = MockClock::new();
    let recorder = metadata_batcher::metrics::prometheus_builder().build_recorder();
    let metrics = recorder.handle();
    let store_clock = clock.clone();
    let store = ScriptedStore::new(move |batch| {
        store_clock.advance(Duration::from_millis(250));
        Ok(batch.len() as u64)
    });
    let b = metrics::with_local_recorder(&recorder, || {
        Batcher::builder(store, MemoryPubsub::new())
            .clock(clock.clone())
            .build()
            .unwrap()
    });
    b.add(agent(1), vec![md("k", "v", 1)]).unwrap();
    let report = b.flush().unwrap();
    assert_eq!(report.elapsed, Duration::from_millis(250));
    let text = metrics.render();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
            .to_owned()
    };
    assert_eq!(
        line("coderd_agentapi_metadata_flush_duration_seconds_sum{reason=\"manual\"}"),
        "coderd_agentapi_metadata_flush_duration_seconds_sum{reason=\"manual\"} 0.25"
    );
    assert!(line(
        "coderd_agentapi_metadata_flush_duration_seconds_bucket{reason=\"manual\",le=\"0.1\"}"
    )
    .ends_with(" 0"));
    assert!(line(
        "coderd_agentapi_metadata_flush_duration_seconds_bucket{reason=\"manual\",le=\"0.25\"}"
    )
    .ends_with(" 1"));
}

#[test]
fn close_drains_queued_updates_and_add_after_close_fails() {
    let clock = MockClock::new();
    let store = MemoryStore::new();
    let pubsub = MemoryPubsub::new();
    let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    for i in 0..300 {
        store.register(agent(i), ["k"]);
    }
    let b = Batcher::builder(store.clone(), pubsub)
        .clock(clock.clone())
        .build()
        .unwrap();
    for i in 0..300 {
        b.add(agent(i), vec![md("k", &i.to_string(), 1)]).unwrap();
    }
    // No sync: some of these may still be in the channel when close starts.
    b.close();
    for i in 0..300 {
        assert_eq!(store.get(agent(i), "k").unwrap().value, i.to_string());
    }
    let stats = b.stats();
    assert_eq!((stats.flushed, stats.flushes.shutdown), (300, 1));
    assert_eq!(stats.unwritten_at_shutdown, 0);
    assert_eq!(announced(&announcements).concat().len(), 300);
    assert!(!b.health().worker_alive);

    assert_eq!(
        b.add(agent(1), vec![md("k", "v", 2)]),
        Err(AddError::Closed)
    );
    b.close(); // idempotent
    b.sync(); // returns at once
    assert_eq!(b.flush(), None);
}

#[test]
fn invalid_input_is_rejected_whole() {
    let clock = MockClock::new();
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &MemoryPubsub::new(), &clock);
    let cases = [
        (
            vec![md("ok", "v", 1), md("", "v", 1)],
            1,
            InvalidMetadata::EmptyKey,
        ),
        (
            vec![md(&"k".repeat(128), "v", 1)],
            0,
            InvalidMetadata::KeyTooLong { chars: 128 },
        ),
        (
            vec![md("ok", "v", 1), md("ok2", "v", 1), md("k", "nul\0", 1)],
            2,
            InvalidMetadata::NulByte {
                field: MetadataField::Value,
            },
        ),
    ];
    for (call, index, problem) in cases {
        let err = b.add(agent(1), call).unwrap_err();
        assert_eq!(err, AddError::Invalid { index, problem });
        assert!(err.to_string().contains(&format!("entry {index}")));
    }
    b.sync();
    let stats = b.stats();
    assert_eq!((stats.batched, stats.queued, stats.dropped), (0, 0, 0));
    assert_eq!(b.flush(), None);
    assert!(calls.lock().is_empty());
    // The batcher still works after refusing.
    b.add(agent(1), vec![md("ok", "v", 1)]).unwrap();
    assert_eq!(b.flush().unwrap().count, 1);
}

#[test]
fn long_values_are_cut_before_batching() {
    let clock = MockClock::new();
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let b = batcher(store, &MemoryPubsub::new(), &clock);
    b.add(agent(1), vec![md("k", &"v".repeat(3000), 1)])
        .unwrap();
    b.flush().unwrap();
    let calls = calls.lock();
    assert_eq!(calls[0].values[0].len(), 2048);
    assert_eq!(
        calls[0].errors[0],
        "value of 3000 bytes exceeded 2048 bytes"
    );
}

#[test]
fn build_rejects_zero_settings() {
    let zero = Duration::ZERO;
    type Configure = fn(metadata_batcher::Builder) -> metadata_batcher::Builder;
    let cases: [(Configure, &str); 5] = [
        (|b| b.batch_size(0), "batch_size"),
        (|b| b.interval(Duration::ZERO), "interval"),
        (|b| b.channel_capacity(0), "channel_capacity"),
        (
            |b| b.final_flush_timeout(Duration::ZERO),
            "final_flush_timeout",
        ),
        (
            |b| b.retry_backoff(Duration::ZERO, Duration::ZERO),
            "retry_backoff",
        ),
    ];
    for (configure, setting) in cases {
        let err = configure(Batcher::builder(MemoryStore::new(), MemoryPubsub::new()))
            .build()
            .unwrap_err();
        assert!(err.to_string().starts_with(setting), "{err}");
    }
    let err = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
        .batch_size(100)
        .max_pending(99)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_pending (99)"), "{err}");
    let _ = zero;
}

#[test]
fn metrics_exposition_has_go_names_and_buckets() {
    let clock = MockClock::new();
    let recorder = metadata_batcher::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let b = metrics::with_local_recorder(&recorder, || {
        Batcher::builder(ScriptedStore::accepting(), MemoryPubsub::new())
            .clock(clock.clone())
            .batch_size(3)
            .channel_capacity(15)
            .flush_mode(FlushMode::Inline)
            .build()
            .unwrap()
    });
    b.add(
        agent(1),
        vec![md("a", "v", 1), md("b", "v", 1), md("c", "v", 1)],
    )
    .unwrap();
    b.add(agent(2), vec![md("a", "v", 1)]).unwrap();
    b.sync();
    clock.advance(INTERVAL);
    b.sync();
    let text = handle.render();
    for expected in [
        "coderd_agentapi_metadata_batches_total{reason=\"capacity\"} 1",
        "coderd_agentapi_metadata_batches_total{reason=\"scheduled\"} 1",
        "coderd_agentapi_metadata_flushed_total 4",
        "coderd_agentapi_metadata_batch_size_bucket{le=\"10\"} 2",
        "coderd_agentapi_metadata_batch_size_bucket{le=\"500\"} 2",
        "coderd_agentapi_metadata_batch_size_sum 4",
        "coderd_agentapi_metadata_batch_utilization_bucket{le=\"1\"} 1",
        "coderd_agentapi_metadata_batch_utilization_bucket{le=\"3\"} 2",
        "coderd_agentapi_metadata_batch_utilization_bucket{le=\"160\"} 2",
        "coderd_agentapi_metadata_flush_duration_seconds_bucket{reason=\"capacity\",le=\"5\"} 1",
        "coderd_agentapi_metadata_dropped_keys_total 0",
        "coderd_agentapi_metadata_publish_errors_total 0",
        "# HELP coderd_agentapi_metadata_batch_size Total number of metadata entries in each batch, updated before flushes.",
        "# TYPE coderd_agentapi_metadata_flush_duration_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in\n{text}"
        );
    }
}

#[test]
fn publish_errors_are_counted_and_remaining_chunks_still_sent() {
    let clock = MockClock::new();
    let pubsub = MemoryPubsub::new();
    let b = batcher(ScriptedStore::accepting(), &pubsub, &clock);
    for i in 0..400 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    pubsub.set_failing(true);
    let report = b.flush().unwrap();
    assert_eq!((report.chunks, report.publish_errors), (2, 2));
    assert_eq!(b.stats().publish_errors, 2);
    pubsub.set_failing(false);
    // A failed publish does not keep the rows: they are stored.
    assert_eq!(b.stats().batched, 0);
    b.add(agent(1), vec![md("k", "v", 2)]).unwrap();
    assert_eq!(b.flush().unwrap().publish_errors, 0);
    assert_eq!(pubsub.published(), 1);
}

#[test]
fn panicking_store_does_not_stop_the_worker() {
    let clock = MockClock::new();
    let mut first = true;
    let store = ScriptedStore::new(move |batch| {
        if std::mem::take(&mut first) {
            panic!("store bug");
        }
        Ok(batch.len() as u64)
    });
    let b = batcher(store, &MemoryPubsub::new(), &clock);
    b.add(agent(1), vec![md("a", "v", 1), md("b", "v", 1)])
        .unwrap();
    let report = b.flush().unwrap();
    assert_eq!(report.stored, 0);
    assert!(report.error.unwrap().to_string().contains("store bug"));
    let stats = b.stats();
    assert_eq!(
        (stats.panics, stats.store_errors, stats.lost_to_panics),
        (1, 1, 2)
    );
    assert!(b.health().worker_alive);

    b.add(agent(1), vec![md("c", "v", 1)]).unwrap();
    let report = b.flush().unwrap();
    assert_eq!((report.stored, report.error), (1, None));
}

#[test]
fn panicking_publisher_is_counted() {
    struct Panicking;
    impl metadata_batcher::Publisher for Panicking {
        fn publish(&mut self, _: &str, _: &[u8]) -> Result<(), metadata_batcher::PublishError> {
            panic!("publisher bug")
        }
    }
    let b = Batcher::builder(ScriptedStore::accepting(), Panicking)
        .clock(MockClock::new())
        .build()
        .unwrap();
    b.add(agent(1), vec![md("a", "v", 1)]).unwrap();
    let report = b.flush().unwrap();
    assert_eq!((report.stored, report.publish_errors), (1, 1));
    assert_eq!((b.stats().panics, b.stats().publish_errors), (1, 1));
    b.add(agent(1), vec![md("a", "v", 2)]).unwrap();
    assert_eq!(b.flush().unwrap().stored, 1);
}

#[test]
fn pipelined_flush_carries_what_accrued_while_the_store_worked() {
    let clock = MockClock::new();
    let (store, gate) = ScriptedStore::gated();
    let calls = store.calls.clone();
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(100)
        .channel_capacity(2000)
        .build()
        .unwrap();
    let gate = gate;
    for i in 0..100 {
        b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
    }
    gate.entered.recv().unwrap();
    // The store is blocked; intake and dedup go on.
    for i in 100..1300 {
        let report = b.add(agent(i), vec![md("k", "v", 1)]).unwrap();
        assert_eq!(report.dropped, 0);
    }
    // `sync` would wait for the blocked flush, so watch the batch fill instead: no timing
    // is involved, only the worker's progress through what is already queued.
    while b.stats().batched < 1200 {
        thread::yield_now();
    }
    assert_eq!(b.stats().in_flight, 100);
    gate.open();
    b.sync();
    // The second flush carries all 1,200 that accrued, in statements of at most
    // `batch_size` rows.
    let sizes: Vec<usize> = calls.lock().iter().map(|batch| batch.len()).collect();
    assert_eq!(sizes, [100; 13]);
    let stats = b.stats();
    assert_eq!(
        (stats.flushed, stats.dropped, stats.flushes.capacity),
        (1300, 0, 2)
    );
    let last = stats.last_flush.unwrap();
    assert_eq!((last.count, last.stored, last.statements), (1200, 1200, 12));
    let agents: HashSet<_> = calls
        .lock()
        .iter()
        .flat_map(|c| c.agent_ids.clone())
        .collect();
    assert_eq!(agents.len(), 1300);
}

#[test]
fn flush_and_sync_cover_everything_accepted_before_them_under_contention() {
    let clock = MockClock::new();
    let store = MemoryStore::new();
    for t in 0..8 {
        store.register(agent(t), ["k"]);
    }
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(4)
        .channel_capacity(1000)
        .build()
        .unwrap();
    thread::scope(|scope| {
        for t in 0..8u128 {
            let (b, store, clock) = (&b, &store, &clock);
            scope.spawn(move || {
                for round in 0..100u64 {
                    let value = format!("{t}-{round}");
                    b.add(agent(t), vec![md("k", &value, round)]).unwrap();
                    // Other threads' adds, flushes, syncs and clock moves interleave
                    // freely (a sync alone promises no flush: the timer may be disarmed by
                    // another thread's flush in flight); a flush must still cover this
                    // thread's own update.
                    match round % 3 {
                        0 => {}
                        1 => {
                            clock.advance(INTERVAL);
                            b.sync();
                        }
                        _ => b.sync(),
                    }
                    b.flush();
                    assert_eq!(store.get(agent(t), "k").unwrap().value, value);
                }
            });
        }
    });
    assert_eq!(b.stats().dropped, 0);
}

#[test]
fn handles_are_shareable_across_threads() {
    fn shareable<T: Send + Sync>() {}
    fn sendable<T: Send>() {}
    shareable::<Batcher>();
    shareable::<MockClock>();
    shareable::<metadata_batcher::SystemClock>();
    sendable::<metadata_batcher::Builder>();
    sendable::<MemoryStore>();
    sendable::<MemoryPubsub>();
    #[cfg(feature = "postgres")]
    {
        sendable::<metadata_batcher::postgres::PgStore>();
        sendable::<metadata_batcher::postgres::PgPublisher>();
        sendable::<metadata_batcher::postgres::PgSubscriber>();
    }
}

/// Collects what `tracing` writes on the test thread, as text.
#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn dropped_keys_warn_at_most_once_per_ten_seconds_of_the_injected_clock() {
    let clock = MockClock::new();
    let (store, gate) = ScriptedStore::gated();
    // Inline and blocked in the store: the channel stays full, so every add below drops.
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .batch_size(1)
        .channel_capacity(1)
        .flush_mode(FlushMode::Inline)
        .build()
        .unwrap();
    let gate = gate;
    b.add(agent(0), vec![md("k", "v", 1)]).unwrap();
    gate.entered.recv().unwrap();
    assert_eq!(b.add(agent(1), vec![md("k", "v", 1)]).unwrap().accepted, 1);

    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let drop_one = || assert_eq!(b.add(agent(2), vec![md("k", "v", 1)]).unwrap().dropped, 1);
        drop_one(); // warn
        clock.advance(Duration::from_secs(9));
        drop_one(); // debug: 9 s since the warning
        clock.advance(Duration::from_secs(1));
        drop_one(); // warn: 10 s since the warning
        drop_one(); // debug
    });
    let text = String::from_utf8(log.0.lock().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("metadata channel at capacity, dropped updates"))
        .collect();
    let levels: Vec<&str> = lines
        .iter()
        .map(|l| {
            if l.contains(" WARN ") {
                "warn"
            } else if l.contains(" DEBUG ") {
                "debug"
            } else {
                "?"
            }
        })
        .collect();
    assert_eq!(levels, ["warn", "debug", "warn", "debug"], "{text}");
    assert!(lines[0].contains("dropped_count=1"), "{}", lines[0]);
    assert_eq!(b.stats().dropped, 4);
    gate.open();
}
