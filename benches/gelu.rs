//! GELU forward and backward. On a GPU at the model's MLP size (62848 x 3072), timed with CUDA
//! events; on the CPU at a small size. Throughput counts the bytes each op must move.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::Gpu;
use mapet::ops::gelu;
use mapet::testing::{filler, gpu_time};

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping GPU GELU benches: {e}");
            return;
        }
    };
    let n = 62848usize * 3072;
    let x = gpu.upload_bf16(&filler(n, 1)).unwrap();
    let dy = gpu.upload_bf16(&filler(n, 2)).unwrap();
    let mut out = gpu.alloc(n).unwrap();
    let mut g = c.benchmark_group(format!("gelu_gpu/{}", gpu.name()));
    g.throughput(Throughput::Bytes(n as u64 * 4));
    g.bench_function("forward_62848x3072", |b| {
        b.iter_custom(|iters| gpu_time(&gpu, iters, || gelu::cuda_forward(&gpu, &x, &mut out).unwrap()))
    });
    g.throughput(Throughput::Bytes(n as u64 * 6));
    g.bench_function("backward_62848x3072", |b| {
        b.iter_custom(|iters| gpu_time(&gpu, iters, || gelu::cuda_backward(&gpu, &x, &dy, &mut out).unwrap()))
    });
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let n = 1 << 16;
    let x = filler(n, 1);
    let dy = filler(n, 2);
    let mut out = vec![0.0f32; n];
    let mut g = c.benchmark_group("gelu_cpu");
    g.throughput(Throughput::Bytes(n as u64 * 8));
    g.bench_function("forward_65536", |b| b.iter(|| gelu::cpu_forward(&x, &mut out).unwrap()));
    g.throughput(Throughput::Bytes(n as u64 * 12));
    g.bench_function("backward_65536", |b| b.iter(|| gelu::cpu_backward(&x, &dy, &mut out).unwrap()));
    g.finish();
}

criterion_group! { name = benches; config = common::config(); targets = gpu_benches, cpu_benches }
criterion_main!(benches);
