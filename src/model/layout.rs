//! The parameter layout: every tensor of `BertForSequenceClassification` at a fixed offset in one
//! contiguous buffer of `P` values, in transformers' `state_dict` order and with its names.
//!
//! Both backends use this one layout, which is what makes the GPU trial array a plain `[T, P]`
//! buffer and lets AdamW update every parameter of every trial in one pass.

use std::ops::Range;

use crate::config::BertConfig;

/// One named tensor inside the flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// transformers' name, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Whether AdamW's weight decay applies (Trainer: all but biases and LayerNorm weights).
    pub decay: bool,
}

#[derive(Clone, Debug)]
pub struct EmbeddingParams {
    pub word: Range<usize>,
    pub position: Range<usize>,
    pub token_type: Range<usize>,
    pub ln_weight: Range<usize>,
    pub ln_bias: Range<usize>,
}

/// One encoder layer. Linear weights are `[out, in]` as in `torch.nn.Linear`.
#[derive(Clone, Debug)]
pub struct LayerParams {
    pub query_w: Range<usize>,
    pub query_b: Range<usize>,
    pub key_w: Range<usize>,
    pub key_b: Range<usize>,
    pub value_w: Range<usize>,
    pub value_b: Range<usize>,
    pub attn_out_w: Range<usize>,
    pub attn_out_b: Range<usize>,
    pub attn_ln_weight: Range<usize>,
    pub attn_ln_bias: Range<usize>,
    pub inter_w: Range<usize>,
    pub inter_b: Range<usize>,
    pub out_w: Range<usize>,
    pub out_b: Range<usize>,
    pub out_ln_weight: Range<usize>,
    pub out_ln_bias: Range<usize>,
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub embeddings: EmbeddingParams,
    pub layers: Vec<LayerParams>,
    pub pooler_w: Range<usize>,
    pub pooler_b: Range<usize>,
    pub classifier_w: Range<usize>,
    pub classifier_b: Range<usize>,
    /// P: the number of values in one model's parameter buffer.
    pub len: usize,
}

struct Builder {
    tensors: Vec<TensorSpec>,
    len: usize,
}

impl Builder {
    fn push(&mut self, name: String, shape: &[usize]) -> Range<usize> {
        let n: usize = shape.iter().product();
        let range = self.len..self.len + n;
        self.len += n;
        // Trainer's rule (`get_decay_parameter_names`): no decay for biases and LayerNorm weights.
        let decay = !(name.ends_with(".bias") || name.contains("LayerNorm"));
        self.tensors.push(TensorSpec { name, shape: shape.to_vec(), range: range.clone(), decay });
        range
    }
}

impl ParamLayout {
    pub fn new(c: &BertConfig) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut b = Builder { tensors: Vec::new(), len: 0 };
        let e = "bert.embeddings";
        let embeddings = EmbeddingParams {
            word: b.push(format!("{e}.word_embeddings.weight"), &[c.vocab_size, h]),
            position: b.push(format!("{e}.position_embeddings.weight"), &[c.max_position_embeddings, h]),
            token_type: b.push(format!("{e}.token_type_embeddings.weight"), &[c.type_vocab_size, h]),
            ln_weight: b.push(format!("{e}.LayerNorm.weight"), &[h]),
            ln_bias: b.push(format!("{e}.LayerNorm.bias"), &[h]),
        };
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("bert.encoder.layer.{l}");
                LayerParams {
                    query_w: b.push(format!("{p}.attention.self.query.weight"), &[h, h]),
                    query_b: b.push(format!("{p}.attention.self.query.bias"), &[h]),
                    key_w: b.push(format!("{p}.attention.self.key.weight"), &[h, h]),
                    key_b: b.push(format!("{p}.attention.self.key.bias"), &[h]),
                    value_w: b.push(format!("{p}.attention.self.value.weight"), &[h, h]),
                    value_b: b.push(format!("{p}.attention.self.value.bias"), &[h]),
                    attn_out_w: b.push(format!("{p}.attention.output.dense.weight"), &[h, h]),
                    attn_out_b: b.push(format!("{p}.attention.output.dense.bias"), &[h]),
                    attn_ln_weight: b.push(format!("{p}.attention.output.LayerNorm.weight"), &[h]),
                    attn_ln_bias: b.push(format!("{p}.attention.output.LayerNorm.bias"), &[h]),
                    inter_w: b.push(format!("{p}.intermediate.dense.weight"), &[i, h]),
                    inter_b: b.push(format!("{p}.intermediate.dense.bias"), &[i]),
                    out_w: b.push(format!("{p}.output.dense.weight"), &[h, i]),
                    out_b: b.push(format!("{p}.output.dense.bias"), &[h]),
                    out_ln_weight: b.push(format!("{p}.output.LayerNorm.weight"), &[h]),
                    out_ln_bias: b.push(format!("{p}.output.LayerNorm.bias"), &[h]),
                }
            })
            .collect();
        let pooler_w = b.push("bert.pooler.dense.weight".into(), &[h, h]);
        let pooler_b = b.push("bert.pooler.dense.bias".into(), &[h]);
        let classifier_w = b.push("classifier.weight".into(), &[c.num_labels, h]);
        let classifier_b = b.push("classifier.bias".into(), &[c.num_labels]);
        ParamLayout {
            tensors: b.tensors,
            embeddings,
            layers,
            pooler_w,
            pooler_b,
            classifier_w,
            classifier_b,
            len: b.len,
        }
    }

    pub fn find(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Per-value weight-decay mask (1 = decay), as the multi-trial AdamW consumes it.
    pub fn decay_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.len];
        for t in &self.tensors {
            m[t.range.clone()].fill(t.decay);
        }
        m
    }
}
