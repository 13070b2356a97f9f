//! GPU kernel throughput next to the device's own ceilings: every hand-written kernel on a
//! bert-tiny trial array (T = 8 trials, an IMDB-shaped batch of 16 sequences, 4,156 packed
//! tokens), reported by criterion in GB/s (memory-bound kernels: bytes each launch must move) or
//! in "elem/s" = FLOP/s (attention, GEMMs), beside a device-to-device copy (bandwidth ceiling)
//! and a 4096³ cuBLAS SGEMM (compute ceiling). Each sample times `iters` launches between two
//! CUDA events, so launch latency on the host does not count.
//!
//! Without a usable GPU it prints why and exits successfully.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DeviceRepr};
use hpo_gpu::cpu::adamw::AdamW;
use hpo_gpu::cpu::bert::{self, Sequence};
use hpo_gpu::cpu::philox::DropoutRng;
use hpo_gpu::cuda::attention::{self, AttnDropout, AttnShape, DeviceAttnSeqs};
use hpo_gpu::cuda::bias::BiasShape;
use hpo_gpu::cuda::context::Gpu;
use hpo_gpu::cuda::cross_entropy::{DeviceLabels, softmax_cross_entropy};
use hpo_gpu::cuda::dropout::{DeviceRng, DropoutShape, dropout};
use hpo_gpu::cuda::embedding::{self, DeviceTokens, positions_of};
use hpo_gpu::cuda::gelu;
use hpo_gpu::cuda::gemm::{Fp32Math, gemm_trials, set_fp32_math};
use hpo_gpu::cuda::layernorm::{self, LayerNormShape};
use hpo_gpu::cuda::optimizer::{GradNorm, TrialSteps, adamw};
use hpo_gpu::ops::{EmbeddingTables, Operand, Out};

const TRIALS: usize = 8;
const LENS: [usize; 16] = [512, 180, 240, 512, 131, 300, 98, 512, 220, 160, 512, 75, 260, 190, 512, 200];
const H: usize = 128;
const HEADS: usize = 2;
const INTER: usize = 512;

fn up<T: DeviceRepr>(g: &Gpu, v: &[T]) -> CudaSlice<T> {
    g.stream.clone_htod(v).expect("upload")
}

fn filled(g: &Gpu, n: usize, seed: u32) -> CudaSlice<f32> {
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect();
    up(g, &v)
}

/// Device time of `iters` runs of `launch`, measured with CUDA events.
fn device_time(g: &Gpu, iters: u64, mut launch: impl FnMut()) -> Duration {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = g.ctx.new_event(flags).expect("event");
    let end = g.ctx.new_event(flags).expect("event");
    start.record(&g.stream).expect("record");
    for _ in 0..iters {
        launch();
    }
    end.record(&g.stream).expect("record");
    let ms = start.elapsed_ms(&end).expect("elapsed");
    Duration::from_secs_f64(ms as f64 / 1e3)
}

fn bench_one(
    c: &mut Criterion,
    g: &Gpu,
    group: &str,
    name: &str,
    throughput: Throughput,
    mut launch: impl FnMut(),
) {
    launch(); // load the function and surface launch errors before timing
    g.synchronize().expect("first launch");
    let mut grp = c.benchmark_group(group);
    grp.throughput(throughput);
    grp.bench_function(BenchmarkId::from_parameter(name), |b| {
        b.iter_custom(|iters| device_time(g, iters, &mut launch))
    });
    grp.finish();
}

fn main() {
    let g = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            println!("kernels bench skipped: {e}");
            return;
        }
    };
    println!("kernels bench on {} ({TRIALS} trials, bert-tiny shapes)", g.name);
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();

    // Ceilings: copy bandwidth (bytes read + written) and SGEMM rate.
    let big = 64 << 20; // 64 Mi floats = 256 MiB
    let src = filled(&g, big, 1);
    let mut dst = filled(&g, big, 2);
    bench_one(
        &mut c,
        &g,
        "baseline",
        "copy_dtod_256MiB (bytes)",
        Throughput::Bytes(2 * 4 * big as u64),
        || g.stream.memcpy_dtod(&src, &mut dst).expect("copy"),
    );
    drop((src, dst));
    let nn = 4096;
    let (a, b) = (filled(&g, nn * nn, 3), filled(&g, nn * nn, 4));
    let mut cc = filled(&g, nn * nn, 5);
    let sq = Operand { rows: nn, cols: nn, offset: 0, stride: 0, transposed: false };
    for (math, label) in [(Fp32Math::Exact, "sgemm_4096 (FLOP)"), (Fp32Math::Tf32, "sgemm_tf32_4096 (FLOP)")]
    {
        set_fp32_math(&g, math).expect("math mode");
        bench_one(&mut c, &g, "baseline", label, Throughput::Elements(2 * (nn * nn * nn) as u64), || {
            gemm_trials(&g, 1, 1.0f32, (&a, sq), (&b, sq), 0.0, (&mut cc, Out { offset: 0, stride: 0 }))
                .expect("gemm")
        });
    }
    set_fp32_math(&g, Fp32Math::Exact).expect("math mode");
    drop((a, b, cc));

    // The trial array's buffers.
    let mut seqs = Vec::new();
    let mut start = 0;
    for &len in &LENS {
        seqs.push(Sequence { start, len, valid: len });
        start += len;
    }
    let n = start;
    let act = n * H;
    let p_len = 2 * H + INTER + 8 + 30522 * H + 512 * H + 2 * H; // LN γβ, FFN bias, tables
    let (gamma, beta, ffn_b) = (0, H, 2 * H);
    let tables = EmbeddingTables {
        word: 2 * H + INTER + 8,
        position: 2 * H + INTER + 8 + 30522 * H,
        token_type: 2 * H + INTER + 8 + 30522 * H + 512 * H,
        vocab: 30522,
        positions: 512,
        types: 2,
        hidden: H,
    };
    let params = filled(&g, TRIALS * p_len, 6);
    let mut grads = filled(&g, TRIALS * p_len, 7);
    let ids: Vec<u32> = (0..n).map(|i| (1000 + i * 7919 % 29_000) as u32).collect();
    let tokens =
        DeviceTokens::upload(&g, &ids, &vec![0; n], &positions_of(&seqs, n), n, tables).expect("tokens");
    let x = filled(&g, TRIALS * act, 8);
    let res = filled(&g, TRIALS * act, 9);
    let mut y = filled(&g, TRIALS * act, 10);
    let mut xhat = filled(&g, TRIALS * act, 11);
    let mut rstd = filled(&g, TRIALS * n, 12);
    let gb = |bytes_per_trial: usize| Throughput::Bytes((bytes_per_trial * TRIALS) as u64);

    bench_one(&mut c, &g, "kernels", "embedding_forward (bytes)", gb(4 * act * 4), || {
        embedding::embedding_forward(&g, &mut y, act, &params, p_len, &tokens, TRIALS).expect("launch")
    });
    bench_one(&mut c, &g, "kernels", "embedding_backward (bytes)", gb(4 * act * 4), || {
        embedding::embedding_backward(&g, &mut grads, p_len, &x, act, &tokens, Some(0), TRIALS)
            .expect("launch")
    });
    let ln = LayerNormShape {
        trials: TRIALS,
        rows: n,
        hidden: H,
        act_stride: act,
        row_stride: n,
        param_stride: p_len,
        gamma,
        beta,
    };
    bench_one(&mut c, &g, "kernels", "layernorm_forward+residual (bytes)", gb(4 * act * 4), || {
        layernorm::layernorm_forward(&g, &ln, 1e-12, &x, Some(&res), &params, &mut y, &mut xhat, &mut rstd)
            .expect("launch")
    });
    let mut dx = filled(&g, TRIALS * act, 13);
    bench_one(&mut c, &g, "kernels", "layernorm_backward (bytes)", gb(3 * act * 4), || {
        layernorm::layernorm_backward(&g, &ln, &x, &xhat, &rstd, &params, &mut dx, &mut grads)
            .expect("launch")
    });

    let inter = n * INTER;
    let mut pre = filled(&g, TRIALS * inter, 14);
    let mut gact = filled(&g, TRIALS * inter, 15);
    let dyi = filled(&g, TRIALS * inter, 16);
    let bs = BiasShape {
        trials: TRIALS,
        rows: n,
        width: INTER,
        act_stride: inter,
        param_stride: p_len,
        bias: ffn_b,
    };
    bench_one(&mut c, &g, "kernels", "bias_gelu_forward (bytes)", gb(3 * inter * 4), || {
        gelu::bias_gelu_forward(&g, &bs, &mut pre, &params, &mut gact).expect("launch")
    });
    bench_one(&mut c, &g, "kernels", "gelu_backward+bias_grad (bytes)", gb(3 * inter * 4), || {
        gelu::gelu_backward(&g, &bs, &pre, &dyi, &mut gact, Some(&mut grads)).expect("launch")
    });

    let gens: Vec<DropoutRng> =
        (0..TRIALS).map(|t| DropoutRng { seed: 42, stream: t as u32, step: 1 }).collect();
    let drng = DeviceRng::upload(&g, &gens).expect("rng");
    let mut xd = filled(&g, TRIALS * act, 17);
    let ds = DropoutShape { trials: TRIALS, n: act, stride: act, site: 2, base: 0 };
    bench_one(&mut c, &g, "kernels", "dropout (bytes)", gb(2 * act * 4), || {
        dropout(&g, &ds, 0.1, &drng, &mut xd, Some(&mut y)).expect("launch")
    });

    // Attention: FLOPs of the matrix products (fwd: q·kᵀ and p·v; bwd: five products).
    let (layout, _) = bert::attention_layout(&seqs, HEADS, false);
    let pairs: usize = LENS.iter().map(|l| l * l).sum();
    let dseqs = DeviceAttnSeqs::upload(&g, &[layout], n, n, HEADS).expect("layout");
    let ash = AttnShape {
        trials: TRIALS,
        head_dim: H / HEADS,
        q_stride: act,
        kv_stride: act,
        lse_stride: n * HEADS,
    };
    let (q, k, v) =
        (filled(&g, TRIALS * act, 18), filled(&g, TRIALS * act, 19), filled(&g, TRIALS * act, 20));
    let mut ctx = filled(&g, TRIALS * act, 21);
    let mut lse = filled(&g, TRIALS * n * HEADS, 22);
    let mut delta = filled(&g, TRIALS * n * HEADS, 23);
    let drop = Some(AttnDropout { p: 0.1, site: 1 });
    let flop = |products: usize| Throughput::Elements((products * 2 * pairs * H * TRIALS) as u64);
    bench_one(&mut c, &g, "kernels", "attention_forward D64 dropout (FLOP)", flop(2), || {
        attention::attention_forward(&g, &ash, &dseqs, &q, &k, &v, &drng, drop, &mut ctx, &mut lse)
            .expect("launch")
    });
    let (mut dq, mut dk, mut dv) =
        (filled(&g, TRIALS * act, 24), filled(&g, TRIALS * act, 25), filled(&g, TRIALS * act, 26));
    bench_one(&mut c, &g, "kernels", "attention_backward D64 dropout (FLOP)", flop(7), || {
        attention::attention_backward(
            &g, &ash, &dseqs, &q, &k, &v, &ctx, &lse, &x, &drng, drop, &mut delta, &mut dq, &mut dk, &mut dv,
        )
        .expect("launch")
    });

    // Linear layer GEMM over the trials (FFN up-projection: n × 128 → n × 512).
    let w = filled(&g, TRIALS * INTER * H, 27);
    let xs = Operand { rows: n, cols: H, offset: 0, stride: act, transposed: false };
    let ws = Operand { rows: INTER, cols: H, offset: 0, stride: INTER * H, transposed: true };
    bench_one(
        &mut c,
        &g,
        "kernels",
        "sgemm_over_trials ffn_up (FLOP)",
        Throughput::Elements((2 * n * H * INTER * TRIALS) as u64),
        || {
            gemm_trials(
                &g,
                TRIALS,
                1.0f32,
                (&x, xs),
                (&w, ws),
                0.0,
                (&mut pre, Out { offset: 0, stride: inter }),
            )
            .expect("gemm")
        },
    );

    // Loss and accuracy heads (tiny: 16 rows × 2 labels per trial).
    let logits = filled(&g, TRIALS * 16 * 2, 28);
    let labels =
        DeviceLabels::upload(&g, &(0..16).map(|i| i % 2).collect::<Vec<_>>(), 16, 2).expect("labels");
    let mut losses = filled(&g, TRIALS * 16, 29);
    let mut dlogits = filled(&g, TRIALS * 32, 30);
    let scale = up(&g, &[1.0f32 / 16.0; TRIALS]);
    bench_one(&mut c, &g, "kernels", "softmax_cross_entropy (bytes)", gb(16 * 2 * 4 * 2 + 16 * 8), || {
        softmax_cross_entropy(
            &g,
            TRIALS,
            &logits,
            32,
            &labels,
            Some((&mut losses, 16)),
            Some(&mut dlogits),
            Some(&scale),
        )
        .expect("launch")
    });

    // Optimizer over the real bert-tiny parameter count.
    let p = 4_386_178;
    let mut params8 = filled(&g, TRIALS * p, 31);
    let mut grads8 = filled(&g, TRIALS * p, 32);
    let (mut m, mut vv) = (filled(&g, TRIALS * p, 33), filled(&g, TRIALS * p, 34));
    let decay = up(&g, &vec![1u8; p]);
    let mut norm = GradNorm::new(&g, TRIALS).expect("scratch");
    bench_one(&mut c, &g, "kernels", "grad_norm+clip (bytes)", gb(3 * p * 4), || {
        norm.run(&g, &mut grads8, p, p, Some(1.0)).expect("launch")
    });
    let steps =
        TrialSteps { lr: vec![5e-5; TRIALS], weight_decay: vec![0.01; TRIALS], step: vec![1; TRIALS] };
    bench_one(&mut c, &g, "kernels", "adamw (bytes)", gb(7 * p * 4 + p), || {
        adamw(&g, &AdamW::default(), &steps, &decay, &mut params8, &grads8, &mut m, &mut vv, p, p)
            .expect("launch")
    });

    c.final_summary();
}
