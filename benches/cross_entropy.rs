//! Criterion benches of the codebook cross-entropy (decoder head + loss).
//!
//! - CPU reference at a small size (runs anywhere): forward, forward + backward.
//! - GPU at the ViT-B pre-training size, R = 18816 rows (128 images x 147 predicted tokens),
//!   D = 768, V = 8192: forward and forward + backward. Prints the median time from timing
//!   events, the GEMM throughput it implies, and the extra device memory of each variant; then
//!   the same queued (timed as the PyTorch peers are), with other chunk sizes, with cuBLASLt
//!   candidates other than the heuristic's first for the three GEMMs (chosen on the whole call),
//!   and with the forward split into passes (sub-chunks).
//!   Skipped (with the reason printed) where no GPU is usable.

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use mapet::cuda::gemm::{pin_text, Gemm, Pin, PinChoice};
use mapet::cuda::DeviceBuffer;
use mapet::error::Error;
use mapet::ops::cross_entropy::{
    cpu_backward, cpu_forward, cuda_forward, cuda_forward_backward, cuda_forward_backward_queued, cuda_forward_queued,
    CpuRowOutputs, CrossEntropyShape, CudaRowOutputs,
};
use mapet::testing::{gpu_or_skip, rng, uniform, uniform_bf16};
use rand::Rng;

fn targets(rng: &mut impl Rng, rows: usize, vocab: usize) -> Vec<i32> {
    (0..rows).map(|_| rng.random_range(0..vocab as i32)).collect()
}

fn cpu(c: &mut Criterion) {
    let (rows, dim, vocab) = (256, 64, 512);
    let shape = CrossEntropyShape::new(rows, dim, vocab);
    let mut rng = rng("bench cross_entropy cpu");
    let x = uniform(&mut rng, rows * dim, 1.0);
    let w = uniform(&mut rng, vocab * dim, 0.1);
    let b = uniform(&mut rng, vocab, 0.1);
    let t = targets(&mut rng, rows, vocab);
    let mut out = CpuRowOutputs::new(rows);
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * dim], vec![0.0; vocab * dim], vec![0.0; vocab]);
    let mut group = c.benchmark_group(format!("cross_entropy_cpu_r{rows}_d{dim}_v{vocab}"));
    group.sample_size(10);
    group.bench_function("forward", |bench| bench.iter(|| cpu_forward(&shape, &x, &w, &b, &t, &mut out).unwrap()));
    group.bench_function("forward_backward", |bench| {
        bench.iter(|| cpu_backward(&shape, &x, &w, &b, &t, 1.0, &mut dx, &mut dw, &mut db).unwrap())
    });
    group.finish();
}

fn gpu(c: &mut Criterion) {
    let Some(gpu) = gpu_or_skip("bench cross_entropy gpu") else { return };
    let gemm = Gemm::new(&gpu).expect("cuBLASLt");
    let (rows, dim, vocab) = (18816, 768, 8192);
    let shape = CrossEntropyShape::new(rows, dim, vocab);
    let mut rng = rng("bench cross_entropy gpu");
    let x = gpu.upload_bf16(&uniform_bf16(&mut rng, rows * dim, 1.0)).unwrap();
    let w = gpu.upload_bf16(&uniform_bf16(&mut rng, vocab * dim, 0.05)).unwrap();
    let b = gpu.upload(&uniform(&mut rng, vocab, 0.1)).unwrap();
    let t = targets(&mut rng, rows, vocab);
    let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
    let mut dx = gpu.alloc::<bf16>(rows * dim).unwrap();
    let mut dw = gpu.zeros::<f32>(vocab * dim).unwrap();
    let mut db = gpu.zeros::<f32>(vocab).unwrap();

    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    let flops = 2.0 * rows as f64 * dim as f64 * vocab as f64;
    let fwd = gpu.time_ms(3, 20, || cuda_forward(&gpu, &gemm, &shape, &x, &w, &b, &t, &mut out).map(|_| ())).unwrap();
    let both = gpu
        .time_ms(3, 20, || {
            cuda_forward_backward(&gpu, &gemm, &shape, &x, &w, &b, &t, 1.0, &mut out, &mut dx, &mut dw, &mut db)
                .map(|_| ())
        })
        .unwrap();
    let (f, fb) = (fwd[fwd.len() / 2], both[both.len() / 2]);
    println!(
        "RESULT cross_entropy on {} (R {rows}, D {dim}, V {vocab}, {} rows per chunk):\n\
         RESULT cross_entropy forward          {f:.3} ms median ({:.0} TFLOP/s in its GEMM), extra device memory {:.1} MiB\n\
         RESULT cross_entropy forward+backward {fb:.3} ms median ({:.0} TFLOP/s in its 3 GEMMs), extra device memory {:.1} MiB",
        gpu.name(),
        shape.gpu_chunk_rows(),
        flops / (f as f64 * 1e-3) / 1e12,
        mib(shape.gpu_extra_device_bytes(false)),
        3.0 * flops / (fb as f64 * 1e-3) / 1e12,
        mib(shape.gpu_extra_device_bytes(true)),
    );

    // How many blocks of the held-rows kernels an SM holds (two of the one-row kernel on an H200
    // in the seventh run; the paired kernel is meant to run one).
    for (kernel, threads) in [("cross_entropy_rows_held", 256), ("cross_entropy_rows_paired", 512)] {
        let per_sm = gpu
            .function("cross_entropy", kernel)
            .and_then(|f| Ok(f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)?));
        println!("RESULT {kernel}: {per_sm:?} blocks per SM, {}", gpu.name());
    }

    // The same calls queued without their final wait, timed as the PyTorch peers are (an event
    // before the call, one after it is queued, then the wait): the lines above also count the
    // host's round trip for the 8-byte statistics inside each call, which the peers' calls
    // (their loss stays on the device) do not make.
    let fwd_q =
        gpu.time_ms(3, 20, || cuda_forward_queued(&gpu, &gemm, &shape, &x, &w, &b, &t, &mut out).map(|_| ())).unwrap();
    let both_q = gpu
        .time_ms(3, 20, || {
            cuda_forward_backward_queued(&gpu, &gemm, &shape, &x, &w, &b, &t, 1.0, &mut out, &mut dx, &mut dw, &mut db)
                .map(|_| ())
        })
        .unwrap();
    println!(
        "RESULT cross_entropy forward          {:.3} ms median, queued (statistics read after the stop event)\n\
         RESULT cross_entropy forward+backward {:.3} ms median, queued (statistics read after the stop event)",
        fwd_q[fwd_q.len() / 2],
        both_q[both_q.len() / 2],
    );

    // How the time depends on the chunk size (the memory rule caps it near the default): smaller
    // chunks mean more, smaller GEMMs, more kernel boundaries and more passes over the dW
    // accumulator.
    // 2688 rows: seven chunks, the default before the chunk budget went from 48 to 52 MiB.
    for rc in [1024, 2048, 2688, shape.gpu_chunk_rows()] {
        let s = shape.with_chunk_rows(rc);
        let t = gpu
            .time_ms(3, 20, || {
                cuda_forward_backward(&gpu, &gemm, &s, &x, &w, &b, &t, 1.0, &mut out, &mut dx, &mut dw, &mut db)
                    .map(|_| ())
            })
            .unwrap();
        println!("RESULT cross_entropy forward+backward {:.3} ms median with {rc} rows per chunk", t[t.len() / 2]);
    }

    // cuBLASLt's other candidates for the call's three GEMM sizes (logits, dx, dW at the default
    // chunk), chosen greedily on the whole call: each size in turn tries ranks 1.. with the
    // earlier sizes' choices kept, and keeps a rank only if it takes more than 1% off. The
    // choice is what `MAPET_GEMM_PIN` would be set to (printed), and is raced below. The same for
    // paired rows' chunks (MAPET_CE_ROW_BLOCKS=paired), whose GEMMs have other sizes.
    let paired = shape.with_paired_rows(true);
    let call = |g: &Gemm,
                s: &CrossEntropyShape,
                out: &mut CudaRowOutputs,
                dx: &mut DeviceBuffer<bf16>,
                dw: &mut DeviceBuffer<f32>,
                db: &mut DeviceBuffer<f32>| {
        cuda_forward_backward_queued(&gpu, g, s, &x, &w, &b, &t, 1.0, out, dx, dw, db).map(|_| ())
    };
    let mut choose_pins = |s: &CrossEntropyShape| -> Vec<Pin> {
        let n = s.gpu_chunk_rows();
        let mut pins: Vec<Pin> = Vec::new();
        for size in [(n, vocab, dim), (n, dim, vocab), (vocab, dim, n)] {
            let mut best: Option<(usize, f32)> = None;
            let mut line = Vec::new();
            for rank in 0..6 {
                let mut trial = pins.clone();
                trial.push((size, PinChoice::Rank(rank)));
                let timed = Gemm::with_pins(&gpu, trial).and_then(|g| {
                    gpu.time_ms(2, 10, || call(&g, s, &mut out, &mut dx, &mut dw, &mut db)).map(|ms| ms[ms.len() / 2])
                });
                match timed {
                    Ok(ms) => {
                        line.push(format!("#{rank} {ms:.3}"));
                        if best.is_none_or(|(_, b)| ms < 0.99 * b) {
                            best = Some((rank, ms));
                        }
                    }
                    // The heuristic has no more candidates for this size.
                    Err(Error::Unsupported { what: "GEMM pin", .. }) if rank > 0 => break,
                    // A candidate cuBLASLt will not run here: the next one.
                    Err(e) if rank > 0 => line.push(format!("#{rank} failed ({e})")),
                    Err(e) => panic!("cross_entropy with {size:?} at rank {rank}: {e}"),
                }
            }
            let rank = best.map_or(0, |(r, _)| r);
            let (m, nn, k) = size;
            println!(
                "RESULT cross_entropy GEMM {m}x{nn}x{k}: whole call, queued (ms) {}; chosen #{rank}",
                line.join(", ")
            );
            if rank > 0 {
                pins.push((size, PinChoice::Rank(rank)));
            }
        }
        pins
    };
    let pins = choose_pins(&shape);
    let paired_pins = choose_pins(&paired);
    let (pins_chosen, paired_pins_chosen) = (pin_text(&pins), pin_text(&paired_pins));
    let tuned = Gemm::with_pins(&gpu, pins).expect("cuBLASLt");
    let paired_tuned = Gemm::with_pins(&gpu, paired_pins).expect("cuBLASLt");
    // The chosen candidates pinned by their configurations instead of their ranks (taken from
    // the algorithms `tuned` caches on a first call): raced below, where it should time as
    // `chosen GEMMs` does, since it runs the same algorithms.
    call(&tuned, &shape, &mut out, &mut dx, &mut dw, &mut db).expect("cross_entropy with the chosen GEMMs");
    let by_config = Gemm::with_pins(&gpu, tuned.config_pins()).expect("cuBLASLt");

    // Forward passes of a half, a third and a quarter of the chunk (the module docs' sub-chunks):
    // whether the row kernel, reading the logits a pass's GEMM has just left in L2, gains more
    // than the extra launches cost; each with the default GEMMs and with the candidates chosen
    // above; all queued (timed as the peers are) but the first, the headline call. Lines later
    // in this bench read slower than the same configuration earlier (BENCHMARKS.md, fifth run,
    // fourth call), so the variants are alternated, three rounds, and each is quoted with its
    // rounds' medians.
    let passes = |sub: usize| {
        let s = shape.with_sub_chunk_rows(sub);
        (format!("{} passes of <= {sub} rows", s.gpu_sub_chunks(s.gpu_chunk_rows()).len()), s)
    };
    // (name, shape, GEMMs, queued, programmatic dependent launches)
    let mut variants: Vec<(String, CrossEntropyShape, &Gemm, bool, bool)> =
        vec![("one pass (default), waiting".to_string(), shape, &gemm, false, false)];
    // And MAPET_GEMM_TUNE's choice: each GEMM's candidates timed alone, on its first call.
    let self_tuned = Gemm::with_pins(&gpu, Vec::new()).expect("cuBLASLt").with_tuning(true);
    for (g, gname) in [(&gemm, "default GEMMs"), (&tuned, "chosen GEMMs"), (&self_tuned, "MAPET_GEMM_TUNE GEMMs")] {
        variants.push((format!("one pass, {gname}, queued"), shape, g, true, false));
        for (name, s) in [1568, 1046, 784].map(passes) {
            variants.push((format!("{name}, {gname}, queued"), s, g, true, false));
        }
        // The row kernel visiting the rows from the last back (MAPET_CE_ROW_ORDER=reverse): does it
        // find more of the logits the GEMM has just written still in L2?
        // Two rows a block and five chunks instead of six (MAPET_CE_ROW_BLOCKS=paired), with the
        // GEMM candidates chosen for its own sizes in place of the chosen ones.
        let paired_gemm = if gname == "chosen GEMMs" { &paired_tuned } else { g };
        variants.push((format!("one pass, paired rows, {gname}, queued"), paired, paired_gemm, true, false));
        if gname == "default GEMMs" {
            // The paired kernel in the default's six chunks: its own speed against the held
            // kernel's, apart from what five chunks change (not a switch: the winners skip it).
            let rc = shape.gpu_chunk_rows();
            let six = paired.with_chunk_rows(rc);
            variants.push((format!("one pass, paired rows, {rc}-row chunks, {gname}, queued"), six, g, true, false));
        }
        variants.push((
            format!("one pass, rows reversed, {gname}, queued"),
            shape.with_reversed_rows(true),
            g,
            true,
            false,
        ));
    }
    // The row and reduction kernels as programmatic dependent launches (compute capability 9.0;
    // MAPET_DEPENDENT_LAUNCH): each one's launch overlaps the end of the GEMM before it.
    if gpu.compute_capability() == (9, 0) {
        variants.push(("one pass, dependent launches, default GEMMs, queued".to_string(), shape, &gemm, true, true));
    }
    variants.push(("one pass, chosen GEMMs by configuration, queued".to_string(), shape, &by_config, true, false));
    // The chosen and self-tuned GEMMs also timed as the headline is (waiting for each call), so
    // that their lines compare with the first variant's and with the headline above: in the sixth
    // run the queued lines read 3% above the waiting ones for the same default call.
    variants.push(("one pass, chosen GEMMs, waiting".to_string(), shape, &tuned, false, false));
    variants.push(("one pass, MAPET_GEMM_TUNE GEMMs, waiting".to_string(), shape, &self_tuned, false, false));
    // A variant that fails is reported and left out of the later rounds; the others go on.
    let mut rounds = vec![Vec::new(); variants.len()];
    let mut failed: Vec<Option<String>> = vec![None; variants.len()];
    for _ in 0..3 {
        for (i, (_, s, g, queued, dependent)) in variants.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            gpu.set_dependent_launches(*dependent);
            let timed = gpu.time_ms(2, 10, || {
                if *queued {
                    call(g, s, &mut out, &mut dx, &mut dw, &mut db)
                } else {
                    cuda_forward_backward(&gpu, g, s, &x, &w, &b, &t, 1.0, &mut out, &mut dx, &mut dw, &mut db)
                        .map(|_| ())
                }
            });
            gpu.set_dependent_launches(false);
            match timed {
                Ok(ms) => rounds[i].push(ms[ms.len() / 2]),
                Err(e) => failed[i] = Some(e.to_string()),
            }
        }
    }
    for (((name, ..), r), why) in variants.iter().zip(&rounds).zip(&failed) {
        if let Some(why) = why {
            println!("RESULT cross_entropy forward+backward with {name} a chunk: failed: {why}");
            continue;
        }
        let mut sorted = r.clone();
        sorted.sort_by(f32::total_cmp);
        let each = r.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(" / ");
        println!(
            "RESULT cross_entropy forward+backward {:.3} ms (rounds {each}) with {name} a chunk",
            sorted[sorted.len() / 2]
        );
    }
    println!("RESULT cross_entropy chosen GEMMs: MAPET_GEMM_PIN={pins_chosen:?}");
    println!("RESULT cross_entropy chosen GEMMs with paired rows: MAPET_GEMM_PIN={paired_pins_chosen:?}");
    // The same choices by configuration (the sizes pinned by rank above, not every size these
    // Gemms ran in the race), which a later cuBLASLt still finds where it proposes them (ranks
    // move between versions), and the configurations the default GEMMs ran: what a default pin
    // table would be made of.
    for (g, what) in [(&tuned, "chosen GEMMs"), (&paired_tuned, "chosen GEMMs with paired rows")] {
        let pinned: Vec<(usize, usize, usize)> = g.pins().iter().map(|p| p.0).collect();
        let by_config: Vec<Pin> = g.config_pins().into_iter().filter(|p| pinned.contains(&p.0)).collect();
        println!("RESULT cross_entropy {what} by configuration: MAPET_GEMM_PIN={:?}", pin_text(&by_config));
    }
    // The default GEMMs are Gemm::new's: the default pin table's for this device, where it has
    // any (gemm::DEFAULT_PINS), else the heuristic's first proposals.
    println!(
        "RESULT cross_entropy default pin table on {} (compute capability {}.{}, {} SMs): {:?}",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count(),
        pin_text(gemm.default_pins())
    );
    for line in gemm.algorithm_report() {
        println!("RESULT cross_entropy default GEMM: {line}");
    }
    println!("RESULT cross_entropy GEMM pins chosen with cuBLASLt {} on {}", gemm.library_version(), gpu.name());
    for line in self_tuned.tuning_report() {
        println!("RESULT cross_entropy MAPET_GEMM_TUNE: {line}");
    }

    let mut group = c.benchmark_group(format!("cross_entropy_gpu_r{rows}_d{dim}_v{vocab}"));
    group.sample_size(10);
    group.bench_function("forward", |bench| {
        bench.iter(|| cuda_forward(&gpu, &gemm, &shape, &x, &w, &b, &t, &mut out).unwrap())
    });
    group.bench_function("forward_backward", |bench| {
        bench.iter(|| {
            cuda_forward_backward(&gpu, &gemm, &shape, &x, &w, &b, &t, 1.0, &mut out, &mut dx, &mut dw, &mut db)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
