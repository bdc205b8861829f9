//! The real parts a soak runs on, started by the soak itself and stopped when it ends
//! (also on a panic: each part's `Drop` stops it):
//!
//! - a throwaway primary with a synchronous streaming standby (`tests/pg/replication.rs`);
//! - with `--pooler`, a pgbouncer in transaction mode in front of each server
//!   (`tests/pg/pgbouncer.rs`, [`POOL_SIZE`] server connections, [`POOLER_SETTINGS`]);
//! - a TCP proxy in front of each server and each pooler, in a process of their own
//!   ([`Proxies`]), which can black-hole every connection or add latency: the network
//!   faults, between the fleet and what it connects to;
//! - two URLs, each listing both servers' paths in the pair's fixed order with
//!   `target_session_attrs=read-write`, so they reach whichever server is the primary: the
//!   fleet's (through the poolers when there are any) and the subscribers' (a `LISTEN`
//!   needs a session of its own, so never through a transaction pooler).
//!
//! The path: fleet → proxy → pgbouncer → server; subscribers → proxy → server.

use std::net::SocketAddr;

use metadata_batcher::postgres as pg;

use super::load;
use super::pg::replication::ReplicatedPair;
use super::pg::PgBouncer;
use super::proxies::Proxies;

/// The database the soak's table lives in.
pub const DBNAME: &str = "soak";
/// Each pooler's server connections: fewer than the fleet's sessions (each replica's
/// store runs up to 2 statements at once, and its publisher 1), as a pooler is for.
pub const POOL_SIZE: u32 = 4;
/// Over the shared test settings (`examples/support/pgbouncer_ini.rs`): a server that was
/// down is tried again after 1 s (the default, 15 s, would hold every client of a pooler
/// whose server restarted for 15 s), and a server connection attempt gives up after 2 s
/// (as the fleet's own `connect_timeout`).
pub const POOLER_SETTINGS: &str = "server_login_retry = 1\nserver_connect_timeout = 2\n";

/// The running parts; see the module docs.
pub struct Parts {
    pub pair: ReplicatedPair,
    /// One in front of each of `pair.nodes()`, when the soak runs with a pooler.
    pub poolers: Option<[PgBouncer; 2]>,
    /// In front of `pair.nodes()` (0, 1), then of the poolers (2, 3).
    pub proxies: Proxies,
}

impl Parts {
    /// Starts the pair (room for `sessions` connections besides its own), creates the
    /// table and registers `agents` × `keys` rows, and starts the poolers (with `pooler`)
    /// and the proxies.
    pub fn start(
        sessions: u32,
        agents: usize,
        key_names: &[String],
        pooler: bool,
    ) -> Result<Parts, String> {
        let pair = ReplicatedPair::start(Some(sessions + 2 * POOL_SIZE));
        pair.create_migrated_db(DBNAME);
        let mut client = pair.primary().socket_client(DBNAME, "soak set-up");
        let ids: Vec<_> = (0..agents).map(load::agent).collect();
        let keys: Vec<&str> = key_names.iter().map(String::as_str).collect();
        pg::register_keys_for_agents(&mut client, &ids, &keys)
            .map_err(|err| format!("registering the rows: {err}"))?;
        client
            .batch_execute("VACUUM ANALYZE workspace_agent_metadata")
            .map_err(|err| format!("VACUUM ANALYZE: {err}"))?;
        let [first, second] = pair.nodes();
        let poolers = pooler.then(|| {
            [first, second]
                .map(|node| PgBouncer::with_settings(&node.url(), POOL_SIZE, POOLER_SETTINGS))
        });
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut targets = vec![local(first.port()), local(second.port())];
        if let Some(poolers) = &poolers {
            targets.extend(poolers.iter().map(|pooler| local(pooler.port())));
        }
        let proxies = Proxies::start(&targets)?;
        Ok(Parts {
            pair,
            poolers,
            proxies,
        })
    }

    /// The fleet's stores' and publishers' URL: through the poolers when there are any.
    pub fn url(&self) -> String {
        match self.poolers {
            Some(_) => self.url_via(2),
            None => self.url_via(0),
        }
    }

    /// The subscribers' (and the verification's) URL: straight to the servers.
    pub fn direct_url(&self) -> String {
        self.url_via(0)
    }

    /// Both paths through the proxies `first` and `first + 1`.
    fn url_via(&self, first: usize) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DBNAME}\
             ?target_session_attrs=read-write&sslmode=disable",
            self.proxies.port(first),
            self.proxies.port(first + 1)
        )
    }

    /// Restarts the pooler in front of the current primary.
    pub fn restart_pooler(&mut self) -> Result<(), String> {
        let primary = self.pair.primary().port();
        let index = self
            .pair
            .nodes()
            .iter()
            .position(|node| node.port() == primary)
            .ok_or("the primary is not one of the pair's nodes")?;
        let poolers = self
            .poolers
            .as_mut()
            .ok_or("a pooler restart without a pooler (run with --pooler)")?;
        poolers[index].restart()
    }
}
