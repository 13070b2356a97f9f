//! Tokenized splits and the packed batches the model consumes.

use crate::cpu::bert::{Batch, Sequence};

/// A tokenized split: token ids per example and its label.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizedSplit {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<usize>,
}

impl TokenizedSplit {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Real tokens in the split.
    pub fn tokens(&self) -> usize {
        self.ids.iter().map(|s| s.len()).sum()
    }

    /// The examples at `indices`, packed end to end (no padding).
    pub fn packed_batch(&self, indices: &[usize]) -> Batch {
        let seqs: Vec<&[u32]> = indices.iter().map(|&i| self.ids[i].as_slice()).collect();
        let labels: Vec<usize> = indices.iter().map(|&i| self.labels[i]).collect();
        Batch::packed(&seqs, &labels)
    }

    /// The examples at `indices` padded to `pad_to` with `pad_id` and an attention mask, the way
    /// transformers feeds them with `padding="max_length"`; used to prove packing changes nothing.
    pub fn padded_batch(&self, indices: &[usize], pad_to: usize, pad_id: u32) -> Batch {
        let mut b = Batch::default();
        for &i in indices {
            let s = &self.ids[i];
            assert!(s.len() <= pad_to, "sequence longer than the padded length");
            b.seqs.push(Sequence { start: b.input_ids.len(), len: pad_to, valid: s.len() });
            b.input_ids.extend_from_slice(s);
            b.input_ids.extend(std::iter::repeat_n(pad_id, pad_to - s.len()));
            b.labels.push(self.labels[i]);
        }
        b.token_type_ids = vec![0; b.input_ids.len()];
        b
    }
}
