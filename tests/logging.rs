//! An app that logs only through the `log` crate (env_logger and the like), with no tracing
//! subscriber, still receives the crate's warnings; and `migrate` does not log the server's
//! "already exists" NOTICE on every start.
//!
//! Its own test binary: `log::set_logger` is once per process, and no test here may install
//! a tracing subscriber (tracing forwards to `log` only while none is set).

mod pg;

use std::sync::{Mutex, Once};

use metadata_batcher::postgres::{migrate, PgStore};
use pg::TestDb;

/// One log record as the app saw it.
#[derive(Debug, Clone)]
struct Record {
    level: log::Level,
    target: String,
    message: String,
}

/// The app's logger: keeps every record.
struct Collect;

static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Record {
                level: record.level(),
                target: record.target().to_owned(),
                message: record.args().to_string(),
            });
    }

    fn flush(&self) {}
}

/// Installs the `log`-only logger once for this binary; returns the records so far.
fn records() -> Vec<Record> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Collect).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    RECORDS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[test]
fn a_log_only_app_receives_the_connect_warning() {
    records();
    // Port 1 on localhost: nothing listens, the connection is refused at once.
    let url = "postgres://postgres@127.0.0.1:1/postgres";
    assert!(PgStore::connect(url).is_err());
    let warnings: Vec<Record> = records()
        .into_iter()
        .filter(|r| r.level == log::Level::Warn && r.target.starts_with("metadata_batcher"))
        .filter(|r| r.message.contains("metadata store cannot connect"))
        .collect();
    // One record per event, carrying the event's fields.
    assert_eq!(warnings.len(), 1, "{:#?}", records());
    assert!(
        warnings[0].message.contains("127.0.0.1:1") || warnings[0].message.contains("refused"),
        "{:?}",
        warnings[0]
    );
}

#[test]
fn migrate_does_not_log_the_already_exists_notice() {
    records();
    // TestDb::new has migrated once; twice more, as every later start does.
    let db = TestDb::new();
    let mut client = db.client("mb-test migrate again");
    let client_min_messages = |client: &mut postgres::Client| -> String {
        client
            .query_one("SHOW client_min_messages", &[])
            .unwrap()
            .get(0)
    };
    let before = client_min_messages(&mut client);
    migrate(&mut client).unwrap();
    migrate(&mut client).unwrap();
    let notices: Vec<Record> = records()
        .into_iter()
        .filter(|r| r.message.contains("already exists"))
        .collect();
    assert!(notices.is_empty(), "{notices:#?}");
    // The caller's session keeps its own setting: LOCAL ended with migrate's transaction.
    assert_eq!(client_min_messages(&mut client), before);
}
