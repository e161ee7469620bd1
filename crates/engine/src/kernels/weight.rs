//! Weight matrices as the forward pass holds them: dequantized f32, GGUF blocks kept
//! quantized ([`QMatrix`]), or a stack of such parts, each with batch-invariant kernels behind
//! [`matmul`](fn@super::matmul).

use super::quant::QMatrix;

/// A weight matrix `[rows, cols]` in row-major order: one row per output feature, as GGUF
/// stores projections (`y = x · Wᵀ`).
#[derive(Clone, Debug)]
pub struct Weight {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) data: WeightData,
}

/// How a [`Weight`]'s values are held; each variant has its own batch-invariant kernels.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WeightData {
    /// Dequantized values, `rows * cols` of them.
    F32(Vec<f32>),
    /// GGUF blocks kept quantized, dequantized a few rows at a time by the matmul.
    Quant(QMatrix),
    /// Parts of different kinds stacked row-wise (a Q4_K_M file's Q5_0 Q and K projections
    /// over a Q8_0 V): each part keeps its own form, and its outputs are its block of columns.
    Stack(Vec<Weight>),
}

impl Weight {
    /// A weight from dequantized f32 values; `None` if `data.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Option<Weight> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Weight {
            rows,
            cols,
            data: WeightData::F32(data),
        })
    }

    /// A weight kept as quantized blocks.
    pub fn from_quant(q: QMatrix) -> Weight {
        Weight {
            rows: q.rows(),
            cols: q.cols(),
            data: WeightData::Quant(q),
        }
    }

    /// Stacks weights with the same column count into one (rows of the first, then of the
    /// second, ...): fused projections then need one pass over the input instead of several.
    /// Quantized parts of one kind become one quantized matrix, f32 parts one f32 matrix; any
    /// other mix stays a stack of its parts, each in its own form (none is dequantized).
    /// `None` if the column counts differ or `parts` is empty.
    pub fn concat_rows(parts: Vec<Weight>) -> Option<Weight> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts.iter().all(|p| matches!(p.data, WeightData::F32(_))) {
            let mut data = Vec::with_capacity(rows * cols);
            for p in parts {
                data.extend_from_slice(&p.into_f32());
            }
            return Weight::from_f32(rows, cols, data);
        }
        let quant: Option<Vec<QMatrix>> = parts
            .iter()
            .map(|p| match &p.data {
                WeightData::Quant(q) => Some(q.clone()),
                _ => None,
            })
            .collect();
        if let Some(q) = quant.and_then(QMatrix::concat_rows) {
            return Some(Weight::from_quant(q));
        }
        Some(Weight {
            rows,
            cols,
            data: WeightData::Stack(parts),
        })
    }

    /// Copies row `r` as f32 into `out` (an embedding lookup).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`: callers check token ids first.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[r * self.cols..(r + 1) * self.cols]),
            WeightData::Quant(q) => q.row_into(r, out),
            WeightData::Stack(parts) => {
                let mut r = r;
                for p in parts {
                    if r < p.rows {
                        return p.row_into(r, out);
                    }
                    r -= p.rows;
                }
                panic!("row out of range of a stacked weight");
            }
        }
    }

    /// All values as f32, row-major (dequantizing if need be).
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            WeightData::F32(d) => d,
            WeightData::Quant(q) => q.to_f32(),
            WeightData::Stack(parts) => parts.into_iter().flat_map(Weight::into_f32).collect(),
        }
    }

    /// Bytes of memory the values take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.len() * size_of::<f32>(),
            WeightData::Quant(q) => q.bytes(),
            WeightData::Stack(parts) => parts.iter().map(Weight::bytes).sum(),
        }
    }
}
