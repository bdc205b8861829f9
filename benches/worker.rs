//! Target 2: worker capacity with a no-op store, in updates per second through intake,
//! dedup and flush building, end to end.
//!
//! One iteration: 100,000 updates (10,000 calls of 10 keys), built before the clock starts,
//! are added from one thread and then `sync()` waits until the worker has taken every one
//! in and every capacity flush they triggered (batch 500) has completed. The clock covers
//! both, so the figure is the end-to-end rate at which updates become completed flushes:
//! `100,000 / time`. Scenarios:
//!
//! - `distinct`: 10,000 agents × 10 keys, each key once: every update is a new batch entry
//!   (the worst case for the map: inserts, never replacements) and 200 flushes of 500.
//! - `dedup`: 100 agents × 10 keys, each key 100 times: mostly replacements.
//!
//! Each in both flush modes (the pipelined default and the Go-like inline one). Pipelined
//! runs with `max_pending` above the iteration's 100,000 entries, so what is measured is
//! capacity, not the bound; `pipelined-default-bound` runs with the default bound
//! (20 × 500) and prints how many entries the bound dropped (`retention_dropped`): when
//! intake outruns the flusher thread, those updates are accepted but never flushed, so
//! its time is not a capacity figure.
//!
//! `cargo bench --bench worker -- --warm-up-time 1 --measurement-time 3`

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metadata_batcher::{Batcher, FlushMode};

use common::{agent, at, call, key_names, NoopPublisher, NoopStore};

const KEYS_PER_CALL: usize = 10;
const CALLS: usize = 10_000;
const UPDATES: usize = CALLS * KEYS_PER_CALL;

fn bench_worker(c: &mut Criterion) {
    let keys = key_names(KEYS_PER_CALL);
    let mut group = c.benchmark_group("worker");
    group.throughput(Throughput::Elements(UPDATES as u64));
    for (scenario, agents) in [("distinct", CALLS), ("dedup", 100)] {
        for (mode_name, mode, max_pending) in [
            ("pipelined", FlushMode::Pipelined, Some(2 * UPDATES)),
            ("inline", FlushMode::Inline, None),
            ("pipelined-default-bound", FlushMode::Pipelined, None),
        ] {
            let mut builder = Batcher::builder(NoopStore, NoopPublisher);
            if let Some(max_pending) = max_pending {
                builder = builder.max_pending(max_pending);
            }
            let batcher = builder
                .flush_mode(mode)
                // The whole iteration fits: `add` never drops, the worker is the limit.
                .channel_capacity(2 * UPDATES)
                .interval(Duration::from_secs(3600))
                .build()
                .expect("valid settings");
            let mut dropped = 0;
            let mut round = 0u64;
            group.bench_function(BenchmarkId::new(scenario, mode_name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let prepared: Vec<_> = (0..CALLS)
                            .map(|i| {
                                round += 1;
                                (agent(i % agents), call(&keys, round, at(round)))
                            })
                            .collect();
                        let start = Instant::now();
                        for (who, metadata) in prepared {
                            dropped += batcher.add(who, metadata).unwrap().dropped;
                        }
                        batcher.sync();
                        total += start.elapsed();
                        // What is left below one batch is flushed outside the clock, so
                        // every iteration starts from an empty batch.
                        batcher.flush();
                    }
                    total
                })
            });
            let stats = batcher.stats();
            println!(
                "worker/{scenario}/{mode_name}: dropped {dropped}, retention_dropped {}, flushed {}, flushes capacity {} manual {}, mean rows per capacity flush {:.0}",
                stats.retention_dropped,
                stats.flushed,
                stats.flushes.capacity,
                stats.flushes.manual,
                stats.last_flush.map_or(0.0, |_| stats.flushed as f64
                    / (stats.flushes.capacity + stats.flushes.manual).max(1) as f64)
            );
            batcher.close();
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_worker
}
criterion_main!(benches);
