//! Two-stream attention on the GPU against the CPU reference (DESIGN.md's tolerance rule): bf16
//! inputs drawn fresh every run, outputs poisoned before each launch, an f64 truth, and an f32
//! CPU baseline that sees the same bf16 inputs and rounds its outputs to bf16 as the kernels do.
//! Skips with the reason where no GPU is present; fails instead under `MAPET_REQUIRE_GPU=1`.

use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::attention::{self, AttentionKernels, AttentionShape};
use mapet::ops::KernelChoice;
use mapet::testing;
use proptest::prelude::*;
use rand::Rng;

struct Case {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

fn draw(rng: &mut impl Rng, shape: AttentionShape) -> Case {
    let d = shape.model_dim();
    let (b, lq, lk) = (shape.batch, shape.q_rows(), shape.k_rows());
    // Scores of a few units: softmax neither flat nor one-hot.
    Case {
        shape,
        q: testing::uniform_bf16(rng, b * lq * d, 1.5),
        k: testing::uniform_bf16(rng, b * lk * d, 1.5),
        v: testing::uniform_bf16(rng, b * lk * d, 1.0),
        d_o: testing::uniform_bf16(rng, b * lq * d, 1.0),
    }
}

struct GpuOut {
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn run_gpu(gpu: &Gpu, kernels: AttentionKernels, c: &Case) -> GpuOut {
    run_gpu_with(gpu, kernels, kernels, c)
}

/// The forward with `fwd`, then the backward with `bwd` on that forward's O and lse.
fn run_gpu_with(gpu: &Gpu, fwd: AttentionKernels, bwd: AttentionKernels, c: &Case) -> GpuOut {
    let s = &c.shape;
    let (q, k, v, d_o) = (
        gpu.upload_bf16(&c.q).unwrap(),
        gpu.upload_bf16(&c.k).unwrap(),
        gpu.upload_bf16(&c.v).unwrap(),
        gpu.upload_bf16(&c.d_o).unwrap(),
    );
    let mut o: DeviceBuffer<half::bf16> = gpu.alloc(c.q.len()).unwrap();
    let mut lse: DeviceBuffer<f32> = gpu.alloc(s.batch * s.heads * s.q_rows()).unwrap();
    let mut dq: DeviceBuffer<half::bf16> = gpu.alloc(c.q.len()).unwrap();
    let mut dk: DeviceBuffer<half::bf16> = gpu.alloc(c.k.len()).unwrap();
    let mut dv: DeviceBuffer<half::bf16> = gpu.alloc(c.v.len()).unwrap();
    for b in [&mut o, &mut dq, &mut dk, &mut dv] {
        b.poison().unwrap();
    }
    lse.poison().unwrap();
    // A kernel waiting forever on a barrier ends the process within seconds, naming the launch
    // (`testing::finish_or_exit`), rather than when the binary's timeout runs out.
    attention::cuda_forward(gpu, fwd, s, &q, &k, &v, &mut o, &mut lse).unwrap();
    testing::finish_or_exit(gpu, &format!("attention forward, {} kernels, {s:?}", fwd.name())).unwrap();
    attention::cuda_backward(gpu, bwd, s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv).unwrap();
    testing::finish_or_exit(gpu, &format!("attention backward, {} kernels, {s:?}", bwd.name())).unwrap();
    GpuOut {
        o: o.to_host_f32().unwrap(),
        lse: lse.to_host().unwrap(),
        dq: dq.to_host_f32().unwrap(),
        dk: dk.to_host_f32().unwrap(),
        dv: dv.to_host_f32().unwrap(),
    }
}

/// The kernel sets these tests check: all of them, or those `MAPET_TEST_ATTENTION_SETS` names
/// (comma-separated, e.g. `tiled,resident`), so that a fault of one set (sticky for the rest of
/// the process) can be kept out of a rerun of the others.
fn sets() -> Vec<AttentionKernels> {
    AttentionKernels::listed_in("MAPET_TEST_ATTENTION_SETS").unwrap_or_else(|e| panic!("{e}"))
}

/// Forward and backward of every kernel set (`sets`) against the truth and the baseline.
fn check(gpu: &Gpu, c: &Case) {
    for kernels in sets() {
        check_pair(gpu, kernels, kernels, c);
    }
}

/// The forward of `fwd` and the backward of `bwd` on its O and lse, against the truth and the
/// baseline; a failing forward's backward is checked again on the tiled forward's outputs.
fn check_pair(gpu: &Gpu, fwd: AttentionKernels, bwd: AttentionKernels, c: &Case) {
    let s = &c.shape;
    let g = run_gpu_with(gpu, fwd, bwd, c);
    let f64v = |x: &[f32]| testing::to_f64(x);
    // Truth: f64 on the bf16 inputs. The backward truth uses the truth's own O and lse.
    let (mut o64, mut lse64) = (vec![0.0f64; c.q.len()], vec![0.0f64; g.lse.len()]);
    attention::f64_forward(s, &f64v(&c.q), &f64v(&c.k), &f64v(&c.v), &mut o64, &mut lse64).unwrap();
    let (mut dq64, mut dk64, mut dv64) = (vec![0.0f64; c.q.len()], vec![0.0f64; c.k.len()], vec![0.0f64; c.v.len()]);
    attention::f64_backward(
        s,
        &f64v(&c.q),
        &f64v(&c.k),
        &f64v(&c.v),
        &o64,
        &lse64,
        &f64v(&c.d_o),
        &mut dq64,
        &mut dk64,
        &mut dv64,
    )
    .unwrap();
    // Baseline: f32 CPU on the same inputs, outputs rounded to bf16 where the kernels write bf16;
    // its backward consumes its own bf16-rounded O, as the kernels consume their own.
    let (mut o32, mut lse32) = (vec![0.0f32; c.q.len()], vec![0.0f32; g.lse.len()]);
    attention::cpu_forward(s, &c.q, &c.k, &c.v, &mut o32, &mut lse32).unwrap();
    mapet::cpu::round_bf16(&mut o32);
    let (mut dq32, mut dk32, mut dv32) = (vec![0.0f32; c.q.len()], vec![0.0f32; c.k.len()], vec![0.0f32; c.v.len()]);
    attention::cpu_backward(s, &c.q, &c.k, &c.v, &o32, &lse32, &c.d_o, &mut dq32, &mut dk32, &mut dv32).unwrap();
    for x in [&mut dq32, &mut dk32, &mut dv32] {
        mapet::cpu::round_bf16(x);
    }
    let tag = format!("{fwd:?}/{bwd:?} B={} H={} N={} C={}", s.batch, s.heads, s.n_tokens, s.n_context);
    let mut failures = Vec::new();
    let mut expect = |name: &str, rows: Rows, got: &[f32], base: &[f32], truth: &[f64], factor: f64, floor: f64| {
        if let Err(msg) = testing::within_baseline(&format!("{name} [{tag}]"), got, base, truth, factor, floor) {
            eprintln!("{}", locate(name, s, rows, got, base, truth));
            failures.push(msg);
            return false;
        }
        true
    };
    let o_ok = expect("O", Rows::Query, &g.o, &o32, &o64, 2.0, 1e-4);
    let forward_failed = !(expect("lse", Rows::Lse, &g.lse, &lse32, &lse64, 2.0, 1e-5) && o_ok);
    expect("dQ", Rows::Query, &g.dq, &dq32, &dq64, 3.0, 1e-4);
    expect("dK", Rows::Key, &g.dk, &dk32, &dk64, 3.0, 1e-4);
    expect("dV", Rows::Key, &g.dv, &dv32, &dv64, 3.0, 1e-4);
    if forward_failed && fwd != AttentionKernels::Tiled {
        // A wrong forward makes the backward's inputs wrong: check this set's backward again on
        // the tiled forward's O and lse, so that one run tells which of the kernels is at fault.
        let g = run_gpu_with(gpu, AttentionKernels::Tiled, bwd, c);
        eprintln!("{bwd:?} backward on the tiled forward's O and lse:");
        expect("dQ (tiled forward)", Rows::Query, &g.dq, &dq32, &dq64, 3.0, 1e-4);
        expect("dK (tiled forward)", Rows::Key, &g.dk, &dk32, &dk64, 3.0, 1e-4);
        expect("dV (tiled forward)", Rows::Key, &g.dv, &dv32, &dv64, 3.0, 1e-4);
    }
    assert!(failures.is_empty(), "{} tensor(s) off the CPU reference:\n{}", failures.len(), failures.join("\n"));
}

/// How a tensor's flat index splits, for [`locate`].
#[derive(Clone, Copy)]
enum Rows {
    /// `[B, N + 2P, H * 64]`: O, dQ.
    Query,
    /// `[B, N + P, H * 64]`: dK, dV.
    Key,
    /// `[B, H, N + 2P]`.
    Lse,
}

/// Where a failing tensor is wrong, so that one GPU run narrows a kernel bug down: the elements
/// off the truth by more than 4x the baseline's worst error, counted along the indices a bug tends
/// to follow (the row's class; its 64-row tile, 16-row slice and row mod 8 in the wgmma kernels'
/// position order, which for keys is their own order; the 8-column group and column pair within
/// it, which name the accumulator fragment; head; sample), and the first few.
fn locate(name: &str, s: &AttentionShape, rows: Rows, got: &[f32], base: &[f32], truth: &[f64]) -> String {
    let worst = base.iter().zip(truth).map(|(&b, &t)| (b as f64 - t).abs()).fold(0.0f64, f64::max);
    let bar = (4.0 * worst).max(1e-6);
    let m = off_counts(s, rows, got, truth, bar);
    let first: Vec<String> = m
        .wrong
        .iter()
        .take(6)
        .map(|&i| {
            let (b, h, r, col) = split(s, rows, i);
            let at = col.map_or(String::new(), |col| format!(" col {col}"));
            let class = CLASSES[row_class(s, rows, r)];
            format!(
                "    sample {b} head {h} row {r} ({class}, position {}){at}: {:e} against {:e}",
                position(s, rows, r),
                got[i],
                truth[i]
            )
        })
        .collect();
    format!(
        "{} (off the truth by more than {bar:.2e}, 4x the baseline's worst; classes {CLASSES:?})\n  first:\n{}",
        m.report(name),
        first.join("\n")
    )
}

/// The (sample, head, row, column) of flat index i (no column for lse).
fn split(s: &AttentionShape, rows: Rows, i: usize) -> (usize, usize, usize, Option<usize>) {
    let (heads, d) = (s.heads, s.model_dim());
    let nrows = if matches!(rows, Rows::Key) { s.k_rows() } else { s.q_rows() };
    match rows {
        Rows::Query | Rows::Key => (i / (nrows * d), (i % d) / 64, (i / d) % nrows, Some(i % 64)),
        Rows::Lse => (i / (heads * nrows), (i / nrows) % heads, i % nrows, None),
    }
}

/// The elements off `truth` by more than `bar` (or NaN), along the dimensions of [`locate`].
fn off_counts(s: &AttentionShape, rows: Rows, got: &[f32], truth: &[f64], bar: f64) -> testing::Misses {
    let pos = |i: usize| position(s, rows, split(s, rows, i).2);
    testing::misses(
        got.len(),
        |i| got[i].is_nan() || (got[i] as f64 - truth[i]).abs() > bar,
        &[
            ("row class", &|i| Some(row_class(s, rows, split(s, rows, i).2))),
            ("position tile (64)", &|i| Some(pos(i) / 64)),
            ("slice in tile (16)", &|i| Some(pos(i) % 64 / 16)),
            ("position mod 8", &|i| Some(pos(i) % 8)),
            ("column group (8)", &|i| split(s, rows, i).3.map(|c| c / 8)),
            ("column pair in group", &|i| split(s, rows, i).3.map(|c| c % 8 / 2)),
            ("head", &|i| Some(split(s, rows, i).1)),
            ("sample", &|i| Some(split(s, rows, i).0)),
        ],
    )
}

/// The row classes, in the order of [`row_class`]'s numbers.
const CLASSES: [&str; 4] = ["context", "predicted", "mask", "query"];

/// The row's class, an index into [`CLASSES`]: context and predicted content rows, mask rows,
/// query-stream rows.
fn row_class(s: &AttentionShape, rows: Rows, r: usize) -> usize {
    let (n, c) = (s.n_tokens, s.n_context);
    match r {
        r if r < c => 0,
        r if r < n => 1,
        _ if r < s.k_rows() || matches!(rows, Rows::Key) => 2,
        _ => 3,
    }
}

/// The row's place in the wgmma kernels' position order (the inverse of their `row_at`): content
/// rows 0..C, the mask rows, then query-stream row N + P + j and content row C + j alternating.
/// Keys keep their own order.
fn position(s: &AttentionShape, rows: Rows, r: usize) -> usize {
    let (n, c, p) = (s.n_tokens, s.n_context, s.n_tokens - s.n_context);
    match rows {
        Rows::Key => r,
        _ if r < c => r,
        _ if r < n => c + p + 2 * (r - c) + 1,
        _ if r < n + p => c + r - n,
        _ => c + p + 2 * (r - n - p),
    }
}

/// The failure report of the GPU checks, on a tensor corrupted by hand (no GPU needed): it must
/// count exactly the corrupted elements, in the buckets they belong to.
#[test]
fn failure_report_counts_the_wrong_elements_where_they_are() {
    let mut rng = testing::rng("failure_report_counts_the_wrong_elements_where_they_are");
    let s = shape(2, 2, 65, 33); // P = 32: Lq = 129, Lk = 97
    let positions: std::collections::BTreeSet<usize> = (0..s.q_rows()).map(|r| position(&s, Rows::Query, r)).collect();
    assert_eq!(positions, (0..s.q_rows()).collect(), "the position order is a permutation of the query rows");
    let truth: Vec<f64> = testing::uniform(&mut rng, s.q_len(), 1.0).iter().map(|&v| v as f64).collect();
    let mut got: Vec<f32> = truth.iter().map(|&v| v as f32).collect();
    let d = s.model_dim();
    // Sample 1, head 0, columns 8..16 of the first query-stream row (N + P = 97, position
    // C + P = 65) and of predicted content row C + 1 = 34 (position C + P + 3 = 68).
    for r in [97, 34] {
        for col in 8..16 {
            got[(s.q_rows() + r) * d + col] += 0.5;
        }
    }
    let m = off_counts(&s, Rows::Query, &got, &truth, 0.1);
    assert_eq!(m.wrong.len(), 16);
    assert_eq!((m.count("row class", 3), m.count("row class", 1), m.count("row class", 0)), (8, 8, 0));
    assert_eq!((m.count("position tile (64)", 1), m.count("slice in tile (16)", 0)), (16, 16));
    assert_eq!((m.count("position mod 8", 1), m.count("position mod 8", 4)), (8, 8));
    assert_eq!((m.count("column group (8)", 1), m.count("column pair in group", 3)), (16, 4));
    assert_eq!((m.count("head", 0), m.count("sample", 1)), (16, 16));
    let exact: Vec<f32> = truth.iter().map(|&v| v as f32).collect(); // a baseline off by f32 rounding
    let report = locate("O", &s, Rows::Query, &got, &exact, &truth);
    assert!(report.contains("row 34 (predicted, position 68) col 8"), "{report}");
    // lse is [B, H, Lq]: sample 1, head 1, row 0.
    let truth: Vec<f64> = testing::uniform(&mut rng, s.lse_len(), 1.0).iter().map(|&v| v as f64).collect();
    let mut got: Vec<f32> = truth.iter().map(|&v| v as f32).collect();
    got[(2 + 1) * s.q_rows()] = f32::NAN;
    let m = off_counts(&s, Rows::Lse, &got, &truth, 0.1);
    assert_eq!(m.wrong.len(), 1, "a NaN counts as wrong");
    assert_eq!((m.count("head", 1), m.count("sample", 1), m.count("column group (8)", 0)), (1, 1, 0));
}

fn shape(batch: usize, heads: usize, n_tokens: usize, n_context: usize) -> AttentionShape {
    AttentionShape { batch, heads, head_dim: 64, n_tokens, n_context }
}

#[test]
fn vit_sized_sequence_matches_cpu() {
    let Some(gpu) = testing::gpu_poisoning_or_skip("vit_sized_sequence_matches_cpu") else { return };
    let mut rng = testing::rng("vit_sized_sequence_matches_cpu");
    check(&gpu, &draw(&mut rng, shape(2, 3, 197, 50)));
}

#[test]
fn edge_sizes_match_cpu() {
    let Some(gpu) = testing::gpu_poisoning_or_skip("edge_sizes_match_cpu") else { return };
    let mut rng = testing::rng("edge_sizes_match_cpu");
    // One CTA holding all three segments; C = 1 and C = N - 1; sizes around the 64-row tile
    // (Lq = N + 2P: 128 for N = 64, C = 32; 129 for N = 65, C = 33), and Lk a multiple of 64 with
    // Lq one too (N = 128, C = 64: Lq = 256, Lk = 192).
    for (n, c) in
        [(2, 1), (5, 1), (5, 4), (17, 16), (33, 1), (64, 10), (64, 32), (65, 32), (65, 33), (100, 99), (128, 64)]
    {
        check(&gpu, &draw(&mut rng, shape(2, 2, n, c)));
    }
}

/// A forward of one set and a backward of another (`MAPET_ATTENTION_BACKWARD_KERNELS`): every
/// ordered pair of different sets, the backward on the other forward's O and lse, at a shape with
/// several row and key tiles and partial ones.
#[test]
fn mixed_forward_and_backward_sets_match_cpu() {
    let Some(gpu) = testing::gpu_poisoning_or_skip("mixed_forward_and_backward_sets_match_cpu") else { return };
    let mut rng = testing::rng("mixed_forward_and_backward_sets_match_cpu");
    let c = draw(&mut rng, shape(2, 3, 197, 50));
    for fwd in sets() {
        for bwd in sets().into_iter().filter(|&b| b != fwd) {
            check_pair(&gpu, fwd, bwd, &c);
        }
    }
}

/// Enough (sample, head) pairs that every CTA owns one whole pair (pairs >= 4 x SMs: one CTA
/// per pair for the forward and dQ kernels at two CTAs an SM, and for dK/dV at one): then each
/// warpgroup of the wgmma kernels takes several row or key tiles in turn (Lq = 270: 5 tiles of 64
/// rows over 2 warpgroups; Lk = 200: 4 key tiles over 3), which exercises the barriers before a
/// warpgroup refills its Q or dO tile and the dK/dV kernel's K/V reloads. The other tests' shapes
/// give each warpgroup one tile at most.
#[test]
fn several_tiles_per_warpgroup_match_cpu() {
    let test = "several_tiles_per_warpgroup_match_cpu";
    let Some(gpu) = testing::gpu_poisoning_or_skip(test) else { return };
    let mut rng = testing::rng(test);
    let heads = 12;
    let batch = (4 * gpu.sm_count() as usize).div_ceil(heads);
    check(&gpu, &draw(&mut rng, shape(batch, heads, 130, 60)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_shapes_match_cpu(batch in 1usize..4, heads in 1usize..4, n in 2usize..140, c_frac in 0.0f64..1.0, seed in any::<u64>()) {
        let Some(gpu) = testing::gpu_poisoning_or_skip("random_shapes_match_cpu") else { return Ok(()) };
        let c = 1 + ((n - 2) as f64 * c_frac) as usize;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        check(&gpu, &draw(&mut rng, shape(batch, heads, n, c)));
    }
}

#[test]
fn same_inputs_give_bit_identical_outputs() {
    let Some(gpu) = testing::gpu_poisoning_or_skip("same_inputs_give_bit_identical_outputs") else { return };
    let mut rng = testing::rng("same_inputs_give_bit_identical_outputs");
    let c = draw(&mut rng, shape(4, 4, 197, 50));
    for kernels in sets() {
        let (a, b) = (run_gpu(&gpu, kernels, &c), run_gpu(&gpu, kernels, &c));
        assert_same_run_to_run(&format!("{kernels:?}, two runs"), kernels, &a, &b);
    }
}

/// The `wgmma-peek` dK/dV kernel loads its per-position stats at another point of its chunk
/// loop and changes no operation or its order (forward and dQ are the `wgmma` kernels): on the
/// same inputs the two sets must give the same bits. Off compute capability 9.0 both sets run the
/// resident kernels, where the comparison could not fail, so it skips there.
#[test]
fn wgmma_peek_backward_gives_the_wgmma_bits() {
    let test = "wgmma_peek_backward_gives_the_wgmma_bits";
    let Some(gpu) = wgmma_sets_or_skip(test, AttentionKernels::WgmmaPeek) else { return };
    let mut rng = testing::rng(test);
    for s in [shape(2, 3, 197, 50), shape(1, 2, 37, 1), shape(3, 1, 90, 89)] {
        let c = draw(&mut rng, s);
        let a = run_gpu_with(&gpu, AttentionKernels::Wgmma, AttentionKernels::Wgmma, &c);
        let b = run_gpu_with(&gpu, AttentionKernels::Wgmma, AttentionKernels::WgmmaPeek, &c);
        assert_bit_identical(&format!("wgmma and wgmma-peek backward, {s:?}"), &a, &b);
    }
}

/// The `wgmma-persistent` forward does each row tile's work as the `wgmma` forward does, in the
/// same order, so the same O and lse bits (its backward is the `wgmma` one): at ViT-B's sequence
/// with fewer pairs than SMs (a CTA's first pair only), and with several pairs a CTA (the next
/// pair's K and V copied into the other buffer while this one's run, the buffers swapped at each
/// pair's end), at ViT's Lq (8 row tiles, two a warpgroup) and at Lq 200 and 256 (4 row tiles,
/// one a warpgroup, so every tile ends a pair); about 2.5 and 7 pairs a CTA, ViT's twice on fresh
/// inputs. Each shape must run the persistent kernel. Skips off compute capability 9.0, where
/// both sets run the resident kernels.
#[test]
fn wgmma_persistent_forward_gives_the_wgmma_bits() {
    let test = "wgmma_persistent_forward_gives_the_wgmma_bits";
    let Some(gpu) = wgmma_sets_or_skip(test, AttentionKernels::WgmmaPersistent) else { return };
    let mut rng = testing::rng(test);
    // Pairs for about 2.5 and 7 a CTA (one CTA an SM).
    let heads = 12;
    let per_cta = |n: usize| (n * gpu.sm_count() as usize).div_ceil(2 * heads);
    let (some, many) = (per_cta(5), per_cta(14));
    let shapes = [
        shape(2, 3, 197, 50),
        shape(some, heads, 197, 50),
        shape(some, heads, 197, 50),
        shape(many, heads, 197, 50),
        shape(some, heads, 70, 5),
        shape(many, heads, 128, 64),
    ];
    for s in shapes {
        // Else the comparison would be of the wgmma forward with itself.
        let kernel = attention::cuda_forward_kernel(&gpu, AttentionKernels::WgmmaPersistent, &s);
        assert_eq!(kernel, "mapet_attention_fwd_wgmma_persistent", "{s:?}: the set falls back to another forward");
        let c = draw(&mut rng, s);
        let a = run_gpu_with(&gpu, AttentionKernels::Wgmma, AttentionKernels::Wgmma, &c);
        let b = run_gpu_with(&gpu, AttentionKernels::WgmmaPersistent, AttentionKernels::Wgmma, &c);
        assert_bit_identical(&format!("wgmma-persistent and wgmma forward, {s:?}"), &b, &a);
    }
}

/// The `wgmma-balanced` dK/dV kernel on its plan's shared runs (src/ops/attention.rs,
/// balanced_deal): one warpgroup computes a run's first chunks and hands its partial dK and dV
/// through shared memory to the one that computes the rest and stores the run. Against the CPU
/// reference, at ViT's sequence with two CTAs a pair (three runs a CTA, one shared) and with one
/// (six runs, as at ViT-B: 23 / 21 / 23 chunks), at C = 90 with two CTAs a pair (where the taking
/// warpgroup has the shared run alone), and at a shape of eight runs; each shape must run the
/// balanced kernel with a shared run. Its forward and dQ are `wgmma`'s (the set's make-up): the
/// same O, lse and dQ bits. The fused backward (`wgmma-fused`) shares a 64-key tile the same way,
/// through a slot in global memory: at each of these shapes where its plan shares one (ViT's at
/// least), it is checked against the CPU too. Skips off compute capability 9.0.
#[test]
fn wgmma_balanced_backward_shares_runs_and_matches_cpu() {
    let test = "wgmma_balanced_backward_shares_runs_and_matches_cpu";
    let Some(gpu) = wgmma_sets_or_skip(test, AttentionKernels::WgmmaBalanced) else { return };
    let mut rng = testing::rng(test);
    // Enough pairs for one dK/dV CTA a pair (two waves of one CTA an SM).
    let one_cta = |heads: usize| (2 * gpu.sm_count() as usize).div_ceil(heads);
    let shapes =
        [shape(2, 3, 197, 50), shape(one_cta(12), 12, 197, 50), shape(2, 3, 197, 90), shape(one_cta(4), 4, 400, 345)];
    let mut fused_shared = 0;
    for s in shapes {
        let kernel = attention::cuda_dkdv_kernel(&gpu, AttentionKernels::WgmmaBalanced, &s);
        assert_eq!(kernel, Some(("mapet_attention_bwd_dkdv_wgmma_balanced", true)), "{s:?}: no shared run");
        let c = draw(&mut rng, s);
        check_pair(&gpu, AttentionKernels::Wgmma, AttentionKernels::WgmmaBalanced, &c);
        let a = run_gpu_with(&gpu, AttentionKernels::Wgmma, AttentionKernels::Wgmma, &c);
        let b = run_gpu_with(&gpu, AttentionKernels::Wgmma, AttentionKernels::WgmmaBalanced, &c);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (name, x, y) in [("O", &a.o, &b.o), ("lse", &a.lse, &b.lse), ("dQ", &a.dq, &b.dq)] {
            assert!(bits(x) == bits(y), "{s:?}: {name} differs between wgmma and wgmma-balanced");
        }
        let fused = AttentionKernels::WgmmaFused;
        if sets().contains(&fused) && attention::cuda_dkdv_kernel(&gpu, fused, &s).is_some_and(|k| k.1) {
            fused_shared += 1;
            check_pair(&gpu, AttentionKernels::Wgmma, fused, &c);
        }
    }
    if sets().contains(&AttentionKernels::WgmmaFused) {
        assert!(fused_shared >= 2, "the fused backward shared a tile at {fused_shared} shapes, ViT's two at least");
    }
}

/// The GPU for a test that compares the `wgmma` set with `other` (a set of the same kernels
/// but one), or `None` with the reason printed: no GPU, not compute capability 9.0 (both sets
/// then run the resident kernels, and the comparison could not fail), or a set left out by
/// `MAPET_TEST_ATTENTION_SETS`.
fn wgmma_sets_or_skip(test: &str, other: AttentionKernels) -> Option<Gpu> {
    let gpu = testing::gpu_poisoning_or_skip(test)?;
    if gpu.compute_capability() != (9, 0) {
        eprintln!(
            "SKIP {test}: compute capability {:?}, not 9.0: no wgmma kernels to compare",
            gpu.compute_capability()
        );
        return None;
    }
    if !sets().contains(&AttentionKernels::Wgmma) || !sets().contains(&other) {
        eprintln!("SKIP {test}: MAPET_TEST_ATTENTION_SETS leaves out wgmma or {}", other.name());
        return None;
    }
    Some(gpu)
}

/// Programmatic dependent launches (`Gpu::set_dependent_launches`, compute capability 9.0)
/// change when a kernel may start, never what it computes: every attention kernel waits for
/// the one before it first (the backward's dK/dV reads the delta its dQ kernel writes). Each set's
/// forward and backward give the same bits with and without them.
#[test]
fn dependent_launches_give_the_same_bits() {
    let test = "dependent_launches_give_the_same_bits";
    let Some(gpu) = testing::gpu_poisoning_or_skip(test) else { return };
    gpu.set_dependent_launches(true);
    let on = gpu.dependent_launches();
    gpu.set_dependent_launches(false);
    if !on {
        eprintln!("SKIP {test}: {} has no dependent launches", gpu.name());
        return;
    }
    let shapes = [shape(4, 12, 197, 50), shape(1, 2, 37, 1)];
    same_bits_either_way(test, &gpu, &shapes, "dependent launches", |on| gpu.set_dependent_launches(on));
}

/// Every set on each of `shapes` (fresh inputs each) with a switch off and on (`switch`), the
/// two runs held to `assert_same_run_to_run`; the switch is left off.
fn same_bits_either_way(test: &str, gpu: &Gpu, shapes: &[AttentionShape], what: &str, switch: impl Fn(bool)) {
    let mut rng = testing::rng(test);
    for &s in shapes {
        let c = draw(&mut rng, s);
        for kernels in sets() {
            switch(false);
            let plain = run_gpu(gpu, kernels, &c);
            switch(true);
            let with = run_gpu(gpu, kernels, &c);
            switch(false);
            assert_same_run_to_run(
                &format!("{} with and without {what}, {s:?}", kernels.name()),
                kernels,
                &plain,
                &with,
            );
        }
    }
}

/// Sending the next wave's operands to L2 (`Gpu::set_next_wave_to_l2`, `MAPET_L2_AHEAD`; on compute
/// capability 9.0 the wgmma forward and dQ kernels' `_l2` twins and the wgmma dK/dV kernels take
/// it) changes what L2 holds, never what a kernel computes: each set's outputs are the same bits
/// with and without it. What it can catch is a fault: an address formed outside the tensors.
/// Shapes: twice as many (sample, head) pairs as SMs, so that the first wave's CTAs (dK/dV: one a
/// pair; forward and dQ: two a pair, two an SM) send the second wave's rows up to the last pair's
/// last row; a few pairs more than SMs, where the non-fused sets take several CTAs a pair (the
/// forward and dQ four); an odd small shape with as many pairs as three times the SMs, one CTA a
/// pair, whose last tiles reach past Lq and Lk (sent by all three kernels); and fewer pairs than
/// SMs (none sent).
#[test]
fn next_wave_to_l2_gives_the_same_bits() {
    let test = "next_wave_to_l2_gives_the_same_bits";
    let Some(gpu) = testing::gpu_poisoning_or_skip(test) else { return };
    if gpu.compute_capability() != (9, 0) {
        eprintln!("SKIP {test}: {} runs no wgmma kernel", gpu.name());
        return;
    }
    let sms = gpu.sm_count() as usize;
    let shapes = [
        shape((2 * sms).div_ceil(12), 12, 197, 50),
        shape(sms / 12 + 1, 12, 197, 50),
        shape(sms, 3, 37, 1),
        shape(3, 2, 37, 1),
    ];
    // The switch picks the forward's and dQ's twins (so the runs below compare two kernels each).
    let kernels = |on| {
        gpu.set_next_wave_to_l2(on);
        let w = AttentionKernels::Wgmma;
        (attention::cuda_forward_kernel(&gpu, w, &shapes[0]), attention::cuda_dq_kernel(&gpu, w, &shapes[0]))
    };
    assert_eq!(kernels(true), ("mapet_attention_fwd_wgmma_l2", Some("mapet_attention_bwd_dq_wgmma_l2")));
    assert_eq!(kernels(false), ("mapet_attention_fwd_wgmma", Some("mapet_attention_bwd_dq_wgmma")));
    // The fused set runs no dQ kernel at ViT's shape.
    assert_eq!(attention::cuda_dq_kernel(&gpu, AttentionKernels::WgmmaFused, &shapes[0]), None);
    same_bits_either_way(test, &gpu, &shapes, "the next wave sent to L2", |on| gpu.set_next_wave_to_l2(on));
}

/// Two runs of `kernels` on the same inputs: the same bits, but for a set whose backward is not
/// deterministic (`wgmma-fused`: its dQ adds its tiles in no fixed order), whose dQ may differ
/// by the rounding of an f32 sum taken in another order, carried into bf16: at most one bf16 unit
/// in the last place of the larger of the two values (2^-7 of it, relative), beyond an absolute
/// 1e-6 where sums cancel to nearly nothing. It prints how many elements differ, which measures
/// the nondeterminism.
fn assert_same_run_to_run(what: &str, kernels: AttentionKernels, a: &GpuOut, b: &GpuOut) {
    if kernels.deterministic() {
        return assert_bit_identical(what, a, b);
    }
    assert_bits(&format!("{what} (all but dQ)"), a, b, false);
    let mut differ = 0usize;
    let mut worst = 0.0f64;
    for (i, (&x, &y)) in a.dq.iter().zip(&b.dq).enumerate() {
        if x.to_bits() == y.to_bits() {
            continue;
        }
        differ += 1;
        let (d, m) = ((x as f64 - y as f64).abs(), (x.abs().max(y.abs())) as f64);
        worst = worst.max(d / m.max(1e-30));
        assert!(d <= m / 128.0 + 1e-6, "{what}: dQ element {i} is {x:e} in one run and {y:e} in the other");
    }
    eprintln!(
        "{what}: dQ differs in {differ} of {} elements between the runs (worst relative difference {worst:.2e})",
        a.dq.len()
    );
}

fn assert_bit_identical(what: &str, a: &GpuOut, b: &GpuOut) {
    assert_bits(what, a, b, true)
}

/// Every output the same bit for bit (dQ only `with_dq`).
fn assert_bits(what: &str, a: &GpuOut, b: &GpuOut, with_dq: bool) {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let dq = [("dQ", &a.dq, &b.dq)];
    let others = [("O", &a.o, &b.o), ("lse", &a.lse, &b.lse), ("dK", &a.dk, &b.dk), ("dV", &a.dv, &b.dv)];
    for (name, x, y) in others.into_iter().chain(dq.into_iter().filter(|_| with_dq)) {
        let (x, y) = (bits(x), bits(y));
        if let Some(i) = (0..x.len()).find(|&i| x[i] != y[i]) {
            panic!(
                "{what}: {name} differs first at element {i} of {} ({:e} against {:e})",
                x.len(),
                f32::from_bits(x[i]),
                f32::from_bits(y[i])
            );
        }
    }
}

/// The K/V-resident kernels do per warp what the tiled ones do, in the same order: the same bits,
/// at the ViT-B sequence (one CTA per pair), at small batches (several CTAs per pair, warps
/// with no row tile), at odd sizes, and where K and V are too large to stay resident (the tiled
/// kernels run for both).
#[test]
fn resident_kernels_match_the_tiled_ones_bit_for_bit() {
    let test = "resident_kernels_match_the_tiled_ones_bit_for_bit";
    let Some(gpu) = testing::gpu_poisoning_or_skip(test) else { return };
    let mut rng = testing::rng(test);
    for s in
        [shape(64, 12, 197, 50), shape(2, 3, 197, 50), shape(1, 1, 5, 1), shape(3, 2, 65, 33), shape(1, 2, 300, 50)]
    {
        let c = draw(&mut rng, s);
        let tiled = run_gpu(&gpu, AttentionKernels::Tiled, &c);
        let resident = run_gpu(&gpu, AttentionKernels::Resident, &c);
        assert_bit_identical(&format!("resident against tiled, {s:?}"), &resident, &tiled);
    }
}

#[test]
fn unsupported_head_dim_is_refused_with_the_reason() {
    let s = AttentionShape { batch: 1, heads: 2, head_dim: 16, n_tokens: 9, n_context: 3 };
    let err = attention::check_cuda_shape(&s).unwrap_err().to_string();
    assert!(err.contains("head_dim") && err.contains("64"), "{err}");
    let ok = shape(1, 2, 9, 3);
    attention::check_cuda_shape(&ok).unwrap();
    let bad_c = shape(1, 2, 9, 9);
    assert!(attention::check_cuda_shape(&bad_c).is_err());
}
