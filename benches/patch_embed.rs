//! Patch embedding benches. GPU: ViT-B/16 at B = 128 (224x224, p = 16, D = 768, C = 50), forward
//! from uint8 (in both contraction orders, `PixelOrder`) and from f32 pixels, and forward +
//! backward; the median of event-timed runs (ten
//! back-to-back calls each) is printed in ms per call beside criterion's numbers. Without a GPU
//! the GPU benches print one SKIP line. CPU: the f32 reference at a small size.
//!
//! `MAPET_BENCH_PATCH_ORDERS` (comma-separated order names; unset, all) leaves out every line
//! that runs an order it does not name, the f32 lines counting as `chw`: the run script's way to
//! bench the orders that passed their tests when another failed (a fault is sticky and would fail
//! every later line; a hang ends the bench).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::patch_embed::{
    cpu_backward, cpu_forward_f32, cuda_backward, cuda_forward_f32, cuda_forward_u8, DevicePixels, Normalize,
    PatchEmbedShape, PixelOrder, Pixels,
};
use mapet::ops::KernelChoice;
use mapet::testing::{finish_or_exit, rng, uniform};
use rand::seq::SliceRandom;
use rand::Rng;

fn random_ranks(rng: &mut impl Rng, s: &PatchEmbedShape) -> Vec<i32> {
    let n = s.n_tokens();
    let mut ranks = Vec::with_capacity(s.ranks_len());
    for _ in 0..s.batch {
        let mut order: Vec<i32> = (1..n as i32).collect();
        order.shuffle(rng);
        ranks.push(0);
        ranks.extend(order);
    }
    ranks
}

struct Inputs {
    hwc: DeviceBuffer<u8>,
    chw: DeviceBuffer<f32>,
    ranks: DeviceBuffer<i32>,
    weight: DeviceBuffer<bf16>,
    bias: DeviceBuffer<f32>,
    pos: DeviceBuffer<f32>,
    cls: DeviceBuffer<f32>,
    mask: DeviceBuffer<f32>,
    out: DeviceBuffer<bf16>,
    d_out: DeviceBuffer<bf16>,
    grads: [DeviceBuffer<f32>; 5],
}

fn gpu_inputs(gpu: &Gpu, s: &PatchEmbedShape) -> mapet::Result<Inputs> {
    let mut r = rng("bench patch_embed");
    let hwc: Vec<u8> = (0..s.pixels_len()).map(|_| r.random()).collect();
    Ok(Inputs {
        hwc: gpu.upload(&hwc)?,
        chw: gpu.upload(&uniform(&mut r, s.pixels_len(), 2.0))?,
        ranks: gpu.upload(&random_ranks(&mut r, s))?,
        weight: gpu.upload_bf16(&uniform(&mut r, s.weight_len(), 0.03))?,
        bias: gpu.upload(&uniform(&mut r, s.dim, 0.1))?,
        pos: gpu.upload(&uniform(&mut r, s.pos_len(), 0.1))?,
        cls: gpu.upload(&uniform(&mut r, s.dim, 0.1))?,
        mask: gpu.upload(&uniform(&mut r, s.dim, 0.1))?,
        out: gpu.alloc(s.out_len())?,
        d_out: gpu.upload_bf16(&uniform(&mut r, s.out_len(), 1.0))?,
        grads: [
            gpu.zeros(s.weight_len())?,
            gpu.zeros(s.dim)?,
            gpu.zeros(s.pos_len())?,
            gpu.zeros(s.dim)?,
            gpu.zeros(s.dim)?,
        ],
    })
}

/// uint8 pixels in a contraction order, or f32 pixels (None).
type Entry = Option<PixelOrder>;

fn forward(gpu: &Gpu, s: &PatchEmbedShape, x: &mut Inputs, entry: Entry) -> mapet::Result<()> {
    match entry {
        Some(order) => cuda_forward_u8(
            gpu,
            order,
            s,
            &x.hwc,
            &Normalize::IMAGENET,
            &x.ranks,
            &x.weight,
            &x.bias,
            &x.pos,
            &x.cls,
            &x.mask,
            &mut x.out,
        ),
        None => cuda_forward_f32(gpu, s, &x.chw, &x.ranks, &x.weight, &x.bias, &x.pos, &x.cls, &x.mask, &mut x.out),
    }
}

fn backward(gpu: &Gpu, s: &PatchEmbedShape, x: &mut Inputs, entry: Entry) -> mapet::Result<()> {
    let (pixels, order) = match entry {
        Some(order) => (DevicePixels::U8 { hwc: &x.hwc, norm: Normalize::IMAGENET }, order),
        None => (DevicePixels::F32 { chw: &x.chw }, PixelOrder::Chw),
    };
    let [w, b, pos, cls, mask] = &mut x.grads;
    cuda_backward(gpu, order, s, pixels, &x.ranks, &x.d_out, w, b, pos, cls, mask)
}

/// Calls per timed sample of the printed medians.
const INNER: usize = 10;

fn bench_gpu(c: &mut Criterion) {
    let gpu = match Gpu::first() {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP patch_embed GPU benches: {e}");
            return;
        }
    };
    let s = PatchEmbedShape { batch: 128, image: 224, patch: 16, dim: 768, n_context: 50 };
    let mut x = gpu_inputs(&gpu, &s).expect("inputs");
    let flops = 2.0 * (s.batch * s.n_patches() * s.patch_len() * s.dim) as f64;
    type Step = fn(&Gpu, &PatchEmbedShape, &mut Inputs, Entry) -> mapet::Result<()>;
    let fwd_bwd: Step = |g, s, x, e| {
        forward(g, s, x, e)?;
        backward(g, s, x, e)
    };
    let (chw, hwc) = (Some(PixelOrder::Chw), Some(PixelOrder::Hwc));
    let (ws, ws_raw) = (Some(PixelOrder::HwcWs), Some(PixelOrder::HwcWsRaw));
    // A forward of one order with the backward of another (MAPET_PATCH_EMBED_BACKWARD_ORDER).
    let ws_then_hwc: Step = |g, s, x, _| {
        forward(g, s, x, Some(PixelOrder::HwcWs))?;
        backward(g, s, x, Some(PixelOrder::Hwc))
    };
    let hwc_then_ws: Step = |g, s, x, _| {
        forward(g, s, x, Some(PixelOrder::Hwc))?;
        backward(g, s, x, Some(PixelOrder::HwcWs))
    };
    let ws_raw_then_hwc: Step = |g, s, x, _| {
        forward(g, s, x, Some(PixelOrder::HwcWsRaw))?;
        backward(g, s, x, Some(PixelOrder::Hwc))
    };
    // The default pair's kernels as programmatic dependent launches (compute capability 9.0):
    // each kernel's launch and start overlap the end of the one before (Gpu::launch_dependent).
    let dependent: Step = |g, s, x, e| {
        g.set_dependent_launches(true);
        let r = forward(g, s, x, e).and_then(|()| backward(g, s, x, e));
        g.set_dependent_launches(false);
        r
    };
    // The hwc-ws variants last, the newest kernels: a kernel fault is sticky, and would fail
    // every line after it.
    let cases: [(&str, Step, Entry, f64); 17] = [
        ("forward u8 chw", forward, chw, flops),
        ("forward u8 hwc", forward, hwc, flops),
        ("forward f32", forward, None, flops),
        ("backward u8 chw", backward, chw, flops),
        ("backward u8 hwc", backward, hwc, flops),
        ("forward+backward u8 chw", fwd_bwd, chw, 2.0 * flops),
        ("forward+backward u8 hwc", fwd_bwd, hwc, 2.0 * flops),
        ("forward+backward f32", fwd_bwd, None, 2.0 * flops),
        ("forward u8 hwc-ws", forward, ws, flops),
        ("backward u8 hwc-ws", backward, ws, flops),
        ("forward+backward u8 hwc-ws", fwd_bwd, ws, 2.0 * flops),
        ("forward+backward u8 hwc-ws/hwc", ws_then_hwc, ws, 2.0 * flops),
        ("forward+backward u8 hwc/hwc-ws", hwc_then_ws, ws, 2.0 * flops),
        ("forward u8 hwc-ws-raw", forward, ws_raw, flops),
        ("forward+backward u8 hwc-ws-raw", fwd_bwd, ws_raw, 2.0 * flops),
        ("forward+backward u8 hwc-ws-raw/hwc", ws_raw_then_hwc, ws_raw, 2.0 * flops),
        ("forward+backward u8 hwc-ws-raw (dependent launches)", dependent, ws_raw, 2.0 * flops),
    ];
    let benched = PixelOrder::listed_in("MAPET_BENCH_PATCH_ORDERS").unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("patch_embed_gpu_b128_224_p16_d768");
    for (name, step, entry, work) in cases {
        // The orders a line runs: those its name gives after "u8" ("hwc-ws/hwc": both; a
        // remark in parentheses after them aside), chw for f32.
        let orders: Vec<PixelOrder> = match name.split_once(" u8 ") {
            Some((_, o)) => o
                .split(" (")
                .next()
                .unwrap_or(o)
                .split('/')
                .map(|n| PixelOrder::named("order", n).expect("a bench line's order"))
                .collect(),
            None => vec![PixelOrder::Chw],
        };
        if let Some(left_out) = orders.iter().find(|o| !benched.contains(o)) {
            println!("RESULT patch_embed {name}: skipped, MAPET_BENCH_PATCH_ORDERS leaves out {}", left_out.name());
            continue;
        }
        if entry.is_some_and(|order| !order.supported_on(&gpu)) {
            println!("RESULT patch_embed {name}: skipped, {} is not a compute capability 9.0 device", gpu.name());
            continue;
        }
        // A variant that fails is reported, and the bench goes on with the others; one that
        // hangs ends the bench with a HUNG line.
        let trial = step(&gpu, &s, &mut x, entry).and_then(|()| finish_or_exit(&gpu, &format!("patch_embed {name}")));
        if let Err(e) = trial {
            println!("RESULT patch_embed {name}: failed: {e}");
            continue;
        }
        // Ten calls between each pair of events, as a training step queues them: timing single
        // calls would add the host's launch latency to every sample.
        let times = gpu.time_ms(3, 30, || (0..INNER).try_for_each(|_| step(&gpu, &s, &mut x, entry))).expect("timing");
        let median = times[times.len() / 2] / INNER as f32;
        println!(
            "RESULT patch_embed {name} (B=128, 224/16, D=768) on {}: {median:.4} ms median, {:.1} TFLOP/s of GEMM",
            gpu.name(),
            work / (median as f64 * 1e-3) / 1e12
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = gpu.time_ms(0, 1, || (0..iters).try_for_each(|_| step(&gpu, &s, &mut x, entry)));
                Duration::from_secs_f64(t.expect("timing")[0] as f64 * 1e-3)
            })
        });
    }
    group.finish();
}

fn bench_cpu(c: &mut Criterion) {
    let s = PatchEmbedShape { batch: 4, image: 64, patch: 16, dim: 96, n_context: 5 };
    let mut r = rng("bench patch_embed cpu");
    let chw = uniform(&mut r, s.pixels_len(), 2.0);
    let ranks = random_ranks(&mut r, &s);
    let weight = uniform(&mut r, s.weight_len(), 0.05);
    let bias = uniform(&mut r, s.dim, 0.1);
    let pos = uniform(&mut r, s.pos_len(), 0.1);
    let cls = uniform(&mut r, s.dim, 0.1);
    let mask = uniform(&mut r, s.dim, 0.1);
    let d_out = uniform(&mut r, s.out_len(), 1.0);
    let mut out = vec![0.0f32; s.out_len()];
    let (mut dw, mut db, mut dpos, mut dcls, mut dmask) =
        (vec![0.0; s.weight_len()], vec![0.0; s.dim], vec![0.0; s.pos_len()], vec![0.0; s.dim], vec![0.0; s.dim]);
    let mut group = c.benchmark_group("patch_embed_cpu_b4_64_p16_d96");
    group.bench_function("forward f32", |b| {
        b.iter(|| cpu_forward_f32(&s, &chw, &ranks, &weight, &bias, &pos, &cls, &mask, &mut out).unwrap())
    });
    group.bench_function("backward f32", |b| {
        b.iter(|| {
            cpu_backward(
                &s,
                Pixels::F32 { chw: &chw },
                &ranks,
                &d_out,
                &mut dw,
                &mut db,
                &mut dpos,
                &mut dcls,
                &mut dmask,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_gpu, bench_cpu);
criterion_main!(benches);
