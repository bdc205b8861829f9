//! Over-long values and errors, cut and explained exactly as Coder's agent API does before
//! its batcher (`coderd/agentapi/metadata.go`), through the public `add`.

mod common;

use std::time::SystemTime;

use common::{agent, ScriptedStore};
use metadata_batcher::{Batcher, MemoryPubsub, Metadata, MockClock};

/// The (value, error) the store receives for one update of `value` and `error`.
fn stored(value: &str, error: &str) -> (String, String) {
    let store = ScriptedStore::accepting();
    let calls = store.calls.clone();
    let batcher = Batcher::builder(store, MemoryPubsub::new())
        .clock(MockClock::new())
        .build()
        .unwrap();
    batcher
        .add(
            agent(1),
            vec![Metadata::new("k", value, error, SystemTime::UNIX_EPOCH)],
        )
        .unwrap();
    batcher.flush().unwrap();
    let calls = calls.lock();
    (calls[0].values[0].clone(), calls[0].errors[0].clone())
}

#[test]
fn go_messages_for_over_long_values_and_errors() {
    // Go's messages, word for word: "value of %d bytes exceeded %d bytes" and
    // "error of %d bytes exceeded %d bytes", with maxValueLen = maxErrorLen = 2048.
    assert_eq!(
        stored(&"v".repeat(3000), "script failed"),
        (
            "v".repeat(2048),
            "value of 3000 bytes exceeded 2048 bytes".to_owned()
        )
    );
    assert_eq!(
        stored("42", &"e".repeat(4000)),
        (
            "42".to_owned(),
            "error of 4000 bytes exceeded 2048 bytes".to_owned()
        )
    );
    // Both too long: Go checks the original error after cutting the value, so the error's
    // message wins.
    assert_eq!(
        stored(&"v".repeat(3000), &"e".repeat(4000)),
        (
            "v".repeat(2048),
            "error of 4000 bytes exceeded 2048 bytes".to_owned()
        )
    );
    // Exactly at the limit: untouched.
    assert_eq!(
        stored(&"v".repeat(2048), &"e".repeat(2048)),
        ("v".repeat(2048), "e".repeat(2048))
    );
}

#[test]
fn a_multi_byte_value_is_cut_on_a_character_boundary() {
    // "a" then 2-byte characters: byte 2048 falls inside one. Go's byte slice would split
    // it, and PostgreSQL refuses invalid UTF-8, so the crate cuts one byte earlier.
    let value = format!("a{}", "é".repeat(1200));
    let (stored_value, error) = stored(&value, &"e".repeat(2049));
    assert_eq!(stored_value.len(), 2047);
    assert!(value.starts_with(&stored_value));
    assert_eq!(error, "error of 2049 bytes exceeded 2048 bytes");
}
