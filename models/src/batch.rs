//! A batch of token sequences with the positions and document boundaries the model needs.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

/// Token ids with explicit position ids and document ids, all `[batch, seq]`.
///
/// A packed sequence holds several documents: positions restart at 0 in each, and a token
/// attends only to earlier tokens of its own document (the document mask).
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Tensor<2, Int>,
    pub position_ids: Tensor<2, Int>,
    pub document_ids: Tensor<2, Int>,
}

impl Batch {
    /// One document per row, positions `0..seq`.
    pub fn from_ids(ids: &[i64], batch: usize, seq: usize, device: &Device) -> Self {
        let positions: Vec<i64> = (0..batch).flat_map(|_| 0..seq as i64).collect();
        let documents = vec![0i64; batch * seq];
        Self::packed(ids, &positions, &documents, batch, seq, device)
    }

    /// Rows with several documents: `positions` restart per document, `documents` label them.
    pub fn packed(
        ids: &[i64],
        positions: &[i64],
        documents: &[i64],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Self {
        let t = |v: &[i64]| Tensor::from_data(TensorData::new(v.to_vec(), [batch, seq]), device);
        Self {
            input_ids: t(ids),
            position_ids: t(positions),
            document_ids: t(documents),
        }
    }

    /// The same batch without autodiff (for a model stripped of it, as evaluation and
    /// recompute forwards use).
    pub fn inner(&self) -> Self {
        Self {
            input_ids: self.input_ids.clone().inner(),
            position_ids: self.position_ids.clone().inner(),
            document_ids: self.document_ids.clone().inner(),
        }
    }

    pub fn dims(&self) -> [usize; 2] {
        self.input_ids.dims()
    }

    /// `true` where attention is forbidden: later tokens and other documents; `[batch, seq, seq]`.
    pub fn attention_block_mask(&self) -> Tensor<3, Bool> {
        let [b, s] = self.dims();
        let device = self.input_ids.device();
        let idx = Tensor::<1, Int>::arange(0..s as i64, &device);
        let query = idx.clone().reshape([1, s, 1]).expand([b, s, s]);
        let key = idx.reshape([1, 1, s]).expand([b, s, s]);
        let future = key.greater(query);
        let docs = self.document_ids.clone();
        let other_doc = docs
            .clone()
            .reshape([b, s, 1])
            .expand([b, s, s])
            .not_equal(docs.reshape([b, 1, s]).expand([b, s, s]));
        future.bool_or(other_doc)
    }
}
