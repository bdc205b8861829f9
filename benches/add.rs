//! Target 1: the `add` hot path, in nanoseconds per accepted key, 10 keys per call, at 1, 2
//! and 8 calling threads.
//!
//! The worker runs for real and drains the channel concurrently, over a store that does
//! nothing. Each thread's calls are built in chunks before the clock starts (the caller's
//! own `Vec<Metadata>` and strings are not part of `add`'s cost); after each chunk the
//! clock stops and `sync()` lets the worker catch up, so the channel (sized far above a
//! chunk) never fills. Dropped keys are counted and reported: a dropped key is not an
//! accepted key, so a run with drops does not measure the target.
//!
//! One criterion iteration is one `add` call on each thread; the reported time is wall
//! time, so `time / (10 × threads)` is the wall-clock cost per accepted key (on this
//! 2-core machine, 8 threads share 2 cores with the worker). `add/caller_cpu/threads/1`
//! runs a single caller over warm chunks of 256 calls (like `add_worker_held`) and reports
//! its thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): `add`'s cost to the caller with the
//! worker draining, without the time the caller spent waiting for a core that the worker
//! and the flusher had.
//!
//! `cargo bench --bench add -- --warm-up-time 1 --measurement-time 3`

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{Receiver, Sender};
use metadata_batcher::{Batcher, FlushMode, MetadataBatch, Store, StoreError, Written};

use common::{agent, at, call, key_names, NoopPublisher, NoopStore};

const KEYS_PER_CALL: usize = 10;
/// Calls each thread builds before a timed stretch.
const CHUNK_CALLS: usize = 4096;
/// Calls built before a stretch of `add_worker_held`: about 0.5 MB of vectors and strings,
/// so they are still in the core's L2 cache when `add` reads them, as an RPC handler's
/// freshly decoded message is. (4,096 calls spill to L3: +60 ns a call in cache misses on
/// the caller's own data.)
const WARM_CHUNK_CALLS: usize = 256;
/// Agents per thread: the worker deduplicates into a bounded map, as in production.
const AGENTS_PER_THREAD: usize = 1000;
const THREADS: [usize; 3] = [1, 2, 8];

fn batcher(threads: usize) -> Batcher {
    Batcher::builder(NoopStore, NoopPublisher)
        // Room for a whole chunk of every thread, twice over: the channel never fills.
        .channel_capacity(2 * threads * CHUNK_CALLS * KEYS_PER_CALL)
        .interval(Duration::from_secs(3600))
        .build()
        .expect("valid settings")
}

/// What a timed stretch reports.
#[derive(Clone, Copy)]
enum Measure {
    /// Wall time from the first thread's start to the last one's end.
    Wall,
    /// The calling thread's own CPU time: what `add` costs the caller, without the time it
    /// waited for a core while the worker and the flusher had both (2 cores, 3 threads).
    CallerCpu,
}

fn bench_add(c: &mut Criterion) {
    let keys = key_names(KEYS_PER_CALL);
    let dropped = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let mut group = c.benchmark_group("add");
    let runs = THREADS
        .iter()
        .map(|&threads| ("threads", threads, Measure::Wall, CHUNK_CALLS))
        .chain([(
            "caller_cpu/threads",
            1,
            Measure::CallerCpu,
            WARM_CHUNK_CALLS,
        )]);
    for (name, threads, measure, chunk_calls) in runs {
        let batcher = batcher(threads);
        group.throughput(Throughput::Elements((threads * KEYS_PER_CALL) as u64));
        group.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(threads);
                // Each thread's (start, end, CPU time) of its timed stretch.
                let spans: Vec<Mutex<Option<(Instant, Instant, Duration)>>> =
                    (0..threads).map(|_| Mutex::new(None)).collect();
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let calls = (iters - done).min(chunk_calls as u64) as usize;
                    std::thread::scope(|scope| {
                        for (t, slot) in spans.iter().enumerate() {
                            let (barrier, batcher, keys) = (&barrier, &batcher, &keys);
                            let (dropped, accepted) = (&dropped, &accepted);
                            scope.spawn(move || {
                                let base = (done as usize) * threads + t;
                                let prepared: Vec<_> = (0..calls)
                                    .map(|i| {
                                        let n = (base + i * threads) as u64;
                                        let who =
                                            agent(t * AGENTS_PER_THREAD + i % AGENTS_PER_THREAD);
                                        (who, call(keys, n, at(n)))
                                    })
                                    .collect();
                                let (mut ok, mut lost) = (0u64, 0u64);
                                barrier.wait();
                                let cpu = ThreadTime::now();
                                let start = Instant::now();
                                for (who, metadata) in prepared {
                                    let report = batcher.add(who, metadata).unwrap();
                                    ok += report.accepted as u64;
                                    lost += report.dropped as u64;
                                }
                                let end = Instant::now();
                                *slot.lock().unwrap() = Some((start, end, cpu.elapsed()));
                                accepted.fetch_add(ok, Relaxed);
                                dropped.fetch_add(lost, Relaxed);
                            });
                        }
                    });
                    let spans: Vec<_> = spans
                        .iter()
                        .filter_map(|s| s.lock().unwrap().take())
                        .collect();
                    total += match measure {
                        // With more threads than cores, a thread may start late.
                        Measure::Wall => {
                            let first = spans.iter().map(|s| s.0).min().expect("every thread ran");
                            let last = spans.iter().map(|s| s.1).max().expect("every thread ran");
                            last - first
                        }
                        Measure::CallerCpu => spans.iter().map(|s| s.2).sum(),
                    };
                    batcher.sync();
                    done += calls as u64;
                }
                total
            })
        });
        let stats = batcher.stats();
        println!(
            "add/{name}/{threads}: accepted {} keys, dropped {} (batcher stats: dropped {}, flushed {})",
            accepted.swap(0, Relaxed),
            dropped.swap(0, Relaxed),
            stats.dropped,
            stats.flushed
        );
        batcher.close();
    }
    group.finish();
}

/// A store that, once armed, blocks its next call until released: with flushes inline,
/// that holds the worker inside the store, so nothing drains the channel concurrently.
struct GateStore {
    entered: Sender<()>,
    release: Receiver<()>,
}

impl Store for GateStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        let _ = self.entered.send(());
        let _ = self.release.recv();
        Ok(Written::rows(batch.len() as u64))
    }
}

/// Diagnostic for the profile: the same single-thread `add` while the worker is held in a
/// (gated, inline) flush, so no other core touches the channel, the key budget or the
/// caller's vectors during the timed stretch. The difference to `add/threads/1` is the
/// cost of sharing those cache lines with a worker that drains concurrently.
fn bench_add_worker_held(c: &mut Criterion) {
    let keys = key_names(KEYS_PER_CALL);
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded();
    let batcher = Batcher::builder(
        GateStore {
            entered: entered_tx,
            release: release_rx,
        },
        NoopPublisher,
    )
    .flush_mode(FlushMode::Inline)
    .batch_size(1_000_000)
    .max_pending(1_000_000)
    .channel_capacity(2 * WARM_CHUNK_CALLS * KEYS_PER_CALL)
    .interval(Duration::from_secs(3600))
    .build()
    .expect("valid settings");
    let mut group = c.benchmark_group("add_worker_held");
    group.throughput(Throughput::Elements(KEYS_PER_CALL as u64));
    let mut dropped = 0;
    group.bench_function("threads/1", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let calls = (iters - done).min(WARM_CHUNK_CALLS as u64) as usize;
                let prepared: Vec<_> = (0..calls)
                    .map(|i| {
                        let n = done + i as u64;
                        (agent(i % AGENTS_PER_THREAD), call(&keys, n, at(n)))
                    })
                    .collect();
                std::thread::scope(|scope| {
                    // One entry, then a manual flush that the store holds.
                    batcher
                        .add(agent(usize::MAX >> 8), call(&keys[..1], 0, at(0)))
                        .unwrap();
                    let flushing = scope.spawn(|| batcher.flush());
                    entered.recv().expect("the store was entered");
                    let start = Instant::now();
                    for (who, metadata) in prepared {
                        dropped += batcher.add(who, metadata).unwrap().dropped;
                    }
                    total += start.elapsed();
                    release.send(()).unwrap();
                    flushing.join().unwrap();
                });
                // The worker takes the chunk in (and the next flush must not block).
                batcher.sync();
                done += calls as u64;
            }
            total
        })
    });
    println!("add_worker_held/threads/1: dropped {dropped}");
    drop(release);
    batcher.close();
    group.finish();
}

criterion_group!(benches, bench_add, bench_add_worker_held);
criterion_main!(benches);
