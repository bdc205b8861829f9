//! Test doubles shared by the batcher tests: a store that records every batch and lets a
//! test decide what each call does.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metadata_batcher::{
    BatchResult, Capabilities, Interrupt, Metadata, MetadataBatch, Store, StoreError, Written,
};
use parking_lot::Mutex;
use uuid::Uuid;

type Behaviour = dyn FnMut(&MetadataBatch) -> Result<Written, StoreError> + Send;

/// A store whose calls run a closure and are recorded.
pub struct ScriptedStore {
    pub calls: Arc<Mutex<Vec<MetadataBatch>>>,
    one_by_one: OneByOne,
    interrupt: Option<Box<dyn FnMut() -> Interrupt + Send>>,
    max_batch_rows: Option<usize>,
    parallel: Parallel,
}

/// Records each call and runs the closure; the `Store` trait's own `batch_update_many`.
struct OneByOne {
    calls: Arc<Mutex<Vec<MetadataBatch>>>,
    behaviour: Box<Behaviour>,
}

impl Store for OneByOne {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        self.calls.lock().push(batch.clone());
        (self.behaviour)(batch)
    }
}

/// What a [`ScriptedStore`] does with several batches in one call.
#[derive(Default)]
struct Parallel {
    batches: Option<usize>,
    /// Batches per `batch_update_many` call, in order.
    groups: Arc<Mutex<Vec<usize>>>,
    /// Tries at most this many batches of a call, and says nothing of the rest.
    tries: Option<usize>,
}

impl ScriptedStore {
    /// Every call succeeds and updates every row.
    pub fn accepting() -> Self {
        Self::new(|batch| Ok(batch.len() as u64))
    }

    /// `behaviour` answers rows updated (a `u64`) or a [`Written`].
    pub fn new<W: Into<Written>>(
        mut behaviour: impl FnMut(&MetadataBatch) -> Result<W, StoreError> + Send + 'static,
    ) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        ScriptedStore {
            calls: calls.clone(),
            one_by_one: OneByOne {
                calls,
                behaviour: Box::new(move |batch| behaviour(batch).map(Into::into)),
            },
            interrupt: None,
            max_batch_rows: None,
            parallel: Parallel::default(),
        }
    }

    pub fn with_interrupt(mut self, make: impl FnMut() -> Interrupt + Send + 'static) -> Self {
        self.interrupt = Some(Box::new(make));
        self
    }

    /// A store that takes up to `rows` rows a call: the batcher sizes its statements.
    pub fn with_max_batch_rows(mut self, rows: usize) -> Self {
        self.max_batch_rows = Some(rows);
        self
    }

    /// A store that takes up to `batches` batches a call (`Store::parallel_batches`); it
    /// writes them with the trait's default (one after another), and records how many each
    /// call got in the returned list.
    pub fn with_parallel_batches(mut self, batches: usize) -> (Self, Arc<Mutex<Vec<usize>>>) {
        self.parallel.batches = Some(batches);
        let groups = self.parallel.groups.clone();
        (self, groups)
    }

    /// Tries only the first `tries` batches of each call of several, and returns their
    /// results alone.
    pub fn trying_only(mut self, tries: usize) -> Self {
        self.parallel.tries = Some(tries);
        self
    }
}

impl Store for ScriptedStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        self.one_by_one.batch_update(batch)
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        self.interrupt.as_mut().map(|make| make())
    }

    fn capabilities(&self) -> Capabilities {
        let capabilities =
            Capabilities::default().with_parallel_batches(self.parallel.batches.unwrap_or(1));
        match self.max_batch_rows {
            Some(rows) => capabilities.with_max_batch_rows(rows),
            None => capabilities,
        }
    }

    /// With [`trying_only`](ScriptedStore::trying_only), answers a shorter list than it was
    /// given, which the batcher reads as "the rest were not tried".
    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        self.parallel.groups.lock().push(batches.len());
        let tries = self.parallel.tries.unwrap_or(batches.len());
        self.one_by_one
            .batch_update_many(&batches[..tries.min(batches.len())])
    }
}

/// Holds store calls until the test opens it; see [`ScriptedStore::gated`].
pub struct Gate {
    /// Receives once per call that reached the gate.
    pub entered: crossbeam_channel::Receiver<()>,
    release: crossbeam_channel::Sender<()>,
}

impl Gate {
    /// Lets every waiting and later call through.
    pub fn open(self) {
        drop(self.release);
    }
}

impl ScriptedStore {
    /// A store whose every call waits at the gate until it is opened, then succeeds.
    ///
    /// Bind the gate after the batcher (`let gate = gate;` after building it): locals drop
    /// in reverse order, so a failing assertion then opens the gate before the batcher's
    /// drop, and the close that drop starts does not wait for the blocked call.
    pub fn gated() -> (ScriptedStore, Gate) {
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (release, released) = crossbeam_channel::bounded::<()>(0);
        let store = ScriptedStore::new(move |batch| {
            let _ = entered_tx.send(());
            // Only ever disconnected, by `Gate::open`.
            let _ = released.recv();
            Ok(batch.len() as u64)
        });
        (store, Gate { entered, release })
    }
}

pub fn agent(n: u128) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 + n)
}

pub fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

pub fn md(key: &str, value: &str, secs: u64) -> Metadata {
    Metadata::new(key, value, "", at(secs))
}

/// The rows of a batch as sortable tuples.
pub fn rows(batch: &MetadataBatch) -> Vec<(Uuid, String, String, String, SystemTime)> {
    let mut rows: Vec<_> = (0..batch.len())
        .map(|i| {
            (
                batch.agent_ids[i],
                batch.keys[i].clone(),
                batch.values[i].clone(),
                batch.errors[i].clone(),
                batch.collected_at[i],
            )
        })
        .collect();
    rows.sort();
    rows
}

/// A [`MockClock`](metadata_batcher::MockClock) that tells the test every timer armed, and
/// can be made to panic, once, when a named thread reads the time (a faulty `Clock`, as a
/// user's could be).
#[derive(Clone)]
pub struct TestClock {
    pub mock: metadata_batcher::MockClock,
    armed: crossbeam_channel::Sender<Armed>,
    timers: crossbeam_channel::Receiver<Armed>,
    /// The thread whose `now()` panics, after how many more readings.
    panic_on: Arc<Mutex<Option<(&'static str, usize)>>>,
}

/// A timer armed: by which thread, for how long, and when.
pub struct Armed {
    pub thread: Option<String>,
    pub duration: Duration,
    pub at: std::time::Instant,
}

impl TestClock {
    pub fn new() -> Self {
        let (armed, timers) = crossbeam_channel::unbounded();
        TestClock {
            mock: metadata_batcher::MockClock::new(),
            armed,
            timers,
            panic_on: Arc::default(),
        }
    }

    /// Waits until a timer of `d` is armed (by the real clock, at most 10 s).
    pub fn wait_for_timer(&self, d: Duration) {
        self.wait_for(|armed| armed.duration == d)
            .unwrap_or_else(|| panic!("no timer of {d:?} was armed within 10 s"));
    }

    /// Waits until the thread named `thread` arms a timer of `d` (by the real clock, at
    /// most 10 s); returns the mock instant it fires at.
    pub fn timer_armed_by(&self, thread: &str, d: Duration) -> Option<std::time::Instant> {
        self.wait_for(|armed| armed.duration == d && armed.thread.as_deref() == Some(thread))
            .map(|armed| armed.at + armed.duration)
    }

    fn wait_for(&self, wanted: impl Fn(&Armed) -> bool) -> Option<Armed> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.timers.recv_timeout(left) {
                Ok(armed) if wanted(&armed) => return Some(armed),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Every timer armed, as it is armed.
    pub fn timers(&self) -> &crossbeam_channel::Receiver<Armed> {
        &self.timers
    }

    /// The next `now()` on the thread named `thread` panics.
    pub fn panic_once_on(&self, thread: &'static str) {
        self.panic_on_reading(thread, 1);
    }

    /// The `nth` `now()` from here on the thread named `thread` panics (1: the next).
    pub fn panic_on_reading(&self, thread: &'static str, nth: usize) {
        *self.panic_on.lock() = Some((thread, nth));
    }
}

impl metadata_batcher::Clock for TestClock {
    fn now(&self) -> std::time::Instant {
        let name = std::thread::current().name().map(str::to_owned);
        let mut panic_on = self.panic_on.lock();
        if let Some((thread, left)) = panic_on.as_mut() {
            if name.as_deref() == Some(*thread) {
                *left -= 1;
                if *left == 0 {
                    *panic_on = None;
                    drop(panic_on);
                    panic!("clock failure on {name:?}");
                }
            }
        }
        drop(panic_on);
        self.mock.now()
    }

    fn after(&self, d: Duration) -> crossbeam_channel::Receiver<std::time::Instant> {
        // Armed before the test hears of it, so the test's next `advance` reaches it; the
        // time read after arming, so `at + d` is never before the timer's deadline (a
        // store may move the clock in between).
        let timer = self.mock.after(d);
        let at = self.mock.now();
        let _ = self.armed.send(Armed {
            thread: std::thread::current().name().map(str::to_owned),
            duration: d,
            at,
        });
        timer
    }

    fn tick(&self, d: Duration) -> crossbeam_channel::Receiver<std::time::Instant> {
        self.mock.tick(d)
    }

    fn system_time(&self) -> SystemTime {
        self.mock.system_time()
    }
}
