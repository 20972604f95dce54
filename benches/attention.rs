//! Two-stream attention throughput at the ViT-T/S/B MaPeT shapes: B = 128, head dim 64, N = 197,
//! C = 50 (491 query rows against 344 keys). FLOPs are counted over visible (row, key) pairs only:
//! every row sees exactly N keys, so forward = 4 * B * H * 491 * 197 * 64 and backward 2.5x that.
//! Without a GPU this times the CPU reference on a small shape instead.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::attention::{self, AttentionKernels, AttentionShape};
use mapet::ops::KernelChoice;
use mapet::testing;

fn visible_flops(s: &AttentionShape) -> u64 {
    4 * (s.batch * s.heads * s.q_rows() * s.n_tokens * s.head_dim) as u64
}

/// Plain lines with the median and TFLOP/s (criterion reports elements/s) of `run(false)`, the
/// forward alone, and `run(true)`, followed by the backward; then the backward alone (the
/// difference).
fn print_results(gpu: &Gpu, shape: &str, label: &str, flops: u64, mut run: impl FnMut(bool) -> mapet::Result<()>) {
    let mut medians = [0.0f64; 2];
    for (i, (what, fl, bwd)) in
        [("forward", flops, false), ("forward+backward", flops * 7 / 2, true)].into_iter().enumerate()
    {
        let t = match gpu.time_ms(5, 50, || run(bwd)) {
            Ok(t) => t,
            Err(e) => {
                println!("RESULT attention {shape} {label} {what}: failed: {e}");
                return;
            }
        };
        let med = t[t.len() / 2] as f64;
        medians[i] = med;
        println!(
            "RESULT attention {shape} {label} {what}: median {med:.4} ms, {:.1} TFLOP/s (visible pairs), {}",
            fl as f64 / med / 1e9,
            gpu.name()
        );
    }
    println!("RESULT attention {shape} {label} backward (difference): {:.4} ms", medians[1] - medians[0]);
}

fn gpu_benches(c: &mut Criterion, gpu: &Gpu) {
    // A set whose tests hung can be left out (`MAPET_BENCH_ATTENTION_SETS=tiled,resident`): its
    // first launch here would end the bench.
    let sets = AttentionKernels::listed_in("MAPET_BENCH_ATTENTION_SETS").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = testing::rng("bench attention");
    for (name, heads) in [("vit-b", 12), ("vit-s", 6), ("vit-t", 3)] {
        let s = AttentionShape { batch: 128, heads, head_dim: 64, n_tokens: 197, n_context: 50 };
        let d = s.model_dim();
        let (lq, lk) = (s.batch * s.q_rows() * d, s.batch * s.k_rows() * d);
        let q = gpu.upload_bf16(&testing::uniform(&mut rng, lq, 1.5)).unwrap();
        let k = gpu.upload_bf16(&testing::uniform(&mut rng, lk, 1.5)).unwrap();
        let v = gpu.upload_bf16(&testing::uniform(&mut rng, lk, 1.0)).unwrap();
        let d_o = gpu.upload_bf16(&testing::uniform(&mut rng, lq, 1.0)).unwrap();
        let mut o: DeviceBuffer<half::bf16> = gpu.alloc(lq).unwrap();
        let mut lse: DeviceBuffer<f32> = gpu.alloc(s.batch * s.heads * s.q_rows()).unwrap();
        let (mut dq, mut dk, mut dv) = (gpu.alloc(lq).unwrap(), gpu.alloc(lk).unwrap(), gpu.alloc(lk).unwrap());
        let flops = visible_flops(&s);

        for &kernels in &sets {
            let kn = kernels.name();
            // A set that fails is reported, and the bench goes on with the others.
            // A set whose kernels hang ends the bench here, with a HUNG line naming them.
            let trial = attention::cuda_forward(gpu, kernels, &s, &q, &k, &v, &mut o, &mut lse)
                .and_then(|()| testing::finish_or_exit(gpu, &format!("attention {name} {kn} forward")))
                .and_then(|()| {
                    attention::cuda_backward(gpu, kernels, &s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv)
                })
                .and_then(|()| testing::finish_or_exit(gpu, &format!("attention {name} {kn} backward")));
            if let Err(e) = trial {
                println!("RESULT attention {name} {kn}: failed: {e}");
                continue;
            }
            let mut g = c.benchmark_group(format!("attention/{name}/{kn}"));
            g.sample_size(20);
            g.throughput(Throughput::Elements(flops));
            g.bench_function("forward", |b| {
                b.iter_custom(|iters| {
                    let t = gpu
                        .time_ms(2, iters as usize, || {
                            attention::cuda_forward(gpu, kernels, &s, &q, &k, &v, &mut o, &mut lse)
                        })
                        .unwrap();
                    std::time::Duration::from_secs_f64(t.iter().map(|&x| x as f64).sum::<f64>() / 1e3)
                })
            });
            g.throughput(Throughput::Elements(flops * 7 / 2));
            g.bench_function("forward+backward", |b| {
                b.iter_custom(|iters| {
                    let t = gpu
                        .time_ms(2, iters as usize, || {
                            attention::cuda_forward(gpu, kernels, &s, &q, &k, &v, &mut o, &mut lse)?;
                            attention::cuda_backward(
                                gpu, kernels, &s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv,
                            )
                        })
                        .unwrap();
                    std::time::Duration::from_secs_f64(t.iter().map(|&x| x as f64).sum::<f64>() / 1e3)
                })
            });
            g.finish();
            print_results(gpu, name, kn, flops, |bwd_too| {
                attention::cuda_forward(gpu, kernels, &s, &q, &k, &v, &mut o, &mut lse)?;
                if bwd_too {
                    attention::cuda_backward(gpu, kernels, &s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv)?;
                }
                Ok(())
            });
        }
        // The RESULT lines of `label`: the forward of the set `fwd`, and with it the backward of `bwd`.
        let mut time_sets = |label: &str, fwd: AttentionKernels, bwd: AttentionKernels| {
            print_results(gpu, name, label, flops, |bwd_too| {
                attention::cuda_forward(gpu, fwd, &s, &q, &k, &v, &mut o, &mut lse)?;
                if bwd_too {
                    attention::cuda_backward(gpu, bwd, &s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv)?;
                }
                Ok(())
            })
        };
        // The forward of one set with the backward of another (MAPET_ATTENTION_BACKWARD_KERNELS),
        // at ViT-B: where one direction of a set wins and the other does not.
        if name == "vit-b" {
            for (fwd, bwd) in [
                (AttentionKernels::Wgmma, AttentionKernels::Resident),
                (AttentionKernels::Resident, AttentionKernels::Wgmma),
            ] {
                if sets.contains(&fwd) && sets.contains(&bwd) {
                    time_sets(&format!("{}/{}", fwd.name(), bwd.name()), fwd, bwd);
                }
            }
        }
        // Which dK/dV kernel the balanced set ran, and whether its plan shares a run (so that its
        // lines above timed the hand-off).
        if sets.contains(&AttentionKernels::WgmmaBalanced) {
            let dkdv = attention::cuda_dkdv_kernel(gpu, AttentionKernels::WgmmaBalanced, &s);
            println!("RESULT attention {name} wgmma-balanced dK/dV kernel (name, shares a run): {dkdv:?}");
        }
        // The default set as programmatic dependent launches (compute capability 9.0), at ViT-B:
        // each kernel's launch and start overlap the end of the one before (Gpu::launch_dependent).
        if name == "vit-b" && sets.contains(&AttentionKernels::Wgmma) {
            gpu.set_dependent_launches(true);
            if gpu.dependent_launches() {
                time_sets("wgmma (dependent launches)", AttentionKernels::Wgmma, AttentionKernels::Wgmma);
            }
            gpu.set_dependent_launches(false);
        }
        // The wgmma kernels sending the next wave's rows to L2 (Gpu::set_next_wave_to_l2,
        // MAPET_L2_AHEAD), at ViT-B: the default set's forward (the `_l2` twin), and its backward
        // (dQ's twin and the dK/dV kernel) and the fused set's.
        if name == "vit-b" {
            let asked = gpu.next_wave_to_l2();
            gpu.set_next_wave_to_l2(true);
            for kernels in [AttentionKernels::Wgmma, AttentionKernels::WgmmaFused] {
                if sets.contains(&kernels) {
                    time_sets(&format!("{} (next wave to L2)", kernels.name()), kernels, kernels);
                }
            }
            gpu.set_next_wave_to_l2(asked);
        }
        // How many CTAs of the dK/dV kernel an SM holds (registers bound it).
        let kernel = "mapet_attention_bwd_dkdv";
        let per_sm = gpu
            .function("attention", kernel)
            .and_then(|f| Ok(f.occupancy_max_active_blocks_per_multiprocessor(attention::CUDA_THREADS, 0, None)?));
        println!("RESULT attention {kernel}: {per_sm:?} CTAs per SM, {}", gpu.name());
    }
}

fn cpu_bench(c: &mut Criterion) {
    let s = AttentionShape { batch: 2, heads: 2, head_dim: 64, n_tokens: 50, n_context: 13 };
    let mut rng = testing::rng("bench attention cpu");
    let d = s.model_dim();
    let q = testing::uniform(&mut rng, s.batch * s.q_rows() * d, 1.0);
    let k = testing::uniform(&mut rng, s.batch * s.k_rows() * d, 1.0);
    let v = testing::uniform(&mut rng, s.batch * s.k_rows() * d, 1.0);
    let mut o = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.batch * s.heads * s.q_rows()];
    let mut g = c.benchmark_group("attention/cpu-reference");
    g.sample_size(10);
    g.throughput(Throughput::Elements(visible_flops(&s)));
    g.bench_function("forward B=2 H=2 N=50", |b| {
        b.iter(|| attention::cpu_forward(&s, &q, &k, &v, &mut o, &mut lse).unwrap())
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    match Gpu::first() {
        Ok(gpu) => gpu_benches(c, &gpu),
        Err(e) => println!("attention GPU benches skipped: {e}"),
    }
    cpu_bench(c);
}

criterion_group!(group, benches);
criterion_main!(group);
