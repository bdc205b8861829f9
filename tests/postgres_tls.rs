//! TLS with libpq's `sslmode` semantics against a TLS-only PostgreSQL of the test's own: a
//! throwaway cluster (`tests/pg/certs.rs`) with certificates generated for the test and a
//! pg_hba.conf of `hostssl` lines only, so nothing here depends on how the machine's
//! cluster is configured.
//!
//! `sslmode=prefer`'s fallback to plaintext after a failed TLS attempt runs against two
//! servers of that kind: a fake front end whose TLS handshakes fail (`tests/pg/broken_tls.rs`),
//! forwarding plaintext to the machine's server (which never sees a TLS attempt); and a
//! throwaway cluster that takes TLS but whose pg_hba.conf refuses TLS sessions.

mod pg;

use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::postgres::{
    self as mbpg, ConnectErrorKind, PgOptions, PgPublisher, PgStore, PgSubscriber, SubscriberEvent,
};
use metadata_batcher::{Batcher, Metadata, Written, METADATA_BATCH_CHANNEL};
use pg::certs::{Certs, TlsCluster, CERT_USER};
use pg::{Breakage, BrokenTls};
use uuid::Uuid;

fn named(application_name: &str) -> PgOptions {
    PgOptions::new().application_name(application_name)
}

/// `url` (a URL, as `TlsCluster::url` gives) pointing at database `dbname`.
fn in_db(url: &str, dbname: &str) -> String {
    url.replacen("/postgres?", &format!("/{dbname}?"), 1)
}

/// What the TLS cluster says of the sessions named `application_name`: their `ssl` flags.
fn ssl_of(cluster: &TlsCluster, application_name: &str) -> Vec<bool> {
    ssl_flags(&mut cluster.cluster.admin(), application_name)
}

/// What the server `admin` is connected to says of the sessions named `application_name`:
/// their `ssl` flags.
fn ssl_flags(admin: &mut postgres::Client, application_name: &str) -> Vec<bool> {
    admin
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&application_name],
        )
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A store, publisher and subscriber on one connection string, named `"{prefix} store"`,
/// `"{prefix} publisher"` and `"{prefix} subscriber"`.
struct Sessions {
    store: PgStore,
    publisher: PgPublisher,
    subscriber: PgSubscriber,
}

impl Sessions {
    fn open(url: &str, prefix: &str) -> Sessions {
        let options = |role: &str| named(&format!("{prefix} {role}"));
        Sessions {
            store: PgStore::open(url, options("store"))
                .unwrap_or_else(|err| panic!("{prefix} store: {err}")),
            publisher: PgPublisher::open(url, options("publisher"))
                .unwrap_or_else(|err| panic!("{prefix} publisher: {err}")),
            subscriber: PgSubscriber::open(url, METADATA_BATCH_CHANNEL, options("subscriber"))
                .unwrap_or_else(|err| panic!("{prefix} subscriber: {err}")),
        }
    }

    /// Writes `value` as `agent`'s `cpu` through a batcher on the store and publisher, and
    /// checks that the subscriber is told and `client` reads it back: the sessions work.
    fn round_trip(self, client: &mut postgres::Client, agent: Uuid, value: &str) {
        let Sessions {
            store,
            publisher,
            mut subscriber,
        } = self;
        let batcher = Batcher::builder(store, publisher).build().unwrap();
        batcher
            .add(
                agent,
                vec![Metadata::new("cpu", value, "", SystemTime::now())],
            )
            .unwrap();
        assert_eq!(batcher.flush().expect("a flush").updated, 1);
        assert_eq!(
            subscriber.next(Duration::from_secs(5)).unwrap(),
            Some(SubscriberEvent::Agents(vec![agent]))
        );
        batcher.close();
        assert_eq!(pg::row(client, agent, "cpu").unwrap().0, value);
    }
}

#[test]
fn every_session_is_encrypted_and_verified() {
    let tls = TlsCluster::start_new();
    let db = in_db(&tls.url("verify-full"), "tls_round_trip");
    tls.cluster.create_migrated_db("tls_round_trip");
    let agent = Uuid::from_u128(0x7150);
    let mut client = mbpg::connect_client(&db, &named("tls admin")).expect("admin over TLS");
    mbpg::register(&mut client, agent, &["cpu"]).unwrap();

    let sessions = Sessions::open(&db, "tls");
    for role in ["tls store", "tls publisher", "tls subscriber", "tls admin"] {
        assert_eq!(ssl_of(&tls, role), vec![true], "{role}");
    }
    sessions.round_trip(&mut client, agent, "encrypted");
}

#[test]
fn prefer_and_require_encrypt_and_disable_is_refused() {
    let tls = TlsCluster::start_new();
    // No sslmode is libpq's `prefer`; neither it nor `require` checks the certificate.
    let base = format!("postgres://postgres@localhost:{}/postgres", tls.port());
    for (url, name) in [
        (base.clone(), "tls default"),
        (format!("{base}?sslmode=prefer"), "tls prefer"),
        (format!("{base}?sslmode=require"), "tls require"),
        (format!("{base}?sslmode=allow"), "tls allow"),
    ] {
        let _client = mbpg::connect_client(&url, &named(name)).expect(name);
        assert_eq!(ssl_of(&tls, name), vec![true], "{name}");
    }
    let Err(err) = mbpg::connect_client(&format!("{base}?sslmode=disable"), &named("tls plain"))
    else {
        panic!("the server takes TLS only");
    };
    assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");
    assert!(err.to_string().contains("no encryption"), "{err}");
}

#[test]
fn verify_full_refuses_a_name_the_certificate_does_not_name() {
    let tls = TlsCluster::with_certs(Certs::for_server_names(&["db.example.internal"]));
    let err = PgStore::open(&tls.url("verify-full"), PgOptions::default())
        .expect_err("the certificate names db.example.internal, not localhost");
    assert_eq!(err.kind(), ConnectErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    assert!(err.to_string().contains("localhost"), "{err}");
    // verify-ca checks the chain only: the same server passes.
    let _client = mbpg::connect_client(&tls.url("verify-ca"), &named("tls verify-ca"))
        .expect("verify-ca does not check the name");
    assert_eq!(ssl_of(&tls, "tls verify-ca"), vec![true]);
}

#[test]
fn verify_ca_refuses_a_certificate_from_another_ca() {
    let tls = TlsCluster::start_new();
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslrootcert={}",
        tls.port(),
        tls.certs.other_ca.display()
    );
    for mode in ["verify-ca", "verify-full", "require"] {
        // `require` with a root certificate behaves as verify-ca (libpq's rule).
        let err = PgPublisher::open(&format!("{url} sslmode={mode}"), PgOptions::default())
            .expect_err("signed by a CA we do not trust");
        assert_eq!(err.kind(), ConnectErrorKind::Tls, "{mode}: {err}");
        assert!(err.to_string().contains("UnknownIssuer"), "{mode}: {err}");
    }
    let err = PgSubscriber::open(
        &format!("{url} sslmode=verify-full"),
        METADATA_BATCH_CHANNEL,
        PgOptions::default(),
    )
    .expect_err("the subscriber too");
    assert_eq!(err.kind(), ConnectErrorKind::Tls, "{err}");
}

#[test]
fn a_client_certificate_logs_in() {
    let tls = TlsCluster::start_new();
    tls.cluster.create_migrated_db("tls_cert");
    tls.cluster
        .socket_client("tls_cert", "mb-test grant")
        .batch_execute(&format!(
            "GRANT SELECT, UPDATE ON workspace_agent_metadata TO {CERT_USER}"
        ))
        .unwrap();
    let conninfo = format!("{} dbname=tls_cert", tls.cert_user_conninfo());
    let mut client = mbpg::connect_client(&conninfo, &named("tls cert")).expect("cert login");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, CERT_USER);
    let mut store = PgStore::open(&conninfo, named("tls cert store")).expect("store, cert auth");
    let mut batch = metadata_batcher::MetadataBatch::default();
    batch.push(
        Uuid::from_u128(1),
        Metadata::new("cpu", "x", "", SystemTime::now()),
    );
    use metadata_batcher::Store as _;
    assert_eq!(
        store.batch_update(&batch),
        Ok(Written::rows(0)),
        "no such row, but allowed"
    );

    // Without the certificate the same user is refused, and the error says so.
    let without = conninfo.replace(&format!("sslcert={}", tls.certs.client_cert.display()), "");
    let without = without.replace(&format!("sslkey={}", tls.certs.client_key.display()), "");
    let err = PgStore::open(&without, PgOptions::default()).expect_err("no certificate");
    assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");
}

#[test]
fn closes_cancel_request_reaches_a_hung_statement_over_tls() {
    let tls = TlsCluster::start_new();
    let db = in_db(&tls.url("verify-full"), "tls_cancel");
    tls.cluster.create_migrated_db("tls_cancel");
    let agent = Uuid::from_u128(0xca);
    let mut locker = tls.cluster.socket_client("tls_cancel", "mb-test locker");
    mbpg::register(&mut locker, agent, &["cpu"]).unwrap();
    // Only close's cancel can end the statement: no lock timeout, a statement timeout far
    // beyond the final flush timeout.
    let options = named("tls hung store")
        .statement_timeout(Duration::from_secs(120))
        .lock_timeout(Duration::ZERO);
    let store = PgStore::open(&db, options).unwrap();
    let publisher = PgPublisher::open(&db, named("tls hung publisher")).unwrap();
    let batcher = Batcher::builder(store, publisher)
        .interval(Duration::from_secs(3600))
        .final_flush_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut transaction = locker.transaction().unwrap();
    transaction
        .batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    batcher
        .add(
            agent,
            vec![Metadata::new("cpu", "late", "", SystemTime::now())],
        )
        .unwrap();
    let started = Instant::now();
    batcher.close();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The lock is still held: only the cancel request, sent over TLS, can have ended the
    // statement's wait.
    let mut admin = tls.cluster.admin();
    pg::wait_until("the canceled update leaves the lock queue", || {
        pg::lock_waiters(&mut admin, "tls_cancel", "tls hung store") == 0
    });
    transaction.rollback().unwrap();
}

#[test]
fn a_connector_of_your_own_keeps_tls_for_every_session() {
    use rustls::pki_types::pem::PemObject as _;
    let tls = TlsCluster::start_new();
    tls.cluster.create_migrated_db("tls_byo");
    // The service's own TLS setup: rustls trusting the test CA, as it might already have.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&tls.certs.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(client_config);
    let mut config = postgres::Config::new();
    config
        .host("localhost")
        .port(tls.port())
        .user("postgres")
        .dbname("tls_byo")
        .ssl_mode(postgres::config::SslMode::Require);

    let _store = PgStore::open_config(config.clone(), connector.clone(), named("byo store"))
        .expect("store with the caller's connector");
    let _publisher =
        PgPublisher::open_config(config.clone(), connector.clone(), named("byo publisher"))
            .expect("publisher");
    let _subscriber = PgSubscriber::open_config(
        config.clone(),
        connector,
        METADATA_BATCH_CHANNEL,
        named("byo subscriber"),
    )
    .expect("subscriber");
    for role in ["byo store", "byo publisher", "byo subscriber"] {
        assert_eq!(ssl_of(&tls, role), vec![true], "{role}");
    }
    // The same config in plaintext is refused by the TLS-only server, with the server's
    // words, as a configuration problem.
    config.ssl_mode(postgres::config::SslMode::Disable);
    let err = PgStore::open_config(config, postgres::NoTls, PgOptions::default())
        .expect_err("plaintext refused");
    assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");
}

#[test]
fn prefer_falls_back_to_plaintext_when_the_tls_handshake_fails() {
    let db = pg::TestDb::new();
    let mut admin = db.admin();
    let agent = Uuid::from_u128(0x9ef);
    // Application names unique on the machine's server, where other tests run at once.
    let tag = &db.name[db.name.len() - 8..];
    for breakage in [Breakage::Garbage, Breakage::Close] {
        let front = BrokenTls::in_front_of(&db.url, breakage);
        let prefer = front.url(&db.url, "prefer");
        let prefix = format!("{breakage:?} {tag}");

        let mut client = mbpg::connect_client(&prefer, &named(&format!("{prefix} admin")))
            .unwrap_or_else(|err| panic!("{prefix} admin: {err}"));
        mbpg::register(&mut client, agent, &["cpu"]).unwrap();
        let sessions = Sessions::open(&prefer, &prefix);
        for role in ["admin", "store", "publisher", "subscriber"] {
            let name = format!("{prefix} {role}");
            assert_eq!(ssl_flags(&mut admin, &name), vec![false], "{name}");
        }
        // Each session tried TLS first: one broken TLS attempt and one plaintext session each.
        assert_eq!(
            (front.ssl_requests(), front.plaintext()),
            (4, 4),
            "{breakage:?}"
        );
        sessions.round_trip(&mut client, agent, &prefix);

        // `require` makes no second attempt, and says the handshake failed.
        let err = PgStore::open(&front.url(&db.url, "require"), PgOptions::default())
            .expect_err("require has no plaintext fallback");
        assert_eq!(err.kind(), ConnectErrorKind::Tls, "{breakage:?}: {err}");
        assert!(
            err.to_string().contains("TLS handshake"),
            "{breakage:?}: {err}"
        );
        assert_eq!(
            front.plaintext(),
            4,
            "{breakage:?}: require tried plaintext"
        );
    }
}

#[test]
fn prefer_reports_both_attempts_when_plaintext_fails_too() {
    // Plaintext goes on to port 0, which takes no connection (a free port might be taken by
    // a cluster of a test running at once).
    let nowhere = std::net::SocketAddr::from((pg::certs::LOOPBACK, 0));
    let front = BrokenTls::start(Breakage::Garbage, nowhere);
    let err = PgStore::open(
        &front.url("postgres://postgres@127.0.0.1/postgres", "prefer"),
        PgOptions::default(),
    )
    .expect_err("neither attempt can succeed");
    assert_eq!(
        (front.ssl_requests(), front.plaintext()),
        (1, 1),
        "both attempts made"
    );
    // Neither reached a server: the first attempt's kind, and both attempts' errors.
    assert_eq!(err.kind(), ConnectErrorKind::Tls, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("the TLS attempt failed: error performing TLS handshake"),
        "{err}"
    );
    assert!(
        message.contains("the plaintext attempt failed too"),
        "{err}"
    );

    // When the plaintext attempt reaches the server, what the server said decides the kind:
    // a broken TLS set-up in front does not hide a database that does not exist.
    let db = pg::TestDb::new();
    let front = BrokenTls::in_front_of(&db.url, Breakage::Close);
    let missing = front.url(&db.url, "prefer").replacen(
        &format!("/{}?", db.name),
        "/mb_no_such_database?",
        1,
    );
    let err = PgStore::open(&missing, PgOptions::default()).expect_err("no such database");
    assert_eq!(err.kind(), ConnectErrorKind::Config, "{err}");
    let message = err.to_string();
    assert!(message.contains("TLS handshake"), "{err}");
    assert!(
        message.contains("3D000") && message.contains("mb_no_such_database"),
        "{err}"
    );
}

#[test]
fn prefer_falls_back_to_plaintext_when_pg_hba_refuses_tls() {
    // The server takes TLS (ssl = on, certificates), and then refuses every TLS session.
    let tls = TlsCluster::with_hba(
        Certs::new(),
        "# The Unix socket, for the harness's admin client.\n\
         local all all trust\n\
         hostnossl all postgres 127.0.0.1/32 trust\n",
    );
    tls.cluster.create_migrated_db("tls_nossl");
    let base = format!("postgres://postgres@127.0.0.1:{}/tls_nossl", tls.port());

    // No sslmode is libpq's `prefer`.
    let _client = mbpg::connect_client(&base, &named("nossl default")).expect("default falls back");
    let _store = PgStore::open(&format!("{base}?sslmode=prefer"), named("nossl store"))
        .expect("prefer falls back");
    for name in ["nossl default", "nossl store"] {
        assert_eq!(ssl_of(&tls, name), vec![false], "{name}");
    }

    // `require` and `verify-full` (whose handshake checks the certificate and host name) get
    // through TLS and are refused by pg_hba.conf, in the server's words.
    for url in [
        format!("{base}?sslmode=require"),
        in_db(&tls.url("verify-full"), "tls_nossl"),
    ] {
        let err = PgStore::open(&url, PgOptions::default()).expect_err("TLS sessions refused");
        assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");
        assert!(err.to_string().contains("no pg_hba.conf entry"), "{err}");
        assert!(err.to_string().contains("SSL"), "{err}");
    }
}

#[test]
fn prefer_gives_up_at_connect_timeout_when_the_tls_attempt_is_black_holed() {
    let db = pg::TestDb::new();
    let front = BrokenTls::in_front_of(&db.url, Breakage::Silence);
    let url = front.url(&db.url, "prefer");
    let options = PgOptions::new().connect_timeout(Duration::from_secs(1));
    let open = pg::background("open into a black hole", move || {
        PgStore::open(&url, options).map(drop)
    });
    let result = open.expect_within(Duration::from_secs(10), "PgStore::open");
    let elapsed = open.elapsed();
    eprintln!("sslmode=prefer, TLS attempt black-holed: open returned after {elapsed:?}");
    let err = result.expect_err("the TLS attempt never ends");
    assert_eq!(err.kind(), ConnectErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    // The whole connect_timeout went to the TLS attempt; like libpq, which moves on to the
    // next address at the timeout, there is no plaintext attempt after it.
    assert_eq!((front.ssl_requests(), front.plaintext()), (1, 0));
}
