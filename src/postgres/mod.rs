//! PostgreSQL: the blocking store, the NOTIFY publisher, the LISTEN subscriber and the schema.
//!
//! A replica of a service opens three connections (the store one more per statement it runs
//! at once while a backlog lasts: [`PgOptions::parallel_statements`]):
//!
//! - [`PgStore`] writes each flush with one prepared `UPDATE ... FROM unnest(...)` into
//!   `workspace_agent_metadata`, the table [`migrate`] creates and [`register_keys`] fills;
//! - [`PgPublisher`] announces the flushed agents with `pg_notify`;
//! - [`PgSubscriber`] `LISTEN`s and hands out the agent IDs every replica announces.
//!
//! The store and the publisher keep separate connections so that a NOTIFY is never queued
//! behind a slow batch update, and a cancel request sent to the store cannot hit a publish.
//! All three connect with TLS as libpq's `sslmode` says (feature `tls`, on by default) or
//! your own connector, and bound every call on the client side. The subscriber uses the
//! blocking `postgres` client; the store and the publisher drive `tokio-postgres` sessions
//! on the calling thread with a private runtime (`deadline.rs` says why); no runtime is
//! required of callers or exposed.
//! See `docs/postgres.md` for TLS, poolers, the schema, the statement, and the operational
//! advice, and `docs/design.md` for the deadlines.
//!
//! ```no_run
//! use metadata_batcher::postgres::{self, PgPublisher, PgStore, PgSubscriber, SubscriberEvent};
//! use metadata_batcher::METADATA_BATCH_CHANNEL;
//! use std::time::Duration;
//!
//! let url = "postgres://postgres@127.0.0.1:5432/postgres";
//! let mut client = ::postgres::Client::connect(url, ::postgres::NoTls)?;
//! postgres::migrate(&mut client)?;
//! postgres::register_keys(&mut client, uuid::Uuid::from_u128(1), &["cpu", "mem"])?;
//!
//! let store = PgStore::connect(url)?;
//! let publisher = PgPublisher::connect(url)?;
//! let mut subscriber = PgSubscriber::listen(url, METADATA_BATCH_CHANNEL)?;
//! // ... hand store and publisher to a Batcher ...
//! match subscriber.next(Duration::from_secs(1))? {
//!     Some(SubscriberEvent::Agents(agents)) => println!("changed: {agents:?}"),
//!     Some(SubscriberEvent::Reconnected) => println!("may have missed some; re-read the table"),
//!     None => println!("nothing within a second"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
mod connector;
mod conninfo;
mod deadline;
mod error;
mod listen;
mod options;
mod publisher;
mod schema;
mod session;
mod statement_params;
mod store;
mod subscriber;
#[cfg(feature = "tls")]
mod tls;
mod tls_setup;

pub use client::connect_client;
pub(crate) use deadline::NoAnswer;
pub use error::{ConnectError, ConnectErrorKind};
pub use options::{
    PgOptions, StatementMode, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DEADLINE_MARGIN,
    DEFAULT_KEEPALIVES_IDLE, DEFAULT_LOCK_TIMEOUT, DEFAULT_MAX_STATEMENT_ROWS,
    DEFAULT_PARALLEL_STATEMENTS, DEFAULT_STATEMENT_TIMEOUT, DEFAULT_SUBSCRIBER_HEARTBEAT,
    DEFAULT_TABLE, DEFAULT_TCP_USER_TIMEOUT,
};
pub use publisher::{PgPublisher, MAX_NOTIFY_PAYLOAD};
pub use schema::{
    migrate, register, register_agents, register_keys, register_keys_for_agents, MigrateError,
    RegisterError, MIGRATION_0001,
};
pub use store::{PgStore, BATCH_UPDATE_SQL};
pub use subscriber::{PgSubscriber, SubscribeError, SubscriberEvent};
pub use tls_setup::TlsConnector;
