//! The manifest of a named cache: its compatibility key and its chain of segments. One small
//! JSON file per name, replaced atomically on every save.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::meta::{CacheMeta, SegmentId, checksum};
use crate::{Error, Result};

/// Manifest format version written by this build, and the newest it reads. Version 2 checks
/// the body's bytes as stored; version 1 (a checksum over serde_json's re-encoding of the
/// body) still loads.
pub const MANIFEST_VERSION: u32 = 2;
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
    /// Fields of the body this build does not know (written by a newer one), kept as read:
    /// a save of this name writes them back unchanged.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// A manifest file: the body is checksummed over its bytes exactly as they are stored, so a
/// field this build does not know (or another writer's spacing) is not damage.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    format: String,
    version: u32,
    /// xxh3-64 of the bytes of `body` as they appear in the file.
    checksum: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The envelope as version 1 wrote it.
#[derive(Deserialize)]
struct EnvelopeV1 {
    /// xxh3-64 of serde_json's compact encoding of `body`.
    checksum: String,
    body: Manifest,
}

impl Manifest {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let invalid = |e: serde_json::Error| Error::InvalidInput {
            detail: format!("manifest: {e}"),
        };
        let body = serde_json::value::to_raw_value(self).map_err(invalid)?;
        let env = Envelope {
            format: FORMAT_NAME.to_owned(),
            version: MANIFEST_VERSION,
            checksum: checksum(body.get().as_bytes()),
            body: &body,
        };
        serde_json::to_vec(&env).map_err(invalid)
    }

    /// Parses and validates manifest bytes (`path` only names the file in errors): envelope,
    /// version, checksum and chain continuity. This is the entry point of the fuzz target.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let bad = |detail: String| Error::bad_metadata(path, detail);
        // The format and version first, so a newer file says so instead of failing to parse.
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<serde_json::Value>,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if head.format.as_deref() != Some(FORMAT_NAME) {
            return Err(bad("not an agentkv manifest".into()));
        }
        let version = head
            .version
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no version".into()))?;
        let manifest = match version {
            1 => {
                let env: EnvelopeV1 =
                    serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
                let body = serde_json::to_vec(&env.body).map_err(|e| bad(e.to_string()))?;
                if checksum(&body) != env.checksum {
                    return Err(bad("manifest checksum mismatch".into()));
                }
                env.body
            }
            2 => {
                let env: Envelope =
                    serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
                if checksum(env.body.get().as_bytes()) != env.checksum {
                    return Err(bad("manifest checksum mismatch".into()));
                }
                serde_json::from_str(env.body.get()).map_err(|e| bad(e.to_string()))?
            }
            _ => {
                return Err(Error::UnsupportedVersion {
                    path: path.to_owned(),
                    kind: "manifest",
                    found: u32::try_from(version).unwrap_or(u32::MAX),
                    supported: MANIFEST_VERSION,
                });
            }
        };
        manifest.check_chain().map_err(bad)?;
        Ok(manifest)
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
