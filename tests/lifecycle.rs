//! The batcher's lifecycle: bounded waits (`sync_timeout`, `flush_timeout`,
//! `close_timeout`), a drop that never blocks and the guard that waits, thread names, and
//! the capacities `build` refuses. Every timeout runs on the mock clock; blocking calls run
//! on threads of their own and are waited for with a real-time bound, so a regression fails
//! a test instead of hanging it.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{agent, md, ScriptedStore, TestClock};
use metadata_batcher::{
    Batcher, BuildError, Clock, CloseError, FlushMode, Interrupt, MemoryPubsub, MemoryStore,
    MockClock, PublishError, Publisher, StoreError, WaitError, MAX_CHANNEL_CAPACITY,
};

/// Far longer than any of these calls takes once released: only a hang reaches it.
const HANG: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `call` on a thread named `name`; its result arrives on the receiver.
fn on_thread<T: Send + 'static>(
    name: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> crossbeam_channel::Receiver<T> {
    let (sender, result) = crossbeam_channel::bounded(1);
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = sender.send(call());
        })
        .unwrap();
    result
}

/// A batcher on `clock` whose store holds every call until the gate opens, with one entry
/// batched and its scheduled flush under way (held at the gate).
fn held_in_a_flush(clock: &TestClock) -> (Arc<Batcher>, common::Gate) {
    let (store, gate) = ScriptedStore::gated();
    let b = Arc::new(
        Batcher::builder(store, MemoryPubsub::new())
            .clock(clock.clone())
            .interval(INTERVAL)
            .build()
            .unwrap(),
    );
    b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
    clock.mock.advance(INTERVAL);
    gate.entered
        .recv_timeout(HANG)
        .expect("the flush reached the store");
    (b, gate)
}

#[test]
fn sync_timeout_says_timed_out_then_synced_then_closed() {
    let clock = TestClock::new();
    let (b, gate) = held_in_a_flush(&clock);
    let waiting = on_thread("syncer", {
        let b = b.clone();
        move || b.sync_timeout(TIMEOUT)
    });
    clock
        .timer_armed_by("syncer", TIMEOUT)
        .expect("sync armed its timeout");
    clock.mock.advance(TIMEOUT - Duration::from_millis(1));
    assert!(waiting.try_recv().is_err(), "returned before its timeout");
    clock.mock.advance(Duration::from_millis(1));
    assert_eq!(
        waiting.recv_timeout(HANG).unwrap(),
        Err(WaitError::TimedOut)
    );

    gate.open();
    // No clock moves: an answer in time needs no timer.
    assert_eq!(b.sync_timeout(TIMEOUT), Ok(()));
    assert_eq!(b.stats().flushed, 1);
    assert!(!b.close().deadline_hit);
    assert_eq!(b.sync_timeout(TIMEOUT), Err(WaitError::Closed));
}

#[test]
fn flush_timeout_stops_waiting_but_the_flush_still_runs() {
    let clock = TestClock::new();
    let (b, gate) = held_in_a_flush(&clock);
    b.add(agent(2), vec![md("cpu", "2%", 1)]).unwrap();
    let waiting = on_thread("flusher-caller", {
        let b = b.clone();
        move || b.flush_timeout(TIMEOUT)
    });
    clock
        .timer_armed_by("flusher-caller", TIMEOUT)
        .expect("flush armed its timeout");
    clock.mock.advance(TIMEOUT);
    assert_eq!(
        waiting.recv_timeout(HANG).unwrap(),
        Err(WaitError::TimedOut)
    );

    gate.open();
    assert!(!b.close().deadline_hit);
    assert_eq!(
        b.stats().flushed,
        2,
        "the flush that timed out wrote its entry"
    );
    assert_eq!(b.flush_timeout(TIMEOUT), Err(WaitError::Closed));
}

/// What a [`hung_until_interrupted`] store tells the test.
struct Hung {
    /// Hears each store call begin.
    started: crossbeam_channel::Receiver<()>,
    /// The name of the thread each interrupt ran on.
    interrupted_on: crossbeam_channel::Receiver<Option<String>>,
}

/// A store whose calls block until their interrupt fires.
fn hung_until_interrupted() -> (ScriptedStore, Hung) {
    let (fire, fired) = crossbeam_channel::unbounded::<()>();
    let (ran_on_tx, interrupted_on) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let store = ScriptedStore::new(move |_| {
        let _ = started_tx.send(());
        let _ = fired.recv();
        Err::<u64, _>(StoreError::unavailable("interrupted"))
    })
    .with_interrupt(move || {
        let (fire, ran_on_tx) = (fire.clone(), ran_on_tx.clone());
        Interrupt::new(move || {
            let _ = ran_on_tx.send(thread::current().name().map(str::to_owned));
            let _ = fire.send(());
        })
    });
    (
        store,
        Hung {
            started,
            interrupted_on,
        },
    )
}

#[test]
fn close_timeout_gives_up_at_its_own_deadline_and_reports_it() {
    let clock = TestClock::new();
    let (store, hung) = hung_until_interrupted();
    let b = Arc::new(
        Batcher::builder(store, MemoryPubsub::new())
            .clock(clock.clone())
            .name("ct")
            .final_flush_timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    b.add(agent(1), vec![md("cpu", "1%", 1), md("mem", "2G", 1)])
        .unwrap();
    let closing = on_thread("closer", {
        let b = b.clone();
        move || b.close_timeout(TIMEOUT)
    });
    // Its own timeout, not the final flush timeout of 60 s.
    clock
        .timer_armed_by("closer", TIMEOUT)
        .expect("close armed its deadline");
    hung.started
        .recv_timeout(HANG)
        .expect("the final flush began");
    clock.mock.advance(TIMEOUT);
    let Err(CloseError::TimedOut(report)) = closing.recv_timeout(HANG).unwrap() else {
        panic!("close_timeout did not time out");
    };
    assert!(report.deadline_hit);
    assert_eq!((report.written, report.unwritten), (0, 2));
    assert_eq!(
        hung.interrupted_on.recv_timeout(HANG).unwrap().as_deref(),
        Some("ct-cancel"),
        "the interrupt runs on the instance's cancel thread"
    );
    assert_eq!(b.close_timeout(TIMEOUT), Err(CloseError::Closed(report)));
    assert_eq!(b.close(), report);
}

/// A batcher on a mock clock whose store holds agent 1's `cpu`, and the store.
fn with_one_key() -> (MemoryStore, Batcher) {
    let store = MemoryStore::new();
    store.register(agent(1), ["cpu"]);
    let b = Batcher::builder(store.clone(), MemoryPubsub::new())
        .clock(MockClock::new())
        .build()
        .unwrap();
    (store, b)
}

#[test]
fn close_timeout_in_time_is_ok() {
    let (store, b) = with_one_key();
    b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
    let report = b.close_timeout(TIMEOUT).expect("closed in time");
    assert_eq!((report.written, report.unwritten), (1, 0));
    assert_eq!(store.get(agent(1), "cpu").unwrap().value, "1%");
}

#[test]
fn dropping_the_batcher_never_blocks_and_its_close_still_gives_up_at_the_deadline() {
    let clock = TestClock::new();
    let (store, hung) = hung_until_interrupted();
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .name("dr")
        .final_flush_timeout(TIMEOUT)
        .build()
        .unwrap();
    b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
    b.sync();
    // The drop returns while the final flush hangs in the store.
    on_thread("dropper", move || drop(b))
        .recv_timeout(HANG)
        .expect("drop returned");
    // The close it started runs on a thread of the instance, bounded as `close` is.
    clock
        .timer_armed_by("dr-close", TIMEOUT)
        .expect("the close thread armed the final flush timeout");
    hung.started
        .recv_timeout(HANG)
        .expect("the final flush began");
    clock.mock.advance(TIMEOUT);
    assert_eq!(
        hung.interrupted_on.recv_timeout(HANG).unwrap().as_deref(),
        Some("dr-cancel")
    );
}

#[test]
fn a_close_guard_waits_for_the_final_flush() {
    let (store, b) = with_one_key();
    let guard = b.close_guard();
    b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
    drop(b);
    drop(guard);
    // The guard's drop returned once the close it joined (or ran) had written everything.
    assert_eq!(store.get(agent(1), "cpu").unwrap().value, "1%");
}

#[test]
fn a_guard_dropped_first_closes_and_the_batcher_refuses_updates() {
    let b = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
        .clock(MockClock::new())
        .build()
        .unwrap();
    drop(b.close_guard());
    assert!(b.add(agent(1), vec![md("cpu", "1%", 1)]).is_err());
    assert!(matches!(
        b.close_timeout(TIMEOUT),
        Err(CloseError::Closed(_))
    ));
}

/// A clock that reports, once each, the names of the threads that read it.
#[derive(Clone)]
struct NamingClock {
    mock: MockClock,
    readers: crossbeam_channel::Sender<String>,
}

impl Clock for NamingClock {
    fn now(&self) -> Instant {
        if let Some(name) = thread::current().name() {
            let _ = self.readers.send(name.to_owned());
        }
        self.mock.now()
    }
    fn after(&self, d: Duration) -> crossbeam_channel::Receiver<Instant> {
        self.mock.after(d)
    }
    fn tick(&self, d: Duration) -> crossbeam_channel::Receiver<Instant> {
        self.mock.tick(d)
    }
}

/// Records the name of the thread each publish runs on.
struct NamingPublisher(crossbeam_channel::Sender<String>);

impl Publisher for NamingPublisher {
    fn publish(&mut self, _channel: &str, _payload: &[u8]) -> Result<(), PublishError> {
        let _ = self
            .0
            .send(thread::current().name().unwrap_or("").to_owned());
        Ok(())
    }
}

/// Waits (by the real clock, at most `HANG`) until `names` yields `wanted`.
fn hears(names: &crossbeam_channel::Receiver<String>, wanted: &str) -> bool {
    let deadline = Instant::now() + HANG;
    while let Ok(name) = names.recv_deadline(deadline) {
        if name == wanted {
            return true;
        }
    }
    false
}

#[test]
fn every_thread_is_named_after_the_instance() {
    for (mode, store_thread, publish_thread) in [
        (FlushMode::Pipelined, "replica2-flush", "replica2-notify"),
        (FlushMode::Inline, "replica2-worker", "replica2-worker"),
    ] {
        let (stored_on_tx, stored_on) = crossbeam_channel::unbounded();
        let store = ScriptedStore::new(move |batch| {
            let _ = stored_on_tx.send(thread::current().name().unwrap_or("").to_owned());
            Ok(batch.len() as u64)
        });
        let (published_on_tx, published_on) = crossbeam_channel::unbounded();
        let (readers_tx, readers) = crossbeam_channel::unbounded();
        let clock = NamingClock {
            mock: MockClock::new(),
            readers: readers_tx,
        };
        let b = Batcher::builder(store, NamingPublisher(published_on_tx))
            .clock(clock.clone())
            .name("replica2")
            .flush_mode(mode)
            .build()
            .unwrap();
        b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
        b.flush().expect("flushed");
        assert_eq!(stored_on.try_recv().unwrap(), store_thread, "{mode:?}");
        assert_eq!(published_on.try_recv().unwrap(), publish_thread, "{mode:?}");
        assert!(hears(&readers, "replica2-worker"), "{mode:?}");
        // The gauges thread reads the clock on every tick.
        clock.mock.advance(Duration::from_secs(1));
        assert!(hears(&readers, "replica2-gauges"), "{mode:?}");
        b.close();
    }
}

#[test]
fn the_default_names_are_unchanged() {
    let (stored_on_tx, stored_on) = crossbeam_channel::unbounded();
    let store = ScriptedStore::new(move |batch| {
        let _ = stored_on_tx.send(thread::current().name().unwrap_or("").to_owned());
        Ok(batch.len() as u64)
    });
    let b = Batcher::builder(store, MemoryPubsub::new())
        .clock(MockClock::new())
        .build()
        .unwrap();
    b.add(agent(1), vec![md("cpu", "1%", 1)]).unwrap();
    b.flush().expect("flushed");
    assert_eq!(stored_on.try_recv().unwrap(), "mdbatch-flush");
    b.close();
}

#[test]
fn build_refuses_a_channel_too_large_to_allocate_and_a_name_no_thread_can_have() {
    let build = |configure: fn(metadata_batcher::Builder) -> metadata_batcher::Builder| {
        configure(Batcher::builder(MemoryStore::new(), MemoryPubsub::new())).build()
    };
    let err = build(|b| b.channel_capacity(10_000_000)).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::ChannelTooLarge {
                keys: 10_000_000,
                set_by: "channel_capacity"
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("457 MiB") && message.contains(&MAX_CHANNEL_CAPACITY.to_string()),
        "{message}"
    );
    // The default channel is five batches.
    let err = build(|b| b.batch_size(1_000_000)).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::ChannelTooLarge {
                keys: 5_000_000,
                set_by: "batch_size"
            }
        ),
        "{err:?}"
    );
    // The bound itself is accepted, and so is a large batch with a channel of its own.
    build(|b| b.channel_capacity(MAX_CHANNEL_CAPACITY))
        .unwrap()
        .close();
    build(|b| b.batch_size(1_000_000).channel_capacity(100_000))
        .unwrap()
        .close();

    for name in ["", "a\0b"] {
        let err = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
            .name(name)
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, BuildError::Name { name: n } if n == name),
            "{err:?}"
        );
    }
}
