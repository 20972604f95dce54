//! The warp-specialised TMA + wgmma GEMM (`cuda::hopper::gemm_tn`) against cuBLASLt on the same
//! C = A Bᵀ (bf16 in and out, f32 accumulation), at the shapes its fused successors would take:
//! the cross-entropy's logits GEMM per chunk (3136 x 8192 x 768), the patch embedding's
//! (25088 x 768 x 768) and a square 4096³. Prints the median time of each from CUDA events and
//! the ratio. Needs a compute capability 9.0 device; elsewhere it says why and does nothing.
//!
//! Then the dQ-reduction measurement (`cuda::hopper::dq_reduce`) at ViT-B's attention: 1536
//! (sample, head) pairs of 491 rows, 24 tiles of 64 x 32 f32 a warpgroup (the wgmma dK/dV
//! kernel's 71 position chunks a pair, over its three warpgroups), each way of adding them
//! against the baseline that only zeroes, converts and discards. The difference is what a fused
//! attention backward would spend on accumulating dQ, at most (nothing else runs beside it).

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use mapet::cuda::gemm::{flops, Epilogue, Gemm};
use mapet::cuda::hopper::{dq_reduce, dq_reduce_positions, gemm_tn, DqReduce};
use mapet::testing::{finish_or_exit, gpu_or_skip, rng, uniform};

fn gpu(_c: &mut Criterion) {
    let Some(gpu) = gpu_or_skip("bench hopper") else { return };
    if gpu.compute_capability() != (9, 0) {
        println!("bench hopper: {} is not compute capability 9.0; nothing to time", gpu.name());
        return;
    }
    let gemm = Gemm::new(&gpu).expect("cuBLASLt");
    let mut r = rng("bench hopper");
    for (name, m, n, k) in [
        ("cross-entropy logits chunk", 3136, 8192, 768),
        ("patch embedding", 25088, 768, 768),
        ("square", 4096, 4096, 4096),
    ] {
        let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let a = gpu.upload(&to_bf16(uniform(&mut r, m * k, 1.0))).unwrap();
        let b = gpu.upload(&to_bf16(uniform(&mut r, n * k, 1.0))).unwrap();
        let mut c = gpu.alloc::<bf16>(m * n).unwrap();
        // One call first: an error (a kernel fault is sticky) ends the bench with a line; a hang
        // within 20 s, with a HUNG line.
        let trial = gemm_tn(&gpu, &a, &b, &mut c, m, n, k)
            .and_then(|()| finish_or_exit(&gpu, &format!("gemm_tn {m} x {n} x {k}")));
        if let Err(e) = trial {
            println!("RESULT hopper gemm_tn {name} ({m} x {n} x {k}): failed: {e}");
            return;
        }
        let ours = gpu.time_ms(3, 20, || gemm_tn(&gpu, &a, &b, &mut c, m, n, k)).unwrap();
        let theirs =
            gpu.time_ms(3, 20, || gemm.matmul(m, n, k, &a, false, &b, true, &mut c, 1.0, 0.0, Epilogue::None)).unwrap();
        let (t_ours, t_theirs) = (ours[ours.len() / 2], theirs[theirs.len() / 2]);
        let tflops = |ms: f32| flops(m, n, k) as f64 / (ms as f64 * 1e-3) / 1e12;
        println!(
            "RESULT hopper gemm_tn {name} ({m} x {n} x {k}) on {}: {t_ours:.4} ms ({:.0} TFLOP/s); cuBLASLt {t_theirs:.4} ms \\
             ({:.0} TFLOP/s); {:.2}x cuBLASLt's time",
            gpu.name(),
            tflops(t_ours),
            tflops(t_theirs),
            t_ours / t_theirs
        );
    }
}

fn dq_reduction(_c: &mut Criterion) {
    let Some(gpu) = gpu_or_skip("bench hopper dq_reduce") else { return };
    if gpu.compute_capability() != (9, 0) {
        println!("bench hopper dq_reduce: {} is not compute capability 9.0; nothing to time", gpu.name());
        return;
    }
    let (pairs, lq, items) = (128 * 12, 491, 24);
    let mut acc = gpu.alloc::<f32>(pairs * 64 * dq_reduce_positions(lq)).unwrap();
    let mut dq = gpu.alloc::<bf16>(pairs * lq * 64).unwrap();
    let reduced_mb = (pairs * 3 * items * 64 * 32 * 4) as f64 / 1e6;
    let mut baseline = None;
    for mode in DqReduce::ALL {
        let what = format!(
            "RESULT hopper dq_reduce ViT-B ({pairs} pairs of {lq} rows, {items} tiles a warpgroup), {}",
            mode.name()
        );
        let trial = dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, items, mode)
            .and_then(|()| finish_or_exit(&gpu, &format!("dq_reduce {mode:?}")));
        if let Err(e) = trial {
            println!("{what}: failed: {e}");
            return;
        }
        let times = gpu.time_ms(3, 20, || dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, items, mode)).unwrap();
        let t = times[times.len() / 2];
        match baseline {
            None => {
                println!("{what} on {}: {t:.4} ms", gpu.name());
                baseline = Some(t);
            }
            Some(base) => {
                let extra = t - base;
                println!(
                    "{what} on {}: {t:.4} ms; {extra:.4} ms over the baseline for {reduced_mb:.0} MB ({:.2} TB/s)",
                    gpu.name(),
                    reduced_mb / 1e6 / (extra.max(1e-6) as f64 * 1e-3)
                );
            }
        }
    }
}

criterion_group!(benches, gpu, dq_reduction);
criterion_main!(benches);
