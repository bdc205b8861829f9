//! One flush as parallel columns: exactly the parameters of the batched `UPDATE`.
//!
//! The batch map is turned into five arrays so that a [`Store`](crate::Store) can bind them
//! as five array parameters of one prepared statement (`unnest($1::uuid[], ...)`), whatever
//! the number of rows. Row `i` is `(agent_ids[i], keys[i], values[i], errors[i],
//! collected_at[i])`; a batch never holds the same (agent, key) twice.

use std::time::SystemTime;

use uuid::Uuid;

use crate::Metadata;

/// One flush, as parallel columns: exactly the parameters of the batched UPDATE.
///
/// All five vectors always have the same length.
///
/// ```
/// use std::time::SystemTime;
/// use metadata_batcher::{Metadata, MetadataBatch};
/// use uuid::Uuid;
///
/// let mut batch = MetadataBatch::default();
/// batch.push(Uuid::nil(), Metadata::new("cpu", "42%", "", SystemTime::UNIX_EPOCH));
/// assert_eq!(batch.len(), 1);
/// assert_eq!(batch.keys, ["cpu"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetadataBatch {
    /// `workspace_agent_id` of each row.
    pub agent_ids: Vec<Uuid>,
    /// `key` of each row.
    pub keys: Vec<String>,
    /// `value` of each row.
    pub values: Vec<String>,
    /// `error` of each row.
    pub errors: Vec<String>,
    /// `collected_at` of each row.
    pub collected_at: Vec<SystemTime>,
}

impl MetadataBatch {
    /// An empty batch with room for `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        MetadataBatch {
            agent_ids: Vec::with_capacity(rows),
            keys: Vec::with_capacity(rows),
            values: Vec::with_capacity(rows),
            errors: Vec::with_capacity(rows),
            collected_at: Vec::with_capacity(rows),
        }
    }

    /// How many rows the batch holds.
    pub fn len(&self) -> usize {
        self.agent_ids.len()
    }

    /// Whether the batch holds no row.
    pub fn is_empty(&self) -> bool {
        self.agent_ids.is_empty()
    }

    /// Appends one row.
    pub fn push(&mut self, agent_id: Uuid, metadata: Metadata) {
        self.agent_ids.push(agent_id);
        self.keys.push(metadata.key);
        self.values.push(metadata.value);
        self.errors.push(metadata.error);
        self.collected_at.push(metadata.collected_at);
    }

    /// Moves every row of `other` to the end of this batch.
    pub fn append(&mut self, other: &mut MetadataBatch) {
        self.agent_ids.append(&mut other.agent_ids);
        self.keys.append(&mut other.keys);
        self.values.append(&mut other.values);
        self.errors.append(&mut other.errors);
        self.collected_at.append(&mut other.collected_at);
    }

    /// Splits the batch in two at row `at`: this batch keeps rows `[0, at)` and the returned
    /// one holds `[at, len)`. Moves the strings, copies none.
    ///
    /// # Panics
    /// When `at > len`.
    pub fn split_off(&mut self, at: usize) -> MetadataBatch {
        MetadataBatch {
            agent_ids: self.agent_ids.split_off(at),
            keys: self.keys.split_off(at),
            values: self.values.split_off(at),
            errors: self.errors.split_off(at),
            collected_at: self.collected_at.split_off(at),
        }
    }

    /// Puts the rows in (agent ID, key) order: the one lock order every writer shares.
    ///
    /// A statement locks its rows in the order it sends them, so two replicas whose
    /// statements share rows in different orders can each hold a row the other waits for: a
    /// deadlock, which PostgreSQL breaks by aborting one of them after `deadlock_timeout`.
    /// Sent in one total order, every statement of every replica acquires its locks in
    /// that order and none can wait for another in a cycle. The agent's bytes then the
    /// key's bytes order the rows; a batch never holds the same (agent, key) twice, so the
    /// order is total. Sorts an index and then moves each column once: no string is copied.
    pub(crate) fn sort_by_agent_and_key(&mut self) {
        if self
            .agent_ids
            .windows(2)
            .zip(self.keys.windows(2))
            .all(|(a, k)| (a[0], k[0].as_str()) <= (a[1], k[1].as_str()))
        {
            return;
        }
        // The agents inline and the keys by reference, so that sorting compares contiguous
        // memory and follows a key's pointer only when two agents tie: through indices into
        // the columns, every comparison looked in two columns (twice as slow at 500 rows).
        let mut order: Vec<(u128, &str, usize)> = self
            .agent_ids
            .iter()
            .zip(&self.keys)
            .enumerate()
            .map(|(i, (agent_id, key))| (agent_id.as_u128(), key.as_str(), i))
            .collect();
        order.sort_unstable();
        let order: Vec<usize> = order.into_iter().map(|(_, _, i)| i).collect();
        self.agent_ids = order.iter().map(|&i| self.agent_ids[i]).collect();
        self.collected_at = order.iter().map(|&i| self.collected_at[i]).collect();
        self.keys = permute(&mut self.keys, &order);
        self.values = permute(&mut self.values, &order);
        self.errors = permute(&mut self.errors, &order);
    }

    /// Takes the rows out, one `(agent_id, metadata)` per row, in order.
    pub fn into_rows(self) -> impl Iterator<Item = (Uuid, Metadata)> {
        self.agent_ids
            .into_iter()
            .zip(self.keys)
            .zip(self.values)
            .zip(self.errors)
            .zip(self.collected_at)
            .map(|((((agent_id, key), value), error), collected_at)| {
                (
                    agent_id,
                    Metadata {
                        key,
                        value,
                        error,
                        collected_at,
                    },
                )
            })
    }
}

/// The strings of `column` in `order`, moved out of it (left empty behind).
fn permute(column: &mut [String], order: &[usize]) -> Vec<String> {
    order
        .iter()
        .map(|&i| std::mem::take(&mut column[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorting_orders_rows_by_agent_then_key_and_keeps_each_row_together() {
        let at = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let mut batch = MetadataBatch::default();
        for (agent, key, secs) in [(2, "b", 1), (1, "z", 2), (2, "a", 3), (1, "a", 4)] {
            let value = format!("{agent}{key}");
            batch.push(
                Uuid::from_u128(agent),
                Metadata::new(key, &value, key, at(secs)),
            );
        }
        batch.sort_by_agent_and_key();
        let rows: Vec<_> = batch
            .into_rows()
            .map(|(agent, m)| (agent.as_u128(), m.key, m.value, m.error, m.collected_at))
            .collect();
        assert_eq!(
            rows,
            [
                (1, "a".into(), "1a".into(), "a".into(), at(4)),
                (1, "z".into(), "1z".into(), "z".into(), at(2)),
                (2, "a".into(), "2a".into(), "a".into(), at(3)),
                (2, "b".into(), "2b".into(), "b".into(), at(1)),
            ]
        );
    }
}
