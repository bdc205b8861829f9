//! [`PgOptions`]: the settings every connection of this module is opened and bounded with.
//!
//! Every wait on the network has a setting here with a documented default, and each says
//! exactly what it bounds: `connect_timeout` the whole connection attempt (TCP, TLS,
//! authentication, session settings, preparing the statement), `statement_timeout` plus
//! `deadline_margin` each statement, `tcp_user_timeout` and the keepalives what the kernel
//! tolerates from a silent peer.

use std::time::Duration;

/// Connection settings shared by [`PgStore`](super::PgStore),
/// [`PgPublisher`](super::PgPublisher) and [`PgSubscriber`](super::PgSubscriber).
///
/// Made with [`PgOptions::new`] (the defaults) and a setter per field, each named after
/// the field it sets; the fields stay public to read. `#[non_exhaustive]`: a new setting
/// is added with its own default, without breaking code that sets the others.
///
/// ```
/// use std::time::Duration;
/// use metadata_batcher::postgres::{PgOptions, StatementMode};
///
/// let options = PgOptions::new()
///     .statement_timeout(Duration::from_secs(2))
///     .application_name("coderd metadata store")
///     .statement_mode(StatementMode::Unnamed); // behind PgBouncer in transaction mode
/// assert_eq!(options.statement_timeout, Duration::from_secs(2));
/// assert_eq!(options.connect_timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgOptions {
    /// The server-side `statement_timeout` of every statement: a statement still running
    /// after it is canceled by the server and fails with
    /// [`StoreErrorKind::Canceled`](crate::StoreErrorKind::Canceled). `Duration::ZERO` disables it
    /// (and with it the client-side deadline below). Default 10 s.
    pub statement_timeout: Duration,
    /// How long one connection attempt may take in all: TCP connect, TLS handshake,
    /// authentication, the session settings and preparing the statement. Past it the
    /// attempt is abandoned and fails as unavailable, whether the server refused, never
    /// answered, or answered too slowly. With several hosts (`host=a,b` or
    /// `postgres://a:5432,b:5432/...`) each host tried gets its own `connect_timeout`, in
    /// order, as in libpq: a host that accepts and never answers (a frozen primary) costs
    /// this long before the next is tried, and the whole attempt at most this long per
    /// host. Default 5 s.
    pub connect_timeout: Duration,
    /// The session's `application_name`, shown in `pg_stat_activity`, so an operator (or a
    /// test) can tell the batcher's connections apart. `None` keeps the URL's, or else uses
    /// `metadata-batcher store`, `... publisher` or `... subscriber`.
    pub application_name: Option<String>,
    /// The server-side `lock_timeout`: a statement waiting this long for a row or table lock
    /// held by another session fails (SQLSTATE 55P03) and the batcher splits the batch, so
    /// one locked row cannot hold back every other row. Keep it well below
    /// `statement_timeout`. `Duration::ZERO` disables it. Default 2 s.
    pub lock_timeout: Duration,
    /// The client-side deadline of a statement is `statement_timeout` plus this margin. A
    /// statement with no answer by then (a silent server, a network that drops packets
    /// without closing the connection, a stopped backend) is given up: a cancel request is
    /// sent, the session is dropped and the call fails as unavailable; the next call opens
    /// a new session. Default 2 s.
    pub deadline_margin: Duration,
    /// `TCP_USER_TIMEOUT`: how long data sent may stay unacknowledged before the kernel
    /// closes the connection (Linux; ignored elsewhere and on Unix sockets). Default 15 s.
    pub tcp_user_timeout: Duration,
    /// Idle time before TCP keepalives start probing a connection (then every 5 s, 3 probes):
    /// a subscriber waits silently for hours, and without keepalives a vanished server would
    /// never be noticed. Default 30 s.
    pub keepalives_idle: Duration,
    /// How statements are sent. Default [`StatementMode::Prepared`]; a session that finds its
    /// prepared statement gone (a transaction-mode pooler) switches to
    /// [`StatementMode::Unnamed`] by itself.
    pub statement_mode: StatementMode,
    /// The store session's `synchronous_commit`. `false` (`off`) lets a flush return before
    /// its WAL reaches disk: faster commits, and a crash of the server can lose the last few
    /// hundred milliseconds of flushes (agents re-report them within one interval). The
    /// table stays consistent either way. Default `true`.
    pub synchronous_commit: bool,
    /// The table [`PgStore`](super::PgStore) updates, optionally schema-qualified
    /// (`"coder.workspace_agent_metadata"`); each part is quoted as an identifier. Default
    /// `workspace_agent_metadata`.
    pub table: String,
    /// How long [`PgSubscriber`](super::PgSubscriber) may hear nothing before it checks its
    /// session with an empty query, which must be answered within `connect_timeout`. A
    /// session that goes silent (a proxy or pooler that holds the connection, a stopped
    /// backend, a network that drops packets) delivers no notifications and no error, and
    /// keepalives do not notice a peer whose kernel still answers them; without the check a
    /// watcher would miss every change without knowing. The wait for the answer counts only
    /// calls of `next` with at least 100 ms left (a zero-timeout poll does not check).
    /// `Duration::ZERO` disables it. Default 10 s.
    pub subscriber_heartbeat: Duration,
    /// The most rows one statement of [`PgStore`](super::PgStore) carries. A flush that
    /// carries more than the batcher's `batch_size` goes out in statements sized so that
    /// the network's round trip is at most a tenth of each (see
    /// [`Capabilities::with_max_batch_rows`](crate::Capabilities::with_max_batch_rows)), up to this bound: at most
    /// a few hundred milliseconds of row locks at a few microseconds a row. Below the
    /// batcher's `batch_size` it has no effect. Default 20,000.
    pub max_statement_rows: usize,
    /// How many statements [`PgStore`](super::PgStore) runs at once, each on a session of
    /// its own, when a flush carries more than one statement's rows (a backlog): a round trip
    /// then overlaps the other statements' work, and the server's cores share the rows. The
    /// statements of one flush hold distinct rows, each in the one lock order, so they never
    /// wait for each other. Costs that many server connections per store (through a
    /// transaction-mode pooler, that many of its server connections while a backlog lasts);
    /// the sessions past the first are opened when a backlog first needs them. A flush that
    /// fits one statement uses one session. See
    /// [`Capabilities::with_parallel_batches`](crate::Capabilities::with_parallel_batches). 0 is refused. Default 2.
    pub parallel_statements: usize,
}

/// How a session sends its statement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatementMode {
    /// Prepared once per session as a named statement; each call binds and executes. The
    /// fastest, and what a direct connection or a session-mode pooler should use.
    #[default]
    Prepared,
    /// Sent unnamed with every call (parse, bind and execute in one round trip), with the
    /// session settings (`statement_timeout`, `lock_timeout`, `synchronous_commit`) applied
    /// per transaction with `SET LOCAL`. For transaction-mode poolers (PgBouncer before 1.21
    /// has no prepared statements there, and a session setting would land on whichever
    /// server connection happened to serve it).
    Unnamed,
}

/// The statement timeout [`PgOptions::default`] uses.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connect timeout [`PgOptions::default`] uses: long enough for a loaded server and a
/// TLS handshake, short enough that an unreachable address does not hold a flush for long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock timeout [`PgOptions::default`] uses: a fifth of the statement timeout, so a flush
/// blocked by a lock gives up early enough to split and write the other rows.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// The margin [`PgOptions::default`] adds to `statement_timeout` for the client-side deadline:
/// room for the server's own timeout to arrive first over a slow network.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// The `TCP_USER_TIMEOUT` [`PgOptions::default`] uses.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// The subscriber heartbeat [`PgOptions::default`] uses: a silent `LISTEN` session is found
/// within this plus `connect_timeout` (15 s by default), for one empty query per 10 s of quiet.
pub const DEFAULT_SUBSCRIBER_HEARTBEAT: Duration = Duration::from_secs(10);

/// The bound on one statement's rows [`PgOptions::default`] uses.
pub const DEFAULT_MAX_STATEMENT_ROWS: usize = 20_000;

/// The statements [`PgStore`](super::PgStore) runs at once by [`PgOptions::default`].
pub const DEFAULT_PARALLEL_STATEMENTS: usize = 2;

/// The keepalive idle time [`PgOptions::default`] uses.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

/// The table [`PgOptions::default`] names, as Coder's schema and [`migrate`](super::migrate)
/// call it.
pub const DEFAULT_TABLE: &str = "workspace_agent_metadata";

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: None,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
            tcp_user_timeout: DEFAULT_TCP_USER_TIMEOUT,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            statement_mode: StatementMode::default(),
            synchronous_commit: true,
            table: DEFAULT_TABLE.to_owned(),
            subscriber_heartbeat: DEFAULT_SUBSCRIBER_HEARTBEAT,
            max_statement_rows: DEFAULT_MAX_STATEMENT_ROWS,
            parallel_statements: DEFAULT_PARALLEL_STATEMENTS,
        }
    }
}

impl PgOptions {
    /// The defaults, as [`PgOptions::default`]; set what differs with the setters below.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the session's `application_name`; see
    /// [`application_name`](#structfield.application_name).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Sets the table the store updates; see [`table`](#structfield.table).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Sets the server-side `statement_timeout`; see [`statement_timeout`](#structfield.statement_timeout).
    pub fn statement_timeout(mut self, statement_timeout: Duration) -> Self {
        self.statement_timeout = statement_timeout;
        self
    }

    /// Sets how long one connection attempt may take in all; see [`connect_timeout`](#structfield.connect_timeout).
    pub fn connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets the server-side `lock_timeout`; see [`lock_timeout`](#structfield.lock_timeout).
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// Sets the margin added to `statement_timeout` for the client-side deadline; see [`deadline_margin`](#structfield.deadline_margin).
    pub fn deadline_margin(mut self, deadline_margin: Duration) -> Self {
        self.deadline_margin = deadline_margin;
        self
    }

    /// Sets `TCP_USER_TIMEOUT`; see [`tcp_user_timeout`](#structfield.tcp_user_timeout).
    pub fn tcp_user_timeout(mut self, tcp_user_timeout: Duration) -> Self {
        self.tcp_user_timeout = tcp_user_timeout;
        self
    }

    /// Sets the idle time before TCP keepalives start probing; see [`keepalives_idle`](#structfield.keepalives_idle).
    pub fn keepalives_idle(mut self, keepalives_idle: Duration) -> Self {
        self.keepalives_idle = keepalives_idle;
        self
    }

    /// Sets how statements are sent; see [`statement_mode`](#structfield.statement_mode).
    pub fn statement_mode(mut self, statement_mode: StatementMode) -> Self {
        self.statement_mode = statement_mode;
        self
    }

    /// Sets the store session's `synchronous_commit`; see [`synchronous_commit`](#structfield.synchronous_commit).
    pub fn synchronous_commit(mut self, synchronous_commit: bool) -> Self {
        self.synchronous_commit = synchronous_commit;
        self
    }

    /// Sets how long a subscriber may hear nothing before it checks its session; see [`subscriber_heartbeat`](#structfield.subscriber_heartbeat).
    pub fn subscriber_heartbeat(mut self, subscriber_heartbeat: Duration) -> Self {
        self.subscriber_heartbeat = subscriber_heartbeat;
        self
    }

    /// Sets the most rows one statement carries; see [`max_statement_rows`](#structfield.max_statement_rows).
    pub fn max_statement_rows(mut self, max_statement_rows: usize) -> Self {
        self.max_statement_rows = max_statement_rows;
        self
    }

    /// Sets how many statements a store runs at once; see [`parallel_statements`](#structfield.parallel_statements).
    pub fn parallel_statements(mut self, parallel_statements: usize) -> Self {
        self.parallel_statements = parallel_statements;
        self
    }
}

impl PgOptions {
    /// The client-side deadline of one statement; `None` when `statement_timeout` is off.
    pub(crate) fn statement_deadline(&self) -> Option<Duration> {
        (!self.statement_timeout.is_zero()).then(|| self.statement_timeout + self.deadline_margin)
    }

    /// The session settings, as `SET` (or, per transaction, `SET LOCAL`) statements.
    pub(crate) fn session_settings(&self, scope: &str, store: bool) -> String {
        // Rounded up so that a sub-millisecond timeout does not become 0, which disables it.
        let millis = |d: Duration| d.as_micros().div_ceil(1000);
        let mut sql = format!(
            "SET {scope} statement_timeout = {}; SET {scope} lock_timeout = {}",
            millis(self.statement_timeout),
            millis(self.lock_timeout)
        );
        if store {
            // The update joins the batch to the table by its primary key, and must take its
            // row locks in the order the rows are sent (sorted by agent and key, the order
            // every replica shares, so that no two statements deadlock): only a nested loop
            // over the batch, with an index lookup per row, does. A hash or merge join
            // locks in the table's own order, which moves as rows are rewritten; and
            // planned with the batch's real size (every unnamed statement, and a prepared
            // one's first five executions) PostgreSQL prefers hashing the whole table, which
            // also took twice as long at 20,000 rows and grows with the table. Even the
            // generic plan hashes a small table. So both joins are off for the store's
            // session (or transaction), and the prepared statement keeps its generic plan.
            sql.push_str(&format!(
                "; SET {scope} enable_hashjoin = off; SET {scope} enable_mergejoin = off"
            ));
            if scope != "LOCAL" {
                sql.push_str("; SET plan_cache_mode = force_generic_plan");
            }
            if !self.synchronous_commit {
                sql.push_str(&format!("; SET {scope} synchronous_commit = off"));
            }
        }
        sql
    }
}
