//! The table the store writes: [`migrate`] creates it, [`register_keys`] and
//! [`register_keys_for_agents`] create its rows ([`register`] and [`register_agents`] are the
//! same with the driver's own error).
//!
//! Rows are created when an agent registers its metadata keys; the batcher only updates
//! existing rows, so an agent cannot invent keys by reporting them (an update for an
//! unregistered key matches no row and is counted as unmatched).

use std::fmt;

use postgres::Client;
use uuid::Uuid;

use super::error::describe;

/// The schema, shipped in the crate; [`migrate`] applies it.
pub const MIGRATION_0001: &str = include_str!("../../migrations/0001_workspace_agent_metadata.sql");

/// An arbitrary constant of this crate: the advisory lock key that serialises concurrent
/// migrations. `CREATE TABLE IF NOT EXISTS` alone is not safe when two sessions run it at
/// the same moment (one fails with a unique violation on the catalog).
const MIGRATION_LOCK: i64 = 0x6d62_6d69_6772_0001;

/// Creates `workspace_agent_metadata` if it does not exist. Idempotent, and safe to run
/// from several processes at once (they take turns on an advisory lock).
///
/// ```no_run
/// let mut client = postgres::Client::connect("postgres://postgres@127.0.0.1/postgres", postgres::NoTls)?;
/// metadata_batcher::postgres::migrate(&mut client)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn migrate(client: &mut Client) -> Result<(), MigrateError> {
    let run = |client: &mut Client| -> Result<(), postgres::Error> {
        let mut transaction = client.transaction()?;
        // A simple query, not a prepared one: through a transaction-mode pooler a named
        // statement may not be where the next message lands.
        // `IF NOT EXISTS` makes the server send "NOTICE: relation ... already exists" on
        // every start after the first, which the postgres crate logs at INFO. Expected, so
        // not sent: LOCAL ends with the transaction and leaves the caller's session as it was.
        transaction.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); \
             SET LOCAL client_min_messages = warning"
        ))?;
        transaction.batch_execute(MIGRATION_0001)?;
        transaction.commit()
    };
    run(client).map_err(|source| MigrateError { source })
}

/// Registers one agent's keys: creates a row per key with empty value and error and
/// `collected_at` at `0001-01-01`, so the first real update always wins. Keys already
/// registered are left as they are. Returns how many rows were created.
///
/// The error says what the server said, with its SQLSTATE ([`RegisterError`]).
///
/// ```no_run
/// use uuid::Uuid;
/// let mut client = postgres::Client::connect("postgres://postgres@127.0.0.1/postgres", postgres::NoTls)?;
/// let created = metadata_batcher::postgres::register_keys(&mut client, Uuid::from_u128(1), &["cpu", "mem"])?;
/// assert!(created <= 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn register_keys(
    client: &mut Client,
    agent_id: Uuid,
    keys: &[&str],
) -> Result<u64, RegisterError> {
    register_keys_for_agents(client, &[agent_id], keys)
}

/// Registers the same keys for many agents in one statement (every agent gets every key),
/// as a fleet of identical agents does; 10,000 agents × 10 keys is one round trip. Returns
/// how many rows were created.
///
/// ```no_run
/// use uuid::Uuid;
/// let mut client = postgres::Client::connect("postgres://postgres@127.0.0.1/postgres", postgres::NoTls)?;
/// let agents: Vec<Uuid> = (0..10_000u128).map(Uuid::from_u128).collect();
/// metadata_batcher::postgres::register_keys_for_agents(&mut client, &agents, &["cpu", "mem"])?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn register_keys_for_agents(
    client: &mut Client,
    agent_ids: &[Uuid],
    keys: &[&str],
) -> Result<u64, RegisterError> {
    register_agents(client, agent_ids, keys).map_err(|source| RegisterError { source })
}

/// [`register_keys`] with the `postgres` crate's own error, whose `Display` says only "db
/// error" for anything the server refused; kept for the callers that match on it.
pub fn register(
    client: &mut Client,
    agent_id: Uuid,
    keys: &[&str],
) -> Result<u64, postgres::Error> {
    register_agents(client, &[agent_id], keys)
}

/// [`register_keys_for_agents`] with the `postgres` crate's own error, whose `Display` says
/// only "db error" for anything the server refused; kept for the callers that match on it.
pub fn register_agents(
    client: &mut Client,
    agent_ids: &[Uuid],
    keys: &[&str],
) -> Result<u64, postgres::Error> {
    // Unnamed (parse, bind and execute in one round trip) so that it works through a
    // transaction-mode pooler, where a prepared statement may be gone by the next message.
    client.execute_typed(
        "INSERT INTO workspace_agent_metadata (workspace_agent_id, key) \
         SELECT agent.id, k.key FROM unnest($1::uuid[]) AS agent(id) \
         CROSS JOIN unnest($2::text[]) AS k(key) \
         ON CONFLICT DO NOTHING",
        &[
            (&agent_ids, postgres::types::Type::UUID_ARRAY),
            (&keys, postgres::types::Type::TEXT_ARRAY),
        ],
    )
}

/// [`register_keys`] or [`register_keys_for_agents`] failed: the server's severity, SQLSTATE
/// and message (with its detail and hint), or what broke the connection.
#[derive(Debug)]
pub struct RegisterError {
    source: postgres::Error,
}

impl RegisterError {
    /// The server's SQLSTATE, when the server refused the statement (e.g. `23502`, a NOT NULL
    /// column with no default: Coder's schema, where `docs/postgres.md` shows the insert).
    pub fn code(&self) -> Option<&postgres::error::SqlState> {
        self.source.code()
    }
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "registering metadata keys in workspace_agent_metadata failed: {}",
            describe(&self.source)
        )
    }
}

impl std::error::Error for RegisterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// [`migrate`] failed; the server's message says why.
#[derive(Debug)]
pub struct MigrateError {
    source: postgres::Error,
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "creating table workspace_agent_metadata failed: {}; check that the server is \
             reachable and that the user may create tables in this database",
            describe(&self.source)
        )
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
