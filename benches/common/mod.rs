//! Pieces the benchmarks share: stores and publishers that cost nothing, and update
//! builders that do their allocating before any timed region starts.

#![allow(dead_code)] // each bench binary uses a different part

use std::time::{Duration, SystemTime};

use metadata_batcher::{
    Metadata, MetadataBatch, PublishError, Publisher, Store, StoreError, Written,
};
use uuid::Uuid;

/// A store that accepts every row and does nothing, so the worker is all that is measured.
pub struct NoopStore;

impl Store for NoopStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        Ok(Written::rows(batch.len() as u64))
    }
}

/// A publisher that drops every payload.
pub struct NoopPublisher;

impl Publisher for NoopPublisher {
    fn publish(&mut self, _channel: &str, _payload: &[u8]) -> Result<(), PublishError> {
        Ok(())
    }
}

/// Agent `i` of a benchmark fleet.
pub fn agent(i: usize) -> Uuid {
    Uuid::from_u128(0x6d62_0000_0000_0000_0000_0000_0000_0000 | (i as u128 + 1))
}

/// The key names `key0..keyN`.
pub fn key_names(keys: usize) -> Vec<String> {
    (0..keys).map(|k| format!("key{k}")).collect()
}

/// One `add` call's vector: every key of one agent, with realistic short values. The
/// strings are the caller's own allocation, made here, outside any timed region.
pub fn call(key_names: &[String], round: u64, collected_at: SystemTime) -> Vec<Metadata> {
    key_names
        .iter()
        .map(|key| Metadata::new(key.clone(), format!("{round} %"), "", collected_at))
        .collect()
}

/// A `collected_at` that grows with `n`, so dedup keeps the newest and nothing is ignored.
pub fn at(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(n)
}
