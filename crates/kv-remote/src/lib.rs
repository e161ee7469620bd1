//! A remote tier for [`kv_store`] on any S3-compatible object store (AWS S3, Garage, MinIO,
//! R2...): segment files shared between hosts under `<prefix>/segments/<id>.safetensors`.
//!
//! Segments are content-addressed and immutable, which is what object storage is made for:
//! a push writes a segment once (one already there is a deduplication hit, not an error), a
//! fetch verifies the bytes exactly as a local load does (structure, checksums, that the
//! content is the segment its name says) before the local store keeps them, so a truncated
//! or altered object is an error and never becomes a local file. docs/format.md, "Remote
//! stores", has the layout.
//!
//! The API is blocking, like kv-store's: each call runs on the `Remote`'s own small tokio
//! runtime (from a fresh thread when the caller is itself on a runtime), so agent-pool and the
//! CLI use it as they use a local store.

#![deny(missing_docs)]
#![deny(unsafe_code)]

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use kv_store::{SegmentId, Store};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

mod heads;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use heads::Decision;

/// Everything that can go wrong in the remote tier. Each message says what happened and what
/// to do next; the local store is never changed by a failed remote operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store's URL or options cannot be used.
    #[error("cannot use the remote store {url:?}: {detail}")]
    Config {
        /// The URL as given.
        url: String,
        /// What is wrong and how to give it.
        detail: String,
    },
    /// The object store failed or could not be reached.
    #[error(
        "the remote store {url} failed to {op} {key} (check that it is running and reachable \
         and that its endpoint and credentials are right: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY; the local copies are unaffected)"
    )]
    Remote {
        /// The store's URL.
        url: String,
        /// What was being done ("read", "write", "list"...).
        op: &'static str,
        /// The object's key.
        key: String,
        /// What the client said.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A remote object is not a valid copy of what its key names.
    #[error(
        "the remote object {key} is damaged or is not the segment its name says; nothing was \
         stored locally; push the segment again from a host whose local copy verifies \
         (`agentkv agents verify`): {source}"
    )]
    Damaged {
        /// The object's key.
        key: String,
        /// What the verification found.
        #[source]
        source: kv_store::Error,
    },
    /// An object of an agent's head is not what the protocol wrote.
    #[error(
        "the remote head object {key} is damaged: {detail}; agentkv wrote no such object; \
         remove it only if no host is advancing that agent"
    )]
    Head {
        /// The object's key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Other hosts kept interrupting a proposal.
    #[error(
        "could not commit generation {generation} of agent {name:?}: other hosts kept \
         advancing it ({attempts} attempts); try the turn again"
    )]
    Contended {
        /// The agent.
        name: String,
        /// The generation being decided.
        generation: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// The local store failed.
    #[error(transparent)]
    Local(#[from] kv_store::Error),
}

/// kv-remote's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a push or fetch moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes sent or received (0 when nothing had to move).
    pub bytes: u64,
    /// The destination already had the segment.
    pub already_there: bool,
}

/// What [`Remote::remove_segments`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteGc {
    /// Segments deleted.
    pub removed: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Segments kept because something references them.
    pub kept: u64,
    /// Unreferenced segments kept because they are newer than the grace period.
    pub recent: u64,
}

/// An S3 bucket (and a prefix in it) holding segments several hosts share.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Opens the store at `url` (`s3://bucket` or `s3://bucket/prefix`), configured from the
    /// usual `AWS_*` environment variables (`AWS_ENDPOINT_URL` for a store other than AWS,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), then from `options`
    /// (object_store's S3 keys, e.g. `("aws_endpoint", "http://127.0.0.1:3900")`), which
    /// win. An `http://` endpoint is allowed. Nothing is contacted yet.
    pub fn open(url: &str, options: &[(&str, &str)]) -> Result<Remote> {
        let config = |detail: String| Error::Config {
            url: url.to_owned(),
            detail,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| config("give it as s3://bucket or s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(config("the bucket name is empty".into()));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.contains('\\')
        {
            return Err(config(format!("the prefix {prefix:?} is not a plain path")));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Fail in seconds, not minutes, when the store is down: the local copy is the
            // fallback, and a turn waits on this.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(120)),
            );
        let mut endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok();
        for (key, value) in options {
            let parsed: AmazonS3ConfigKey = key
                .parse()
                .map_err(|e| config(format!("option {key:?}: {e}")))?;
            if parsed == AmazonS3ConfigKey::Endpoint {
                endpoint = Some((*value).to_owned());
            }
            builder = builder.with_config(parsed, *value);
        }
        if endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
        {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| config(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kv-remote")
            .enable_all()
            .build()
            .map_err(|e| config(format!("cannot start its I/O runtime: {e}")))?;
        Ok(Remote {
            store: Arc::new(store),
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            runtime,
        })
    }

    /// The store's URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `future` on this remote's runtime and waits for it.
    fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            // `block_on` on a runtime's own thread would panic: wait from a thread of ours.
            std::thread::scope(|s| {
                s.spawn(|| self.runtime.block_on(future))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.runtime.block_on(future)
        }
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The key of segment `id`.
    pub fn segment_key(&self, id: &SegmentId) -> String {
        self.key(&format!("segments/{id}.safetensors")).to_string()
    }

    fn failed(&self, op: &'static str, key: &ObjectPath, source: object_store::Error) -> Error {
        Error::Remote {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    /// Whether the store holds segment `id` (by its key; its content is checked on fetch).
    pub fn has_segment(&self, id: &SegmentId) -> Result<bool> {
        let key = self.key(&format!("segments/{id}.safetensors"));
        match self.run(self.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed("look up", &key, e)),
        }
    }

    /// Uploads segment `id` from `local`, unless the store already holds it. The local file
    /// is verified first, so a damaged local copy is never shared. An upload is one PUT:
    /// the object appears whole or not at all. Two hosts pushing one id at once write the
    /// same bytes.
    pub fn push_segment(&self, local: &Store, id: &SegmentId) -> Result<Transfer> {
        if self.has_segment(id)? {
            return Ok(Transfer {
                bytes: 0,
                already_there: true,
            });
        }
        let bytes = local.segment_bytes(id)?;
        let n = bytes.len() as u64;
        let key = self.key(&format!("segments/{id}.safetensors"));
        self.run(self.store.put(&key, PutPayload::from(bytes)))
            .map_err(|e| self.failed("write", &key, e))?;
        Ok(Transfer {
            bytes: n,
            already_there: false,
        })
    }

    /// Downloads segment `id` into `local`, unless `local` already has it. The bytes are
    /// verified as a load verifies them before `local` keeps them ([`Error::Damaged`]
    /// otherwise, with nothing written).
    pub fn fetch_segment(&self, local: &Store, id: &SegmentId) -> Result<Transfer> {
        if local.segment_path(id).exists() {
            return Ok(Transfer {
                bytes: 0,
                already_there: true,
            });
        }
        let key = self.key(&format!("segments/{id}.safetensors"));
        // Streamed into the local store's temporary file as it arrives, so the disk writes
        // overlap the download; what the store failed with is kept apart from the checks.
        let mut remote_error = None;
        let mut received = 0u64;
        let imported = local.import_segment_from(id, &mut |file| {
            enum Failed {
                Remote(object_store::Error),
                Local(std::io::Error),
            }
            let result = self.run(async {
                let got = self.store.get(&key).await.map_err(Failed::Remote)?;
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.try_next().await.map_err(Failed::Remote)? {
                    received += chunk.len() as u64;
                    file.write_all(&chunk).map_err(Failed::Local)?;
                }
                Ok(())
            });
            match result {
                Ok(()) => Ok(()),
                // The local store reports its own write errors (a full disk as such).
                Err(Failed::Local(e)) => Err(e),
                Err(Failed::Remote(e)) => {
                    let message = e.to_string();
                    remote_error = Some(e);
                    Err(std::io::Error::other(message))
                }
            }
        });
        if let Some(e) = remote_error {
            return Err(self.failed("read", &key, e));
        }
        match imported {
            Ok(written) => Ok(Transfer {
                bytes: received,
                already_there: !written,
            }),
            Err(
                e @ (kv_store::Error::BadSafetensors { .. }
                | kv_store::Error::BadMetadata { .. }
                | kv_store::Error::ChecksumMismatch { .. }
                | kv_store::Error::UnsupportedVersion { .. }),
            ) => Err(Error::Damaged {
                key: key.to_string(),
                source: e,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` under `name` (relative to the prefix), whatever they are: for tests that
    /// damage the store.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn put_raw(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(name);
        self.run(self.store.put(&key, PutPayload::from(bytes)))
            .map(drop)
            .map_err(|e| self.failed("write", &key, e))
    }

    /// Reads the object `name` (relative to the prefix) as it is: the plain GET the
    /// benchmark compares fetches with.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn get_raw(&self, name: &str) -> Result<Vec<u8>> {
        let key = self.key(name);
        self.run(async { self.store.get(&key).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.failed("read", &key, e))
    }

    /// Bytes of all the objects under `dir` (relative to the prefix), as the store reports
    /// their sizes.
    pub fn stored_bytes(&self, dir: &str) -> Result<u64> {
        let dir = self.key(dir);
        let metas: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.failed("list", &dir, e))?;
        Ok(metas.iter().map(|m| m.size).sum())
    }

    /// Downloads segment `id` and verifies it as a fetch does, keeping nothing: its size, or
    /// [`Error::Damaged`].
    pub fn check_segment(&self, id: &SegmentId) -> Result<u64> {
        let key = self.key(&format!("segments/{id}.safetensors"));
        let bytes = self
            .run(async { self.store.get(&key).await?.bytes().await })
            .map_err(|e| self.failed("read", &key, e))?;
        let n = bytes.len() as u64;
        let name = std::path::PathBuf::from(key.to_string());
        let damaged = |source| Error::Damaged {
            key: key.to_string(),
            source,
        };
        let seg = kv_store::Segment::from_bytes(&name, bytes.to_vec()).map_err(damaged)?;
        if seg.id() != id {
            return Err(damaged(kv_store::Error::InvalidInput {
                detail: format!("its content is segment {}", seg.id()),
            }));
        }
        Ok(n)
    }

    /// The names of the agents with heads on the store (created, and possibly deleted since).
    pub fn list_heads(&self) -> Result<Vec<String>> {
        let dir = self.key("heads");
        let listed = self
            .run(self.store.list_with_delimiter(Some(&dir)))
            .map_err(|e| self.failed("list", &dir, e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter(|name| kv_store::validate_name(name).is_ok())
            .map(str::to_owned)
            .collect())
    }

    /// Deletes the segments not in `keep` whose objects are older than `grace` (so that the
    /// segments of a change still being committed, pushed before it is decided, stay).
    pub fn remove_segments(
        &self,
        keep: &std::collections::HashSet<SegmentId>,
        grace: Duration,
    ) -> Result<RemoteGc> {
        let dir = self.key("segments");
        let metas: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.failed("list", &dir, e))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let grace_ms = grace.as_millis() as i64;
        let mut report = RemoteGc::default();
        for meta in metas {
            let Some(id) = meta
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".safetensors"))
                .and_then(SegmentId::parse)
            else {
                continue;
            };
            if keep.contains(&id) {
                report.kept += 1;
            } else if now_ms - meta.last_modified.timestamp_millis() < grace_ms {
                report.recent += 1;
            } else {
                self.run(self.store.delete(&meta.location))
                    .map_err(|e| self.failed("delete", &meta.location, e))?;
                report.removed += 1;
                report.bytes_freed += meta.size;
            }
        }
        Ok(report)
    }

    /// Every segment id the store holds, in no particular order. Objects under `segments/`
    /// whose names are not segment ids are left out.
    pub fn list_segments(&self) -> Result<Vec<SegmentId>> {
        let dir = self.key("segments");
        let metas: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.failed("list", &dir, e))?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|name| name.strip_suffix(".safetensors"))
            .filter_map(SegmentId::parse)
            .collect())
    }
}
