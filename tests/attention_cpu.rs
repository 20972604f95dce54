//! The permutation machinery and the CPU reference of the two-stream attention.
//!
//! The central check: the rank-order attention (fixed visibility pattern from `visible_bounds`)
//! equals the authors' formulation, attention in RASTER order under dense boolean masks built
//! straight from SPEC.md's table, on random permutations, after mapping rows between the two
//! orders. Then finite differences for the backward, the mask semantics, and the error paths.

// The naive references index by position on purpose: they read like the formulas.
#![allow(clippy::needless_range_loop)]

use mapet::error::Error;
use mapet::ops::attention::{cpu_backward, cpu_forward, f64_backward, f64_forward, AttentionShape};
use mapet::perm::{
    gather_predicted_rank_order, gather_rank_order, key_kind_rank, naive_raster_masks, order_from_ranks,
    predicted_index, row_kind_rank, sample_ranks, scatter_predicted_index_order, scatter_raster_order, validate_ranks,
    visible, visible_bounds, KeyKind, RowKind,
};
use mapet::testing::{rel_err, rng, to_f64, uniform};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ------------------------------------------------------------------------------------------------
// Helpers

fn shape(batch: usize, heads: usize, head_dim: usize, n_tokens: usize, n_context: usize) -> AttentionShape {
    AttentionShape { batch, heads, head_dim, n_tokens, n_context }
}

fn rel_err64(got: &[f64], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// One sample's rank-order rows [N + 2P, d] (or [N + P, d] without the query stream) -> raster
/// order: content rows by token index, mask rows and query rows in predicted_index order.
fn rank_to_raster(x: &[f64], ranks: &[u32], c: usize, d: usize, with_query: bool) -> Vec<f64> {
    let n = ranks.len();
    let p = n - c;
    let mut out = scatter_raster_order(&x[..n * d], ranks, d).unwrap();
    out.extend(scatter_predicted_index_order(&x[n * d..(n + p) * d], ranks, c, d).unwrap());
    if with_query {
        out.extend(scatter_predicted_index_order(&x[(n + p) * d..(n + 2 * p) * d], ranks, c, d).unwrap());
    }
    out
}

/// The inverse of [`rank_to_raster`].
fn raster_to_rank(x: &[f64], ranks: &[u32], c: usize, d: usize, with_query: bool) -> Vec<f64> {
    let n = ranks.len();
    let p = n - c;
    let mut out = gather_rank_order(&x[..n * d], ranks, d).unwrap();
    out.extend(gather_predicted_rank_order(&x[n * d..(n + p) * d], ranks, c, d).unwrap());
    if with_query {
        out.extend(gather_predicted_rank_order(&x[(n + p) * d..(n + 2 * p) * d], ranks, c, d).unwrap());
    }
    out
}

/// The authors' formulation, in f64: per sample, map the rank-order q, k, v to raster order,
/// attend with the dense raster masks (scores of masked keys dropped), map o and lse back.
fn naive_raster_forward(
    s: &AttentionShape,
    ranks: &[Vec<u32>],
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (c, hd, dm) = (s.n_context, s.head_dim, s.model_dim());
    let (qr, kr) = (s.q_rows(), s.k_rows());
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o = vec![0.0; s.q_len()];
    let mut lse = vec![0.0; s.lse_len()];
    for b in 0..s.batch {
        let rk = &ranks[b];
        let q_r = rank_to_raster(&q[b * qr * dm..(b + 1) * qr * dm], rk, c, dm, true);
        let k_r = rank_to_raster(&k[b * kr * dm..(b + 1) * kr * dm], rk, c, dm, false);
        let v_r = rank_to_raster(&v[b * kr * dm..(b + 1) * kr * dm], rk, c, dm, false);
        let (content, query) = naive_raster_masks(rk, c);
        // Raster rows: [0, N+P) use the content mask, [N+P, N+2P) the query mask.
        let mask_row =
            |i: usize| if i < kr { &content[i * kr..(i + 1) * kr] } else { &query[(i - kr) * kr..(i - kr + 1) * kr] };
        let mut o_r = vec![0.0; qr * dm];
        let mut lse_r = vec![vec![0.0; qr]; s.heads];
        for h in 0..s.heads {
            let cols = h * hd..(h + 1) * hd;
            for i in 0..qr {
                let mask = mask_row(i);
                let qi = &q_r[i * dm..][cols.clone()];
                let scores: Vec<Option<f64>> = (0..kr)
                    .map(|j| {
                        mask[j].then(|| {
                            scale * qi.iter().zip(&k_r[j * dm..][cols.clone()]).map(|(a, b)| a * b).sum::<f64>()
                        })
                    })
                    .collect();
                let max = scores.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let sum: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                lse_r[h][i] = max + sum.ln();
                for (j, sj) in scores.iter().enumerate() {
                    if let Some(sj) = sj {
                        let p = (sj - max).exp() / sum;
                        for (d, col) in cols.clone().enumerate() {
                            o_r[i * dm + col] += p * v_r[j * dm + cols.start + d];
                        }
                    }
                }
            }
        }
        o[b * qr * dm..(b + 1) * qr * dm].copy_from_slice(&raster_to_rank(&o_r, rk, c, dm, true));
        for h in 0..s.heads {
            let at = (b * s.heads + h) * qr;
            lse[at..at + qr].copy_from_slice(&raster_to_rank(&lse_r[h], rk, c, 1, true));
        }
    }
    (o, lse)
}

/// Random rank-order inputs q, k, v in [-scale, scale).
fn inputs(r: &mut impl Rng, s: &AttentionShape, scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (uniform(r, s.q_len(), scale), uniform(r, s.k_len(), scale), uniform(r, s.k_len(), scale))
}

fn forward32(s: &AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    // Poisoned outputs: everything must be written.
    let mut o = vec![f32::NAN; s.q_len()];
    let mut lse = vec![f32::NAN; s.lse_len()];
    cpu_forward(s, q, k, v, &mut o, &mut lse).unwrap();
    assert!(o.iter().chain(&lse).all(|x| x.is_finite()), "forward left unwritten or non-finite values");
    (o, lse)
}

fn forward64(s: &AttentionShape, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![f64::NAN; s.q_len()];
    let mut lse = vec![f64::NAN; s.lse_len()];
    f64_forward(s, q, k, v, &mut o, &mut lse).unwrap();
    assert!(o.iter().chain(&lse).all(|x| x.is_finite()), "forward left unwritten or non-finite values");
    (o, lse)
}

/// Checks the rank-order forward (f32 and f64) against the raster-order dense-mask formulation.
fn check_forward_against_raster(s: &AttentionShape, seed: u64) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let ranks: Vec<Vec<u32>> = (0..s.batch).map(|_| sample_ranks(&mut r, s.n_tokens)).collect();
    let (q, k, v) = inputs(&mut r, s, 1.5);
    let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
    let (o_naive, lse_naive) = naive_raster_forward(s, &ranks, &q64, &k64, &v64);

    let (o64, lse64) = forward64(s, &q64, &k64, &v64);
    let (e_o64, e_l64) = (rel_err64(&o64, &o_naive), rel_err64(&lse64, &lse_naive));
    assert!(e_o64 < 1e-12 && e_l64 < 1e-12, "{s:?}: f64 rank order vs raster: o {e_o64:.2e}, lse {e_l64:.2e}");

    let (o32, lse32) = forward32(s, &q, &k, &v);
    let (e_o, e_l) = (rel_err(&o32, &o_naive), rel_err(&lse32, &lse_naive));
    assert!(e_o < 1e-5 && e_l < 1e-5, "{s:?}: f32 rank order vs raster: o {e_o:.2e}, lse {e_l:.2e}");
}

// ------------------------------------------------------------------------------------------------
// Forward: rank-order layout == the authors' raster formulation

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn forward_matches_raster_dense_masks(
        batch in 1usize..3,
        heads in 1usize..3,
        head_dim in prop::sample::select(vec![4usize, 12, 16, 64]),
        n_tokens in 2usize..40,
        c_pick in 0u8..4,
        c_raw in any::<usize>(),
        seed in any::<u64>(),
    ) {
        let n_context = match c_pick {
            0 => 1,
            1 => n_tokens - 1,
            _ => 1 + c_raw % (n_tokens - 1),
        };
        check_forward_against_raster(&shape(batch, heads, head_dim, n_tokens, n_context), seed);
    }
}

#[test]
fn forward_matches_raster_vit_sizes() {
    let seed = rng("forward_matches_raster_vit_sizes").random();
    // ViT-B/16's N and C, two heads of 64; and a tiny-image model.
    check_forward_against_raster(&shape(1, 2, 64, 197, 50), seed);
    check_forward_against_raster(&shape(2, 3, 16, 17, 5), seed ^ 1);
}

// ------------------------------------------------------------------------------------------------
// Backward

/// L(q, k, v) = sum(w * o), so dL/do = w.
fn loss(s: &AttentionShape, q: &[f64], k: &[f64], v: &[f64], w: &[f64]) -> f64 {
    forward64(s, q, k, v).0.iter().zip(w).map(|(o, w)| o * w).sum()
}

fn backward64(s: &AttentionShape, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> [Vec<f64>; 3] {
    let (o, lse) = forward64(s, q, k, v);
    let mut dq = vec![f64::NAN; s.q_len()];
    let mut dk = vec![f64::NAN; s.k_len()];
    let mut dv = vec![f64::NAN; s.k_len()];
    f64_backward(s, q, k, v, &o, &lse, d_o, &mut dq, &mut dk, &mut dv).unwrap();
    [dq, dk, dv]
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng("backward_matches_finite_differences");
    // C = 1, C = N - 1 and a middle case; odd head dims.
    for s in [shape(2, 2, 4, 6, 1), shape(1, 1, 12, 5, 4), shape(1, 2, 16, 9, 3)] {
        let (q, k, v) = inputs(&mut r, &s, 1.5);
        let (q, k, v) = (to_f64(&q), to_f64(&k), to_f64(&v));
        let w = to_f64(&uniform(&mut r, s.q_len(), 1.0));
        let grads = backward64(&s, &q, &k, &v, &w);
        let eps = 1e-5;
        let mut inputs = [q, k, v];
        for (which, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let mut fd = vec![0.0; inputs[which].len()];
            for (e, fd_e) in fd.iter_mut().enumerate() {
                let x0 = inputs[which][e];
                inputs[which][e] = x0 + eps;
                let up = loss(&s, &inputs[0], &inputs[1], &inputs[2], &w);
                inputs[which][e] = x0 - eps;
                let down = loss(&s, &inputs[0], &inputs[1], &inputs[2], &w);
                inputs[which][e] = x0;
                *fd_e = (up - down) / (2.0 * eps);
            }
            let err = rel_err64(&grads[which], &fd);
            eprintln!("{s:?} {name}: rel err vs finite differences {err:.2e}");
            assert!(err < 1e-7, "{s:?} {name}: backward vs finite differences rel err {err:.2e}");
        }
    }
}

#[test]
fn backward_f32_matches_f64() {
    let mut r = rng("backward_f32_matches_f64");
    for s in [shape(1, 2, 64, 197, 50), shape(2, 3, 12, 11, 1), shape(2, 1, 16, 11, 10)] {
        let (q, k, v) = inputs(&mut r, &s, 1.5);
        let d_o = uniform(&mut r, s.q_len(), 1.0);
        let [dq64, dk64, dv64] = backward64(&s, &to_f64(&q), &to_f64(&k), &to_f64(&v), &to_f64(&d_o));

        let (o, lse) = forward32(&s, &q, &k, &v);
        // Poisoned: the gradients must be written, not accumulated.
        let mut dq = vec![f32::NAN; s.q_len()];
        let mut dk = vec![f32::NAN; s.k_len()];
        let mut dv = vec![f32::NAN; s.k_len()];
        cpu_backward(&s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv).unwrap();
        for (name, got, want) in [("dq", &dq, &dq64), ("dk", &dk, &dk64), ("dv", &dv, &dv64)] {
            assert!(got.iter().all(|x| x.is_finite()), "{s:?} {name}: not all written");
            let err = rel_err(got, want);
            eprintln!("{s:?} {name}: f32 vs f64 rel err {err:.2e}");
            assert!(err < 1e-5, "{s:?} {name}: f32 vs f64 rel err {err:.2e}");
        }
    }
}

#[test]
fn kernel_rounding_emulation_rounds_p_and_ds_and_stays_near_the_truth() {
    // The CUDA kernels' internal roundings, emulated (what `mapet::emulate` runs): bf16 P in the
    // forward (with its lazy running max), bf16 P and dS in the backward. Against the f64 truth
    // the error is that of bf16 (2^-9 relative), clearly more than f32's, and the forward's lse,
    // which no bf16 value enters, stays at f32 accuracy whatever base the running max lags to.
    let mut r = rng("kernel_rounding_emulation");
    // Scores spread wide (scale 4): running maxima rise by more than the lazy threshold.
    for (s, amp) in [(shape(2, 2, 64, 197, 50), 1.5), (shape(1, 3, 64, 65, 1), 4.0), (shape(2, 1, 16, 11, 10), 1.5)] {
        let (q, k, v) = inputs(&mut r, &s, amp);
        let d_o = uniform(&mut r, s.q_len(), 1.0);
        let (o64, lse64) = forward64(&s, &to_f64(&q), &to_f64(&k), &to_f64(&v));
        let [dq64, dk64, dv64] = backward64(&s, &to_f64(&q), &to_f64(&k), &to_f64(&v), &to_f64(&d_o));
        let (o32, lse32) = forward32(&s, &q, &k, &v);

        let mut o = vec![f32::NAN; s.q_len()];
        let mut lse = vec![f32::NAN; s.lse_len()];
        mapet::ops::attention::cpu_forward_kernel_rounding(&s, &q, &k, &v, &mut o, &mut lse).unwrap();
        let (eo, eo32) = (rel_err(&o, &o64), rel_err(&o32, &o64));
        eprintln!("{s:?}: O rel err, kernel rounding {eo:.2e}, f32 {eo32:.2e}; lse {:.2e}", rel_err(&lse, &lse64));
        assert!(eo < 4e-3 && eo > 10.0 * eo32, "{s:?}: O rel err {eo:.2e} (f32: {eo32:.2e})");
        assert!(rel_err(&lse, &lse64) < 1e-6 && rel_err(&lse32, &lse64) < 1e-6, "{s:?}: lse");

        let mut dq = vec![f32::NAN; s.q_len()];
        let mut dk = vec![f32::NAN; s.k_len()];
        let mut dv = vec![f32::NAN; s.k_len()];
        let bwd = mapet::ops::attention::cpu_backward_kernel_rounding;
        bwd(&s, &q, &k, &v, &o32, &lse32, &d_o, &mut dq, &mut dk, &mut dv).unwrap();
        for (name, got, want) in [("dq", &dq, &dq64), ("dk", &dk, &dk64), ("dv", &dv, &dv64)] {
            let err = rel_err(got, want);
            eprintln!("{s:?} {name}: kernel rounding vs f64 rel err {err:.2e}");
            assert!(err < 1e-2 && err > 1e-4, "{s:?} {name}: rel err {err:.2e}: bf16-sized rounding expected");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Mask semantics

#[test]
fn visible_follows_spec_table() {
    use KeyKind::{Content as CK, Mask as MK};
    use RowKind::{Content, MaskInH, Query};
    let c = 2; // N = 6: ranks 0, 1 are context, 2..5 predicted
    #[rustfmt::skip]
    let cases = [
        // content row of rank 3: context keys, content keys of rank <= 3, mask keys of rank > 3
        (Content, 3, CK, 0, true), (Content, 3, CK, 1, true), (Content, 3, CK, 2, true),
        (Content, 3, CK, 3, true), (Content, 3, CK, 4, false), (Content, 3, CK, 5, false),
        (Content, 3, MK, 2, false), (Content, 3, MK, 3, false), (Content, 3, MK, 4, true), (Content, 3, MK, 5, true),
        // a context row (rank 1): context keys and every mask key, no predicted content key
        (Content, 1, CK, 0, true), (Content, 1, CK, 1, true), (Content, 1, CK, 2, false),
        (Content, 1, MK, 2, true), (Content, 1, MK, 5, true),
        (Content, 0, CK, 1, true), (Content, 0, CK, 2, false),
        // mask token in h: context content keys, every mask key
        (MaskInH, 4, CK, 0, true), (MaskInH, 4, CK, 1, true), (MaskInH, 4, CK, 2, false), (MaskInH, 4, CK, 4, false),
        (MaskInH, 4, MK, 2, true), (MaskInH, 4, MK, 4, true), (MaskInH, 4, MK, 5, true),
        // query rank 2: content keys of rank < 2, mask keys of rank >= 2
        (Query, 2, CK, 0, true), (Query, 2, CK, 1, true), (Query, 2, CK, 2, false),
        (Query, 2, MK, 2, true), (Query, 2, MK, 5, true),
        // query rank 4: never its own content, its own mask token yes
        (Query, 4, CK, 3, true), (Query, 4, CK, 4, false), (Query, 4, CK, 5, false),
        (Query, 4, MK, 3, false), (Query, 4, MK, 4, true), (Query, 4, MK, 5, true),
    ];
    for (row, r, key, k, want) in cases {
        assert_eq!(visible(row, r, key, k, c), want, "visible({row:?}, {r}, {key:?}, {k}, C={c})");
    }
}

#[test]
fn rank_layout_matches_params_h() {
    // N = 5, C = 2, P = 3: rows 0..5 content, 5..8 mask (ranks 2..4), 8..11 query (ranks 2..4).
    let want_rows = [
        (RowKind::Content, 0),
        (RowKind::Content, 1),
        (RowKind::Content, 2),
        (RowKind::Content, 3),
        (RowKind::Content, 4),
        (RowKind::MaskInH, 2),
        (RowKind::MaskInH, 3),
        (RowKind::MaskInH, 4),
        (RowKind::Query, 2),
        (RowKind::Query, 3),
        (RowKind::Query, 4),
    ];
    for (row, want) in want_rows.iter().enumerate() {
        assert_eq!(row_kind_rank(5, 2, row), *want, "row {row}");
    }
    for (key, want) in want_rows[..8].iter().enumerate() {
        let want = (if want.0 == RowKind::Content { KeyKind::Content } else { KeyKind::Mask }, want.1);
        assert_eq!(key_kind_rank(5, 2, key), want, "key {key}");
    }
    // (a, m) by hand from params.h's formulas.
    let want_bounds = [(2, 5), (2, 5), (3, 6), (4, 7), (5, 8), (2, 5), (2, 5), (2, 5), (2, 5), (3, 6), (4, 7)];
    for (row, want) in want_bounds.iter().enumerate() {
        assert_eq!(visible_bounds(5, 2, row), *want, "bounds of row {row}");
    }
}

#[test]
fn visible_bounds_agree_with_visible() {
    for n in 2..=30 {
        for c in 1..n {
            let p = n - c;
            for row in 0..n + 2 * p {
                let (kind, r) = row_kind_rank(n, c, row);
                let (a, m) = visible_bounds(n, c, row);
                assert!(a <= m && m <= n + p, "N={n} C={c} row {row}: bounds ({a}, {m})");
                for key in 0..n + p {
                    let (key_kind, k) = key_kind_rank(n, c, key);
                    let by_bounds = key < a || key >= m;
                    assert_eq!(
                        by_bounds,
                        visible(kind, r, key_kind, k, c),
                        "N={n} C={c} row {row} ({kind:?} rank {r}) key {key} ({key_kind:?} rank {k}), bounds ({a}, {m})"
                    );
                }
            }
        }
    }
}

#[test]
fn raster_masks_see_every_token_once_and_match_rank_layout() {
    let mut r = rng("raster_masks_see_every_token_once_and_match_rank_layout");
    for _ in 0..40 {
        let n = r.random_range(2..40usize);
        let c = r.random_range(1..n);
        let p = n - c;
        let l = n + p;
        let ranks = sample_ranks(&mut r, n);
        let pidx = predicted_index(&ranks, c);
        let (content, query) = naive_raster_masks(&ranks, c);
        assert_eq!((content.len(), query.len()), (l * l, p * l));

        // Raster row/key -> (kind, rank, token).
        let key_of = |j: usize| {
            if j < n {
                (KeyKind::Content, ranks[j] as usize, j)
            } else {
                let t = pidx[j - n] as usize;
                (KeyKind::Mask, ranks[t] as usize, t)
            }
        };
        let rows = (0..l).map(|i| {
            let (kind, rank, _) = key_of(i);
            let kind = if kind == KeyKind::Content { RowKind::Content } else { RowKind::MaskInH };
            (kind, rank, &content[i * l..(i + 1) * l])
        });
        let query_rows = (0..p).map(|i| (RowKind::Query, ranks[pidx[i] as usize] as usize, &query[i * l..(i + 1) * l]));
        for (kind, rank, mask) in rows.chain(query_rows) {
            // Exactly N keys, and they cover every token position once.
            let mut seen = vec![0u32; n];
            for j in (0..l).filter(|&j| mask[j]) {
                seen[key_of(j).2] += 1;
            }
            assert!(seen.iter().all(|&s| s == 1), "N={n} C={c} {kind:?} row of rank {rank}: tokens seen {seen:?}");
            // The table by ranks, and the fixed rank-order pattern.
            let layout_row = match kind {
                RowKind::Content => rank,
                RowKind::MaskInH => n + rank - c,
                RowKind::Query => n + p + rank - c,
            };
            assert_eq!(row_kind_rank(n, c, layout_row), (kind, rank));
            let (a, m) = visible_bounds(n, c, layout_row);
            for (j, &vis) in mask.iter().enumerate() {
                let (key_kind, k, _) = key_of(j);
                assert_eq!(vis, visible(kind, rank, key_kind, k, c), "N={n} C={c} {kind:?} rank {rank} key {j}");
                let layout_key = if key_kind == KeyKind::Content { k } else { n + k - c };
                assert_eq!(vis, layout_key < a || layout_key >= m, "N={n} C={c} {kind:?} rank {rank} key {j}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Permutations

#[test]
fn sample_ranks_is_a_uniform_permutation_with_cls_first() {
    let mut r = rng("sample_ranks_is_a_uniform_permutation_with_cls_first");
    for n in [1, 2, 3, 50, 197] {
        let ranks = sample_ranks(&mut r, n);
        assert_eq!(ranks.len(), n);
        validate_ranks(&ranks).unwrap();
    }
    // N = 5: the 4! = 24 orders of the patches, 24000 draws, ~1000 +- 31 each.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..24_000 {
        *counts.entry(sample_ranks(&mut r, 5)).or_insert(0u32) += 1;
    }
    assert_eq!(counts.len(), 24, "not every permutation drawn");
    for (ranks, count) in &counts {
        assert!((850..=1150).contains(count), "permutation {ranks:?} drawn {count} times of 24000 (expected ~1000)");
    }
}

#[test]
fn order_and_predicted_index() {
    let mut r = rng("order_and_predicted_index");
    for _ in 0..20 {
        let n = r.random_range(2..60usize);
        let c = r.random_range(1..n);
        let ranks = sample_ranks(&mut r, n);
        let order = order_from_ranks(&ranks);
        for t in 0..n {
            assert_eq!(order[ranks[t] as usize] as usize, t);
        }
        let pidx = predicted_index(&ranks, c);
        assert_eq!(pidx.len(), n - c);
        assert!(pidx.windows(2).all(|w| w[0] < w[1]), "not ascending: {pidx:?}");
        for t in 0..n {
            assert_eq!(pidx.contains(&(t as u32)), ranks[t] as usize >= c, "token {t} rank {}", ranks[t]);
        }
    }
    // By hand: N = 5, permutation (0, 3, 1, 4, 2).
    let ranks = [0, 2, 4, 1, 3];
    assert_eq!(order_from_ranks(&ranks), vec![0, 3, 1, 4, 2]);
    assert_eq!(predicted_index(&ranks, 2), vec![1, 2, 4]);
    assert_eq!(predicted_index(&ranks, 4), vec![2]);
}

#[test]
fn gather_scatter_move_rows_by_rank() {
    let mut r = rng("gather_scatter_move_rows_by_rank");
    for _ in 0..20 {
        let n = r.random_range(2..40usize);
        let c = r.random_range(1..n);
        let p = n - c;
        let d = r.random_range(1..9usize);
        let ranks = sample_ranks(&mut r, n);
        let order = order_from_ranks(&ranks);
        let pidx = predicted_index(&ranks, c);

        let src: Vec<u64> = (0..n * d).map(|_| r.random()).collect();
        let by_rank = gather_rank_order(&src, &ranks, d).unwrap();
        for t in 0..n {
            let rk = ranks[t] as usize;
            assert_eq!(by_rank[rk * d..(rk + 1) * d], src[t * d..(t + 1) * d], "token {t}");
        }
        assert_eq!(scatter_raster_order(&by_rank, &ranks, d).unwrap(), src);

        let src: Vec<f32> = uniform(&mut r, p * d, 1.0);
        let by_rank = gather_predicted_rank_order(&src, &ranks, c, d).unwrap();
        for j in 0..p {
            let token = order[c + j];
            let i = pidx.iter().position(|&t| t == token).unwrap();
            assert_eq!(by_rank[j * d..(j + 1) * d], src[i * d..(i + 1) * d], "rank {}", c + j);
        }
        assert_eq!(scatter_predicted_index_order(&by_rank, &ranks, c, d).unwrap(), src);
    }
}

// ------------------------------------------------------------------------------------------------
// Errors

fn assert_unsupported<T: std::fmt::Debug>(res: mapet::Result<T>, field: &str) {
    match res {
        Err(Error::Unsupported { what, .. }) if what == field => {}
        other => panic!("expected Unsupported naming `{field}`, got {other:?}"),
    }
}

fn assert_shape<T: std::fmt::Debug>(res: mapet::Result<T>, tensor: &str) {
    match res {
        Err(ref e @ Error::Shape { tensor: t, .. }) if t == tensor => {
            assert!(e.to_string().contains(tensor), "message does not name `{tensor}`: {e}")
        }
        other => panic!("expected Shape naming `{tensor}`, got {other:?}"),
    }
}

#[test]
fn bad_shapes_are_errors() {
    let good = shape(2, 2, 4, 6, 2);
    good.validate().unwrap();
    assert_unsupported(shape(2, 2, 4, 6, 0).validate(), "n_context");
    assert_unsupported(shape(2, 2, 4, 6, 6).validate(), "n_context");
    assert_unsupported(shape(2, 2, 4, 6, 7).validate(), "n_context");
    assert_unsupported(shape(0, 2, 4, 6, 2).validate(), "batch");
    assert_unsupported(shape(2, 0, 4, 6, 2).validate(), "heads");
    assert_unsupported(shape(2, 2, 0, 6, 2).validate(), "head_dim");
    assert_unsupported(shape(2, 2, 4, 0, 0).validate(), "n_tokens");
    assert_unsupported(shape(usize::MAX / 2, 2, 4, 6, 2).validate(), "shape");
    assert_unsupported(shape(1, 1, 4, usize::MAX, 1).validate(), "shape");

    let s = good;
    let (ql, kl, ll) = (s.q_len(), s.k_len(), s.lse_len());
    assert_eq!((s.n_pred(), s.q_rows(), s.k_rows(), s.model_dim()), (4, 14, 10, 8));
    assert_eq!((ql, kl, ll), (2 * 14 * 8, 2 * 10 * 8, 2 * 2 * 14));
    assert_eq!(s.scale(), 0.5);
    let v = |len: usize| vec![0.5f32; len];

    // Forward: C = 0 and C = N through the call itself, then each buffer.
    let fwd = |s: &AttentionShape, lens: [usize; 5]| {
        let (mut o, mut lse) = (v(lens[3]), v(lens[4]));
        cpu_forward(s, &v(lens[0]), &v(lens[1]), &v(lens[2]), &mut o, &mut lse)
    };
    assert_unsupported(fwd(&shape(2, 2, 4, 6, 0), [ql, kl, kl, ql, ll]), "n_context");
    assert_unsupported(fwd(&shape(2, 2, 4, 6, 6), [ql, kl, kl, ql, ll]), "n_context");
    fwd(&s, [ql, kl, kl, ql, ll]).unwrap();
    for (i, name) in ["q", "k", "v", "o", "lse"].iter().enumerate() {
        let mut lens = [ql, kl, kl, ql, ll];
        lens[i] += 1;
        assert_shape(fwd(&s, lens), name);
        lens[i] -= 2;
        assert_shape(fwd(&s, lens), name);
    }

    // Backward: q, k, v, o, lse, d_o, dq, dk, dv.
    let bwd = |s: &AttentionShape, lens: [usize; 9]| {
        let (mut dq, mut dk, mut dv) = (v(lens[6]), v(lens[7]), v(lens[8]));
        cpu_backward(
            s,
            &v(lens[0]),
            &v(lens[1]),
            &v(lens[2]),
            &v(lens[3]),
            &v(lens[4]),
            &v(lens[5]),
            &mut dq,
            &mut dk,
            &mut dv,
        )
    };
    let good_lens = [ql, kl, kl, ql, ll, ql, ql, kl, kl];
    assert_unsupported(bwd(&shape(2, 2, 4, 6, 0), good_lens), "n_context");
    assert_unsupported(bwd(&shape(2, 2, 4, 6, 6), good_lens), "n_context");
    bwd(&s, good_lens).unwrap();
    for (i, name) in ["q", "k", "v", "o", "lse", "d_o", "dq", "dk", "dv"].iter().enumerate() {
        let mut lens = good_lens;
        lens[i] += 3;
        assert_shape(bwd(&s, lens), name);
    }

    // f64 variants check the same way.
    let mut o = vec![0.0f64; ql];
    let mut lse = vec![0.0f64; ll];
    assert_shape(f64_forward(&s, &vec![0.0; ql], &vec![0.0; kl + 1], &vec![0.0; kl], &mut o, &mut lse), "k");
}

#[test]
fn bad_ranks_are_errors() {
    validate_ranks(&[0, 2, 1]).unwrap();
    assert_shape(validate_ranks(&[]), "ranks");
    assert_shape(validate_ranks(&[0, 1, 1]), "ranks");
    assert_shape(validate_ranks(&[0, 1, 3]), "ranks");
    assert_unsupported(validate_ranks(&[1, 0, 2]), "ranks");

    let src = vec![1.0f32; 3 * 2];
    assert_shape(gather_rank_order(&src, &[0, 1, 1], 2), "ranks");
    assert_shape(gather_rank_order(&src[..5], &[0, 2, 1], 2), "src_raster");
    assert_shape(scatter_raster_order(&src, &[0, 2, 1, 3], 2), "src_rank");
    assert_unsupported(scatter_raster_order(&src, &[2, 0, 1], 2), "ranks");
    assert_unsupported(gather_predicted_rank_order(&src[..4], &[0, 2, 1], 0, 2), "n_context");
    assert_unsupported(gather_predicted_rank_order(&src[..4], &[0, 2, 1], 3, 2), "n_context");
    assert_shape(gather_predicted_rank_order(&src, &[0, 2, 1], 1, 2), "src_index");
    assert_shape(scatter_predicted_index_order(&src[..2], &[0, 2, 1], 1, 2), "src_rank");
    gather_predicted_rank_order(&src[..4], &[0, 2, 1], 1, 2).unwrap();
}
