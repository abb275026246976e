//! Criterion benches of single CUDA kernels at the Qwen2.5-0.5B shapes of the issues' targets
//! (decode: 64 sequences of 384 positions; training: 64 × 384 = 24,576 rows, 16,384 scored
//! tokens, a rank-16 adapter on every projection: 8.8M parameters). Every iteration launches
//! the kernel and synchronizes, so a time includes one launch latency (a few µs). Skips (prints
//! why) without a GPU. Inputs are deterministic; values do not matter for the time.

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use rft::cuda::{
    availability, decode_partitions, grad_norm_partials_len, grpo_loss_partials_len, AttnShape, CudaDevice,
    GemmChoice, GrpoLossScalars, LoraOut, SamplingParamsDev, TrainAttnShape,
};
use rft::loss::GrpoLossConfig;
use rft::optim::AdamW;
use rft::sampling::SamplingParams;

const D: usize = 896;
const I: usize = 4864;
const H: usize = 14;
const KV: usize = 2;
const HD: usize = 64;
const V: usize = 151_936;
const SEQS: usize = 64;
const LEN: usize = 384;
const ROWS: usize = SEQS * LEN;
const TOKENS: usize = 64 * 256;

fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32
                - 0.5
        })
        .collect()
}

fn bf(dev: &CudaDevice, n: usize, seed: u32) -> CudaSlice<bf16> {
    dev.upload_bf16(&vals(n, seed)).expect("upload")
}

fn f32s(dev: &CudaDevice, n: usize, seed: u32) -> CudaSlice<f32> {
    dev.upload(&vals(n, seed)).expect("upload")
}

fn kernels(c: &mut Criterion) {
    if let Err(why) = availability() {
        eprintln!("skipping kernel benches: {why}");
        return;
    }
    let dev = CudaDevice::new(0).expect("device");
    let sync = |d: &CudaDevice| d.synchronize().expect("sync");
    let mut g = c.benchmark_group("kernels_qwen2.5-0.5b");
    // Short windows: the whole GPU session has ~10 minutes of device time.
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));

    // RMSNorm over the training rows.
    let x = bf(&dev, ROWS * D, 1);
    let w = bf(&dev, D, 2);
    let mut y = bf(&dev, ROWS * D, 3);
    g.bench_function("rmsnorm_fwd_bf16 24576x896", |b| {
        b.iter(|| {
            dev.rmsnorm_fwd_bf16(&x, &w, &mut y, ROWS, D, 1e-6).unwrap();
            sync(&dev)
        })
    });

    // Decode attention: 64 sequences × 384 positions in a paged cache (pages of 16).
    let pages_per_seq = LEN / 16;
    let shape = AttnShape {
        n_heads: H,
        n_kv_heads: KV,
        head_dim: HD,
        num_pages: SEQS * pages_per_seq,
        page_size: 16,
        max_pages: pages_per_seq,
        window: None,
    };
    let kc = bf(&dev, SEQS * LEN * KV * HD, 4);
    let vc = bf(&dev, SEQS * LEN * KV * HD, 5);
    let table: Vec<i32> = (0..(SEQS * pages_per_seq) as i32).collect();
    let table = dev.upload(&table).unwrap();
    let lens = dev.upload(&vec![LEN as i32; SEQS]).unwrap();
    let q = bf(&dev, SEQS * H * HD, 6);
    let mut out = bf(&dev, SEQS * H * HD, 7);
    let parts = SEQS * decode_partitions(LEN, None);
    let mut part_o = f32s(&dev, parts * H * HD, 8);
    let mut part_ml = f32s(&dev, parts * H * 2, 9);
    let mut counters = dev
        .alloc_zeros::<u32>(SEQS * shape.decode_blocks_per_seq())
        .unwrap();
    g.bench_function("attention_decode_bf16 64x384", |b| {
        b.iter(|| {
            dev.attention_decode_bf16(
                &q,
                &kc,
                &vc,
                &table,
                &lens,
                &mut out,
                &mut part_o,
                &mut part_ml,
                &mut counters,
                &shape,
                SEQS,
                LEN,
            )
            .unwrap();
            sync(&dev)
        })
    });

    // Sampling (temperature 1, top-p 0.95) and log-prob of 64 rows over the full vocabulary.
    let logits64 = f32s(&dev, SEQS * V, 10);
    let params = vec![
        SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: 1,
            ..Default::default()
        };
        SEQS
    ];
    let streams: Vec<u64> = (0..SEQS as u64).collect();
    let sp = SamplingParamsDev::upload(&dev, &params, &streams, &vec![0; SEQS]).unwrap();
    let mut toks = dev.alloc_zeros::<u32>(SEQS).unwrap();
    let mut lps = dev.alloc_zeros::<f32>(SEQS).unwrap();
    let mut scratch = dev
        .alloc_zeros::<f64>(rft::cuda::sample_scratch_len(SEQS, V))
        .unwrap();
    g.bench_function("sample_tokens_f32 64x151936 top-p", |b| {
        b.iter(|| {
            dev.sample_tokens_f32(&logits64, &sp, &mut scratch, &mut toks, &mut lps, SEQS, V)
                .unwrap();
            sync(&dev)
        })
    });
    // The GRPO case: temperature 1, no top-k/top-p (the chunked fast path).
    let plain = vec![
        SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        };
        SEQS
    ];
    let sp1 = SamplingParamsDev::upload(&dev, &plain, &streams, &vec![0; SEQS]).unwrap();
    g.bench_function("sample_tokens_f32 64x151936 T=1", |b| {
        b.iter(|| {
            dev.sample_tokens_f32(&logits64, &sp1, &mut scratch, &mut toks, &mut lps, SEQS, V)
                .unwrap();
            sync(&dev)
        })
    });

    // Decode-time LoRA on the widest projection (gate/up: 896 → 4864), 64 rows, r = 16.
    let xr = bf(&dev, SEQS * D, 11);
    let a = f32s(&dev, 16 * D, 12);
    let bm = f32s(&dev, I * 16, 13);
    let mut xa = f32s(&dev, SEQS * 16, 14);
    let mut yr = bf(&dev, SEQS * I, 15);
    g.bench_function("lora_xa+expand_add_bf16 64x896->4864 r16", |b| {
        b.iter(|| {
            dev.lora_xa_bf16(&xr, &a, &mut xa, SEQS, D, 16).unwrap();
            dev.lora_expand_add_bf16(&mut yr, &xa, &bm, 2.0, SEQS, I, 16)
                .unwrap();
            sync(&dev)
        })
    });

    // The decode GEMMs at 64 rows: cuBLAS vs the skinny kernel (kernels/gemm.cu) with one split
    // and with the split rule's count, 10 launches per iteration (a launch is a few µs, as
    // small as the synchronization): Qwen2.5-0.5B's stacked q|k|v, o, gate|up, down.
    for (name, k, n) in [
        ("qkv", D, D + 2 * KV * HD),
        ("o", D, D),
        ("gate_up", D, 2 * I),
        ("down", I, D),
    ] {
        let xg = bf(&dev, SEQS * k, 30);
        let wg = bf(&dev, n * k, 31);
        let mut yg = bf(&dev, SEQS * n, 32);
        let auto = rft::cuda::skinny_splits(k, n, dev.multiprocessors());
        let mut choices = vec![GemmChoice::Cublas, GemmChoice::Skinny { splits: 1 }];
        if auto > 1 {
            choices.push(GemmChoice::Skinny { splits: auto });
        }
        for choice in choices {
            let label = match choice {
                GemmChoice::Cublas => "cublas".to_string(),
                GemmChoice::Skinny { splits } => format!("skinny s{splits}"),
            };
            g.bench_function(format!("gemm {name} 64x{k}->{n} {label} (x10)"), |b| {
                b.iter(|| {
                    for _ in 0..10 {
                        dev.gemm_with(choice, &xg, &wg, &mut yg, SEQS, k, n).unwrap();
                    }
                    sync(&dev)
                })
            });
        }
    }

    // Training: the log-softmax gather of one lm_head chunk (1024 rows), forward and backward.
    let mut chunk = f32s(&dev, 1024 * V, 16);
    let targets = dev
        .upload(&(0..1024u32).map(|i| i * 97 % V as u32).collect::<Vec<_>>())
        .unwrap();
    let (mut lp, mut ent, mut lse, mut ms) = (
        f32s(&dev, 1024, 0),
        f32s(&dev, 1024, 0),
        f32s(&dev, 1024, 0),
        f32s(&dev, 1024, 0),
    );
    let dlogp = f32s(&dev, 1024, 17);
    g.bench_function("logprob_gather_fwd_f32 1024x151936", |b| {
        b.iter(|| {
            dev.logprob_gather_fwd_f32(
                &chunk, &targets, &mut lp, &mut ent, &mut lse, &mut ms, 1024, V, 1.0,
            )
            .unwrap();
            sync(&dev)
        })
    });
    g.bench_function("logprob_gather_bwd_f32 1024x151936 (in place)", |b| {
        b.iter(|| {
            dev.logprob_gather_bwd_f32(
                &mut chunk,
                &targets,
                &dlogp,
                None::<&CudaSlice<f32>>,
                &lse,
                &ms,
                1024,
                V,
                1.0,
            )
            .unwrap();
            sync(&dev)
        })
    });
    // The training step's form: f32 logits read, bf16 dlogits written (replaces the in-place
    // backward above followed by cast_f32_to_bf16).
    let mut dchunk = bf(&dev, 1024 * V, 22);
    g.bench_function("logprob_gather_bwd_f32_to_bf16 1024x151936", |b| {
        b.iter(|| {
            dev.logprob_gather_bwd_f32_to_bf16(
                &chunk,
                &mut dchunk,
                &targets,
                &dlogp,
                None::<&CudaSlice<f32>>,
                &lse,
                &ms,
                1024,
                V,
                1.0,
            )
            .unwrap();
            sync(&dev)
        })
    });

    // Training attention over 64 packed sequences of 384 tokens, forward and backward.
    let tshape = TrainAttnShape {
        n_heads: H,
        n_kv_heads: KV,
        head_dim: HD,
        window: None,
    };
    let cu: Vec<i32> = (0..=SEQS as i32).map(|s| s * LEN as i32).collect();
    let cu = dev.upload(&cu).unwrap();
    let (tq, tk, tv) = (
        bf(&dev, ROWS * H * HD, 18),
        bf(&dev, ROWS * KV * HD, 19),
        bf(&dev, ROWS * KV * HD, 20),
    );
    let mut tout = bf(&dev, ROWS * H * HD, 21);
    let mut tlse = f32s(&dev, ROWS * H, 0);
    let dout = bf(&dev, ROWS * H * HD, 22);
    let (mut dq, mut dk, mut dv) = (
        bf(&dev, ROWS * H * HD, 0),
        bf(&dev, ROWS * KV * HD, 0),
        bf(&dev, ROWS * KV * HD, 0),
    );
    let mut delta = f32s(&dev, ROWS * H, 0);
    g.bench_function("attention_train_fwd_bf16 64x384", |b| {
        b.iter(|| {
            dev.attention_train_fwd_bf16(&tq, &tk, &tv, &cu, &mut tout, &mut tlse, &tshape, SEQS, ROWS, LEN)
                .unwrap();
            sync(&dev)
        })
    });
    g.bench_function("attention_train_bwd_bf16 64x384", |b| {
        b.iter(|| {
            dev.attention_train_bwd_bf16(
                &tq, &tk, &tv, &tout, &dout, &tlse, &cu, &mut dq, &mut dk, &mut dv, &mut delta, &tshape,
                SEQS, ROWS, LEN,
            )
            .unwrap();
            sync(&dev)
        })
    });

    // Training MLP pieces on every row: SwiGLU and RMSNorm backward.
    let (gate, up, dyi) = (
        bf(&dev, ROWS * I, 23),
        bf(&dev, ROWS * I, 24),
        bf(&dev, ROWS * I, 25),
    );
    let (mut dgate, mut dup) = (bf(&dev, ROWS * I, 0), bf(&dev, ROWS * I, 0));
    g.bench_function("swiglu_bwd_bf16 24576x4864", |b| {
        b.iter(|| {
            dev.swiglu_bwd_bf16(&gate, &up, &dyi, &mut dgate, &mut dup, ROWS * I)
                .unwrap();
            sync(&dev)
        })
    });
    let dy = bf(&dev, ROWS * D, 26);
    let mut dx = bf(&dev, ROWS * D, 0);
    g.bench_function("rmsnorm_bwd_bf16 24576x896", |b| {
        b.iter(|| {
            dev.rmsnorm_bwd_bf16::<CudaSlice<f32>, CudaSlice<f32>>(
                &x, &w, &dy, &mut dx, None, ROWS, D, 1e-6, false,
            )
            .unwrap();
            sync(&dev)
        })
    });

    // LoRA gradients of the widest projection over every row on CUDA cores (the first kernels,
    // kept for comparison): u, dyB, dB, dA, dx.
    let xt = bf(&dev, ROWS * D, 27);
    let dyt = bf(&dev, ROWS * I, 28);
    let (mut u, mut dyb) = (f32s(&dev, ROWS * 16, 0), f32s(&dev, ROWS * 16, 0));
    let (mut da, mut db) = (f32s(&dev, 16 * D, 0), f32s(&dev, I * 16, 0));
    let scratch_len =
        rft::cuda::lora_grad_scratch_len(ROWS, I, 16).max(rft::cuda::lora_grad_scratch_len(ROWS, 16, D));
    let mut scratch = f32s(&dev, scratch_len.max(1), 0);
    let mut dxt = bf(&dev, ROWS * D, 0);
    g.bench_function(
        "lora backward (u, dyB, dB, dA, dx) 24576 rows 896->4864 r16",
        |b| {
            b.iter(|| {
                dev.lora_bwd_xa_bf16(&xt, &a, &mut u, ROWS, D, 16).unwrap();
                dev.lora_bwd_dyb_bf16(&dyt, &bm, &mut dyb, ROWS, I, 16).unwrap();
                dev.lora_grad_b_bf16(&dyt, &u, &mut db, &mut scratch, 2.0, ROWS, I, 16)
                    .unwrap();
                dev.lora_grad_a_bf16(&dyb, &xt, &mut da, &mut scratch, 2.0, ROWS, D, 16)
                    .unwrap();
                dev.lora_bwd_dx_bf16(&dyb, &a, &mut dxt, 2.0, ROWS, D, 16)
                    .unwrap();
                sync(&dev)
            })
        },
    );

    // The same LoRA work on tensor cores (what the training step uses): fused forward
    // y += s·(x Aᵀ) Bᵀ storing xa, fused dx += s·(dy B) A storing dyB, then dB and dA.
    let (a16, b16) = (bf(&dev, 16 * D, 33), bf(&dev, I * 16, 34));
    let mut yt = bf(&dev, ROWS * I, 35);
    let (mut xa16, mut dyb16) = (bf(&dev, ROWS * 16, 0), bf(&dev, ROWS * 16, 0));
    let tc_scratch = rft::cuda::lora_train_grad_scratch_len(ROWS, I, 16)
        .max(rft::cuda::lora_train_grad_scratch_len(ROWS, D, 16));
    let mut scratch_tc = f32s(&dev, tc_scratch.max(1), 0);
    g.bench_function(
        "lora_train fwd+bwd (tensor cores) 24576 rows 896->4864 r16",
        |b| {
            b.iter(|| {
                dev.lora_train_fwd_bf16(
                    &xt,
                    &a16,
                    &b16,
                    &mut yt,
                    LoraOut::Add,
                    Some(&mut xa16),
                    2.0,
                    ROWS,
                    D,
                    I,
                    16,
                )
                .unwrap();
                dev.lora_train_bwd_dx_bf16(
                    &dyt,
                    &a16,
                    &b16,
                    &mut dxt,
                    LoraOut::Add,
                    &mut dyb16,
                    2.0,
                    ROWS,
                    D,
                    I,
                    16,
                )
                .unwrap();
                dev.lora_train_grad_b_bf16(&dyt, &xa16, &mut db, &mut scratch_tc, 2.0, ROWS, I, 16)
                    .unwrap();
                dev.lora_train_grad_a_bf16(&dyb16, &xt, &mut da, &mut scratch_tc, 2.0, ROWS, D, 16)
                    .unwrap();
                sync(&dev)
            })
        },
    );

    // The GRPO loss over the scored tokens, and AdamW over a 0.5B r16 all-linear adapter.
    let logp = f32s(&dev, TOKENS, 29);
    let seq_of: Vec<i32> = (0..TOKENS as i32).map(|t| t / 256).collect();
    let seq_of = dev.upload(&seq_of).unwrap();
    let adv = f32s(&dev, SEQS, 30);
    let wts = dev.upload(&vec![1.0f64 / TOKENS as f64; SEQS]).unwrap();
    let mut grad = f32s(&dev, TOKENS, 0);
    let mut partials = dev.alloc_zeros::<f64>(grpo_loss_partials_len(TOKENS)).unwrap();
    let mut totals = dev.alloc_zeros::<f64>(rft::cuda::GRPO_FIELDS).unwrap();
    let scalars = GrpoLossScalars::from_config(&GrpoLossConfig::default());
    g.bench_function("grpo_loss_fwd_bwd_f32 16384 tokens", |b| {
        b.iter(|| {
            dev.grpo_loss_fwd_bwd_f32(
                &logp,
                None::<&CudaSlice<f32>>,
                None::<&CudaSlice<f32>>,
                &seq_of,
                &adv,
                &wts,
                &mut grad,
                None::<&mut CudaSlice<f32>>,
                &mut partials,
                &mut totals,
                TOKENS,
                SEQS,
                scalars,
            )
            .unwrap();
            sync(&dev)
        })
    });
    const P: usize = 8_798_208;
    let mut params = f32s(&dev, P, 31);
    let (mut m, mut v) = (f32s(&dev, P, 0), f32s(&dev, P, 0));
    let grads = f32s(&dev, P, 32);
    let mut npart = dev.alloc_zeros::<f64>(grad_norm_partials_len(P)).unwrap();
    let mut stats = dev.alloc_zeros::<f64>(2).unwrap();
    let sc = AdamW::default().scalars(1);
    g.bench_function("grad_sq_norm + adamw_step_f32 8.8M params", |b| {
        b.iter(|| {
            dev.grad_sq_norm_f32(&grads, &mut npart, &mut stats).unwrap();
            dev.adamw_step_f32(&mut params, &mut m, &mut v, &grads, Some(&stats), 1.0, &sc)
                .unwrap();
            sync(&dev)
        })
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
