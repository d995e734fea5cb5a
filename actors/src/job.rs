//! A job as it travels on the Redis Stream: the entry's fields, parsed strictly.

use std::collections::HashMap;

use uuid::Uuid;

/// Schema version written in every entry's `schema` field.
pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    ImageAdded,
    Recluster,
}

impl JobKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            JobKind::ImageAdded => "image_added",
            JobKind::Recluster => "recluster",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "image_added" => Some(JobKind::ImageAdded),
            "recluster" => Some(JobKind::Recluster),
            _ => None,
        }
    }
}

/// The contents of one jobs-stream entry (DESIGN.md, "Redis Streams contract").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEntry {
    pub job_id: Uuid,
    pub pet_id: String,
    pub kind: JobKind,
    pub image_ids: Vec<Uuid>,
    /// Unix milliseconds when the API enqueued the job.
    pub enqueued_at_ms: i64,
    /// 1 for the first attempt; travels with re-added entries.
    pub attempt: u32,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Why an entry could not be read as a job; such entries go straight to dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedEntry {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unsupported schema `{0}`")]
    Schema(String),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// `pet_id` rule of the API: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_pet_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl JobEntry {
    pub fn parse(fields: &HashMap<String, String>) -> Result<Self, MalformedEntry> {
        let get = |k: &'static str| {
            fields
                .get(k)
                .map(String::as_str)
                .ok_or(MalformedEntry::Missing(k))
        };
        let schema = get("schema")?;
        if schema != SCHEMA_VERSION {
            return Err(MalformedEntry::Schema(truncate(schema)));
        }
        let invalid = |field: &'static str, reason: &str| MalformedEntry::Invalid {
            field,
            reason: reason.into(),
        };
        let job_id =
            Uuid::parse_str(get("job_id")?).map_err(|_| invalid("job_id", "not a UUID"))?;
        let pet_id = get("pet_id")?;
        if !valid_pet_id(pet_id) {
            return Err(invalid(
                "pet_id",
                "must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        let kind = JobKind::parse(get("kind")?).ok_or_else(|| invalid("kind", "unknown kind"))?;
        let ids = get("image_ids")?;
        let image_ids = if ids.is_empty() {
            Vec::new()
        } else {
            ids.split(',')
                .map(|s| {
                    Uuid::parse_str(s).map_err(|_| invalid("image_ids", "not a list of UUIDs"))
                })
                .collect::<Result<_, _>>()?
        };
        let enqueued_at_ms = get("enqueued_at")?
            .parse()
            .map_err(|_| invalid("enqueued_at", "not unix milliseconds"))?;
        let attempt: u32 = get("attempt")?
            .parse()
            .map_err(|_| invalid("attempt", "not a number"))?;
        if attempt == 0 {
            return Err(invalid("attempt", "starts at 1"));
        }
        let opt = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
        Ok(JobEntry {
            job_id,
            pet_id: pet_id.to_owned(),
            kind,
            image_ids,
            enqueued_at_ms,
            attempt,
            traceparent: opt("traceparent"),
            tracestate: opt("tracestate"),
        })
    }

    /// The entry's fields in the order they are written.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("schema", SCHEMA_VERSION.to_owned()),
            ("job_id", self.job_id.to_string()),
            ("pet_id", self.pet_id.clone()),
            ("kind", self.kind.as_str().to_owned()),
            (
                "image_ids",
                self.image_ids
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("enqueued_at", self.enqueued_at_ms.to_string()),
            ("attempt", self.attempt.to_string()),
        ];
        if let Some(tp) = &self.traceparent {
            f.push(("traceparent", tp.clone()));
        }
        if let Some(ts) = &self.tracestate {
            f.push(("tracestate", ts.clone()));
        }
        f
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> JobEntry {
        JobEntry {
            job_id: Uuid::now_v7(),
            pet_id: "rex_01".into(),
            kind: JobKind::ImageAdded,
            image_ids: vec![Uuid::now_v7(), Uuid::now_v7()],
            enqueued_at_ms: 1_700_000_000_000,
            attempt: 1,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        }
    }

    fn fields(e: &JobEntry) -> HashMap<String, String> {
        e.to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    #[test]
    fn round_trips_through_fields() {
        let e = entry();
        assert_eq!(JobEntry::parse(&fields(&e)).unwrap(), e);
    }

    #[test]
    fn empty_image_ids_parse_as_empty_list() {
        let mut e = entry();
        e.image_ids.clear();
        e.kind = JobKind::Recluster;
        assert!(JobEntry::parse(&fields(&e)).unwrap().image_ids.is_empty());
    }

    #[test]
    fn rejects_malformed_entries() {
        let base = fields(&entry());
        let cases: Vec<(&str, Option<&str>)> = vec![
            ("schema", Some("2")),
            ("schema", None),
            ("job_id", Some("not-a-uuid")),
            ("pet_id", Some("../../etc")),
            ("pet_id", Some("")),
            ("kind", Some("bogus")),
            ("image_ids", Some("1,2")),
            ("enqueued_at", Some("yesterday")),
            ("attempt", Some("0")),
            ("attempt", None),
        ];
        for (k, v) in cases {
            let mut f = base.clone();
            match v {
                Some(v) => f.insert(k.into(), v.into()),
                None => f.remove(k),
            };
            assert!(JobEntry::parse(&f).is_err(), "{k}={v:?} should be rejected");
        }
    }

    #[test]
    fn pet_id_rule() {
        assert!(valid_pet_id("a"));
        assert!(valid_pet_id(&"x".repeat(64)));
        assert!(!valid_pet_id(&"x".repeat(65)));
        assert!(!valid_pet_id("has space"));
        assert!(!valid_pet_id("dot.ted"));
    }
}
