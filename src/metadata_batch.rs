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
