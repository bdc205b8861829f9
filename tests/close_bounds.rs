//! What `close()` bounds: no caller of `flush`, `sync` or `add` waits past its return,
//! whatever the store or the publisher does, and its report and log say what held it.
//! Each test runs the blocking calls on threads of their own and waits for them with a
//! real-time bound, so a regression fails the test instead of hanging it.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{agent, md, ScriptedStore, TestClock};
use metadata_batcher::{
    Batcher, Builder, CloseReport, FlushMode, Interrupt, MemoryPubsub, MemoryStore, PublishError,
    Publisher, StoreError,
};

/// Far longer than any of these calls takes once released: only a hang reaches it.
const HANG: Duration = Duration::from_secs(10);

/// Calls `call` on `b` on a thread of its own; its result arrives on the receiver.
fn in_background<T: Send + 'static>(
    b: &Arc<Batcher>,
    call: impl FnOnce(&Batcher) -> T + Send + 'static,
) -> crossbeam_channel::Receiver<T> {
    let b = b.clone();
    let (sender, result) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = sender.send(call(&b));
    });
    result
}

/// Closes `b` on a thread of its own, moves the clock to the deadline `close` armed, and
/// returns its report.
fn close_at_the_deadline(b: &Arc<Batcher>, clock: &TestClock, timeout: Duration) -> CloseReport {
    let closed = in_background(b, Batcher::close);
    clock.wait_for_timer(timeout);
    clock.mock.advance(timeout);
    closed.recv_timeout(HANG).expect("close() returned")
}

/// A store call that blocks until its interrupt fires, then fails `Unavailable`, as a
/// PostgreSQL session does when its cancel request arrives. Reports each call's start.
fn hung_until_interrupted() -> (ScriptedStore, crossbeam_channel::Receiver<()>) {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let (fire, fired) = crossbeam_channel::unbounded::<()>();
    let store = ScriptedStore::new(move |_| {
        let _ = started_tx.send(());
        let _ = fired.recv();
        Err::<u64, _>(StoreError::unavailable("connection closed by the cancel"))
    })
    .with_interrupt(move || {
        let fire = fire.clone();
        Interrupt::new(move || {
            let _ = fire.send(());
        })
    });
    (store, started)
}

/// A batcher on the mock `clock` whose store hangs until interrupted (see
/// [`hung_until_interrupted`]), with `settings` on top; the receiver hears each store call
/// begin.
fn hung_batcher(
    clock: &TestClock,
    timeout: Duration,
    settings: impl FnOnce(Builder) -> Builder,
) -> (Arc<Batcher>, crossbeam_channel::Receiver<()>) {
    let (store, started) = hung_until_interrupted();
    let builder = Batcher::builder(store, MemoryPubsub::new())
        .clock(clock.clone())
        .final_flush_timeout(timeout);
    (Arc::new(settings(builder).build().unwrap()), started)
}

/// Issue 21's first confirmed case: a `flush()` waiting on a store call when `close()`
/// gives up on it returned only when the process ended, and so did a `sync()` behind it.
#[test]
fn a_flush_waiting_on_a_hung_store_returns_when_close_gives_up() {
    let clock = TestClock::new();
    let timeout = Duration::from_millis(500);
    let (b, started) = hung_batcher(&clock, timeout, |b| b);
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    let flushed = in_background(&b, Batcher::flush);
    started
        .recv_timeout(HANG)
        .expect("the flush reached the store");
    let synced = in_background(&b, Batcher::sync);
    let report = close_at_the_deadline(&b, &clock, timeout);
    assert!(report.deadline_hit);
    assert_eq!((report.written, report.unwritten), (0, 1));
    let flush = flushed
        .recv_timeout(HANG)
        .expect("flush() returned after close()");
    if let Some(flush) = flush {
        assert_eq!(flush.stored, 0);
    }
    synced
        .recv_timeout(HANG)
        .expect("sync() returned after close()");
    assert!(b.flush().is_none(), "a flush after close returns at once");
    b.sync();
    assert_eq!(
        b.add(agent(0), vec![md("a", "w", 2)]),
        Err(metadata_batcher::AddError::Closed)
    );
}

/// Never returns from `publish` until the test ends; says when a publish began.
struct StuckPublisher {
    entered: crossbeam_channel::Sender<()>,
    stuck: crossbeam_channel::Receiver<()>,
}

/// The publisher, the receiver of its entries, and what releases it when dropped.
fn stuck_publisher() -> (
    StuckPublisher,
    crossbeam_channel::Receiver<()>,
    crossbeam_channel::Sender<()>,
) {
    let (entered, entries) = crossbeam_channel::unbounded();
    let (release, stuck) = crossbeam_channel::bounded(0);
    (StuckPublisher { entered, stuck }, entries, release)
}

impl Publisher for StuckPublisher {
    fn publish(&mut self, _channel: &str, _payload: &[u8]) -> Result<(), PublishError> {
        let _ = self.entered.send(());
        let _ = self.stuck.recv();
        Ok(())
    }
}

/// Issue 21's second confirmed case: with a publisher that never returns, `close()` said
/// the deadline was hit with everything written, blamed the store, and joined the
/// publisher thread with no bound; a `flush()` waiting for its announcement never returned.
#[test]
fn a_stuck_publisher_holds_neither_close_nor_flush_and_its_agents_are_counted() {
    let clock = TestClock::new();
    let timeout = Duration::from_secs(1);
    let (publisher, entries, release) = stuck_publisher();
    let store = MemoryStore::new();
    store.register(agent(0), ["a"]);
    let b = Arc::new(
        Batcher::builder(store.clone(), publisher)
            .clock(clock.clone())
            .final_flush_timeout(timeout)
            .build()
            .unwrap(),
    );
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    let flushed = in_background(&b, Batcher::flush);
    entries.recv_timeout(HANG).expect("the publish began");
    let report = close_at_the_deadline(&b, &clock, timeout);
    assert_eq!(
        (report.written, report.unwritten),
        (0, 0),
        "written before close"
    );
    assert!(report.deadline_hit);
    assert_eq!(report.unannounced, 1, "the agent being published");
    // Its report, when the worker handed it over before `close` returned; `None` after.
    let flush = flushed
        .recv_timeout(HANG)
        .expect("flush() returned after close()");
    if let Some(flush) = flush {
        assert_eq!((flush.stored, flush.publish_errors), (1, 1));
    }
    assert_eq!(store.get(agent(0), "a").unwrap().value, "v");
    assert_eq!(b.stats().publish_errors, 1);
    drop(release);
}

/// Inline, the flush publishes on the worker thread: a stuck publisher holds the worker,
/// and `close()` still returns at its deadline.
#[test]
fn inline_a_stuck_publisher_does_not_hold_close() {
    let clock = TestClock::new();
    let timeout = Duration::from_secs(1);
    let (publisher, entries, release) = stuck_publisher();
    let b = Arc::new(
        Batcher::builder(MemoryStore::new(), publisher)
            .clock(clock.clone())
            .flush_mode(FlushMode::Inline)
            .final_flush_timeout(timeout)
            .build()
            .unwrap(),
    );
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    let flushed = in_background(&b, Batcher::flush);
    entries.recv_timeout(HANG).expect("the publish began");
    let report = close_at_the_deadline(&b, &clock, timeout);
    assert!(report.deadline_hit);
    assert_eq!(report.unwritten, 0);
    assert!(
        flushed.recv_timeout(HANG).is_ok(),
        "flush() returned after close()"
    );
    drop(release);
}

/// Found by the simulation (seed 2570): inline, a capacity flush that an update's second
/// key triggered ran with the update's third key in neither the batch nor the flush, so
/// a `close()` that gave up during it counted two unwritten of three.
#[test]
fn inline_a_close_that_gives_up_mid_update_counts_every_key() {
    let clock = TestClock::new();
    let timeout = Duration::from_millis(500);
    let (b, started) = hung_batcher(&clock, timeout, |b| {
        b.flush_mode(FlushMode::Inline).batch_size(2)
    });
    b.add(
        agent(0),
        vec![md("a", "v", 1), md("b", "v", 1), md("c", "v", 1)],
    )
    .unwrap();
    started
        .recv_timeout(HANG)
        .expect("the capacity flush reached the store");
    let report = close_at_the_deadline(&b, &clock, timeout);
    assert!(report.deadline_hit);
    assert_eq!(report.unwritten, 3);
}

/// Found by the long simulation run (seed 1022965): a worker that died while a flush was
/// held in the store counted what it held only after that flush; a `close()` that gave
/// up meanwhile counted the flush alone, and the keys the worker held were lost uncounted.
#[test]
fn a_close_that_gives_up_on_a_dying_worker_counts_what_it_held() {
    let clock = TestClock::new();
    let timeout = Duration::from_millis(500);
    let (b, started) = hung_batcher(&clock, timeout, |b| b.batch_size(1));
    b.add(agent(0), vec![md("a", "v", 1)]).unwrap();
    started
        .recv_timeout(HANG)
        .expect("the capacity flush reached the store");
    clock.panic_once_on("mdbatch-worker");
    b.add(
        agent(1),
        vec![md("a", "v", 1), md("b", "v", 1), md("c", "v", 1)],
    )
    .unwrap();
    let report = close_at_the_deadline(&b, &clock, timeout);
    assert!(report.deadline_hit);
    assert_eq!(report.unwritten, 4, "{:?}", b.stats());
    // Whether the worker has begun dying by then or not, the count is the same.
    assert_eq!(b.stats().accepted, 4);
}
