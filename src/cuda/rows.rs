//! The small row and element-wise ops between the big kernels: the [CLS]-row gather and its
//! scatter-add (last layer), the pooler's tanh forward and backward, an in-place add (residual
//! gradients), and zeroing the dummy sequences' loss-gradient rows.
//!
//! CPU twins: `ops::host::HostOps`'s `gather_cls`, `scatter_add_cls`, `tanh_forward`,
//! `tanh_backward`, `add` and the dummy-row masking in its `cross_entropy`.
//! Kernels: `kernels/rows.cu`.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::context::Gpu;
use super::kernel::{
    ADD, GATHER_ROWS, Kernel, SCATTER_ADD_ROWS, TANH_BACKWARD, TANH_FORWARD, ZERO_ROWS_FROM,
};
use super::launch::{Launch, Span, blocks, config};

/// The rows a gather or scatter-add touches: `rows` `[T, seqs]` picks `seqs` rows of width
/// `hidden` per trial out of a `[T, ·, hidden]` activation.
pub struct RowSelection<'a> {
    pub rows: &'a CudaSlice<u32>,
    pub trials: usize,
    pub seqs: usize,
    pub hidden: usize,
}

/// Both kernels take (destination, source, rows, seqs, hidden, then the larger activation's
/// stride and the selection's stride).
fn selected_rows(
    gpu: &Gpu,
    kernel: Kernel,
    selection: &RowSelection<'_>,
    (dst, dst_stride): (&CudaSlice<f32>, usize),
    (src, src_stride): (&CudaSlice<f32>, usize),
    (full_stride, selected_stride): (usize, usize),
) -> Result<()> {
    let trials = selection.trials;
    let mut launch = Launch::new(gpu, kernel, "")?;
    launch.buffer("destination", dst, Span::trials(trials, dst_stride, dst_stride))?;
    launch.buffer("source", src, Span::trials(trials, src_stride, src_stride))?;
    launch.table(selection.rows).int("sequences", selection.seqs)?.int("hidden", selection.hidden)?;
    launch.arg(full_stride as u64).arg(selected_stride as u64);
    launch.run(config(blocks(selection.seqs * selection.hidden, 256), trials, 1, 256, 0)?)
}

/// out `[T, seqs, H]` = the selected rows of x `[T, ·, H]` (`x_stride` apart).
pub fn gather_rows(
    gpu: &Gpu,
    selection: &RowSelection<'_>,
    x: &CudaSlice<f32>,
    x_stride: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let out_stride = selection.seqs * selection.hidden;
    let strides = (x_stride, out_stride);
    selected_rows(gpu, GATHER_ROWS, selection, (&*out, out_stride), (x, x_stride), strides)
}

/// The selected rows of dx `[T, ·, H]` (`dx_stride` apart) += d `[T, seqs, H]`.
pub fn scatter_add_rows(
    gpu: &Gpu,
    selection: &RowSelection<'_>,
    d: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dx_stride: usize,
) -> Result<()> {
    let d_stride = selection.seqs * selection.hidden;
    let strides = (dx_stride, d_stride);
    selected_rows(gpu, SCATTER_ADD_ROWS, selection, (&*dx, dx_stride), (d, d_stride), strides)
}

/// One element-wise kernel over the first `n` values of `y` (and `x`).
fn elementwise(
    gpu: &Gpu,
    kernel: Kernel,
    y: &CudaSlice<f32>,
    x: Option<&CudaSlice<f32>>,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let span = Span::trials(1, 0, n);
    let mut launch = Launch::new(gpu, kernel, "")?;
    launch.buffer("y", y, span)?;
    if let Some(x) = x {
        launch.buffer("x", x, span)?;
    }
    launch.arg(n as u64);
    launch.run(config(blocks(n, 256), 1, 1, 256, 0)?)
}

/// x = tanh(x) for the first `n` values.
pub fn tanh_forward(gpu: &Gpu, x: &mut CudaSlice<f32>, n: usize) -> Result<()> {
    elementwise(gpu, TANH_FORWARD, x, None, n)
}

/// d *= 1 − y² for the first `n` values.
pub fn tanh_backward(gpu: &Gpu, y: &CudaSlice<f32>, d: &mut CudaSlice<f32>, n: usize) -> Result<()> {
    elementwise(gpu, TANH_BACKWARD, d, Some(y), n)
}

/// y += x for the first `n` values.
pub fn add(gpu: &Gpu, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
    elementwise(gpu, ADD, y, Some(x), n)
}

/// Zeroes rows `i >= valid[t]` of x `[T, rows, width]` (`rows·width` apart): the dummy
/// sequences' rows of a loss gradient.
pub fn zero_rows_from(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    valid: &CudaSlice<u32>,
    trials: usize,
    rows: usize,
    width: usize,
) -> Result<()> {
    let stride = rows * width;
    let mut launch = Launch::new(gpu, ZERO_ROWS_FROM, "")?;
    launch.buffer("x", x, Span::trials(trials, stride, stride))?.buffer(
        "valid",
        valid,
        Span::trials(trials, 1, 1),
    )?;
    launch.int("sequences", rows)?.int("classes", width)?.arg(stride as u64);
    launch.run(config(blocks(stride, 256), trials, 1, 256, 0)?)
}
