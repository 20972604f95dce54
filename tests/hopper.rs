//! The Hopper building blocks (`cuda/hopper.cuh`) against host computations: a TMA box load
//! read back through the 128-byte swizzle, and wgmma over TMA-loaded swizzled tiles. On a
//! compute capability 9.0 device they must match exactly (the load) or to f32 rounding (the
//! product); elsewhere both are refused; with no GPU the GPU tests skip and say why. Also the
//! dQ-reduction measurement's sums (`dq_reduce`), exact, and whether a programmatic dependent
//! launch starts early and waits (`dependent_launch_overlap`).

use half::bf16;
use mapet::cuda::hopper::{
    dependent_launch_overlap, dq_reduce, dq_reduce_positions, gemm_tn, store_transposed, tensor_map_bf16,
    tma_roundtrip, wgmma_rs, wgmma_sw128, wgmma_sw128_n192, DqReduce, PdlTimes, BOX,
};
use mapet::cuda::Gpu;
use mapet::testing::{finish_or_exit, gpu_or_skip, rng, uniform};
use mapet::Error;

/// A row-major bf16 matrix of random values in [-1, 1), as bf16 and as the f32 they round to. A
/// test draws all of its matrices from one generator (`rng`), so that the seed it prints replays
/// them all, each different from the others.
fn random_matrix(r: &mut impl rand::Rng, rows: usize, cols: usize) -> (Vec<bf16>, Vec<f32>) {
    let h: Vec<bf16> = uniform(r, rows * cols, 1.0).into_iter().map(bf16::from_f32).collect();
    let f = h.iter().map(|v| v.to_f32()).collect();
    (h, f)
}

/// Off compute capability 9.0 the checks must refuse to run, saying why: true (and the caller's
/// test ends) there, after asserting that `attempt` was refused so.
fn refused_off_hopper<T: std::fmt::Debug>(gpu: &Gpu, attempt: impl FnOnce() -> mapet::Result<T>) -> bool {
    if gpu.compute_capability() == (9, 0) {
        return false;
    }
    let err = attempt().unwrap_err();
    assert!(err.to_string().contains("9.0"), "{err}");
    true
}

#[test]
fn tensor_maps_refuse_unaligned_rows() {
    // Checked before the driver is called, so this runs without a GPU.
    for (rows, cols) in [(0, 64), (8, 0), (8, 3), (8, 12)] {
        let err = tensor_map_bf16(std::ptr::null(), rows, cols, BOX).unwrap_err();
        assert!(matches!(err, Error::Unsupported { what: "tensor map", .. }), "[{rows}, {cols}]: {err}");
    }
    for box_rows in [0, 257] {
        let err = tensor_map_bf16(std::ptr::null(), 8, 64, box_rows).unwrap_err();
        assert!(err.to_string().contains("boxes of 1 to 256 rows"), "{box_rows}: {err}");
    }
}

#[test]
fn tma_box_loads_read_back_through_the_swizzle() {
    let test = "tma_box_loads_read_back_through_the_swizzle";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let (rows, cols) = (200, 136);
    let (h, _) = random_matrix(&mut rng(test), rows, cols);
    let a = gpu.upload(&h).unwrap();
    if refused_off_hopper(&gpu, || tma_roundtrip(&gpu, &a, rows, cols, 0, 0)) {
        return;
    }
    let err = tma_roundtrip(&gpu, &a, rows, cols, 7, 3).unwrap_err();
    assert!(err.to_string().contains("multiple of 8"), "an unaligned column is refused on the host: {err}");
    // Inside, at a 64-multiple, and across both edges (zeros beyond them). Column offsets are
    // multiples of 8 elements: TMA needs the box's first byte of a row 16-byte aligned.
    for (r0, c0) in [(0, 0), (64, 64), (150, 96), (7, 8)] {
        let out = tma_roundtrip(&gpu, &a, rows, cols, r0, c0).unwrap();
        for r in 0..BOX {
            for c in 0..BOX {
                let (gr, gc) = (r0 + r, c0 + c);
                let want = if gr < rows && gc < cols { h[gr * cols + gc] } else { bf16::ZERO };
                let got = out[r * BOX + c];
                assert_eq!(got.to_bits(), want.to_bits(), "box ({r0}, {c0}), element ({r}, {c}): {got} against {want}");
            }
        }
    }
}

/// Checks `got(i, j)` against the f64 product `A Bᵀ` (`fa` `[m, k]`, `fb` `[n, k]`, row-major)
/// for every element, within `tol(want)`.
fn check_product(
    what: &str,
    got: impl Fn(usize, usize) -> f64,
    fa: &[f32],
    fb: &[f32],
    (m, n, k): (usize, usize, usize),
    tol: impl Fn(f64) -> f64,
) {
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k).map(|t| fa[i * k + t] as f64 * fb[j * k + t] as f64).sum();
            let got = got(i, j);
            assert!((got - want).abs() <= tol(want), "{what}, C[{i}][{j}]: {got} against {want}");
        }
    }
}

/// Exact bf16 products summed in f32 on the tensor cores: a few ulps of sums of magnitude up to
/// ~k/3. A wrong swizzle, descriptor or fragment layout moves whole products (~0.3 each).
fn f32_sum_tolerance(want: f64) -> f64 {
    1e-4 * (1.0 + want.abs())
}

/// The GPU tests' comparison on the host: it passes the exact product and fails one element
/// moved by a whole product.
#[test]
fn check_product_passes_the_product_and_fails_a_moved_element() {
    let (m, n, k) = (5, 7, 9);
    let mut r = rng("check_product");
    let (_, fa) = random_matrix(&mut r, m, k);
    let (_, fb) = random_matrix(&mut r, n, k);
    let exact = |i: usize, j: usize| (0..k).map(|t| fa[i * k + t] as f64 * fb[j * k + t] as f64).sum::<f64>();
    check_product("exact", exact, &fa, &fb, (m, n, k), f32_sum_tolerance);
    let moved = std::panic::catch_unwind(|| {
        let off = |i: usize, j: usize| exact(i, j) + if (i, j) == (3, 4) { 0.3 } else { 0.0 };
        check_product("moved", off, &fa, &fb, (m, n, k), f32_sum_tolerance)
    });
    let msg = moved.expect_err("a moved element passed");
    let msg = msg.downcast_ref::<String>().expect("a panic message");
    assert!(msg.contains("moved, C[3][4]"), "{msg}");
}

#[test]
fn wgmma_on_swizzled_tiles_matches_the_host_product() {
    let test = "wgmma_on_swizzled_tiles_matches_the_host_product";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let mut r = rng(test);
    for k in [BOX, 2 * BOX] {
        let (ha, fa) = random_matrix(&mut r, BOX, k);
        let (hb, fb) = random_matrix(&mut r, BOX, k);
        let (a, b) = (gpu.upload(&ha).unwrap(), gpu.upload(&hb).unwrap());
        if refused_off_hopper(&gpu, || wgmma_sw128(&gpu, &a, &b, k)) {
            return;
        }
        let out = wgmma_sw128(&gpu, &a, &b, k).unwrap();
        check_product(&format!("k {k}"), |i, j| out[i * BOX + j] as f64, &fa, &fb, (BOX, BOX, k), f32_sum_tolerance);
    }
}

/// The m64n192k16 form (the `hwc-ws` forward's, 96 accumulators a thread) on the same swizzled
/// tiles, B's 192 rows in three boxes: a fault of its wrapper shows here apart from the kernel's
/// own pipeline.
#[test]
fn wgmma_n192_on_swizzled_tiles_matches_the_host_product() {
    let test = "wgmma_n192_on_swizzled_tiles_matches_the_host_product";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let n = 3 * BOX;
    let mut r = rng(test);
    let (ha, fa) = random_matrix(&mut r, BOX, BOX);
    let (hb, fb) = random_matrix(&mut r, n, BOX);
    let (a, b) = (gpu.upload(&ha).unwrap(), gpu.upload(&hb).unwrap());
    if refused_off_hopper(&gpu, || wgmma_sw128_n192(&gpu, &a, &b)) {
        return;
    }
    let out = wgmma_sw128_n192(&gpu, &a, &b).unwrap();
    check_product("n 192", |i, j| out[i * n + j] as f64, &fa, &fb, (BOX, n, BOX), f32_sum_tolerance);
}

#[test]
fn warp_specialised_gemm_matches_the_host_product() {
    let test = "warp_specialised_gemm_matches_the_host_product";
    let Some(gpu) = gpu_or_skip(test) else { return };
    // One tile; edges in m, n and k (k = 8 and 136 end inside a 64-deep slice; n = 37 is odd);
    // several tiles with a K of ViT-B's width.
    let mut r = rng(test);
    for (m, n, k) in [(128, 256, 64), (200, 300, 136), (70, 37, 24), (1, 8, 8), (384, 512, 768)] {
        let (ha, fa) = random_matrix(&mut r, m, k);
        let (hb, fb) = random_matrix(&mut r, n, k);
        let (a, b) = (gpu.upload(&ha).unwrap(), gpu.upload(&hb).unwrap());
        let mut c = gpu.alloc::<bf16>(m * n).unwrap();
        c.poison().unwrap();
        if refused_off_hopper(&gpu, || gemm_tn(&gpu, &a, &b, &mut c, m, n, k)) {
            return;
        }
        gemm_tn(&gpu, &a, &b, &mut c, m, n, k).unwrap();
        finish_or_exit(&gpu, &format!("gemm_tn {m} x {n} x {k}")).unwrap();
        let out = c.to_host().unwrap();
        // One bf16 rounding of an f32 sum (2^-9 relative, 2^-8 kept) and f32 accumulation; a
        // wrong operand layout, stage or edge is off by whole products (~0.3 each).
        let what = format!("[{m}, {n}, {k}]");
        check_product(&what, |i, j| out[i * n + j].to_f32() as f64, &fa, &fb, (m, n, k), |w| 4e-3 * w.abs() + 1e-3);
    }
}

#[test]
fn register_a_wgmma_reads_b_both_ways() {
    let test = "register_a_wgmma_reads_b_both_ways";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let mut r = rng(test);
    let (ha, fa) = random_matrix(&mut r, BOX, BOX);
    let (hb, fb) = random_matrix(&mut r, BOX, BOX);
    let (a, b) = (gpu.upload(&ha).unwrap(), gpu.upload(&hb).unwrap());
    if refused_off_hopper(&gpu, || wgmma_rs(&gpu, &a, &b, BOX)) {
        return;
    }
    // All rows of B, and B cut at a row that is not a multiple of the 8-row swizzle atom.
    for b_rows in [BOX, 45] {
        let bv = |r: usize, c: usize| if r < b_rows { fb[r * BOX + c] as f64 } else { 0.0 };
        let out = wgmma_rs(&gpu, &a, &b, b_rows).unwrap();
        let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs());
        for i in 0..BOX {
            for j in 0..32 {
                let want: f64 = (0..BOX).map(|t| fa[i * BOX + t] as f64 * bv(j, t)).sum();
                let got = out.kmajor[i * 32 + j];
                assert!(close(got, want), "b_rows {b_rows}, A B^T [{i}][{j}]: {got} against {want}");
                let want: f64 = (0..BOX).map(|t| fa[i * BOX + t] as f64 * bv(32 + j, t)).sum();
                let got = out.shared_a[i * 32 + j];
                assert!(close(got, want), "b_rows {b_rows}, A B[32:64]^T from shared [{i}][{j}]: {got} against {want}");
                let want: f64 = (0..BOX).map(|t| fa[t * BOX + i] as f64 * bv(j, t)).sum();
                let got = out.mmajor_a[i * 32 + j];
                assert!(close(got, want), "b_rows {b_rows}, A^T B[0:32]^T, A M-major [{i}][{j}]: {got} against {want}");
            }
            for j in 0..BOX {
                let want: f64 = (0..BOX).map(|t| fa[i * BOX + t] as f64 * bv(t, j)).sum();
                let got = out.nmajor[i * BOX + j];
                assert!(close(got, want), "b_rows {b_rows}, A B [{i}][{j}]: {got} against {want}");
                let want: f64 = (0..BOX).map(|t| fa[t * BOX + i] as f64 * bv(t, j)).sum();
                let got = out.mn_major[i * BOX + j];
                assert!(close(got, want), "b_rows {b_rows}, A^T B, both MN-major [{i}][{j}]: {got} against {want}");
            }
        }
    }
}

#[test]
fn dq_reduce_modes_are_the_headers_numbers() {
    // The kernel branches on MAPET_DQ_REDUCE_* (cuda/params.h); the Rust enum restates them.
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda/params.h")).unwrap();
    for (mode, name) in DqReduce::ALL.into_iter().zip(["NONE", "RED1", "RED2", "RED4", "STORE"]) {
        let define = format!("#define MAPET_DQ_REDUCE_{name} {}", mode as i32);
        assert!(header.lines().any(|l| l.trim() == define), "{mode:?}: no `{define}` in cuda/params.h");
    }
}

/// What `dq_reduce` must leave in `dq` (row-major `[pairs, lq, 64]`), from the rule of
/// `MapetHopperDqReduce` in cuda/params.h: every warpgroup's tiles added at their position chunks.
fn dq_reduce_expected(pairs: usize, lq: usize, items: usize, mode: DqReduce) -> Vec<f32> {
    let mut out = vec![0.0f32; pairs * lq * 64];
    if mode == DqReduce::None {
        return out;
    }
    let chunks = dq_reduce_positions(lq) / 32;
    for pair in 0..pairs {
        for w in 0..3 {
            for i in 0..items {
                let q0 = 32 * ((5 * i + 3 * w) % chunks);
                for q in q0..(q0 + 32).min(lq) {
                    for d in 0..64 {
                        let v = ((13 * pair + 7 * w + 5 * i + 3 * d + q) % 5) as f32 - 2.0;
                        out[(pair * lq + q) * 64 + d] += v;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn dq_reductions_add_every_tile_once() {
    let test = "dq_reductions_add_every_tile_once";
    let Some(gpu) = gpu_or_skip(test) else { return };
    // ViT's 491 rows (the last chunk cut), a whole number of chunks, a single chunk; more tiles
    // than chunks (several additions to one element, from all three warpgroups) and fewer.
    for (pairs, lq, items) in [(5, 491, 24), (3, 128, 7), (2, 33, 2), (1, 20, 5)] {
        let mut acc = gpu.alloc::<f32>(pairs * 64 * dq_reduce_positions(lq)).unwrap();
        let mut dq = gpu.alloc::<bf16>(pairs * lq * 64).unwrap();
        if refused_off_hopper(&gpu, || dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, items, DqReduce::Red1)) {
            return;
        }
        for mode in [DqReduce::None, DqReduce::Red1, DqReduce::Red2, DqReduce::Red4] {
            // NaN everywhere first: an element the kernel fails to zero, add to or convert stays NaN.
            acc.poison().unwrap();
            dq.poison().unwrap();
            dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, items, mode).unwrap();
            finish_or_exit(&gpu, &format!("dq_reduce {mode:?} {pairs} x {lq}")).unwrap();
            let got = dq.to_host().unwrap();
            let want = dq_reduce_expected(pairs, lq, items, mode);
            // Sums of at most 3 items values in [-2, 2], so integers of at most 144: exact in f32
            // and in bf16, whatever order the additions came in.
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let (pair, q, d) = (k / (lq * 64), (k / 64) % lq, k % 64);
                assert_eq!(
                    g.to_f32(),
                    *w,
                    "{mode:?}, {pairs} pairs of {lq} rows, {items} tiles: pair {pair}, row {q}, dim {d}"
                );
            }
        }
        // The store mode runs (its racy values are not checked).
        dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, items, DqReduce::Store).unwrap();
        finish_or_exit(&gpu, "dq_reduce Store").unwrap();
    }
}

#[test]
fn dq_reduce_refuses_wrong_buffers() {
    let test = "dq_reduce_refuses_wrong_buffers";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let (pairs, lq) = (2, 40);
    let mut acc = gpu.alloc::<f32>(pairs * 64 * dq_reduce_positions(lq)).unwrap();
    let mut dq = gpu.alloc::<bf16>(pairs * lq * 64).unwrap();
    if refused_off_hopper(&gpu, || dq_reduce(&gpu, &mut acc, &mut dq, pairs, lq, 1, DqReduce::None)) {
        return;
    }
    // An accumulator sized for lq rows rather than whole chunks, and a dq one pair short.
    let mut short_acc = gpu.alloc::<f32>(pairs * 64 * lq).unwrap();
    let err = dq_reduce(&gpu, &mut short_acc, &mut dq, pairs, lq, 1, DqReduce::Red4).unwrap_err();
    assert!(err.to_string().contains("acc"), "{err}");
    let mut short_dq = gpu.alloc::<bf16>((pairs - 1) * lq * 64).unwrap();
    let err = dq_reduce(&gpu, &mut acc, &mut short_dq, pairs, lq, 1, DqReduce::Red4).unwrap_err();
    assert!(err.to_string().contains("dq"), "{err}");
    let err = dq_reduce(&gpu, &mut acc, &mut dq, 0, lq, 1, DqReduce::Red4).unwrap_err();
    assert!(err.to_string().contains("0 pairs"), "{err}");
    // An accumulator 16- but not 128-byte aligned: its L2 discard would drop a neighbour's lines.
    let mut big = gpu.alloc::<f32>(pairs * 64 * dq_reduce_positions(lq) + 4).unwrap();
    let mut shifted = big.view_mut(4..4 + pairs * 64 * dq_reduce_positions(lq)).unwrap();
    let err = dq_reduce(&gpu, &mut shifted, &mut dq, pairs, lq, 1, DqReduce::Red4).unwrap_err();
    assert!(err.to_string().contains("acc") && err.to_string().contains("128"), "{err}");
}

/// A programmatic dependent launch starts while the kernel before it still runs, and its wait
/// holds it until that kernel has ended; a plain launch starts after the end. The op kernels'
/// dependent launches (`MAPET_DEPENDENT_LAUNCH=1`) rest on both: without the first they save
/// nothing, which their benches cannot tell from noise, and without the second they race.
/// Checked on the stream the `Gpu` runs on (`MAPET_STREAM`; the context's legacy default stream
/// when unset) and on a non-blocking stream of its own: if only the second starts early,
/// `MAPET_STREAM=own` is what the dependent launches need.
#[test]
fn dependent_launches_start_early_and_wait() {
    let test = "dependent_launches_start_early_and_wait";
    let Some(gpu) = gpu_or_skip(test) else { return };
    // The primary's spin, and what the clock may be off by (%globaltimer's step is up to a
    // microsecond on some devices), in ns.
    const SPIN: u64 = 200_000;
    const SLACK: u64 = 2_000;
    if refused_off_hopper(&gpu, || dependent_launch_overlap(&gpu, SPIN, false)) {
        return;
    }
    let err = dependent_launch_overlap(&gpu, 2_000_000_000, true).unwrap_err();
    assert!(err.to_string().contains("at most 1 s"), "{err}");
    let own = Gpu::new_on_own_stream(0).unwrap();
    assert!(own.on_own_stream());
    let show = |t: &PdlTimes| {
        let rel = |x: u64| x as i64 - t.primary_end as i64;
        format!(
            "the secondary started {} ns and got past its wait {} ns after the primary's end",
            rel(t.secondary_start),
            rel(t.secondary_waited)
        )
    };
    let mut seen = Vec::new();
    for (stream, g) in [
        (if gpu.on_own_stream() { "its own stream" } else { "the legacy default stream" }, &gpu),
        ("a stream of its own", &own),
    ] {
        let plain = dependent_launch_overlap(g, SPIN, false).unwrap();
        let dependent = dependent_launch_overlap(g, SPIN, true).unwrap();
        eprintln!("{test}: on {stream}: plain: {}; dependent: {}", show(&plain), show(&dependent));
        seen.push((stream, plain, dependent));
    }
    for (stream, plain, dependent) in seen {
        assert!(
            plain.secondary_start + SLACK >= plain.primary_end,
            "on {stream}, a plain launch started early: {}",
            show(&plain)
        );
        assert!(
            dependent.secondary_waited + SLACK >= dependent.primary_end,
            "on {stream}, the wait returned before the primary ended: {}",
            show(&dependent)
        );
        assert!(
            dependent.secondary_start + SPIN / 2 < dependent.primary_end,
            "on {stream}, a dependent launch did not start during the primary's {SPIN} ns spin, so dependent launches \
             save nothing there: {}",
            show(&dependent)
        );
    }
}

#[test]
fn fragments_stored_transposed_read_back_as_the_transpose() {
    let test = "fragments_stored_transposed_read_back_as_the_transpose";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let (h, f) = random_matrix(&mut rng(test), BOX, 32);
    let a = gpu.upload(&h).unwrap();
    if refused_off_hopper(&gpu, || store_transposed(&gpu, &a)) {
        return;
    }
    let out = store_transposed(&gpu, &a).unwrap();
    // Exact: the values only move.
    for r in 0..32 {
        for c in 0..BOX {
            assert_eq!(out[r * BOX + c], f[c * 32 + r], "A^T [{r}][{c}] (A [{c}][{r}])");
        }
    }
}
