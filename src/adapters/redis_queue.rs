//! Redis Streams: the API's enqueue and the pipeline's [`JobQueue`] port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actors::error::PipelineError;
use actors::job::JobEntry;
use actors::ports::{Delivery, JobQueue, QueueDepth};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamInfoGroupsReply, StreamReadReply};
use redis::{RedisError, Value};

use crate::config::RedisSettings;

fn unavailable(e: RedisError) -> PipelineError {
    PipelineError::unavailable("redis", e)
}

/// The jobs stream, its consumer group and the dead-letter stream.
#[derive(Clone)]
pub struct RedisQueue {
    conn: ConnectionManager,
    /// Blocking reads get connections of their own, so they never hold up acks and adds.
    readers: Vec<ConnectionManager>,
    next_reader: std::sync::Arc<AtomicUsize>,
    pub stream: String,
    pub group: String,
    pub deadletter: String,
    /// Redis's host and port (span attributes: `server.address`, `server.port`).
    pub address: String,
    pub port: u16,
    maxlen: usize,
    deadletter_maxlen: usize,
    /// Set when this queue recreated a lost consumer group; the next depth reading reports it.
    recreated: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Adds a job's entry unless the job already has one that is still in the stream; returns
/// the entry's id. KEYS: stream, the job's enqueue marker. ARGV: marker lifetime (ms), then
/// the entry's fields. Atomic, so the API and the relay can both try and a job is never on the
/// stream twice; the marker only has to outlive the moment before the job row records the id.
const ENQUEUE_ONCE: &str = r"
local rec = redis.call('GET', KEYS[2])
if rec then
  if #redis.call('XRANGE', KEYS[1], rec, rec) > 0 then return rec end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return id
";

/// How long an enqueue marker lives.
const ENQUEUE_MARKER_MS: u64 = 24 * 3600 * 1000;

fn no_group(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// `XINFO GROUPS` of a stream that does not exist answers `ERR no such key`.
fn no_stream(e: &RedisError) -> bool {
    e.code() == Some("ERR")
}

impl RedisQueue {
    /// Connects and makes sure the consumer group exists (created at the stream's
    /// start, so entries added before any worker ran are delivered too).
    pub async fn connect(s: &RedisSettings, readers: usize) -> Result<Self, RedisError> {
        let client = redis::Client::open(s.url.expose())?;
        let (address, port) = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => (h.clone(), *p),
            _ => ("localhost".to_owned(), 0),
        };
        let cfg = |timeout: Duration| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(timeout))
        };
        let conn =
            ConnectionManager::new_with_config(client.clone(), cfg(Duration::from_secs(5))).await?;
        let mut rs = Vec::with_capacity(readers);
        for _ in 0..readers {
            let read_timeout = Duration::from_millis(s.block_ms) + Duration::from_secs(5);
            rs.push(ConnectionManager::new_with_config(client.clone(), cfg(read_timeout)).await?);
        }
        let q = RedisQueue {
            conn,
            readers: rs,
            next_reader: Default::default(),
            stream: s.stream.clone(),
            group: s.group.clone(),
            deadletter: s.deadletter_stream.clone(),
            address,
            port,
            maxlen: s.maxlen,
            deadletter_maxlen: s.deadletter_maxlen,
            recreated: Default::default(),
        };
        q.ensure_group().await?;
        q.recreated.store(false, Ordering::Relaxed);
        Ok(q)
    }

    pub async fn ensure_group(&self) -> Result<(), RedisError> {
        let r: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Ok(()) => {
                self.recreated.store(true, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }

    /// Adds a job's entry once: a job whose entry is still in the stream keeps it (see
    /// [`ENQUEUE_ONCE`]); returns the entry's id. The stream is not capped here: a length cap
    /// (`MAXLEN`) would drop entries nobody has processed yet. Workers trim what the group
    /// has acknowledged instead ([`JobQueue::trim`]).
    pub async fn enqueue(&self, entry: &JobEntry) -> Result<String, RedisError> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(ENQUEUE_ONCE)
            .arg(2)
            .arg(&self.stream)
            .arg(format!("{}:enqueued:{}", self.stream, entry.job_id))
            .arg(ENQUEUE_MARKER_MS);
        for (k, v) in entry.to_fields() {
            eval.arg(k).arg(v);
        }
        eval.query_async(&mut self.conn.clone()).await
    }

    /// Whether the consumer group exists on the jobs stream.
    pub async fn group_exists(&self) -> Result<bool, RedisError> {
        let info: Result<StreamInfoGroupsReply, RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut self.conn.clone())
            .await;
        match info {
            Ok(info) => Ok(info.groups.iter().any(|g| g.name == self.group)),
            // No stream, no group.
            Err(e) if no_stream(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn add<'a>(
        &self,
        stream: &str,
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<String, RedisError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.query_async(&mut self.conn.clone()).await
    }

    /// The key of a pet's lock; it lives beside the jobs stream it guards.
    fn pet_lock_key(&self, pet_id: &str) -> String {
        format!("{}:pet-lock:{pet_id}", self.stream)
    }

    /// Dead-letter entries, oldest first: `(id, fields)`.
    pub async fn dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, RedisError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.deadletter)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| {
                let mut fields: Vec<(String, String)> = e
                    .map
                    .iter()
                    .map(|(k, v)| (k.clone(), value_to_string(v)))
                    .collect();
                fields.sort();
                (e.id, fields)
            })
            .collect())
    }

    /// One dead-letter entry's original fields, ready to go back on the jobs stream
    /// (the attempt number raised by one); `None` if there is no such entry.
    pub async fn dead_letter_original(
        &self,
        id: &str,
    ) -> Result<Option<Vec<(String, String)>>, RedisError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.deadletter)
            .arg(id)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(entry) = reply.ids.into_iter().next() else {
            return Ok(None);
        };
        let mut fields: Vec<(String, String)> = entry
            .map
            .iter()
            .filter(|(k, _)| !DEAD_LETTER_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), value_to_string(v)))
            .collect();
        fields.sort();
        for (k, v) in fields.iter_mut() {
            if k == "attempt" {
                *v = v
                    .parse::<u32>()
                    .map(|a| (a + 1).to_string())
                    .unwrap_or_else(|_| v.clone());
            }
        }
        Ok(Some(fields))
    }

    /// Adds `fields` to the jobs stream and removes dead-letter entry `id`; returns the new id.
    pub async fn replay_dead_letter(
        &self,
        id: &str,
        fields: &[(String, String)],
    ) -> Result<String, RedisError> {
        let new_id = self
            .add(
                &self.stream,
                fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .await?;
        redis::cmd("XDEL")
            .arg(&self.deadletter)
            .arg(id)
            .query_async::<i64>(&mut self.conn.clone())
            .await?;
        Ok(new_id)
    }

    /// Deletes every dead-letter entry; returns how many there were.
    pub async fn purge_dead_letters(&self) -> Result<i64, RedisError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("XLEN")
            .arg(&self.deadletter)
            .query_async(&mut conn)
            .await?;
        redis::cmd("DEL")
            .arg(&self.deadletter)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(n)
    }
}

impl RedisQueue {
    /// The delivery count of a pending entry (held by `owner`, when given); `None` if not pending.
    async fn delivery_count(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<u64>, PipelineError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(id)
            .arg(id)
            .arg(1);
        if let Some(o) = owner {
            cmd.arg(o);
        }
        let rows: Value = cmd.query_async(conn).await.map_err(unavailable)?;
        let Value::Array(rows) = rows else {
            return Ok(None);
        };
        Ok(rows.first().map(|row| match row {
            Value::Array(cols) => match cols.get(3) {
                Some(Value::Int(n)) => *n as u64,
                _ => 1,
            },
            _ => 1,
        }))
    }
}

/// Fields the dead-letter stream adds to an entry's own.
const DEAD_LETTER_FIELDS: [&str; 5] = ["error", "deliveries", "failed_at", "source_id", "trace_id"];

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if it is one.
fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace != "00000000000000000000000000000000")
        .then_some(trace)
}

/// The id just after `id` (`ms-seq` with the sequence raised by one).
fn next_id(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    Some(format!("{ms}-{}", seq.parse::<u64>().ok()?.checked_add(1)?))
}

fn value_to_string(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[async_trait]
impl JobQueue for RedisQueue {
    async fn read(
        &self,
        consumer: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Delivery>, PipelineError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len().max(1);
        let mut conn = self
            .readers
            .get(i)
            .cloned()
            .unwrap_or_else(|| self.conn.clone());
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async::<Option<StreamReadReply>>(&mut conn)
            .await;
        let reply = match read {
            Err(e) if no_group(&e) => {
                // The stream or the group was lost (a restart without persistence, a failover,
                // an eviction): recreate it from the stream's start, keeping what was added
                // since. Entries delivered again are idempotent; lost ones come back through
                // the relay.
                tracing::warn!(stream = %self.stream, group = %self.group, "The consumer group is gone; recreating it.");
                self.ensure_group().await.map_err(unavailable)?;
                return Ok(Vec::new());
            }
            other => other.map_err(unavailable)?,
        };
        Ok(reply
            .map(|r| r.keys)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|id| Delivery {
                stream_id: id.id,
                fields: id
                    .map
                    .iter()
                    .map(|(k, v)| (k.clone(), value_to_string(v)))
                    .collect(),
                deliveries: 1,
            })
            .collect())
    }

    async fn ack(&self, stream_ids: &[String]) -> Result<(), PipelineError> {
        redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(stream_ids)
            .query_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&self, d: &Delivery, error: &str) -> Result<(), PipelineError> {
        let mut fields: Vec<(String, String)> = d
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        fields.sort();
        let mut extra: HashMap<&str, String> = HashMap::new();
        extra.insert("error", error.to_owned());
        extra.insert("deliveries", d.deliveries.to_string());
        extra.insert("failed_at", now_ms().to_string());
        extra.insert("source_id", d.stream_id.clone());
        // The trace the entry was sent in, for `deadletter list` and a search in the backend.
        if let Some(trace_id) = d.fields.get("traceparent").and_then(|tp| trace_id_of(tp)) {
            extra.insert("trace_id", trace_id.to_owned());
        }
        let mut add = redis::cmd("XADD");
        // Capped; the depth loop warns well before the cap is reached.
        add.arg(&self.deadletter)
            .arg("MAXLEN")
            .arg(self.deadletter_maxlen)
            .arg("*");
        for (k, v) in &extra {
            add.arg(*k).arg(v);
        }
        for (k, v) in fields
            .iter()
            .filter(|(k, _)| !extra.contains_key(k.as_str()))
        {
            add.arg(k).arg(v);
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.stream).arg(&self.group).arg(&d.stream_id);
        redis::pipe()
            .atomic()
            .add_command(add)
            .add_command(ack)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn depth(&self) -> Result<QueueDepth, PipelineError> {
        let mut conn = self.conn.clone();
        let info: Result<StreamInfoGroupsReply, RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await;
        let group = match info {
            Ok(info) => info.groups.into_iter().find(|g| g.name == self.group),
            Err(e) if no_stream(&e) => None,
            Err(e) => return Err(unavailable(e)),
        };
        let deadletters: i64 = redis::cmd("XLEN")
            .arg(&self.deadletter)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if group.is_none() {
            tracing::warn!(stream = %self.stream, group = %self.group, "The consumer group is gone; recreating it.");
            self.ensure_group().await.map_err(unavailable)?;
        }
        let recreated = self.recreated.swap(false, Ordering::Relaxed);
        Ok(QueueDepth {
            lag: group.as_ref().and_then(|g| g.lag).unwrap_or(0) as i64,
            pending: group.as_ref().map_or(0, |g| g.pending as i64),
            group_exists: group.is_some() && !recreated,
            deadletters,
            deadletter_cap: self.deadletter_maxlen as i64,
        })
    }

    async fn enqueue(&self, entry: &JobEntry) -> Result<String, PipelineError> {
        RedisQueue::enqueue(self, entry).await.map_err(unavailable)
    }

    async fn entries_exist(&self, stream_ids: &[String]) -> Result<Vec<bool>, PipelineError> {
        let mut pipe = redis::pipe();
        for id in stream_ids {
            pipe.cmd("XRANGE").arg(&self.stream).arg(id).arg(id);
        }
        let found: Vec<Vec<Value>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(found.iter().map(|f| !f.is_empty()).collect())
    }

    async fn trim(&self) -> Result<u64, PipelineError> {
        let mut conn = self.conn.clone();
        let info: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(group) = info.groups.into_iter().find(|g| g.name == self.group) else {
            return Ok(0);
        };
        // Keep everything from the oldest pending entry, or else everything not yet delivered.
        let summary: Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let oldest_pending = match &summary {
            Value::Array(parts) => match parts.get(1) {
                Some(v @ (Value::BulkString(_) | Value::SimpleString(_))) => {
                    Some(value_to_string(v))
                }
                _ => None,
            },
            _ => None,
        };
        let Some(min_id) = oldest_pending.or_else(|| next_id(&group.last_delivered_id)) else {
            return Ok(0);
        };
        let removed: u64 = redis::cmd("XTRIM")
            .arg(&self.stream)
            .arg("MINID")
            .arg(&min_id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let len: usize = redis::cmd("XLEN")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if len > self.maxlen {
            tracing::warn!(
                length = len,
                maxlen = self.maxlen,
                "The jobs backlog is longer than redis.maxlen."
            );
        }
        Ok(removed)
    }

    async fn lock_pet(
        &self,
        pet_id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<bool, PipelineError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.pet_lock_key(pet_id))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    async fn refresh_pet(
        &self,
        pet_id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<bool, PipelineError> {
        let kept = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
            .arg(1)
            .arg(self.pet_lock_key(pet_id))
            .arg(owner)
            .arg(ttl_ms.max(1))
            .query_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(kept == 1)
    }

    async fn unlock_pet(&self, pet_id: &str, owner: &str) -> Result<(), PipelineError> {
        redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .arg(1)
            .arg(self.pet_lock_key(pet_id))
            .arg(owner)
            .query_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn reclaim(
        &self,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Delivery>, PipelineError> {
        let mut conn = self.conn.clone();
        // XAUTOCLAIM also drops pending ids whose entries were deleted.
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(consumer)
            .arg(min_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(parts) = reply else {
            return Ok(vec![]);
        };
        let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
            return Ok(vec![]);
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let Value::Array(pair) = e else { continue };
            let [id, Value::Array(kv)] = pair.as_slice() else {
                continue;
            };
            let id = value_to_string(id);
            let fields: HashMap<String, String> = kv
                .chunks(2)
                .filter_map(|c| match c {
                    [k, v] => Some((value_to_string(k), value_to_string(v))),
                    _ => None,
                })
                .collect();
            let deliveries = self
                .delivery_count(&mut conn, &id, None)
                .await?
                .unwrap_or(1);
            out.push(Delivery {
                stream_id: id,
                fields,
                deliveries,
            });
        }
        Ok(out)
    }

    async fn keep_alive(&self, consumer: &str, stream_ids: &[String]) -> Result<(), PipelineError> {
        let mut conn = self.conn.clone();
        for id in stream_ids {
            // Check ownership first: never take an entry back from a consumer that reclaimed it.
            if self
                .delivery_count(&mut conn, id, Some(consumer))
                .await?
                .is_some()
            {
                redis::cmd("XCLAIM")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(consumer)
                    .arg(0)
                    .arg(id)
                    .arg("JUSTID")
                    .query_async::<Value>(&mut conn)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    async fn prune_consumers(&self, consumer: &str, idle_ms: u64) -> Result<usize, PipelineError> {
        let mut conn = self.conn.clone();
        let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut removed = 0;
        for c in info.consumers {
            if c.name != consumer && c.pending == 0 && c.idle as u64 >= idle_ms {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&c.name)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map_err(unavailable)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
