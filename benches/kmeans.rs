//! k-means. On a GPU at k-CLIP's codebook size (k = 8192, timed with CUDA events): the
//! assignment of one million points of dimension 768, the size of the tokenizer's target
//! (throughput counts the GEMM's flops), and the centroid update (bytes of points read). On the CPU: the exact assignment and one Lloyd run of a
//! small codebook.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::gemm::{flops, Gemm};
use mapet::cuda::Gpu;
use mapet::ops::kmeans;
use mapet::testing::{filler, gpu_time};

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping GPU k-means benches: {e}");
            return;
        }
    };
    let gemm = Gemm::new(&gpu).unwrap();
    let (n, k, dim) = (1_000_000usize, 8192usize, 768usize);
    let points = gpu.upload_bf16(&filler(n * dim, 1)).unwrap();
    let centroids = gpu.upload_bf16(&filler(k * dim, 2)).unwrap();
    let mut ids = gpu.alloc::<u32>(n).unwrap();
    let mut sq = gpu.alloc::<f32>(n).unwrap();
    kmeans::cuda_assign(&gpu, &gemm, &points, dim, &centroids, &mut ids, &mut sq).unwrap();
    let mut c32 = gpu.alloc::<f32>(k * dim).unwrap();
    let mut c16 = gpu.alloc::<half::bf16>(k * dim).unwrap();

    let mut g = c.benchmark_group(format!("kmeans_gpu/{}", gpu.name()));
    g.throughput(Throughput::Elements(flops(n, k, dim)));
    g.bench_function("assign_1000000x8192x768", |b| {
        b.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                kmeans::cuda_assign(&gpu, &gemm, &points, dim, &centroids, &mut ids, &mut sq).unwrap();
            })
        })
    });
    g.throughput(Throughput::Bytes((n * dim * 2) as u64));
    g.bench_function("update_1000000x8192x768", |b| {
        b.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                std::hint::black_box(kmeans::cuda_update(&gpu, &points, dim, &ids, &mut c32, &mut c16).unwrap());
            })
        })
    });
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let (n, k, dim) = (8192usize, 512usize, 128usize);
    let points = filler(n * dim, 1);
    let centroids = filler(k * dim, 2);
    let mut g = c.benchmark_group("kmeans_cpu");
    g.throughput(Throughput::Elements(flops(n, k, dim)));
    g.bench_function("assign_8192x512x128", |b| {
        b.iter(|| std::hint::black_box(kmeans::assign(&points, dim, &centroids).unwrap()))
    });
    g.bench_function("lloyd_5_iterations_8192x512x128", |b| {
        b.iter(|| std::hint::black_box(kmeans::lloyd(&points, dim, &centroids, 5).unwrap()))
    });
    g.finish();
}

criterion_group! { name = benches; config = common::config(); targets = gpu_benches, cpu_benches }
criterion_main!(benches);
