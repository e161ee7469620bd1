//! The manifest of a named cache: its compatibility key and its chain of segments. One small
//! JSON file per name, replaced atomically on every save.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::meta::{CacheMeta, SegmentId, checksum};
use crate::{Error, Result};

/// Manifest format version written by this build, and the newest it reads.
pub const MANIFEST_VERSION: u32 = 1;
const FORMAT_NAME: &str = "agentkv.manifest";

/// One link of a cache's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// The segment's content id (its file is `segments/<id>.safetensors`).
    pub id: SegmentId,
    /// Position of its first token.
    pub start: u64,
    /// Number of tokens it holds.
    pub n_tokens: u64,
}

/// What a manifest says about a cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The cache's name.
    pub name: String,
    /// The compatibility key every segment of the chain shares.
    pub meta: CacheMeta,
    /// Total tokens in the chain.
    pub n_tokens: u64,
    /// The chain, in token order; each segment's parent is the one before it.
    pub segments: Vec<SegmentRef>,
    /// Incremented by every save of this name; tells two saves apart.
    pub generation: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    /// xxh3-64 of the compact JSON of `body`.
    checksum: String,
    body: Manifest,
}

impl Manifest {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(self).map_err(|e| Error::InvalidInput {
            detail: format!("manifest: {e}"),
        })?;
        let env = Envelope {
            format: FORMAT_NAME.to_owned(),
            version: MANIFEST_VERSION,
            checksum: checksum(&body),
            body: self.clone(),
        };
        serde_json::to_vec(&env).map_err(|e| Error::InvalidInput {
            detail: format!("manifest: {e}"),
        })
    }

    /// Parses and validates manifest bytes (`path` only names the file in errors): envelope,
    /// version, checksum and chain continuity. This is the entry point of the fuzz target.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let bad = |detail: String| Error::bad_metadata(path, detail);
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(bad("not an agentkv manifest".into()));
        }
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no version".into()))?;
        if version != u64::from(MANIFEST_VERSION) {
            return Err(Error::UnsupportedVersion {
                path: path.to_owned(),
                kind: "manifest",
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: MANIFEST_VERSION,
            });
        }
        let env: Envelope = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let body = serde_json::to_vec(&env.body).map_err(|e| bad(e.to_string()))?;
        if checksum(&body) != env.checksum {
            return Err(bad("manifest checksum mismatch".into()));
        }
        env.body.check_chain().map_err(bad)?;
        Ok(env.body)
    }

    /// Checks that segments are contiguous from token 0 and add up to `n_tokens`.
    fn check_chain(&self) -> Result<(), String> {
        let mut at = 0u64;
        for s in &self.segments {
            if s.start != at {
                return Err(format!(
                    "segment {} starts at {}, expected {at}",
                    s.id, s.start
                ));
            }
            at = at.checked_add(s.n_tokens).ok_or("token count overflows")?;
        }
        if at != self.n_tokens {
            return Err(format!(
                "segments hold {at} tokens, manifest says {}",
                self.n_tokens
            ));
        }
        Ok(())
    }
}
