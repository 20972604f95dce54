//! LayerNorm forward, backward and residual + forward. On a GPU at the model's size (62848 rows
//! of 768: ViT-B, batch 128, both streams), timed with CUDA events; on the CPU at a small size.
//! Throughput is the minimal number of bytes each op must move, so criterion reports GB/s.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::Gpu;
use mapet::ops::layernorm;
use mapet::testing::{filler, gpu_time};

const EPS: f32 = 1e-6;

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping GPU LayerNorm benches: {e}");
            return;
        }
    };
    let (rows, cols) = (62848usize, 768usize);
    let n = rows * cols;
    let x = gpu.upload_bf16(&filler(n, 1)).unwrap();
    let r = gpu.upload_bf16(&filler(n, 2)).unwrap();
    let dy = gpu.upload_bf16(&filler(n, 3)).unwrap();
    let w = gpu.upload(&filler(cols, 4)).unwrap();
    let b = gpu.upload(&filler(cols, 5)).unwrap();
    let mut y = gpu.alloc(n).unwrap();
    let mut h = gpu.alloc(n).unwrap();
    let mut dx = gpu.alloc(n).unwrap();
    let (mut mean, mut rstd) = (gpu.alloc(rows).unwrap(), gpu.alloc(rows).unwrap());
    let (mut dw, mut db) = (gpu.zeros(cols).unwrap(), gpu.zeros(cols).unwrap());
    let stats = (rows * 8) as u64;
    let params = (cols * 8) as u64;

    let mut g = c.benchmark_group(format!("layernorm_gpu/{}", gpu.name()));
    g.throughput(Throughput::Bytes(n as u64 * 4 + stats + params));
    g.bench_function("forward_62848x768", |bch| {
        bch.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                layernorm::cuda_forward(&gpu, &x, &w, &b, EPS, rows, cols, &mut y, &mut mean, &mut rstd).unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes(n as u64 * 6 + stats + 3 * params));
    g.bench_function("backward_62848x768", |bch| {
        bch.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                layernorm::cuda_backward(&gpu, &x, &dy, &w, &mean, &rstd, rows, cols, &mut dx, false, &mut dw, &mut db)
                    .unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes(n as u64 * 8 + stats + params));
    g.bench_function("residual_forward_62848x768", |bch| {
        bch.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                layernorm::cuda_residual_forward(
                    &gpu, &r, &x, &w, &b, EPS, rows, cols, &mut h, &mut y, &mut mean, &mut rstd,
                )
                .unwrap()
            })
        })
    });
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let (rows, cols) = (256usize, 768usize);
    let n = rows * cols;
    let x = filler(n, 1);
    let dy = filler(n, 3);
    let w = filler(cols, 4);
    let b = filler(cols, 5);
    let (mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    let (mut dw, mut db) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    let mut g = c.benchmark_group("layernorm_cpu");
    g.throughput(Throughput::Bytes((n * 8) as u64));
    g.bench_function("forward_256x768", |bch| {
        bch.iter(|| layernorm::cpu_forward(&x, &w, &b, EPS, rows, cols, &mut y, &mut mean, &mut rstd).unwrap())
    });
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("backward_256x768", |bch| {
        bch.iter(|| {
            layernorm::cpu_backward(&x, &dy, &w, &mean, &rstd, rows, cols, &mut dx, false, &mut dw, &mut db).unwrap()
        })
    });
    g.finish();
}

criterion_group! { name = benches; config = common::config(); targets = gpu_benches, cpu_benches }
criterion_main!(benches);
