//! Target 1, second half: `add` allocates nothing beyond the caller's own strings.
//!
//! A counting global allocator counts allocations (and reallocations) made by the calling
//! thread only; the worker thread, which takes the vectors in and frees them, is not
//! counted. The calls are built first, then 100,000 `add` calls run between two readings
//! of the counter. Exits 1 if any call allocated.
//!
//! `cargo bench --bench add_alloc`

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use metadata_batcher::Batcher;

use common::{agent, at, call, key_names, NoopPublisher, NoopStore};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: during thread teardown the slot may be gone; such allocations are not
    // ours to count.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: defers every operation to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const CALLS: usize = 100_000;
const KEYS_PER_CALL: usize = 10;

fn main() {
    // `cargo bench` passes `--bench`; a `--test` run (cargo test --benches) is just as valid.
    let batcher = Batcher::builder(NoopStore, NoopPublisher)
        .channel_capacity(CALLS * KEYS_PER_CALL)
        .interval(Duration::from_secs(3600))
        .build()
        .expect("valid settings");
    let keys = key_names(KEYS_PER_CALL);
    // Warm-up: first-use allocations (thread-locals, lazy statics) are not per-call costs.
    for n in 0..1000u64 {
        batcher
            .add(agent(n as usize % 100), call(&keys, n, at(n)))
            .unwrap();
    }
    batcher.sync();
    let prepared: Vec<_> = (0..CALLS)
        .map(|i| {
            let n = 1000 + i as u64;
            (agent(i % 1000), call(&keys, n, at(n)))
        })
        .collect();
    let (mut accepted, mut dropped) = (0, 0);
    let before = allocations();
    for (who, metadata) in prepared {
        let report = batcher.add(who, metadata).unwrap();
        accepted += report.accepted;
        dropped += report.dropped;
    }
    let allocated = allocations() - before;
    batcher.sync();
    batcher.close();
    println!(
        "add_alloc: {CALLS} calls of {KEYS_PER_CALL} keys: accepted {accepted}, dropped {dropped}, \
         allocations on the calling thread {allocated} ({:.3} per call)",
        allocated as f64 / CALLS as f64
    );
    if allocated > 0 || dropped > 0 {
        std::process::exit(1);
    }
}
