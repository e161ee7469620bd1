//! GGUF files, read with candle's reader: the one module of the engine that knows candle
//! (test support aside). Everything else sees a [`GgufFile`]: its metadata, read through
//! [`meta`]'s typed readers, and its tensors as raw GGUF bytes or f32 values.

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
        let content = Content::read(&mut reader).map_err(|source| EngineError::Gguf {
            path: path.to_owned(),
            source: source.into(),
        })?;
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

    /// Reads tensor `name`'s data.
    pub(crate) fn tensor(&mut self, name: &str) -> Result<GgufTensor> {
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

    /// The block format, when it is one the kernels keep quantized.
    pub(crate) fn quant_kind(&self) -> Option<QKind> {
        match self.qt.dtype() {
            GgmlDType::Q4_1 => Some(QKind::Q4_1),
            GgmlDType::Q8_0 => Some(QKind::Q8_0),
            _ => None,
        }
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
