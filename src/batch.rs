//! The batch: the newest value per (agent, key), waiting for the next flush.
//!
//! Only the worker thread touches it. Updates arrive in any order; per (agent, key) the
//! entry with the newest `collected_at` survives, and on equal timestamps the later arrival
//! wins, so a retried or late update can never replace a newer one.
//!
//! The batch is also the batcher's only buffer besides the channel: entries a failed flush
//! hands back are merged in under the same rule, and [`Batch::trim`] holds it to its bounds
//! (bytes, and optionally distinct entries) by dropping the entries with the oldest
//! `collected_at`. The bytes are kept up to date on every insert, in O(1): the capacities
//! of the entry's three strings plus a fixed per-entry overhead ([`entry_bytes`]).
//!
//! Nothing here may stall the worker for longer than the channel lasts (16.7 ms at 150,000
//! updates/s with the defaults): a flush takes the map in O(1) and the flusher builds the
//! columns ([`Taken::into_columns`]), and the map is sharded so that no doubling moves more
//! than a small share of it.

use std::collections::HashMap;
use std::time::SystemTime;

use uuid::Uuid;

use crate::{Metadata, MetadataBatch};

/// What an entry costs besides its strings, as counted against the byte bound: the map
/// slot (a UUID, a timestamp and three `String` headers, 104 bytes) at the map's lowest
/// load (7/16 just after it grows: about 240 bytes), or, in flight, the five columns' slots
/// (104 bytes), plus the allocator's rounding of three strings. Rounded up, so the bound
/// holds for the real heap.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 288;

/// Bytes one entry counts against the byte bound.
pub(crate) fn entry_bytes(key: &String, value: &String, error: &String) -> usize {
    key.capacity() + value.capacity() + error.capacity() + ENTRY_OVERHEAD_BYTES
}

/// Bytes a batch of flush columns counts against the byte bound.
pub(crate) fn batch_bytes(batch: &MetadataBatch) -> usize {
    (0..batch.len())
        .map(|i| entry_bytes(&batch.keys[i], &batch.values[i], &batch.errors[i]))
        .sum()
}

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

impl Entry {
    fn bytes(&self, row: &RowKey) -> usize {
        entry_bytes(&row.key, &self.value, &self.error)
    }
}

type Entries = HashMap<RowKey, Entry, foldhash::fast::RandomState>;

/// The map is split by agent into this many shards, so that growing it never moves more
/// than a small share of the entries at once: a hash map doubles by moving every entry,
/// which for 60,000 entries took 17 ms here, longer than the default channel lasts at
/// 150,000 updates/s (2,500 keys: 16.7 ms).
const SHARDS: usize = 16;

/// Each shard's share of the agents, ∝ 2^(i/16) (×1000). Shards of equal shares would
/// reach their doubling points together and move everything in one burst; shares spread
/// over one octave put their doublings at different sizes, so one doubling moves at most
/// about 8% of the entries.
const SHARD_WEIGHTS: [u64; SHARDS] = [
    1000, 1044, 1091, 1139, 1189, 1242, 1297, 1354, 1414, 1477, 1542, 1610, 1682, 1756, 1834, 1915,
];

/// Upper bounds of each shard's range of 32-bit hash points.
const SHARD_BOUNDS: [u64; SHARDS] = {
    let mut total = 0;
    let mut i = 0;
    while i < SHARDS {
        total += SHARD_WEIGHTS[i];
        i += 1;
    }
    let mut bounds = [0; SHARDS];
    let mut sum = 0;
    let mut i = 0;
    while i < SHARDS {
        sum += SHARD_WEIGHTS[i];
        bounds[i] = (sum << 32) / total;
        i += 1;
    }
    bounds
};

type Shards = [Entries; SHARDS];

/// Which shard holds an agent's entries: the UUID's halves folded and mixed (Fibonacci
/// hashing, so sequential IDs spread too) into a 32-bit point, placed by the shares.
fn shard_of(agent_id: Uuid) -> usize {
    let (high, low) = agent_id.as_u64_pair();
    let point = (high ^ low).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    SHARD_BOUNDS.partition_point(|&bound| bound <= point)
}

/// Deduplicating map from (agent, key) to the newest update.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    shards: Shards,
    /// Entries in all shards.
    len: usize,
    /// The sum of [`entry_bytes`] over the entries.
    bytes: usize,
    /// Updates that met an entry of the same (agent, key) and lost to it or replaced it,
    /// since the batch was made: each is one accepted update that will never be written.
    superseded: u64,
    /// The maps of the last flush, emptied by the flusher and handed back, so the next
    /// [`Batch::take`] swaps maps instead of allocating and growing new ones.
    spare: Shards,
}

/// A batch taken for a flush: the maps themselves, handed over in O(1). The flusher turns
/// them into columns ([`Taken::into_columns`]), off the worker thread: for 100,000 entries
/// that pass takes milliseconds, during which the worker would not drain the channel.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    shards: Shards,
    len: usize,
}

impl Taken {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The flush columns, and the emptied maps to hand back to [`Batch::recycle`].
    pub(crate) fn into_columns(mut self) -> (MetadataBatch, Taken) {
        let mut columns = MetadataBatch::with_capacity(self.len);
        for shard in &mut self.shards {
            for (row, entry) in shard.drain() {
                columns.agent_ids.push(row.agent_id);
                columns.keys.push(row.key);
                columns.values.push(entry.value);
                columns.errors.push(entry.error);
                columns.collected_at.push(entry.collected_at);
            }
        }
        self.len = 0;
        (columns, self)
    }
}

impl Batch {
    /// What the entries count against the byte bound.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Updates superseded since the batch was made; see the field.
    pub(crate) fn superseded(&self) -> u64 {
        self.superseded
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
        match self.shards[shard_of(agent_id)].entry(RowKey { agent_id, key }) {
            std::collections::hash_map::Entry::Occupied(mut stored) => {
                self.superseded += 1;
                if wins(collected_at, stored.get().collected_at) {
                    // Same key, same overhead: only the value and error change size.
                    let old = stored.insert(entry);
                    let new = stored.get();
                    self.bytes = self.bytes + new.value.capacity() + new.error.capacity()
                        - old.value.capacity()
                        - old.error.capacity();
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                self.bytes += entry_bytes(&slot.key().key, &entry.value, &entry.error);
                self.len += 1;
                slot.insert(entry);
            }
        }
    }

    /// Takes every entry for a flush, in O(1): the maps are swapped with the spare ones.
    /// A spare keeps its allocation unless it is far larger than this flush needed: a
    /// table sized for one burst would make every later insert walk memory that no longer
    /// fits in cache.
    pub(crate) fn take(&mut self) -> Taken {
        for (spare, shard) in self.spare.iter_mut().zip(&self.shards) {
            let len = shard.len();
            if spare.capacity() > 4 * len.max(SMALLEST_SHRUNK_CAPACITY / SHARDS) {
                spare.shrink_to(len);
            }
        }
        let len = std::mem::take(&mut self.len);
        self.bytes = 0;
        Taken {
            shards: std::mem::replace(&mut self.shards, std::mem::take(&mut self.spare)),
            len,
        }
    }

    /// Keeps a flushed (emptied) map's allocations for the next [`Batch::take`].
    pub(crate) fn recycle(&mut self, emptied: Taken) {
        for (spare, mut shard) in self.spare.iter_mut().zip(emptied.shards) {
            shard.clear();
            if shard.capacity() > spare.capacity() {
                *spare = shard;
            }
        }
    }

    /// Drops the entries with the oldest `collected_at` until at most `max_entries` remain
    /// and they count at most `max_bytes`; returns how many it dropped. Sorts the batch's
    /// timestamps, so callers trim in steps rather than one entry at a time.
    pub(crate) fn trim(&mut self, max_entries: usize, max_bytes: usize) -> usize {
        let excess_entries = self.len.saturating_sub(max_entries);
        let excess_bytes = self.bytes.saturating_sub(max_bytes);
        if excess_entries == 0 && excess_bytes == 0 {
            return 0;
        }
        let mut oldest: Vec<(SystemTime, usize)> = self
            .shards
            .iter()
            .flatten()
            .map(|(row, entry)| (entry.collected_at, entry.bytes(row)))
            .collect();
        oldest.sort_unstable_by_key(|&(collected_at, _)| collected_at);
        let (mut dropping, mut freed) = (0, 0);
        while dropping < excess_entries || freed < excess_bytes {
            freed += oldest[dropping].1;
            dropping += 1;
        }
        let threshold = oldest[dropping - 1].0;
        // Everything strictly older than the threshold goes; then entries at the threshold
        // itself while the bounds are still exceeded. The ties are decided as the maps
        // yield them, on what remains once the older ones are gone, so the bounds hold
        // exactly whatever the order.
        let older = oldest.partition_point(|&(collected_at, _)| collected_at < threshold);
        let mut len = self.len - older;
        let mut bytes = self.bytes - oldest[..older].iter().map(|&(_, b)| b).sum::<usize>();
        for shard in &mut self.shards {
            shard.retain(|row, entry| {
                if entry.collected_at < threshold {
                    false
                } else if entry.collected_at == threshold
                    && (len > max_entries || bytes > max_bytes)
                {
                    len -= 1;
                    bytes -= entry.bytes(row);
                    false
                } else {
                    true
                }
            });
        }
        let dropped = self.len - len;
        self.len = len;
        self.bytes = bytes;
        dropped
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
            .into_columns()
            .0
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
        assert_eq!(batch.trim(10, usize::MAX), 0);
        assert_eq!(batch.trim(7, usize::MAX), 3);
        let kept = batch.take().into_columns().0;
        assert_eq!(kept.len(), 7);
        let mut times: Vec<_> = kept.collected_at.clone();
        times.sort();
        assert_eq!(times[0], at(1));
        assert_eq!(times.iter().filter(|&&t| t == at(1)).count(), 1);
    }

    #[test]
    fn bytes_follow_inserts_replacements_and_take() {
        let agent = Uuid::from_u128(1);
        let mut batch = Batch::default();
        batch.insert(agent, md("a", "12345", 1));
        let one = 1 + 5 + ENTRY_OVERHEAD_BYTES;
        assert_eq!(batch.bytes(), one);
        batch.insert(agent, md("a", "1", 2)); // replaces: the value shrinks
        assert_eq!(batch.bytes(), one - 4);
        batch.insert(agent, md("a", "older, longer, loses", 0));
        assert_eq!(batch.bytes(), one - 4);
        batch.insert(agent, Metadata::new("b", "", "err", at(1)));
        assert_eq!(batch.bytes(), one - 4 + 1 + 3 + ENTRY_OVERHEAD_BYTES);
        let taken = batch.take().into_columns().0;
        assert_eq!(batch_bytes(&taken), one - 4 + 1 + 3 + ENTRY_OVERHEAD_BYTES);
        assert_eq!(batch.bytes(), 0);
    }

    #[test]
    fn trim_by_bytes_drops_the_oldest_until_within_the_bound() {
        let agent = Uuid::from_u128(1);
        let mut batch = Batch::default();
        for i in 0..10u64 {
            batch.insert(agent, md(&format!("k{i}"), "v", i / 2));
        }
        let each = 2 + 1 + ENTRY_OVERHEAD_BYTES;
        assert_eq!(batch.bytes(), 10 * each);
        // Room for 6½ entries: the four oldest go.
        assert_eq!(batch.trim(usize::MAX, 6 * each + each / 2), 4);
        assert_eq!(batch.bytes(), 6 * each);
        let kept = batch.take().into_columns().0;
        let mut times = kept.collected_at.clone();
        times.sort();
        assert_eq!(times[0], at(2));
        assert_eq!(times.iter().filter(|&&t| t == at(2)).count(), 2);
    }

    #[test]
    fn shards_take_their_shares_of_sequential_and_random_ids() {
        let mut counts = [0usize; SHARDS];
        for i in 0..160_000u128 {
            counts[shard_of(Uuid::from_u128(0x5eed << 112 | i))] += 1;
            counts[shard_of(Uuid::from_u128(
                i.wrapping_mul(0x2545_F491_4F6C_DD1D_9E37_79B9),
            ))] += 1;
        }
        let total: u64 = SHARD_WEIGHTS.iter().sum();
        for (shard, &count) in counts.iter().enumerate() {
            let expected = 320_000 * SHARD_WEIGHTS[shard] as usize / total as usize;
            assert!(
                count.abs_diff(expected) < expected / 10,
                "shard {shard}: {count} vs {expected}"
            );
        }
    }
}
