//! Where an op reads and writes: GEMM operands, the row shapes of the bias and LayerNorm ops (with
//! their trial count and per-trial strides, as the GPU launchers take them too), and where the
//! embedding tables sit in a trial's parameters.

use crate::model::layout::ParamLayout;

/// One GEMM operand: a row-major `rows × cols` matrix at `offset` in its buffer, `stride`
/// elements between trials, optionally transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub stride: usize,
    pub transposed: bool,
}

impl Operand {
    /// A `[rows, cols]` activation of a dense `[T, rows, cols]` buffer.
    pub fn act(rows: usize, cols: usize) -> Self {
        Operand { rows, cols, offset: 0, stride: rows * cols, transposed: false }
    }
    /// The weight `[out, in]` at `offset` of each trial's parameters, used transposed (x·Wᵀ).
    pub fn weight_t(offset: usize, out: usize, inp: usize, param_stride: usize) -> Self {
        Operand { rows: out, cols: inp, offset, stride: param_stride, transposed: true }
    }
    pub fn t(mut self) -> Self {
        self.transposed = !self.transposed;
        self
    }
    /// Shape after the optional transpose.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }
}

/// Where a GEMM writes: `[m, n]` at `offset`, `stride` between trials.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub offset: usize,
    pub stride: usize,
}

/// A `[T, rows, width]` activation (`act_stride` between trials) and its bias at `bias` inside
/// each trial's `[P]` parameter or gradient buffer (`param_stride`).
#[derive(Clone, Copy, Debug)]
pub struct BiasShape {
    pub trials: usize,
    pub rows: usize,
    pub width: usize,
    pub act_stride: usize,
    pub param_stride: usize,
    pub bias: usize,
}

impl BiasShape {
    /// A densely packed activation (`act_stride` = rows·width).
    pub fn dense(trials: usize, rows: usize, width: usize, param_stride: usize, bias: usize) -> Self {
        BiasShape { trials, rows, width, act_stride: rows * width, param_stride, bias }
    }
}

/// Rows and widths of one LayerNorm. Activations (x, residual, y, xhat, dy, dx) are
/// `[T, rows, hidden]` with `act_stride` between trials; rstd is `[T, rows]` (`row_stride`);
/// γ and β live at `gamma`/`beta` inside each trial's `[P]` parameter buffer (`param_stride`).
#[derive(Clone, Copy, Debug)]
pub struct LayerNormShape {
    pub trials: usize,
    pub rows: usize,
    pub hidden: usize,
    pub act_stride: usize,
    pub row_stride: usize,
    pub param_stride: usize,
    pub gamma: usize,
    pub beta: usize,
}

impl LayerNormShape {
    /// Densely packed activations and rstd.
    pub fn dense(
        trials: usize,
        rows: usize,
        hidden: usize,
        param_stride: usize,
        gamma: usize,
        beta: usize,
    ) -> Self {
        LayerNormShape {
            trials,
            rows,
            hidden,
            act_stride: rows * hidden,
            row_stride: rows,
            param_stride,
            gamma,
            beta,
        }
    }
}

/// Where the three embedding tables sit inside one trial's parameter buffer `[P]`, and their
/// row counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingTables {
    pub word: usize,
    pub position: usize,
    pub token_type: usize,
    pub vocab: usize,
    pub positions: usize,
    pub types: usize,
    pub hidden: usize,
}

impl EmbeddingTables {
    pub fn from_layout(layout: &ParamLayout, hidden: usize) -> Self {
        let embeddings = &layout.embeddings;
        EmbeddingTables {
            word: embeddings.word.start,
            position: embeddings.position.start,
            token_type: embeddings.token_type.start,
            vocab: embeddings.word.len() / hidden,
            positions: embeddings.position.len() / hidden,
            types: embeddings.token_type.len() / hidden,
            hidden,
        }
    }
}
