//! cuBLASLt GEMM throughput on the GEMMs of one ViT-B MaPeT training step at batch 128:
//! M = 128 x 491 = 62848 token rows (344 content + 147 query rows per image), D = 768.
//!
//! Forward `y = x W^T + b` (q / proj, kv, fc1 with bias + GELU, fc2), backward `dX = dY W`
//! (fc2's with the GELU derivative and fc1's bias gradient fused) and weight gradients
//! `dW = dY^T x` in f32 with the bias gradient fused. Reports TFLOP/s (criterion's
//! "elements/s" is FLOP/s here) and prints the median TFLOP/s of each GEMM, timed with CUDA
//! events, and the time of all Linear GEMMs of one transformer block. Also the codebook
//! cross-entropy's three GEMMs on one chunk (3136 rows, V = 8192). Under each shape, the times of
//! the first 8 algorithms cuBLASLt's heuristic proposes for it (`Gemm::time_candidates`; #0 is the
//! one every call runs), and how far under #0 the fastest is. Without a GPU the CUDA group prints
//! why and is skipped; a small CPU sgemm bench runs everywhere.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use mapet::cuda::gemm::{flops, Epilogue, Gemm};
use mapet::cuda::{DeviceBuffer, Gpu};

const ROWS: usize = 128 * 491;
const D: usize = 768;
/// The cross-entropy's chunk rows and vocabulary at ViT-B, batch 128 (`ops::cross_entropy`).
const CE_CHUNK: usize = 3136;
const CE_VOCAB: usize = 8192;

#[derive(Clone, Copy)]
enum Kind {
    /// Forward with bias (`fwd_gelu`: bias + GELU, saving the pre-activation).
    Forward {
        gelu: bool,
    },
    /// dX = dY W (`dgelu`: times gelu'(pre); `bgrad`: with the bias gradient).
    DataGrad {
        dgelu: bool,
        bgrad: bool,
    },
    /// dW = dY^T x in f32, with the bias gradient.
    WeightGrad,
    /// The cross-entropy's GEMMs, no epilogue: logits = x W^T (bf16 out), and dW += dlogits^T x
    /// (f32 out, beta = 1). Its dx = dlogits W is `DataGrad` without epilogue.
    Logits,
    WeightGradAccumulate,
}

struct Shape {
    name: &'static str,
    /// How many times one transformer block runs this GEMM (q and proj share a shape); 0 for
    /// alternatives shown for comparison.
    per_block: u32,
    m: usize,
    n: usize,
    k: usize,
    kind: Kind,
}

fn shapes() -> Vec<Shape> {
    let f = |name, per_block, m, n, k, kind| Shape { name, per_block, m, n, k, kind };
    let dx = |dgelu, bgrad| Kind::DataGrad { dgelu, bgrad };
    vec![
        f("fwd q/proj 768->768", 2, ROWS, D, D, Kind::Forward { gelu: false }),
        f("fwd kv 768->1536", 1, ROWS, 2 * D, D, Kind::Forward { gelu: false }),
        f("fwd fc1 768->3072 +bias+gelu", 1, ROWS, 4 * D, D, Kind::Forward { gelu: true }),
        f("fwd fc2 3072->768", 1, ROWS, D, 4 * D, Kind::Forward { gelu: false }),
        f("dX q/proj", 2, ROWS, D, D, dx(false, false)),
        f("dX kv", 1, ROWS, D, 2 * D, dx(false, false)),
        f("dX fc1", 1, ROWS, D, 4 * D, dx(false, false)),
        f("dX fc2 +dgelu", 1, ROWS, 4 * D, D, dx(true, false)),
        f("dX fc2 +dgelu+bgrad (alt.)", 0, ROWS, 4 * D, D, dx(true, true)),
        f("dX fc2 plain (reference)", 0, ROWS, 4 * D, D, dx(false, false)),
        f("dW q/proj f32 +bgrad", 2, D, D, ROWS, Kind::WeightGrad),
        f("dW kv f32 +bgrad", 1, 2 * D, D, ROWS, Kind::WeightGrad),
        f("dW fc1 f32 +bgrad", 1, 4 * D, D, ROWS, Kind::WeightGrad),
        f("dW fc2 f32 +bgrad", 1, D, 4 * D, ROWS, Kind::WeightGrad),
        // The codebook cross-entropy's three GEMMs on one 3136-row chunk (V = 8192), not part
        // of a transformer block.
        f("ce logits x W^T", 0, CE_CHUNK, CE_VOCAB, D, Kind::Logits),
        f("ce dx dlogits W", 0, CE_CHUNK, D, CE_VOCAB, dx(false, false)),
        f("ce dW += dlogits^T x f32", 0, CE_VOCAB, D, CE_CHUNK, Kind::WeightGradAccumulate),
    ]
}

/// Pseudo-random bf16 values in [-1, 1) (xorshift; fast for hundreds of millions of values).
fn noise(len: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

struct Buffers {
    a: DeviceBuffer<bf16>,
    b: DeviceBuffer<bf16>,
    c: DeviceBuffer<bf16>,
    c32: DeviceBuffer<f32>,
    aux: DeviceBuffer<bf16>,
    bias: DeviceBuffer<bf16>,
    bias_grad: DeviceBuffer<f32>,
    bias_grad16: DeviceBuffer<bf16>,
}

fn buffers(gpu: &Gpu, s: &Shape) -> mapet::Result<Buffers> {
    let (m, n, k) = (s.m, s.n, s.k);
    let is_w = matches!(s.kind, Kind::WeightGrad | Kind::WeightGradAccumulate);
    let gelu = matches!(s.kind, Kind::Forward { gelu: true } | Kind::DataGrad { dgelu: true, .. });
    Ok(Buffers {
        a: gpu.upload(&noise(m * k, 1))?,
        b: gpu.upload(&noise(k * n, 2))?,
        c: gpu.alloc(if is_w { 1 } else { m * n })?,
        c32: gpu.zeros(if is_w { m * n } else { 1 })?,
        aux: if gelu { gpu.upload(&noise(m * n, 3))? } else { gpu.alloc(1)? },
        bias: gpu.upload(&noise(n, 4))?,
        bias_grad: gpu.alloc(m)?,
        bias_grad16: gpu.alloc(n)?,
    })
}

fn launch(gemm: &Gemm, s: &Shape, bf: &mut Buffers) -> mapet::Result<()> {
    let (m, n, k) = (s.m, s.n, s.k);
    match s.kind {
        Kind::Forward { gelu: false } => gemm.matmul(
            m,
            n,
            k,
            &bf.a,
            false,
            &bf.b,
            true,
            &mut bf.c,
            1.0,
            0.0,
            Epilogue::Bias { bias: (&bf.bias).into() },
        ),
        Kind::Forward { gelu: true } => gemm.matmul(
            m,
            n,
            k,
            &bf.a,
            false,
            &bf.b,
            true,
            &mut bf.c,
            1.0,
            0.0,
            Epilogue::BiasGelu { bias: (&bf.bias).into(), aux: &mut bf.aux },
        ),
        Kind::DataGrad { dgelu: false, .. } => {
            gemm.matmul(m, n, k, &bf.a, false, &bf.b, false, &mut bf.c, 1.0, 0.0, Epilogue::None)
        }
        Kind::DataGrad { dgelu: true, bgrad: false } => {
            gemm.matmul(m, n, k, &bf.a, false, &bf.b, false, &mut bf.c, 1.0, 0.0, Epilogue::DGelu { aux: &bf.aux })
        }
        Kind::DataGrad { dgelu: true, bgrad: true } => gemm.matmul(
            m,
            n,
            k,
            &bf.a,
            false,
            &bf.b,
            false,
            &mut bf.c,
            1.0,
            0.0,
            Epilogue::DGeluBiasGrad { aux: &bf.aux, bias_grad: (&mut bf.bias_grad16).into() },
        ),
        Kind::Logits => gemm.matmul(m, n, k, &bf.a, false, &bf.b, true, &mut bf.c, 1.0, 0.0, Epilogue::None),
        Kind::WeightGradAccumulate => {
            gemm.matmul_f32_out(m, n, k, &bf.a, true, &bf.b, false, &mut bf.c32, 1.0, 1.0, Epilogue::None)
        }
        Kind::WeightGrad => gemm.matmul_f32_out(
            m,
            n,
            k,
            &bf.a,
            true,
            &bf.b,
            false,
            &mut bf.c32,
            1.0,
            1.0,
            Epilogue::BiasGradFromA { bias_grad: (&mut bf.bias_grad).into() },
        ),
    }
}

fn cuda_gemms(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP cuda gemm benches: {e}");
            return;
        }
    };
    let gemm = match Gemm::new(&gpu) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP cuda gemm benches: {e}");
            return;
        }
    };
    println!("cuBLASLt GEMMs on {} (M = {ROWS} rows)", gpu.name());
    let mut summary = Vec::new();
    let mut group = c.benchmark_group("gemm_vitb_b128");
    for s in shapes() {
        let mut bf = match buffers(&gpu, &s) {
            Ok(b) => b,
            Err(e) => {
                println!("SKIP {}: {e}", s.name);
                continue;
            }
        };
        if let Err(e) = launch(&gemm, &s, &mut bf).and_then(|_| gpu.synchronize()) {
            println!("FAIL {}: {e}", s.name);
            continue;
        }
        let fl = flops(s.m, s.n, s.k);
        group.throughput(Throughput::Elements(fl));
        group.bench_function(s.name, |bench| {
            bench.iter_custom(|iters| {
                let start = gpu.timing_event().unwrap();
                let stop = gpu.timing_event().unwrap();
                start.record(gpu.stream()).unwrap();
                for _ in 0..iters {
                    launch(&gemm, &s, &mut bf).unwrap();
                }
                stop.record(gpu.stream()).unwrap();
                Duration::from_secs_f64(start.elapsed_ms(&stop).unwrap() as f64 / 1e3)
            })
        });
        let times = gpu.time_ms(3, 21, || launch(&gemm, &s, &mut bf)).unwrap();
        let median = times[times.len() / 2] as f64;
        let tflops = fl as f64 / (median * 1e-3) / 1e12;
        println!("{:<32} m={:>6} n={:>5} k={:>6}: {:>8.3} ms  {:>7.1} TFLOP/s", s.name, s.m, s.n, s.k, median, tflops);
        // The heuristic's other proposals for the shape (rank 0 is the one above): whether its
        // first choice leaves time unused.
        match gemm.time_candidates(&gpu, 8, 11, || launch(&gemm, &s, &mut bf)) {
            Ok(ranks) => {
                let line: Vec<String> = ranks.iter().map(|c| c.to_string()).collect();
                if let Some(best) = ranks.iter().min_by(|a, b| a.ms.total_cmp(&b.ms)) {
                    let base = ranks.first().map_or(best.ms, |x| x.ms);
                    println!(
                        "RESULT gemm {}: candidates (ms, configuration) {}; fastest #{}, {:.1}% under #0",
                        s.name,
                        line.join(", "),
                        best.rank,
                        100.0 * (1.0 - best.ms / base)
                    );
                }
            }
            Err(e) => println!("RESULT gemm {}: candidates: {e}", s.name),
        }
        summary.push((s.name, s.per_block, median, tflops));
    }
    group.finish();
    let block_ms: f64 = summary.iter().map(|s| s.1 as f64 * s.2).sum();
    println!("\nsummary (median of 21, CUDA events) on {}:", gpu.name());
    for (name, per_block, ms, tf) in &summary {
        println!("  {name:<32} x{per_block} {ms:>8.3} ms {tf:>7.1} TFLOP/s");
    }
    println!("  Linear GEMMs of one block (forward + backward, counts x above): {block_ms:.3} ms");
}

fn cpu_sgemm(c: &mut Criterion) {
    let n = 256;
    let a: Vec<f32> = noise(n * n, 5).into_iter().map(f32::from).collect();
    let b: Vec<f32> = noise(n * n, 6).into_iter().map(f32::from).collect();
    let mut out = vec![0.0f32; n * n];
    let mut group = c.benchmark_group("cpu_sgemm");
    group.throughput(Throughput::Elements(flops(n, n, n)));
    group.bench_function("256x256x256", |bench| {
        bench.iter(|| mapet::cpu::sgemm(n, n, n, 1.0, &a, &b, true, 0.0, &mut out))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    targets = cuda_gemms, cpu_sgemm
}
criterion_main!(benches);
