//! CPU reference throughput: one training step (forward + backward) and one evaluation forward of
//! bert-tiny on a synthetic IMDB-shaped batch (16 sequences, 259 tokens on average, one of 512),
//! and of all-MiniLM-L6-v2's shape on 16 full sequences of 128 tokens, reported in examples/s by
//! criterion; each op of a layer alone (`cpu_ops`, elements per second); and the matrix multiply on the shapes the models use, by
//! each library available (OpenBLAS, `matrixmultiply`), in FLOP/s ("elem/s"). Where oneDNN and the
//! CPU's bf16 instructions are there, the models and products also run with `--precision bf16`
//! (suffix `_bf16`, library `oneDNN_bf16`).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hpo_gpu::config::BertConfig;
use hpo_gpu::cpu::adamw::{AdamState, AdamW, grad_norm};
use hpo_gpu::cpu::bert::{self, Batch, Dropout};
use hpo_gpu::cpu::blas::{GemmLibrary, gemm_library_name, use_gemm_library};
use hpo_gpu::cpu::fused_attention;
use hpo_gpu::cpu::onednn;
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::cpu::real::{Head, Mat, attention_head_by_gemm, gemm, linear_gemm};
use hpo_gpu::model::BertModel;
use rayon::prelude::*;

fn imdb_like_batch() -> Batch {
    let lens = [512usize, 180, 240, 512, 131, 300, 98, 512, 220, 160, 512, 75, 260, 190, 512, 200];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (0..l).map(|j| 1000 + ((i * 7919 + j * 104_729) % 29_000) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..lens.len()).map(|i| i % 2).collect();
    Batch::packed(&refs, &labels)
}

/// A training step (forward + backward with dropout) and an evaluation forward of a randomly
/// initialized model of `configs/<config>/config.json` on `batch`, as benchmarks
/// `<group>/train_step_<suffix>` and `<group>/eval_forward_<suffix>` in examples/s.
fn bench_model(c: &mut Criterion, group: &str, config: &str, batch: &Batch, suffix: &str, seconds: u64) {
    hpo_gpu::tune_allocator();
    let path = format!("{}/configs/{config}/config.json", env!("CARGO_MANIFEST_DIR"));
    let config = BertConfig::from_file(std::path::Path::new(&path)).expect("the model's config.json");
    let model = BertModel::random_init(&config, 0);
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(seconds))
        .warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Elements(batch.seqs.len() as u64));
    let drop = Dropout::from_config(&config, DropoutRng { seed: 1, stream: 0, step: 0 });
    let mut grads = vec![0.0f32; model.layout.len];
    let loss_scale = 1.0 / batch.seqs.len() as f32;
    for precision in precisions() {
        g.bench_function(format!("train_step_{suffix}{precision}"), |b| {
            b.iter(|| {
                let fwd = bert::forward(&model.config, &model.layout, &model.params, batch, Some(drop));
                bert::backward(
                    &model.config,
                    &model.layout,
                    &model.params,
                    batch,
                    &fwd,
                    loss_scale,
                    &mut grads,
                );
            })
        });
        g.bench_function(format!("eval_forward_{suffix}{precision}"), |b| {
            b.iter(|| bert::forward(&model.config, &model.layout, &model.params, batch, None).logits)
        });
    }
    onednn::disable_bf16();
    g.finish();
}

/// The precisions this machine runs, each switched on as the iterator reaches it: fp32 (no
/// suffix), then "_bf16" where oneDNN and the CPU's bf16 instructions are there.
fn precisions() -> impl Iterator<Item = &'static str> {
    let bf16 = match onednn::enable_bf16() {
        Ok(_) => true,
        Err(why) => {
            eprintln!("bf16 benchmarks skipped: {why}");
            false
        }
    };
    onednn::disable_bf16();
    ["", "_bf16"].into_iter().take(1 + usize::from(bf16)).inspect(|p| match *p {
        "_bf16" => drop(onednn::enable_bf16()),
        _ => onednn::disable_bf16(),
    })
}

fn bench(c: &mut Criterion) {
    bench_model(c, "bert_tiny_cpu", "bert-tiny", &imdb_like_batch(), "16_examples", 3);
}

/// The products of one layer, forward and backward, for `tokens` packed tokens of a model with
/// hidden size `h` and feed-forward size `f`, plus one head's attention scores at sequence length
/// `len` and head size `d`: (name, m, k, n, A transposed, B transposed).
fn model_shapes(
    model: &str,
    tokens: usize,
    h: usize,
    f: usize,
    len: usize,
    d: usize,
) -> Vec<(String, usize, usize, usize, bool, bool)> {
    vec![
        (format!("{model}/qkv_fwd"), tokens, h, 3 * h, false, true),
        (format!("{model}/ffn_up_fwd"), tokens, h, f, false, true),
        (format!("{model}/ffn_down_fwd"), tokens, f, h, false, true),
        (format!("{model}/ffn_down_dx"), tokens, h, f, false, false),
        (format!("{model}/ffn_down_dw"), h, tokens, f, true, false),
        (format!("{model}/scores"), len, d, len, false, true),
        (format!("{model}/context"), len, len, d, false, false),
    ]
}

fn bench_gemm(c: &mut Criterion) {
    let mut shapes = model_shapes("bert_tiny_4096_tokens", 4096, 128, 512, 512, 64);
    shapes.extend(model_shapes("minilm_2048_tokens", 2048, 384, 1536, 128, 32));
    let mut libraries = vec![GemmLibrary::MatrixMultiply];
    for library in [GemmLibrary::OpenBlas, GemmLibrary::OneDnn] {
        if use_gemm_library(library).is_ok() {
            libraries.push(library);
        }
    }
    let mut g = c.benchmark_group("cpu_gemm");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(300));
    for (name, m, k, n, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let mut out = vec![0.0f32; m * n];
        let a = if ta { Mat::rm_t(&a, k, m) } else { Mat::rm(&a, m, k) };
        let b = if tb { Mat::rm_t(&b, n, k) } else { Mat::rm(&b, k, n) };
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for &library in &libraries {
            use_gemm_library(library).expect("checked above");
            let id = BenchmarkId::new(format!("{name}_{m}x{k}x{n}"), gemm_library_name());
            // oneDNN takes the linear layers' products only, so it is reached through theirs.
            match library {
                GemmLibrary::OneDnn => {
                    g.bench_function(id, |bench| bench.iter(|| linear_gemm(a, b, 0.0, &mut out, n)))
                }
                _ => g.bench_function(id, |bench| bench.iter(|| gemm(1.0, a, b, 0.0, &mut out, n))),
            };
        }
        // bf16 operands, as the linear layers run under --precision bf16 (the inputs' conversion
        // included).
        for precision in precisions().skip(1) {
            let id = BenchmarkId::new(format!("{name}_{m}x{k}x{n}"), format!("oneDNN{precision}"));
            g.bench_function(id, |bench| bench.iter(|| linear_gemm(a, b, 0.0, &mut out, n)));
        }
        onednn::disable_bf16();
    }
    use_gemm_library(GemmLibrary::MatrixMultiply).expect("always there");
    g.finish();
}

/// A linear layer's forward through oneDNN, its bias added in the product (what the model runs)
/// against rows that start as the bias with the product accumulated onto them (what it ran
/// before), in f32 and in bf16, on MiniLM's and bert-tiny's forward shapes.
fn bench_linear_bias(c: &mut Criterion) {
    if use_gemm_library(GemmLibrary::OneDnn).is_err() {
        eprintln!("cpu_linear_bias skipped: oneDNN (libdnnl.so.2) is not loaded");
        return;
    }
    let mut g = c.benchmark_group("cpu_linear_bias");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(300));
    for (name, n, k, m) in [("minilm_ffn_up", 2048, 384, 1536), ("bert_tiny_qkv", 4096, 128, 384)] {
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let b: Vec<f32> = (0..m).map(|i| (i % 13) as f32 * 0.01).collect();
        g.throughput(Throughput::Elements((2 * n * k * m) as u64));
        for precision in precisions() {
            let id = |how: &str| BenchmarkId::new(format!("{name}_{n}x{k}x{m}{precision}"), how);
            g.bench_function(id("bias_in_product"), |bench| {
                bench.iter(|| bert::linear_new(&x, &w, &b, n, k, m))
            });
            g.bench_function(id("bias_first"), |bench| {
                bench.iter(|| {
                    let mut y: Vec<f32> = Vec::with_capacity(n * m);
                    y.par_extend((0..n).into_par_iter().flat_map_iter(|_| b.iter().copied()));
                    linear_gemm(Mat::rm(&x, n, k), Mat::rm_t(&w, m, k), 1.0, &mut y, m);
                    y
                })
            });
        }
        onednn::disable_bf16();
    }
    use_gemm_library(GemmLibrary::MatrixMultiply).expect("always there");
    g.finish();
}

/// all-MiniLM-L6-v2's shape (384 hidden, 12 heads, 6 layers) on 16 IMDB reviews cut at 128
/// tokens: every sequence is full, so packing skips nothing and the step is all arithmetic.
fn bench_minilm(c: &mut Criterion) {
    let seqs: Vec<Vec<u32>> = (0..16)
        .map(|i| (0..128).map(|j| 1000 + ((i * 7919 + j * 104_729) % 29_000) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..seqs.len()).map(|i| i % 2).collect();
    bench_model(c, "minilm_cpu", "all-MiniLM-L6-v2", &Batch::packed(&refs, &labels), "16x128", 4);
}

/// One op at a time on the activations of one MiniLM layer (2,048 tokens: 16 sequences of 128)
/// and of one bert-tiny layer (the IMDB-shaped batch above): elements per second.
fn bench_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_ops");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(300));
    let fill = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 * 1e-3 - 1.0) * 2.0).collect()
    };
    let minilm: Vec<Vec<u32>> = (0..16).map(|_| vec![1000; 128]).collect();
    let minilm: Vec<&[u32]> = minilm.iter().map(|s| s.as_slice()).collect();
    let bert_tiny = imdb_like_batch();
    for (name, batch, h, heads, inter) in
        [("minilm", Batch::packed(&minilm, &[]), 384, 12, 1536), ("bert_tiny", bert_tiny, 128, 2, 512)]
    {
        let n = batch.rows();
        let (x, w, b) = (fill(n * h, 1), fill(3 * h * h, 2), fill(3 * h, 3));
        let (q, k, v) = (fill(n * h, 4), fill(n * h, 5), fill(n * h, 6));
        let mut y = vec![0.0f32; n * h];
        g.throughput(Throughput::Elements((n * h) as u64));
        g.bench_function(format!("{name}/linear_{n}x{h}x{h}"), |bch| {
            bch.iter(|| bert::linear_new(&x, &w[..h * h], &b[..h], n, h, h))
        });
        // Q, K and V: three products against one of the stacked weights (what the model runs).
        g.throughput(Throughput::Elements((3 * n * h) as u64));
        g.bench_function(format!("{name}/qkv_three_linears_{n}x{h}x{h}"), |bch| {
            bch.iter(|| {
                let q = bert::linear_new(&x, &w[..h * h], &b[..h], n, h, h);
                let k = bert::linear_new(&x, &w[h * h..2 * h * h], &b[h..2 * h], n, h, h);
                let v = bert::linear_new(&x, &w[2 * h * h..], &b[2 * h..], n, h, h);
                (q, k, v)
            })
        });
        g.bench_function(format!("{name}/qkv_one_linear_{n}x{h}x{}", 3 * h), |bch| {
            bch.iter(|| bert::linear_new(&x, &w, &b, n, h, 3 * h))
        });
        g.throughput(Throughput::Elements((n * h) as u64));
        let (gamma, beta) = (fill(h, 7), fill(h, 8));
        let (mut xhat, mut rstd) = (vec![0.0f32; n * h], vec![0.0f32; n]);
        g.bench_function(format!("{name}/layernorm_{n}x{h}"), |bch| {
            bch.iter(|| {
                bert::layernorm_forward(
                    &x,
                    None,
                    &gamma,
                    &beta,
                    1e-12,
                    h,
                    &mut y,
                    Some((&mut xhat, &mut rstd)),
                )
            })
        });
        let pre = fill(n * inter, 9);
        let mut act = vec![0.0f32; n * inter];
        g.throughput(Throughput::Elements((n * inter) as u64));
        g.bench_function(format!("{name}/gelu_{n}x{inter}"), |bch| {
            bch.iter(|| bert::gelu_forward(&pre, &mut act))
        });
        let (attn, nprobs) = bert::attention_layout(&batch.seqs, heads, false);
        let mut probs = vec![0.0f32; nprobs];
        g.throughput(Throughput::Elements(nprobs as u64));
        g.bench_function(format!("{name}/attention_{heads}_heads"), |bch| {
            bch.iter(|| {
                bert::attention_forward(
                    bert::Qkv::separate(&q, &k, &v, h),
                    &attn,
                    heads,
                    h,
                    Some(&mut probs),
                    &mut y,
                    None,
                )
            })
        });
    }
    // Dropout's mask (Philox per 4 elements) on one MiniLM layer's attention probabilities.
    let mut probs = fill(16 * 12 * 128 * 128, 12);
    let rng = DropoutRng { seed: 42, stream: 0, step: 1 };
    g.throughput(Throughput::Elements(probs.len() as u64));
    g.bench_function(format!("dropout_{}", probs.len()), |bch| bch.iter(|| rng.apply(0.1, 4, 0, &mut probs)));
    // The optimizer step over every parameter (clipping's norm, then AdamW), at all-MiniLM-L6-v2's
    // 22.7 M parameters: memory-bound where vectorized.
    let n = 22_713_216;
    let (mut params, grads) = (fill(n, 10), fill(n, 11));
    let decay: Vec<bool> = (0..n).map(|i| i % 7 != 0).collect();
    let mut state = AdamState::new(n);
    let opt = AdamW { weight_decay: 0.01, ..Default::default() };
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("optimizer/grad_norm_and_adamw_{n}"), |bch| {
        bch.iter(|| {
            let norm = grad_norm(&grads);
            opt.step(&mut params, &grads, &decay, &mut state, 1e-5);
            norm
        })
    });
    g.finish();
}

/// One sequence and head of attention (scores, softmax, context), on one thread as each
/// (sequence, head) runs in the model (its work items fill the cores): the fused row-block kernel against the three whole passes (two GEMMs
/// around a softmax) it replaced, on bert-tiny's and MiniLM's head shapes; FLOP/s of the two
/// products ("elem/s").
fn bench_attention_head(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_attention_head");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(300));
    for (model, h, d, len) in
        [("bert_tiny", 128, 64, 512), ("bert_tiny", 128, 64, 260), ("minilm", 384, 32, 128)]
    {
        let fill = |seed: usize| -> Vec<f32> {
            (0..len * h).map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 * 1e-3 - 1.0) * 2.0).collect()
        };
        let (q, k, v) = (fill(1), fill(2), fill(3));
        let head = Head {
            q: &q,
            k: &k,
            v: &v,
            q_stride: h,
            kv_stride: h,
            q_len: len,
            k_len: len,
            d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut ctx = vec![0.0f32; len * h];
        g.throughput(Throughput::Elements((4 * len * len * d) as u64));
        let mut fused = fused_attention::Scratch::default();
        g.bench_function(format!("{model}/fused/L{len}_d{d}"), |b| {
            b.iter(|| unsafe {
                fused_attention::head_forward(head, ctx.as_mut_ptr(), h, &mut fused, &mut |_, _| {})
            })
        });
        let mut scores = Vec::new();
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
        g.bench_function(format!("{model}/by_gemm/L{len}_d{d}"), |b| {
            one_thread.install(|| {
                b.iter(|| unsafe {
                    attention_head_by_gemm(head, ctx.as_mut_ptr(), h, &mut scores, &mut |_, _| {})
                })
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench,
    bench_minilm,
    bench_ops,
    bench_gemm,
    bench_linear_bias,
    bench_attention_head
);
criterion_main!(benches);
