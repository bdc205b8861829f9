//! The PgBouncer configuration that the examples' pooler (`pgbouncer.rs` beside this file)
//! and the tests' (`tests/pg/pgbouncer.rs`) both run: one text, so the two cannot drift
//! apart. Transaction mode on 127.0.0.1 only (no Unix socket); the pool kept full and handed
//! out round robin, so that consecutive transactions of one client land on different server
//! connections, as on a busy production pool; clients trusted (the server behind it
//! authenticates PgBouncer as the configuration says).

use std::path::Path;

/// `pgbouncer.ini` for a pooler listening on 127.0.0.1:`listen_port` in front of
/// `host:port`, logging in as `user` (`password` is `" password=..."` or empty), with
/// `pool_size` server connections per database, its files in `dir`.
pub fn pgbouncer_ini(
    (host, port): (&str, u16),
    user: &str,
    password: &str,
    listen_port: u16,
    pool_size: u32,
    dir: &Path,
) -> String {
    format!(
        "[databases]\n\
         * = host={host} port={port} user={user}{password}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {listen_port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/userlist.txt\n\
         admin_users = {user}\n\
         pool_mode = transaction\n\
         default_pool_size = {pool_size}\n\
         min_pool_size = {pool_size}\n\
         server_round_robin = 1\n\
         max_client_conn = 200\n\
         server_reset_query =\n\
         ignore_startup_parameters = extra_float_digits,options\n\
         logfile = {dir}/pgbouncer.log\n\
         pidfile = {dir}/pgbouncer.pid\n",
        dir = dir.display()
    )
}
