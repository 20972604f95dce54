//! One AdamW step over a flat parameter buffer. On a GPU at ViT-B size (86M parameters) with the
//! bf16 copy, timed with CUDA events; on the CPU over 1M parameters. Throughput counts the bytes
//! each step must move: read param, grad, m, v, mask; write param, m, v and the bf16 copy.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::Gpu;
use mapet::ops::adamw::{self, AdamWStep};
use mapet::testing::gpu_time;

/// Bytes per parameter: 4 x 4 read + 1 mask + 3 x 4 written + 2 (bf16 copy).
const BYTES_PER_PARAM: u64 = 31;

/// Deterministic, cheap filler in [-scale, scale).
fn filler(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            scale * ((s >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        })
        .collect()
}

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping GPU AdamW benches: {e}");
            return;
        }
    };
    let n = 86_000_000usize;
    let mut p = gpu.upload(&filler(n, 1, 0.1)).unwrap();
    let g = gpu.upload(&filler(n, 2, 0.01)).unwrap();
    let (mut m, mut v) = (gpu.zeros::<f32>(n).unwrap(), gpu.zeros::<f32>(n).unwrap());
    let mask = gpu.upload(&(0..n).map(|i| (i % 3 != 0) as u8).collect::<Vec<u8>>()).unwrap();
    let mut copy = gpu.alloc(n).unwrap();
    let st = AdamWStep::new(1e-4, 10);
    let mut grp = c.benchmark_group(format!("adamw_gpu/{}", gpu.name()));
    grp.throughput(Throughput::Bytes(n as u64 * BYTES_PER_PARAM));
    grp.bench_function("step_86M_with_bf16_copy", |b| {
        b.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                adamw::cuda_step(&gpu, &mut p, &g, &mut m, &mut v, &mask, &st, Some(&mut copy)).unwrap()
            })
        })
    });
    grp.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let n = 1 << 20;
    let mut p = filler(n, 1, 0.1);
    let g = filler(n, 2, 0.01);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mask: Vec<u8> = (0..n).map(|i| (i % 3 != 0) as u8).collect();
    let mut copy = vec![0.0f32; n];
    let st = AdamWStep::new(1e-4, 10);
    let mut grp = c.benchmark_group("adamw_cpu");
    grp.throughput(Throughput::Bytes(n as u64 * (BYTES_PER_PARAM + 2)));
    grp.bench_function("step_1M_with_copy", |b| {
        b.iter(|| adamw::cpu_step(&mut p, &g, &mut m, &mut v, &mask, &st, Some(&mut copy)).unwrap())
    });
    grp.finish();
}

criterion_group! { name = benches; config = common::config(); targets = gpu_benches, cpu_benches }
criterion_main!(benches);
