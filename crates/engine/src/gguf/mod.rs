//! GGUF files, read with candle's reader: the one module of the engine that knows candle
//! (test support aside). Everything else sees a [`GgufFile`]: its metadata, read through
//! [`meta`]'s typed readers, and its tensors as raw GGUF bytes or f32 values.

mod header;
pub(crate) mod meta;

use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{EngineError, Result};
use crate::kernels::quant::QKind;
use meta::Metadata;

/// An open GGUF file: its parsed header, and the file its tensors are read from.
pub struct GgufFile {
    content: Content,
    /// `None` for a header built in memory (tests): reading a tensor is then an error.
    reader: Option<BufReader<File>>,
}

impl GgufFile {
    /// Opens `path` and parses its header (metadata and tensor index); tensors are read on
    /// demand.
    pub(crate) fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => EngineError::ModelNotFound {
                path: path.to_owned(),
            },
            _ => EngineError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(content) => content,
            Err(source) => return Err(unreadable(path, source)),
        };
        Ok(GgufFile {
            content,
            reader: Some(reader),
        })
    }

    /// A header with `metadata` and no tensors, for tokenizer and chat-template tests.
    #[cfg(any(test, feature = "testing"))]
    pub fn from_metadata(metadata: Metadata) -> GgufFile {
        use candle_core::quantized::gguf_file::VersionedMagic;
        GgufFile {
            content: Content {
                magic: VersionedMagic::GgufV3,
                metadata,
                tensor_infos: Default::default(),
                tensor_data_offset: 0,
            },
            reader: None,
        }
    }

    /// The metadata map.
    pub(crate) fn metadata(&self) -> &Metadata {
        &self.content.metadata
    }

    /// Every tensor's name, sorted.
    pub(crate) fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// The dimensions of tensor `name` as candle reports them (`[rows, cols]`, the reverse of
    /// GGUF's order), if the file has it.
    pub(crate) fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// Reads tensor `name`'s data. A type the engine does not read (Q8_1, Q8_K) and rows that
    /// are not whole blocks of the tensor's type are errors naming the tensor, before any of
    /// it is read.
    pub(crate) fn tensor(&mut self, name: &str) -> Result<GgufTensor> {
        if let Some(info) = self.content.tensor_infos.get(name) {
            let kind = kind_of(info.ggml_dtype).map_err(|dtype| unsupported(name, dtype))?;
            // Rows are GGUF's first dimension, the last of candle's.
            let cols = info.shape.dims().last().copied().unwrap_or(1);
            if let Some(kind) = kind.filter(|k| !cols.is_multiple_of(k.block_values())) {
                return Err(EngineError::PartialBlocks {
                    name: name.to_owned(),
                    dtype: kind.name().to_owned(),
                    cols,
                    block: kind.block_values(),
                });
            }
        }
        let tensor_err = |source: candle_core::Error| EngineError::TensorData {
            name: name.to_owned(),
            source: source.into(),
        };
        let Some(reader) = self.reader.as_mut() else {
            return Err(EngineError::MissingTensor {
                name: name.to_owned(),
            });
        };
        let qt = self
            .content
            .tensor(reader, name, &Device::Cpu)
            .map_err(tensor_err)?;
        Ok(GgufTensor {
            qt,
            name: name.to_owned(),
        })
    }
}

/// The types a weight may be stored in, as GGML names them: f32 and 16-bit floats (read as
/// f32) and the block types the kernels keep quantized.
pub(crate) const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Why candle could not read the header at `path`: a tensor type it does not know, named with
/// its tensor when a second look at the header finds it, or else a damaged file.
fn unreadable(path: &Path, source: candle_core::Error) -> EngineError {
    let unknown = File::open(path).ok().and_then(|f| {
        header::first_unknown_type(&mut BufReader::new(f), |id| {
            // The type numbers candle's reader knows (its `GgmlDType::from_u32`).
            matches!(id, 0..=3 | 6..=15 | 30)
        })
    });
    match unknown {
        Some((name, id)) => unsupported(
            &name,
            header::ggml_type_name(id).map_or_else(|| format!("GGML type {id}"), str::to_owned),
        ),
        None => EngineError::Gguf {
            path: path.to_owned(),
            source: source.into(),
        },
    }
}

/// The kernels' block format for `dtype`, `None` for the float types read as f32, or GGML's
/// name for a type the engine does not read.
fn kind_of(dtype: GgmlDType) -> Result<Option<QKind>, String> {
    let kind = QKind::ALL.into_iter().find(|&k| ggml_dtype(k) == dtype);
    match (kind, dtype) {
        (Some(kind), _) => Ok(Some(kind)),
        (None, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => Ok(None),
        (None, GgmlDType::Q8K) => Err("Q8_K".to_owned()),
        (None, other) => Err(format!("{other:?}")),
    }
}

/// The error for tensor `name` stored as `dtype`, a type the engine does not read.
fn unsupported(name: &str, dtype: String) -> EngineError {
    EngineError::UnsupportedTensorType {
        name: name.to_owned(),
        dtype,
        supported: SUPPORTED_TYPES.to_owned(),
    }
}

/// The candle type of a block format.
pub(crate) fn ggml_dtype(kind: QKind) -> GgmlDType {
    match kind {
        QKind::Q4_0 => GgmlDType::Q4_0,
        QKind::Q4_1 => GgmlDType::Q4_1,
        QKind::Q5_0 => GgmlDType::Q5_0,
        QKind::Q5_1 => GgmlDType::Q5_1,
        QKind::Q8_0 => GgmlDType::Q8_0,
        QKind::Q2K => GgmlDType::Q2K,
        QKind::Q3K => GgmlDType::Q3K,
        QKind::Q4K => GgmlDType::Q4K,
        QKind::Q5K => GgmlDType::Q5K,
        QKind::Q6K => GgmlDType::Q6K,
    }
}

/// candle's dequantization of `bytes`, `[rows, cols]` GGUF blocks of `kind`: the reference the
/// tests hold [`crate::kernels::quant::QMatrix`] to.
#[cfg(test)]
pub(crate) fn candle_dequantize(kind: QKind, rows: usize, cols: usize, bytes: &[u8]) -> Vec<f32> {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    qtensor_from_ggml(ggml_dtype(kind), bytes, vec![rows, cols], &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("candle dequantizes well-formed blocks")
}

/// One tensor's data as stored in the file.
pub(crate) struct GgufTensor {
    qt: QTensor,
    name: String,
}

impl GgufTensor {
    fn err(&self, source: candle_core::Error) -> EngineError {
        EngineError::TensorData {
            name: self.name.clone(),
            source: source.into(),
        }
    }

    /// The GGML type's name (`Q4_1`, `F32`, ...), as the weights hash has always hashed it.
    pub(crate) fn dtype_name(&self) -> String {
        format!("{:?}", self.qt.dtype())
    }

    /// The block format the kernels keep the tensor in, or `None` for F32, F16 and BF16
    /// (read as f32).
    pub(crate) fn quant_kind(&self) -> Result<Option<QKind>> {
        kind_of(self.qt.dtype()).map_err(|dtype| unsupported(&self.name, dtype))
    }

    /// The raw bytes, exactly as in the file.
    pub(crate) fn raw(&self) -> Result<Cow<'_, [u8]>> {
        self.qt.data().map_err(|e| self.err(e))
    }

    /// Every value dequantized to f32, row-major.
    pub(crate) fn to_f32(&self) -> Result<Vec<f32>> {
        self.qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dequant::dequantize_rows;
    use crate::kernels::isa::for_each_isa;
    use crate::kernels::quant::QMatrix;
    use crate::kernels::quant::tests::{Scales, bits, random_blocks};
    use crate::testing::bitwise_equal;

    /// The first index where `got` and `want` differ in bits, for a failure message.
    fn first_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
        got.iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits())
            .map(|i| (i, got[i], want[i]))
    }

    #[test]
    fn every_kind_dequantizes_bitwise_as_candle_at_every_level() {
        // candle's `to_float` transliterates ggml's `dequantize_row_*` for every one of these
        // kinds, so it stands for ggml's reference here (it matches it operation for
        // operation; had it not, ggml's code would be the reference).
        for kind in QKind::ALL {
            for (seed, scales) in [(1, Scales::Moderate), (2, Scales::Extreme)] {
                let (rows, cols) = (6, 3 * kind.block_values());
                let raw = random_blocks(kind, rows, cols, seed, scales);
                let want = candle_dequantize(kind, rows, cols, &raw);
                let q = QMatrix::from_gguf_blocks(kind, rows, cols, &raw).expect("blocks");
                assert_eq!(
                    bits(&q.to_f32()),
                    bits(&want),
                    "{kind:?} {scales:?} portable"
                );
                for_each_isa(|isa| {
                    let mut got = vec![f32::NAN; rows * cols];
                    dequantize_rows(isa, &q, 0, rows, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{kind:?} {scales:?} {isa:?}");
                });
            }
        }
    }

    #[test]
    fn gemma_3_270m_q4_k_m_tensors_dequantize_bitwise_as_candle_at_every_level() {
        let Some(path) = crate::testing::real_gemma_path() else {
            return;
        };
        let mut file = GgufFile::open(&path).expect("open gemma 3 270m");
        let (mut resident, mut stored) = (0usize, 0usize);
        let mut kinds = std::collections::BTreeSet::new();
        for name in file.tensor_names() {
            let dims = file.tensor_dims(&name).expect("listed").to_vec();
            let tensor = file.tensor(&name).expect("tensor");
            let raw = tensor.raw().expect("raw bytes");
            stored += raw.len();
            let Some(kind) = tensor.quant_kind().expect("a supported type") else {
                resident += dims.iter().product::<usize>() * size_of::<f32>();
                continue;
            };
            kinds.insert(kind.name());
            let (rows, cols) = match dims[..] {
                [rows, cols] => (rows, cols),
                [cols] => (1, cols),
                _ => panic!("{name}: {dims:?}"),
            };
            let q = QMatrix::from_gguf_blocks(kind, rows, cols, &raw).expect("whole blocks");
            drop(raw);
            resident += q.bytes();
            let want = tensor.to_f32().expect("candle dequantizes");
            let portable = q.to_f32();
            assert!(
                bitwise_equal(&portable, &want),
                "{name} ({kind:?}) portable: first difference {:?}",
                first_difference(&portable, &want)
            );
            drop(portable);
            for_each_isa(|isa| {
                let mut got = vec![f32::NAN; rows * cols];
                dequantize_rows(isa, &q, 0, rows, &mut got);
                assert!(
                    bitwise_equal(&got, &want),
                    "{name} ({kind:?}) {isa:?}: first difference {:?}",
                    first_difference(&got, &want)
                );
            });
        }
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
        );
        // Memory holds the file's blocks (Q8_0's rearranged, the same bytes).
        assert_eq!(
            resident, stored,
            "resident bytes against the file's tensors"
        );
    }

    /// A GGUF file with one tensor of GGML type `ty`, 256 values (the data zeros).
    fn gguf_with_tensor_type(name: &str, ty: u32) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(0u64.to_le_bytes()); // metadata entries
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1u32.to_le_bytes());
        b.extend(256u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32) + 256, 0);
        b
    }

    #[test]
    fn a_tensor_type_we_do_not_read_is_named_with_its_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (ty, dtype) in [(23, "IQ4_XS"), (35, "TQ2_0"), (77, "GGML type 77")] {
            let path = dir.path().join(format!("{ty}.gguf"));
            std::fs::write(&path, gguf_with_tensor_type("blk.0.attn_q.weight", ty)).expect("write");
            let err = GgufFile::open(&path).err().expect("candle cannot read it");
            assert!(
                matches!(&err, EngineError::UnsupportedTensorType { name, dtype: d, .. }
                    if name == "blk.0.attn_q.weight" && d == dtype),
                "{err:?}"
            );
            let message = err.to_string();
            for part in [
                "blk.0.attn_q.weight",
                dtype,
                "Q4_K",
                "Q6_K",
                "Q5_0",
                "llama-quantize",
            ] {
                assert!(message.contains(part), "{message}");
            }
        }
        // A type candle reads (F32 here) opens; a damaged header stays a damaged file.
        let path = dir.path().join("f32.gguf");
        std::fs::write(&path, gguf_with_tensor_type("t", 0)).expect("write");
        assert!(GgufFile::open(&path).is_ok());
        let mut bytes = gguf_with_tensor_type("t", 23);
        bytes.truncate(30);
        std::fs::write(&path, bytes).expect("write");
        assert!(matches!(
            GgufFile::open(&path),
            Err(EngineError::Gguf { .. })
        ));
    }
}
