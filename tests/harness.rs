//! Self-tests of the test harness in `tests/pg/`: each real part (throwaway cluster, TLS-only
//! cluster, black-holing proxy, silent server, pgbouncer) does what the fault, TLS and pooler
//! tests rely on, checked with plain `postgres::Client` sessions and the `psql` CLI, and
//! leaves nothing behind.

mod pg;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pg::{background, Cluster, ClusterOptions, PgBouncer, Proxy, SilentServer, TlsCluster};
use postgres::{Client, NoTls};

/// Long enough for a healthy local query, short enough to keep the hang checks quick.
const HANG: Duration = Duration::from_millis(500);
/// How long a call that must return may take.
const PROMPT: Duration = Duration::from_secs(10);

fn connect(url: &str, application_name: &str) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = url.parse().expect("url");
    config
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(2));
    config.connect(NoTls)
}

fn one(client: &mut Client) -> Result<i32, postgres::Error> {
    client.query_one("SELECT 1", &[]).map(|row| row.get(0))
}

/// Runs psql on `conninfo` with `sql`; its trimmed stdout, or its stderr as the error.
fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let output = Command::new("psql")
        .args([conninfo, "-XAtq", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql (install postgresql-client)");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

fn process_alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn cluster_restarts_stops_starts_and_cleans_up() {
    let mut cluster = Cluster::start_new();
    let dir = cluster.dir().to_owned();
    let mut before = connect(&cluster.url(), "before").unwrap();
    assert_eq!(one(&mut before).unwrap(), 1);

    cluster.restart();
    assert!(one(&mut before).is_err(), "a restart ends the sessions");
    assert_eq!(
        one(&mut connect(&cluster.url(), "after").unwrap()).unwrap(),
        1
    );

    cluster.stop_immediate();
    assert!(connect(&cluster.url(), "while down").is_err());
    cluster.start();
    assert_eq!(
        one(&mut connect(&cluster.url(), "again").unwrap()).unwrap(),
        1
    );

    let postmaster = cluster.postmaster_pid();
    drop(cluster);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !process_alive(postmaster),
        "postmaster {postmaster} left running"
    );
}

#[test]
fn cluster_drop_after_a_panic_cleans_up() {
    let (dir, postmaster) = std::panic::catch_unwind(|| {
        let mut cluster = Cluster::start_new();
        cluster.sigstop_postmaster();
        let stopped = (cluster.dir().to_owned(), cluster.postmaster_pid());
        std::panic::panic_any(stopped);
    })
    .unwrap_err()
    .downcast::<(PathBuf, u32)>()
    .map(|boxed| *boxed)
    .unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !process_alive(postmaster),
        "postmaster {postmaster} left running"
    );
}

#[test]
fn sigstop_postmaster_hangs_new_connections_only() {
    let mut cluster = Cluster::start_new();
    let mut running = connect(&cluster.url(), "running").unwrap();
    cluster.sigstop_postmaster();
    assert_eq!(one(&mut running).unwrap(), 1, "existing sessions go on");
    let url = cluster.url();
    let new = background("connect", move || connect(&url, "new").map(|_| ()));
    assert!(new.wait(HANG).is_none(), "a new connection must hang");
    cluster.sigcont_postmaster();
    new.expect_within(PROMPT, "the connection after SIGCONT")
        .unwrap();
}

#[test]
fn sigstop_backend_hangs_its_session_until_sigcont() {
    let mut cluster = Cluster::start_new();
    let mut victim = connect(&cluster.url(), "victim").unwrap();
    let pids = cluster.sigstop_backend("victim");
    assert_eq!(pids.len(), 1);
    let query = background("query", move || one(&mut victim));
    assert!(
        query.wait(HANG).is_none(),
        "the stopped backend must not answer"
    );
    assert_eq!(
        one(&mut connect(&cluster.url(), "other").unwrap()).unwrap(),
        1
    );
    cluster.sigcont_backends();
    assert_eq!(query.expect_within(PROMPT, "the query").unwrap(), 1);
}

#[test]
fn max_connections_can_be_exhausted() {
    let cluster = Cluster::with_options(ClusterOptions {
        max_connections: Some(3),
        ..ClusterOptions::default()
    });
    let held: Vec<Client> = (0..3)
        .map(|i| connect(&cluster.url(), &format!("slot {i}")).unwrap())
        .collect();
    let Err(err) = connect(&cluster.url(), "one too many") else {
        panic!("a fourth session got in");
    };
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{err:?}"
    );
    drop(held);
    // The server frees a slot when the backend has exited, a moment after the client left.
    pg::wait_until("a slot frees", || connect(&cluster.url(), "freed").is_ok());
}

#[test]
fn tls_cluster_encrypts_refuses_plaintext_and_takes_client_certificates() {
    let tls = TlsCluster::start_new();
    let check = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    assert_eq!(psql(&tls.conninfo("verify-full"), check).unwrap(), "t");
    assert_eq!(psql(&tls.conninfo("require"), check).unwrap(), "t");

    let refused = psql(&tls.conninfo("disable"), check).unwrap_err();
    assert!(refused.contains("no encryption"), "{refused}");
    let plaintext = format!("postgres://postgres@127.0.0.1:{}/postgres", tls.port());
    let Err(refused) = connect(&plaintext, "plaintext") else {
        panic!("a plaintext session got in");
    };
    assert!(
        format!("{refused:?}").contains("no encryption"),
        "{refused:?}"
    );

    let cert_user = psql(
        &tls.cert_user_conninfo(),
        "select current_user || ' ' || ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .unwrap();
    assert_eq!(cert_user, format!("{} true", pg::CERT_USER));
    let without_cert = psql(
        &format!(
            "host=localhost port={} user={} dbname=postgres sslmode=verify-full sslrootcert={}",
            tls.port(),
            pg::CERT_USER,
            tls.certs.ca.display()
        ),
        "select 1",
    )
    .unwrap_err();
    assert!(without_cert.contains("certificate"), "{without_cert}");

    let other_ca = psql(
        &format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={}",
            tls.port(),
            tls.certs.other_ca.display()
        ),
        "select 1",
    )
    .unwrap_err();
    assert!(other_ca.contains("certificate verify failed"), "{other_ca}");

    let wrong_name = psql(
        &format!(
            "host=wrong.example hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
             sslmode=verify-full sslrootcert={}",
            tls.port(),
            tls.certs.ca.display()
        ),
        "select 1",
    )
    .unwrap_err();
    assert!(
        wrong_name.contains("does not match host name"),
        "{wrong_name}"
    );

    let (cluster_dir, certs_dir) = (tls.cluster.dir().to_owned(), tls.certs.dir().to_owned());
    drop(tls);
    assert!(!cluster_dir.exists() && !certs_dir.exists());
}

#[test]
fn proxy_black_holes_one_connection_then_heals() {
    let cluster = Cluster::start_new();
    let proxy = Proxy::in_front_of(&cluster.url());
    let url = proxy.url(&cluster.url());
    let mut victim = connect(&url, "victim").unwrap();
    let mut bystander = connect(&url, "bystander").unwrap();
    let id = proxy.wait_for_connection("victim");

    proxy.black_hole(id);
    let query = background("query", move || one(&mut victim).map(|n| (n, victim)));
    assert!(query.wait(HANG).is_none(), "a black-holed query must hang");
    assert!(proxy
        .connections()
        .iter()
        .any(|c| c.id == id && c.black_holed && c.open));
    assert_eq!(one(&mut bystander).unwrap(), 1, "other connections go on");
    assert_eq!(
        one(&mut connect(&url, "new").unwrap()).unwrap(),
        1,
        "new ones too"
    );

    proxy.heal(id);
    let (n, mut victim) = query.expect_within(PROMPT, "the healed query").unwrap();
    assert_eq!(n, 1);
    assert_eq!(one(&mut victim).unwrap(), 1);

    drop(proxy);
    assert!(
        one(&mut bystander).is_err(),
        "dropping the proxy closes its connections"
    );
}

/// A regression test: the proxy kept a clone of both sockets of every connection it ever
/// carried, so the soak's long-lived proxies held thousands of descriptors after an hour
/// of reconnects.
#[test]
fn proxy_holds_no_socket_of_a_closed_connection() {
    let cluster = Cluster::start_new();
    let proxy = Proxy::in_front_of(&cluster.url());
    let url = proxy.url(&cluster.url());
    let mut clients: Vec<Client> = (0..5)
        .map(|i| connect(&url, &format!("closed {i}")).unwrap())
        .collect();
    for client in &mut clients {
        assert_eq!(one(client).unwrap(), 1);
    }
    let accepted = proxy.accepted_socket_inodes();
    assert_eq!(accepted.len(), 5);
    drop(clients);
    // The proxy's threads notice the closes within their poll; nothing else to wait on.
    let held = || {
        let fds = pg::proxy::socket_fds();
        accepted.iter().filter(|inode| fds.contains(*inode)).count()
    };
    let deadline = Instant::now() + PROMPT;
    while held() > 0 {
        assert!(
            Instant::now() < deadline,
            "the proxy still holds {} sockets of closed connections",
            held()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn proxy_black_holes_everything_then_heals() {
    let cluster = Cluster::start_new();
    let proxy = Proxy::in_front_of(&cluster.url());
    let url = proxy.url(&cluster.url());
    let mut existing = connect(&url, "existing").unwrap();

    proxy.black_hole_all();
    let query = background("query", move || one(&mut existing));
    let new_url = url.clone();
    let new = background("connect", move || {
        connect(&new_url, "new").and_then(|mut client| one(&mut client))
    });
    assert!(
        query.wait(HANG).is_none(),
        "an existing connection must hang"
    );
    assert!(
        new.wait(Duration::ZERO).is_none(),
        "a new connection must hang"
    );

    proxy.heal_all();
    assert_eq!(query.expect_within(PROMPT, "the healed query").unwrap(), 1);
    assert_eq!(new.expect_within(PROMPT, "the healed connect").unwrap(), 1);
}

#[test]
fn silent_server_accepts_and_never_answers() {
    let silent = SilentServer::start();
    let started = Instant::now();
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres connect_timeout=1",
        silent.addr().port()
    );
    let refused = psql(&conninfo, "select 1").unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "psql waited {elapsed:?}: {refused}"
    );
    assert!(refused.contains("timeout"), "{refused}");
    assert!(silent.accepted() >= 1);

    let url = silent.url();
    let rust = background("connect", move || connect(&url, "silent").map(|_| ()));
    assert!(
        rust.wait(HANG).is_none(),
        "nothing answers a startup packet"
    );
}

#[test]
fn pgbouncer_pools_in_transaction_mode() {
    let bouncer = PgBouncer::start(&pg::server_url());
    let mut clients: Vec<Client> = (0..4)
        .map(|i| bouncer.client("postgres", &format!("pooled {i}")))
        .collect();
    for client in &mut clients {
        assert_eq!(one(client).unwrap(), 1);
    }
    let mut admin = bouncer.client("pgbouncer", "mb-test admin");
    let config = admin.simple_query("SHOW CONFIG").unwrap();
    let pool_mode = config.iter().find_map(|message| match message {
        postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("pool_mode") => {
            row.get(1).map(str::to_owned)
        }
        _ => None,
    });
    assert_eq!(pool_mode.as_deref(), Some("transaction"));
    drop(admin);
    drop(clients);

    let dir = bouncer.dir().to_owned();
    drop(bouncer);
    assert!(!dir.exists(), "{} left behind", dir.display());
}
