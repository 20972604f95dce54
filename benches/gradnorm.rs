//! Global L2 norm. On a GPU over 86M f32 (ViT-B's gradient), timed with CUDA events (each run
//! ends with the 4-byte read-back, as in training); on the CPU over 1M values. Throughput counts
//! the bytes read.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::Gpu;
use mapet::ops::gradnorm;
use mapet::testing::{filler, gpu_time};

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping GPU gradient-norm benches: {e}");
            return;
        }
    };
    let n = 86_000_000usize;
    let x = gpu.upload(&filler(n, 1)).unwrap();
    let mut g = c.benchmark_group(format!("gradnorm_gpu/{}", gpu.name()));
    g.throughput(Throughput::Bytes(n as u64 * 4));
    g.bench_function("l2_norm_86M", |b| {
        b.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                std::hint::black_box(gradnorm::cuda_l2_norm(&gpu, &x).unwrap());
            })
        })
    });
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let n = 1 << 20;
    let x = filler(n, 1);
    let mut g = c.benchmark_group("gradnorm_cpu");
    g.throughput(Throughput::Bytes(n as u64 * 4));
    g.bench_function("l2_norm_1M", |b| b.iter(|| std::hint::black_box(gradnorm::cpu_l2_norm(&x))));
    g.finish();
}

criterion_group! { name = benches; config = common::config(); targets = gpu_benches, cpu_benches }
criterion_main!(benches);
