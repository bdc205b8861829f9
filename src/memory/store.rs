//! [`MemoryStore`]: the table, in a map.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::{MetadataBatch, Store, StoreError, Written};

/// A row of the in-memory table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredMetadata {
    /// The stored value.
    pub value: String,
    /// The stored error.
    pub error: String,
    /// When the stored value was collected; `UNIX_EPOCH` until the first update.
    pub collected_at: SystemTime,
}

type Check = dyn Fn(Uuid, &str, &str) -> Result<(), String> + Send + Sync;

#[derive(Default)]
struct Table {
    rows: HashMap<(Uuid, String), StoredMetadata>,
    statements: u64,
    outage: Option<StoreError>,
    check: Option<Arc<Check>>,
}

/// A real in-memory [`Store`] with the same semantics as the PostgreSQL one; clones share
/// the table.
///
/// ```
/// use std::time::SystemTime;
/// use metadata_batcher::{MemoryStore, Metadata, MetadataBatch, Store};
/// use uuid::Uuid;
///
/// let mut store = MemoryStore::new();
/// let agent = Uuid::from_u128(1);
/// store.register(agent, ["cpu"]);
///
/// let mut batch = MetadataBatch::default();
/// batch.push(agent, Metadata::new("cpu", "42%", "", SystemTime::now()));
/// batch.push(agent, Metadata::new("invented", "x", "", SystemTime::now()));
/// assert_eq!(store.batch_update(&batch).unwrap().updated(), 1); // only registered rows are updated
/// assert_eq!(store.get(agent, "cpu").unwrap().value, "42%");
/// assert!(store.get(agent, "invented").is_none());
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    table: Arc<Mutex<Table>>,
}

impl MemoryStore {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the rows of an agent's keys, as an agent's registration does; existing rows
    /// are left as they are.
    pub fn register<K: Into<String>>(&self, agent_id: Uuid, keys: impl IntoIterator<Item = K>) {
        let mut table = self.table.lock();
        for key in keys {
            table
                .rows
                .entry((agent_id, key.into()))
                .or_insert_with(|| StoredMetadata {
                    value: String::new(),
                    error: String::new(),
                    collected_at: SystemTime::UNIX_EPOCH,
                });
        }
    }

    /// The stored row of (agent, key), if registered.
    pub fn get(&self, agent_id: Uuid, key: &str) -> Option<StoredMetadata> {
        self.table
            .lock()
            .rows
            .get(&(agent_id, key.to_owned()))
            .cloned()
    }

    /// Every stored row.
    pub fn rows(&self) -> HashMap<(Uuid, String), StoredMetadata> {
        self.table.lock().rows.clone()
    }

    /// How many `batch_update` statements ran, failed ones included.
    pub fn statements(&self) -> u64 {
        self.table.lock().statements
    }

    /// Simulates an outage: while set, every `batch_update` fails with this error and
    /// writes nothing. `None` ends it.
    pub fn set_outage(&self, error: Option<StoreError>) {
        self.table.lock().outage = error;
    }

    /// Simulates a CHECK constraint: a statement holding any row for which `check` returns
    /// an error fails as a whole with [`StoreErrorKind::Rejected`](crate::StoreErrorKind::Rejected), as PostgreSQL does.
    /// `check` gets the row's agent ID, key and value.
    pub fn set_check(
        &self,
        check: impl Fn(Uuid, &str, &str) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.table.lock().check = Some(Arc::new(check));
    }
}

impl Store for MemoryStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        let mut table = self.table.lock();
        table.statements += 1;
        if let Some(error) = &table.outage {
            return Err(error.clone());
        }
        if let Some(check) = &table.check {
            for i in 0..batch.len() {
                check(batch.agent_ids[i], &batch.keys[i], &batch.values[i])
                    .map_err(StoreError::rejected)?;
            }
        }
        let mut updated = 0;
        for i in 0..batch.len() {
            // One lookup key per row: the batch is borrowed, so the key is copied here;
            // this store serves tests and the demo, not the hot path.
            let Some(row) = table
                .rows
                .get_mut(&(batch.agent_ids[i], batch.keys[i].clone()))
            else {
                continue;
            };
            // The PostgreSQL statement's guard: never overwrite a newer value.
            if row.collected_at <= batch.collected_at[i] {
                row.value.clone_from(&batch.values[i]);
                row.error.clone_from(&batch.errors[i]);
                row.collected_at = batch.collected_at[i];
                updated += 1;
            }
        }
        Ok(Written::rows(updated))
    }
}
