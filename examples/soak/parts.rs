//! The real parts a soak runs on, started by the soak itself and stopped when it ends
//! (also on a panic: each part's `Drop` stops it):
//!
//! - a throwaway primary with a synchronous streaming standby (`tests/pg/replication.rs`);
//! - a TCP proxy in front of each of the two servers (`tests/pg/proxy.rs`), which can
//!   black-hole every connection or add latency: the network faults;
//! - the URL the batchers use: both proxies, in the pair's fixed order, with
//!   `target_session_attrs=read-write`, so it reaches whichever server is the primary.

use metadata_batcher::postgres as pg;

use super::load;
use super::pg::replication::ReplicatedPair;
use super::pg::Proxy;

/// The database the soak's table lives in.
pub const DBNAME: &str = "soak";

/// The running parts; see the module docs.
pub struct Parts {
    pub pair: ReplicatedPair,
    pub proxies: [Proxy; 2],
}

impl Parts {
    /// Starts the pair (room for `sessions` connections besides its own), creates the
    /// table and registers `agents` × `keys` rows, and puts a proxy in front of each node.
    pub fn start(sessions: u32, agents: usize, key_names: &[String]) -> Result<Parts, String> {
        let pair = ReplicatedPair::start(Some(sessions));
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
        let proxies = [
            Proxy::in_front_of(&first.url()),
            Proxy::in_front_of(&second.url()),
        ];
        Ok(Parts { pair, proxies })
    }

    /// Both servers through their proxies, the primary found by `target_session_attrs`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DBNAME}\
             ?target_session_attrs=read-write&sslmode=disable",
            self.proxies[0].port(),
            self.proxies[1].port()
        )
    }
}
