//! Typed identifiers of the kernels in `kernels/*.cu`: the [`Module`] (one per file, as build.rs
//! embeds them) and each kernel's name, so a launcher names a kernel by a constant rather than by
//! two strings. Kernels instantiated per storage type or head size take a variant suffix at launch
//! (`layernorm_forward` + `f32` = `layernorm_forward_f32`).

use std::fmt;

/// One kernel file, `kernels/<stem>.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Accuracy,
    Attention,
    Bias,
    CrossEntropy,
    Dropout,
    Embedding,
    Gelu,
    LayerNorm,
    Optimizer,
    Rows,
}

impl Module {
    pub const ALL: [Module; 10] = [
        Module::Accuracy,
        Module::Attention,
        Module::Bias,
        Module::CrossEntropy,
        Module::Dropout,
        Module::Embedding,
        Module::Gelu,
        Module::LayerNorm,
        Module::Optimizer,
        Module::Rows,
    ];

    /// The file stem under `kernels/` (the key of build.rs's `KERNEL_PTX`).
    pub fn stem(self) -> &'static str {
        match self {
            Module::Accuracy => "accuracy",
            Module::Attention => "attention",
            Module::Bias => "bias",
            Module::CrossEntropy => "cross_entropy",
            Module::Dropout => "dropout",
            Module::Embedding => "embedding",
            Module::Gelu => "gelu",
            Module::LayerNorm => "layernorm",
            Module::Optimizer => "optimizer",
            Module::Rows => "rows",
        }
    }

    pub fn from_stem(stem: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.stem() == stem)
    }
}

/// One kernel: its file and its name (without the variant suffix, for kernels that have one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub module: Module,
    pub name: &'static str,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

const fn kernel(module: Module, name: &'static str) -> Kernel {
    Kernel { module, name }
}

pub const ARGMAX_ACCURACY: Kernel = kernel(Module::Accuracy, "argmax_accuracy_f32");
/// Variants `d{32,64}_{f32,bf16}`, as the three below.
pub const ATTENTION_FORWARD: Kernel = kernel(Module::Attention, "attention_forward");
pub const ATTENTION_DQ: Kernel = kernel(Module::Attention, "attention_dq");
pub const ATTENTION_DKDV: Kernel = kernel(Module::Attention, "attention_dkdv");
/// Variants `f32` and `bf16` (the activation type), as every kernel below up to `dropout`.
pub const BIAS_ADD: Kernel = kernel(Module::Bias, "bias_add");
pub const BIAS_BACKWARD: Kernel = kernel(Module::Bias, "bias_backward");
pub const EMBEDDING_FORWARD: Kernel = kernel(Module::Embedding, "embedding_forward");
pub const EMBEDDING_BACKWARD: Kernel = kernel(Module::Embedding, "embedding_backward");
pub const BIAS_GELU_FORWARD: Kernel = kernel(Module::Gelu, "bias_gelu_forward");
pub const GELU_BACKWARD: Kernel = kernel(Module::Gelu, "gelu_backward");
pub const LAYERNORM_FORWARD: Kernel = kernel(Module::LayerNorm, "layernorm_forward");
pub const LAYERNORM_BACKWARD: Kernel = kernel(Module::LayerNorm, "layernorm_backward");
pub const DROPOUT: Kernel = kernel(Module::Dropout, "dropout");
pub const SOFTMAX_CROSS_ENTROPY: Kernel = kernel(Module::CrossEntropy, "softmax_cross_entropy_f32");
pub const GRAD_SUMSQ_PARTIAL: Kernel = kernel(Module::Optimizer, "grad_sumsq_partial");
pub const GRAD_NORM_FINISH: Kernel = kernel(Module::Optimizer, "grad_norm_finish");
pub const CLIP_GRADS: Kernel = kernel(Module::Optimizer, "clip_grads");
pub const ADAMW: Kernel = kernel(Module::Optimizer, "adamw");
pub const GATHER_ROWS: Kernel = kernel(Module::Rows, "gather_rows_f32");
pub const SCATTER_ADD_ROWS: Kernel = kernel(Module::Rows, "scatter_add_rows_f32");
pub const TANH_FORWARD: Kernel = kernel(Module::Rows, "tanh_forward_f32");
pub const TANH_BACKWARD: Kernel = kernel(Module::Rows, "tanh_backward_f32");
pub const ADD: Kernel = kernel(Module::Rows, "add_f32");
pub const ZERO_ROWS_FROM: Kernel = kernel(Module::Rows, "zero_rows_from_f32");

#[cfg(test)]
mod tests {
    use super::Module;

    #[test]
    fn every_kernel_file_has_a_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut stems: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        stems.sort();
        let mut known: Vec<String> = Module::ALL.iter().map(|m| m.stem().to_string()).collect();
        known.sort();
        assert_eq!(stems, known);
        assert!(Module::ALL.iter().all(|m| Module::from_stem(m.stem()) == Some(*m)));
    }
}
