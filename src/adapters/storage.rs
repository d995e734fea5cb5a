//! Object storage for the original bytes: a local directory (`file://`) or an
//! S3-compatible bucket (`s3://bucket/prefix`, credentials from the usual AWS variables).

use std::sync::Arc;

use actors::error::PipelineError;
use actors::ports::{BlobStore, IMAGES_PREFIX};
use async_trait::async_trait;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
}

impl Storage {
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let store: Arc<dyn ObjectStore> = if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path)?;
            Arc::new(LocalFileSystem::new_with_prefix(path)?)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()?;
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.trim_end_matches('/')))
            }
        } else {
            anyhow::bail!("storage.url must start with file:// or s3://");
        };
        Ok(Storage { store })
    }

    pub async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), object_store::Error> {
        self.store
            .put(&Path::from(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, object_store::Error> {
        self.store.get(&Path::from(key)).await?.bytes().await
    }

    pub async fn delete(&self, key: &str) -> Result<(), object_store::Error> {
        match self.store.delete(&Path::from(key)).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

#[async_trait]
impl BlobStore for Storage {
    async fn get(&self, key: &str) -> Result<Vec<u8>, PipelineError> {
        match Storage::get(self, key).await {
            Ok(b) => Ok(b.to_vec()),
            // The row exists only once its object does, so a missing object never comes back.
            Err(e @ object_store::Error::NotFound { .. }) => Err(PipelineError::poison(format!(
                "photo missing from storage: {e}"
            ))),
            Err(e) => Err(PipelineError::unavailable("storage", e)),
        }
    }

    async fn list_written(
        &self,
        from: Option<SystemTime>,
        until: SystemTime,
    ) -> Result<Vec<String>, PipelineError> {
        let (from, until): (Option<DateTime<Utc>>, DateTime<Utc>) =
            (from.map(Into::into), until.into());
        let prefix = Path::from(IMAGES_PREFIX);

        self.store
            .list(Some(&prefix))
            .try_filter_map(|m| async move {
                let fresh = from.is_none_or(|f| m.last_modified > f) && m.last_modified <= until;
                Ok(fresh.then(|| m.location.to_string()))
            })
            .try_collect()
            .await
            .map_err(|e| PipelineError::unavailable("storage", e))
    }

    async fn delete(&self, key: &str) -> Result<(), PipelineError> {
        Storage::delete(self, key)
            .await
            .map_err(|e| PipelineError::unavailable("storage", e))
    }
}
