//! Arbitrary Redis stream entries through `JobEntry::parse`.
//!
//! The input is split on NUL bytes into `key, value, key, value, ...` (a
//! trailing key without a value gets the empty string; invalid UTF-8 is
//! replaced lossily, as the Redis client would refuse it anyway). Later
//! duplicates of a key win, like `HashMap::insert`.
//!
//! Invariants: no panic; an accepted entry satisfies the schema's rules and
//! round-trips through `to_fields()` and `parse` to an equal entry, and the
//! fields it writes are accepted unchanged by a second round.

#![no_main]

use std::collections::HashMap;

use actors::job::{JobEntry, SCHEMA_VERSION, valid_pet_id};
use libfuzzer_sys::fuzz_target;

fn fields_of(data: &[u8]) -> HashMap<String, String> {
    let mut parts = data
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut fields = HashMap::new();
    while let Some(k) = parts.next() {
        fields.insert(k, parts.next().unwrap_or_default());
    }
    fields
}

fn to_map(entry: &JobEntry) -> HashMap<String, String> {
    entry
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let fields = fields_of(data);
    let Ok(entry) = JobEntry::parse(&fields) else {
        return;
    };
    assert_eq!(
        fields.get("schema").map(String::as_str),
        Some(SCHEMA_VERSION)
    );
    assert!(valid_pet_id(&entry.pet_id), "{entry:?}");
    assert!(entry.attempt >= 1, "{entry:?}");
    assert_ne!(entry.traceparent.as_deref(), Some(""));
    assert_ne!(entry.tracestate.as_deref(), Some(""));

    let written = to_map(&entry);
    let reparsed = JobEntry::parse(&written).expect("written fields must parse");
    assert_eq!(reparsed, entry, "round trip changed the entry");
    assert_eq!(
        to_map(&reparsed),
        written,
        "second round wrote different fields"
    );
});
