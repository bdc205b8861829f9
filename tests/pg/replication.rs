//! [`ReplicatedPair`]: a throwaway primary with a synchronous streaming standby, that can
//! fail over and rejoin again and again, for the failover tests and the soak.
//!
//! Two [`Cluster`]s: the first initdb'd with WAL for replication, the second made from it
//! with `pg_basebackup -R`. Once the standby streams, the primary's
//! `synchronous_standby_names = '*'` makes every commit wait for the standby, so a row the
//! batcher counted as written is on both servers (`synchronous_commit = on` here, though the
//! harness's default is off).
//!
//! A failover is two steps, as an operator (or Patroni) runs it:
//! - [`ReplicatedPair::promote`]: `pg_ctl promote` on the standby, which then runs with
//!   `synchronous_standby_names = ''` until a standby rejoins: with no standby a synchronous
//!   primary would hold every commit (Patroni's non-strict synchronous mode does the same);
//! - [`ReplicatedPair::rejoin`]: the old primary rebuilt as the new primary's standby
//!   (`pg_basebackup` again, on its old port), and the new primary synchronous again.
//!
//! Each node keeps its port for life, so [`ReplicatedPair::url`] (both hosts, with
//! `target_session_attrs=read-write`) stays valid through every failover: which host is the
//! primary changes, the URL does not. Dropping the pair drops both clusters.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, ClusterOptions};

/// Replication settings on top of the harness's throwaway defaults (`wal_level = minimal`,
/// no WAL senders, asynchronous commits).
const REPLICATION_CONF: [&str; 9] = [
    "wal_level = replica",
    "max_wal_senders = 5",
    "hot_standby = on",
    // The standby's commits and the primary's: a commit returns once the standby has it.
    "synchronous_commit = on",
    // Short enough that a walreceiver cut off by a crash reconnects within a second.
    "wal_retrieve_retry_interval = 200ms",
    "wal_receiver_timeout = 5s",
    "wal_sender_timeout = 5s",
    // Checkpoints at least every 30 s or 256 MB of WAL, so a crash recovery replays that
    // much at most: with the defaults (5 min, 1 GB) the soak's crash restarts replayed WAL
    // for over 30 s.
    "checkpoint_timeout = 30s",
    "max_wal_size = 256MB",
];
/// How long a standby may take to stream after it started.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);

/// A primary and a synchronous standby; see the module docs.
pub struct ReplicatedPair {
    nodes: [Cluster; 2],
    primary: usize,
}

impl ReplicatedPair {
    /// A primary and its synchronous standby, streaming, with up to `max_connections`
    /// sessions each (`None`: the harness's 20).
    pub fn start(max_connections: Option<u32>) -> ReplicatedPair {
        let primary = Cluster::with_options(ClusterOptions {
            conf: REPLICATION_CONF
                .iter()
                .map(|line| line.to_string())
                .collect(),
            hba: Some(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 local replication all trust\nhost replication all 127.0.0.1/32 trust\n"
                    .to_owned(),
            ),
            // Room for the walsender and a base backup's two sessions beside the tests'.
            max_connections: Some(max_connections.unwrap_or(20) + 5),
            files: Vec::new(),
        });
        let standby = Cluster::standby_of(&primary);
        let pair = ReplicatedPair {
            nodes: [primary, standby],
            primary: 0,
        };
        pair.wait_streaming();
        pair.set_synchronous(true);
        pair
    }

    pub fn primary(&self) -> &Cluster {
        &self.nodes[self.primary]
    }

    pub fn primary_mut(&mut self) -> &mut Cluster {
        &mut self.nodes[self.primary]
    }

    /// The other node: the standby, or the old primary between [`promote`](Self::promote)
    /// and [`rejoin`](Self::rejoin).
    pub fn standby(&self) -> &Cluster {
        &self.nodes[1 - self.primary]
    }

    pub fn standby_mut(&mut self) -> &mut Cluster {
        &mut self.nodes[1 - self.primary]
    }

    /// Both nodes, in the URL's order.
    pub fn nodes(&self) -> &[Cluster; 2] {
        &self.nodes
    }

    /// `postgres://postgres@127.0.0.1:P1,127.0.0.1:P2/DBNAME?target_session_attrs=read-write`:
    /// both nodes, always in the same order, so it reaches whichever is the primary.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{dbname}?target_session_attrs=read-write",
            self.nodes[0].port(),
            self.nodes[1].port()
        )
    }

    /// Creates database `name` with the crate's migration on the primary (the standby gets
    /// it by replication) and returns [`url`](Self::url) for it.
    pub fn create_migrated_db(&self, name: &str) -> String {
        self.primary().create_migrated_db(name);
        self.url(name)
    }

    /// Promotes the standby and makes it the primary, running without a synchronous
    /// standby until [`rejoin`](Self::rejoin). The old primary is left as it is (crashed,
    /// frozen, or still running: then it is a second primary nobody should reach, as after
    /// a real split; the URL's read-write check does not tell them apart). Returns how
    /// long the promotion took.
    pub fn promote(&mut self) -> Duration {
        let started = Instant::now();
        let new_primary = 1 - self.primary;
        self.nodes[new_primary].promote();
        self.primary = new_primary;
        let took = started.elapsed();
        self.set_synchronous(false);
        took
    }

    /// Rebuilds the old primary as the new primary's standby and makes replication
    /// synchronous again once it streams.
    pub fn rejoin(&mut self) {
        let (primary, standby) = self.split();
        standby.rebuild_as_standby_of(primary);
        self.wait_streaming();
        self.set_synchronous(true);
    }

    /// A whole failover: the primary stopped with `-m immediate` (a crash), the standby
    /// promoted, the old primary rejoined. Returns the promotion's time.
    pub fn fail_over(&mut self) -> Duration {
        self.primary_mut().stop_immediate();
        let promotion = self.promote();
        self.rejoin();
        promotion
    }

    /// Waits until the primary has a streaming standby.
    pub fn wait_streaming(&self) {
        let mut admin = self.primary().admin();
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        loop {
            let streaming: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .expect("pg_stat_replication")
                .get(0);
            if streaming > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not stream within {STREAMING_TIMEOUT:?}:\n{}",
                self.standby().log()
            );
            // Replication state is the server's own; there is nothing to block on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Commits on the primary wait for the standby (`true`) or not.
    fn set_synchronous(&self, synchronous: bool) {
        let names = if synchronous { "*" } else { "" };
        let mut admin = self.primary().admin();
        // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a batch.
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
            ))
            .expect("set synchronous_standby_names");
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .expect("reload the configuration");
    }

    fn split(&mut self) -> (&Cluster, &mut Cluster) {
        let [first, second] = &mut self.nodes;
        if self.primary == 0 {
            (first, second)
        } else {
            (second, first)
        }
    }
}
