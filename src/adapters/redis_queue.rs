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
    maxlen: usize,
}

impl RedisQueue {
    /// Connects and makes sure the consumer group exists (created at the stream's
    /// start, so entries added before any worker ran are delivered too).
    pub async fn connect(s: &RedisSettings, readers: usize) -> Result<Self, RedisError> {
        let client = redis::Client::open(s.url.expose())?;
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
            maxlen: s.maxlen,
        };
        q.ensure_group().await?;
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
            other => other,
        }
    }

    /// Adds a job entry (trimming the stream approximately to `maxlen`); returns its id.
    pub async fn enqueue(&self, entry: &JobEntry) -> Result<String, RedisError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*");
        for (k, v) in entry.to_fields() {
            cmd.arg(k).arg(v);
        }
        cmd.query_async(&mut self.conn.clone()).await
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map(|_| ())
    }
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
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
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
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
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

    async fn ack(&self, stream_id: &str) -> Result<(), PipelineError> {
        redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(stream_id)
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
        let mut add = redis::cmd("XADD");
        add.arg(&self.deadletter).arg("*");
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
        let info: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let g = info.groups.into_iter().find(|g| g.name == self.group);
        Ok(g.map(|g| QueueDepth {
            lag: g.lag.unwrap_or(0) as i64,
            pending: g.pending as i64,
        })
        .unwrap_or_default())
    }
}
