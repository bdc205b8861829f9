//! The batch: the newest value per (agent, key), waiting for the next flush.
//!
//! Only the worker thread touches it. Updates arrive in any order; per (agent, key) the
//! entry with the newest `collected_at` survives, and on equal timestamps the later arrival
//! wins, so a retried or late update can never replace a newer one.
//!
//! The batch is also the batcher's only buffer besides the channel: entries a failed flush
//! hands back are merged in under the same rule, and [`Batch::trim`] holds it to a bound on
//! distinct entries by dropping the entries with the oldest `collected_at`.

use std::collections::HashMap;
use std::time::SystemTime;

use uuid::Uuid;

use crate::{Metadata, MetadataBatch};

/// Below this the map is never shrunk: small tables are cheap to keep and to walk.
const SMALLEST_SHRUNK_CAPACITY: usize = 1024;

/// The hash map key: one row of the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RowKey {
    agent_id: Uuid,
    key: String,
}

#[derive(Debug)]
struct Entry {
    value: String,
    error: String,
    collected_at: SystemTime,
}

/// Deduplicating map from (agent, key) to the newest update.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    entries: HashMap<RowKey, Entry, foldhash::fast::RandomState>,
}

impl Batch {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes in one update; on equal `collected_at` the update replaces the entry, because it
    /// arrived later.
    pub(crate) fn insert(&mut self, agent_id: Uuid, metadata: Metadata) {
        self.merge(agent_id, metadata, |incoming, stored| incoming >= stored);
    }

    /// Takes back an entry of a failed flush. Everything in the batch arrived after it, so
    /// on equal `collected_at` the batch's entry stays.
    pub(crate) fn restore(&mut self, batch: MetadataBatch) {
        for (agent_id, metadata) in batch.into_rows() {
            self.merge(agent_id, metadata, |incoming, stored| incoming > stored);
        }
    }

    fn merge(
        &mut self,
        agent_id: Uuid,
        metadata: Metadata,
        wins: impl Fn(SystemTime, SystemTime) -> bool,
    ) {
        let Metadata {
            key,
            value,
            error,
            collected_at,
        } = metadata;
        let entry = Entry {
            value,
            error,
            collected_at,
        };
        match self.entries.entry(RowKey { agent_id, key }) {
            std::collections::hash_map::Entry::Occupied(mut stored) => {
                if wins(collected_at, stored.get().collected_at) {
                    stored.insert(entry);
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(entry);
            }
        }
    }

    /// Empties the batch into flush columns, keeping the map's allocation for the next one
    /// unless it is far larger than this flush needed: a table sized for one burst would
    /// make every later insert and drain walk memory that no longer fits in cache.
    pub(crate) fn take(&mut self) -> MetadataBatch {
        let len = self.entries.len();
        let mut columns = MetadataBatch::with_capacity(len);
        for (row, entry) in self.entries.drain() {
            columns.agent_ids.push(row.agent_id);
            columns.keys.push(row.key);
            columns.values.push(entry.value);
            columns.errors.push(entry.error);
            columns.collected_at.push(entry.collected_at);
        }
        if self.entries.capacity() > 4 * len.max(SMALLEST_SHRUNK_CAPACITY) {
            self.entries.shrink_to(len);
        }
        columns
    }

    /// Drops the entries with the oldest `collected_at` until at most `limit` remain;
    /// returns how many it dropped. Linear in the batch size, so callers trim in steps
    /// rather than one entry at a time.
    pub(crate) fn trim(&mut self, limit: usize) -> usize {
        let excess = self.entries.len().saturating_sub(limit);
        if excess == 0 {
            return 0;
        }
        let mut times: Vec<SystemTime> = self.entries.values().map(|e| e.collected_at).collect();
        let (older, &mut threshold, _) = times.select_nth_unstable(excess - 1);
        // Everything strictly older than the threshold goes, and as many entries at the
        // threshold itself as are needed to reach exactly `excess`.
        let mut ties_to_drop = excess - older.iter().filter(|&&t| t < threshold).count();
        self.entries.retain(|_, entry| {
            if entry.collected_at < threshold {
                false
            } else if entry.collected_at == threshold && ties_to_drop > 0 {
                ties_to_drop -= 1;
                false
            } else {
                true
            }
        });
        excess
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn md(key: &str, value: &str, secs: u64) -> Metadata {
        Metadata::new(key, value, "", at(secs))
    }

    fn values(batch: &mut Batch) -> Vec<(String, String)> {
        let mut rows: Vec<_> = batch
            .take()
            .into_rows()
            .map(|(_, m)| (m.key, m.value))
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn newest_wins_and_equal_timestamp_later_arrival_wins() {
        let agent = Uuid::from_u128(1);
        let mut batch = Batch::default();
        batch.insert(agent, md("a", "first", 10));
        batch.insert(agent, md("a", "older", 9));
        batch.insert(agent, md("b", "one", 5));
        batch.insert(agent, md("b", "two", 5));
        assert_eq!(batch.len(), 2);
        assert_eq!(
            values(&mut batch),
            [("a".into(), "first".into()), ("b".into(), "two".into())]
        );
        assert!(batch.is_empty());
    }

    #[test]
    fn restored_entries_lose_ties_and_older_values() {
        let agent = Uuid::from_u128(1);
        let mut batch = Batch::default();
        batch.insert(agent, md("a", "new", 10));
        batch.insert(agent, md("b", "new", 10));
        let mut failed = MetadataBatch::default();
        failed.push(agent, md("a", "retained", 10));
        failed.push(agent, md("b", "retained-newer", 11));
        failed.push(agent, md("c", "retained-only", 1));
        batch.restore(failed);
        assert_eq!(
            values(&mut batch),
            [
                ("a".into(), "new".into()),
                ("b".into(), "retained-newer".into()),
                ("c".into(), "retained-only".into())
            ]
        );
    }

    #[test]
    fn trim_drops_exactly_the_oldest() {
        let agent = Uuid::from_u128(1);
        let mut batch = Batch::default();
        for i in 0..10u64 {
            // Timestamps 0,0,1,1,2,2,...: ties at the threshold are split exactly.
            batch.insert(agent, md(&format!("k{i}"), "v", i / 2));
        }
        assert_eq!(batch.trim(10), 0);
        assert_eq!(batch.trim(7), 3);
        let kept = batch.take();
        assert_eq!(kept.len(), 7);
        let mut times: Vec<_> = kept.collected_at.clone();
        times.sort();
        assert_eq!(times[0], at(1));
        assert_eq!(times.iter().filter(|&&t| t == at(1)).count(), 1);
    }
}
