//! Patch embedding: the CPU reference against a naive direct convolution (raster order, then
//! gathered by rank) in f64, its gradients against the naive backward and finite differences, the
//! uint8 entry against the f32 entry, the CUDA kernels against the CPU (DESIGN.md's rule), their
//! determinism, and the errors on bad input. GPU tests skip cleanly without a GPU.

use half::bf16;
use mapet::cpu::round_bf16;
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::patch_embed::{
    cpu_backward, cpu_forward_f32, cpu_forward_u8, cuda_backward, cuda_forward_f32, cuda_forward_u8, normalize_u8,
    weight_grad_splits_ws, DevicePixels, Normalize, PatchEmbedShape, PixelOrder, Pixels, BWD_WS_MAX_ROWS,
};
use mapet::ops::KernelChoice;
use mapet::testing::{
    assert_within_baseline, gpu_poisoning_or_skip, misses, rel_err, rng, to_f64, uniform, uniform_bf16, Misses,
};
use mapet::Error;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn shape(batch: usize, image: usize, patch: usize, dim: usize, n_context: usize) -> PatchEmbedShape {
    PatchEmbedShape { batch, image, patch, dim, n_context }
}

/// A shape with a random context size 0 < C < N.
fn shape_with_random_c(rng: &mut impl Rng, batch: usize, image: usize, patch: usize, dim: usize) -> PatchEmbedShape {
    let n = 1 + (image / patch) * (image / patch);
    shape(batch, image, patch, dim, rng.random_range(1..n))
}

/// Per sample: rank[0] = 0 and the patches in a uniformly random order.
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

/// Inputs of one call.
struct Case {
    s: PatchEmbedShape,
    hwc: Vec<u8>,
    norm: Normalize,
    chw: Vec<f32>,
    ranks: Vec<i32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    pos: Vec<f32>,
    cls: Vec<f32>,
    mask: Vec<f32>,
}

fn make_case(rng: &mut impl Rng, s: PatchEmbedShape) -> Case {
    let hwc: Vec<u8> = (0..s.pixels_len()).map(|_| rng.random()).collect();
    let norm = Normalize {
        mean: [0, 1, 2].map(|_| rng.random_range(0.3..0.6)),
        std: [0, 1, 2].map(|_| rng.random_range(0.15..0.35)),
    };
    let fan_in = s.patch_len() as f32;
    Case {
        hwc,
        norm,
        chw: uniform(rng, s.pixels_len(), 2.0),
        ranks: random_ranks(rng, &s),
        weight: uniform(rng, s.weight_len(), 1.0 / fan_in.sqrt()),
        bias: uniform(rng, s.dim, 0.5),
        pos: uniform(rng, s.pos_len(), 0.5),
        cls: uniform(rng, s.dim, 0.5),
        mask: uniform(rng, s.dim, 0.5),
        s,
    }
}

/// The u8 images normalised in f64, CHW.
fn normalized_f64(s: &PatchEmbedShape, hwc: &[u8], norm: &Normalize) -> Vec<f64> {
    let n = s.image;
    let mut x = vec![0.0f64; s.pixels_len()];
    for b in 0..s.batch {
        for y in 0..n {
            for xx in 0..n {
                for c in 0..3 {
                    let u = hwc[((b * n + y) * n + xx) * 3 + c] as f64;
                    x[((b * 3 + c) * n + y) * n + xx] = (u / 255.0 - norm.mean[c] as f64) / norm.std[c] as f64;
                }
            }
        }
    }
    x
}

/// Naive f64 forward: direct convolution of each patch in raster order (token t = patch t-1),
/// then every token's row placed at its rank, then the mask rows.
#[allow(clippy::too_many_arguments)]
fn naive_forward(
    s: &PatchEmbedShape,
    x: &[f64],
    ranks: &[i32],
    weight: &[f32],
    bias: &[f32],
    pos: &[f32],
    cls: &[f32],
    mask: &[f32],
) -> Vec<f64> {
    let (d, n, c, np, rows, p, img, g) =
        (s.dim, s.n_tokens(), s.n_context, s.n_predicted(), s.out_rows(), s.patch, s.image, s.grid());
    let mut out = vec![f64::NAN; s.out_len()];
    for b in 0..s.batch {
        // Raster-order tokens first.
        let mut tokens = vec![0.0f64; n * d];
        for ch in 0..d {
            tokens[ch] = cls[ch] as f64 + pos[ch] as f64;
        }
        for py in 0..g {
            for px in 0..g {
                let t = 1 + py * g + px;
                for ch in 0..d {
                    let mut acc = 0.0f64;
                    for cc in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                let w = weight[((ch * 3 + cc) * p + ky) * p + kx] as f64;
                                acc += w * x[((b * 3 + cc) * img + py * p + ky) * img + px * p + kx];
                            }
                        }
                    }
                    tokens[t * d + ch] = acc + bias[ch] as f64 + pos[t * d + ch] as f64;
                }
            }
        }
        // Gather by rank.
        for t in 0..n {
            let r = ranks[b * n + t] as usize;
            for ch in 0..d {
                out[(b * rows + r) * d + ch] = tokens[t * d + ch];
            }
            if r >= c {
                for row in [n + r - c, n + np + r - c] {
                    for ch in 0..d {
                        out[(b * rows + row) * d + ch] = mask[ch] as f64 + pos[t * d + ch] as f64;
                    }
                }
            }
        }
    }
    out
}

/// Gradients in f64: weight, bias, pos_embed, cls, mask.
struct Grads64 {
    w: Vec<f64>,
    b: Vec<f64>,
    pos: Vec<f64>,
    cls: Vec<f64>,
    mask: Vec<f64>,
}

/// Naive f64 backward of [`naive_forward`], added onto `init` (the same initial values for all).
fn naive_backward(s: &PatchEmbedShape, x: &[f64], ranks: &[i32], d_out: &[f32], init: &Grads32) -> Grads64 {
    let (d, n, c, np, rows, p, img, g) =
        (s.dim, s.n_tokens(), s.n_context, s.n_predicted(), s.out_rows(), s.patch, s.image, s.grid());
    let mut gr = Grads64 {
        w: to_f64(&init.w),
        b: to_f64(&init.b),
        pos: to_f64(&init.pos),
        cls: to_f64(&init.cls),
        mask: to_f64(&init.mask),
    };
    let dy = |b: usize, row: usize, ch: usize| d_out[(b * rows + row) * d + ch] as f64;
    for b in 0..s.batch {
        for t in 0..n {
            let r = ranks[b * n + t] as usize;
            for ch in 0..d {
                let v = dy(b, r, ch);
                gr.pos[t * d + ch] += v;
                if t == 0 {
                    gr.cls[ch] += v;
                } else {
                    gr.b[ch] += v;
                    let (py, px) = ((t - 1) / g, (t - 1) % g);
                    for cc in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                gr.w[((ch * 3 + cc) * p + ky) * p + kx] +=
                                    v * x[((b * 3 + cc) * img + py * p + ky) * img + px * p + kx];
                            }
                        }
                    }
                }
                if r >= c {
                    let m = dy(b, n + r - c, ch) + dy(b, n + np + r - c, ch);
                    gr.pos[t * d + ch] += m;
                    gr.mask[ch] += m;
                }
            }
        }
    }
    gr
}

/// f32 gradients (host).
#[derive(Clone, PartialEq)]
struct Grads32 {
    w: Vec<f32>,
    b: Vec<f32>,
    pos: Vec<f32>,
    cls: Vec<f32>,
    mask: Vec<f32>,
}

impl Grads32 {
    fn random(rng: &mut impl Rng, s: &PatchEmbedShape, scale: f32) -> Self {
        Grads32 {
            w: uniform(rng, s.weight_len(), scale),
            b: uniform(rng, s.dim, scale),
            pos: uniform(rng, s.pos_len(), scale),
            cls: uniform(rng, s.dim, scale),
            mask: uniform(rng, s.dim, scale),
        }
    }

    fn cpu_backward(&mut self, s: &PatchEmbedShape, pixels: Pixels<'_>, ranks: &[i32], d_out: &[f32]) {
        cpu_backward(s, pixels, ranks, d_out, &mut self.w, &mut self.b, &mut self.pos, &mut self.cls, &mut self.mask)
            .unwrap();
    }

    fn named(&self) -> [(&'static str, &[f32]); 5] {
        [
            ("dweight", &self.w),
            ("dbias", &self.b),
            ("dpos_embed", &self.pos),
            ("dcls", &self.cls),
            ("dmask", &self.mask),
        ]
    }
}

impl Grads64 {
    fn named(&self) -> [&[f64]; 5] {
        [&self.w, &self.b, &self.pos, &self.cls, &self.mask]
    }
}

fn cpu_forward(case: &Case) -> Vec<f32> {
    let s = &case.s;
    let mut out = vec![f32::NAN; s.out_len()];
    cpu_forward_f32(s, &case.chw, &case.ranks, &case.weight, &case.bias, &case.pos, &case.cls, &case.mask, &mut out)
        .unwrap();
    out
}

const CPU_SHAPES: &[(usize, usize, usize, usize)] = &[
    // (batch, image, patch, dim)
    (2, 32, 8, 16),
    (3, 12, 4, 5),
    (2, 15, 3, 7),
    (1, 28, 7, 9),
    (2, 16, 16, 24),
    (2, 20, 5, 3),
];

#[test]
fn cpu_forward_matches_naive_convolution() {
    let mut rng = rng("cpu_forward_matches_naive_convolution");
    for &(b, img, p, d) in CPU_SHAPES {
        let s = shape_with_random_c(&mut rng, b, img, p, d);
        let case = make_case(&mut rng, s);
        let out = cpu_forward(&case);
        let want = naive_forward(
            &s,
            &to_f64(&case.chw),
            &case.ranks,
            &case.weight,
            &case.bias,
            &case.pos,
            &case.cls,
            &case.mask,
        );
        mapet::testing::assert_all_written("cpu forward", &out);
        let e = rel_err(&out, &want);
        eprintln!("{s:?}: rel err {e:.3e}");
        assert!(e < 1e-5, "{s:?}: CPU forward differs from the naive convolution: {e:.3e}");
    }
}

#[test]
fn cpu_forward_u8_equals_f32_entry_on_normalized_image() {
    let mut rng = rng("cpu_forward_u8_equals_f32_entry_on_normalized_image");
    for &(b, img, p, d) in CPU_SHAPES {
        let s = shape_with_random_c(&mut rng, b, img, p, d);
        let mut case = make_case(&mut rng, s);
        let mut out_u8 = vec![f32::NAN; s.out_len()];
        cpu_forward_u8(
            &s,
            &case.hwc,
            &case.norm,
            &case.ranks,
            &case.weight,
            &case.bias,
            &case.pos,
            &case.cls,
            &case.mask,
            &mut out_u8,
        )
        .unwrap();
        case.chw = normalize_u8(&s, &case.hwc, &case.norm).unwrap();
        let out_f32 = cpu_forward(&case);
        assert!(
            out_u8.iter().zip(&out_f32).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{s:?}: u8 entry differs from the f32 entry on the normalised image"
        );
        let x = normalized_f64(&s, &case.hwc, &case.norm);
        let want = naive_forward(&s, &x, &case.ranks, &case.weight, &case.bias, &case.pos, &case.cls, &case.mask);
        let e = rel_err(&out_u8, &want);
        assert!(e < 1e-5, "{s:?}: u8 CPU forward differs from the naive convolution: {e:.3e}");
    }
}

#[test]
fn cpu_backward_matches_naive_and_accumulates() {
    let mut rng = rng("cpu_backward_matches_naive_and_accumulates");
    for &(b, img, p, d) in CPU_SHAPES {
        let s = shape_with_random_c(&mut rng, b, img, p, d);
        let case = make_case(&mut rng, s);
        let d_out = uniform(&mut rng, s.out_len(), 1.0);
        let init = Grads32::random(&mut rng, &s, 0.5);
        let mut got = init.clone();
        got.cpu_backward(&s, Pixels::F32 { chw: &case.chw }, &case.ranks, &d_out);
        let want = naive_backward(&s, &to_f64(&case.chw), &case.ranks, &d_out, &init);
        for ((name, g), w) in got.named().into_iter().zip(want.named()) {
            let e = rel_err(g, w);
            assert!(e < 1e-5, "{s:?}: {name} differs from the naive backward: {e:.3e}");
        }
        // The u8 entry equals the f32 entry on the normalised image.
        let mut got_u8 = init.clone();
        got_u8.cpu_backward(&s, Pixels::U8 { hwc: &case.hwc, norm: case.norm }, &case.ranks, &d_out);
        let chw = normalize_u8(&s, &case.hwc, &case.norm).unwrap();
        let mut got_norm = init.clone();
        got_norm.cpu_backward(&s, Pixels::F32 { chw: &chw }, &case.ranks, &d_out);
        assert!(got_u8 == got_norm, "{s:?}: u8 backward differs from the f32 backward on the normalised image");
    }
}

/// Loss = sum(out * dy) in f64 over the f32 forward.
fn loss(case: &Case, dy: &[f32]) -> f64 {
    cpu_forward(case).iter().zip(dy).map(|(&o, &g)| o as f64 * g as f64).sum()
}

/// Parameter `which` (weight, bias, pos_embed, cls, mask), element i.
fn param_mut(c: &mut Case, which: usize, i: usize) -> &mut f32 {
    match which {
        0 => &mut c.weight[i],
        1 => &mut c.bias[i],
        2 => &mut c.pos[i],
        3 => &mut c.cls[i],
        _ => &mut c.mask[i],
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = rng("cpu_backward_matches_finite_differences");
    for &(b, img, p, d) in &[(2usize, 12usize, 4usize, 6usize), (2, 15, 5, 4)] {
        let s = shape_with_random_c(&mut rng, b, img, p, d);
        let mut case = make_case(&mut rng, s);
        let dy = uniform(&mut rng, s.out_len(), 1.0);
        let zero = Grads32 {
            w: vec![0.0; s.weight_len()],
            b: vec![0.0; s.dim],
            pos: vec![0.0; s.pos_len()],
            cls: vec![0.0; s.dim],
            mask: vec![0.0; s.dim],
        };
        let mut grads = zero.clone();
        grads.cpu_backward(&s, Pixels::F32 { chw: &case.chw }, &case.ranks, &dy);
        // The forward is affine in every parameter, so a large step has no truncation error.
        let eps = 0.25f32;
        let mut checked = 0;
        for which in 0..5 {
            let len = [s.weight_len(), s.dim, s.pos_len(), s.dim, s.dim][which];
            for _ in 0..12 {
                let i = rng.random_range(0..len);
                let orig = *param_mut(&mut case, which, i);
                *param_mut(&mut case, which, i) = orig + eps;
                let up = loss(&case, &dy);
                *param_mut(&mut case, which, i) = orig - eps;
                let down = loss(&case, &dy);
                *param_mut(&mut case, which, i) = orig;
                let fd = (up - down) / (2.0 * eps as f64);
                let (name, g) = grads.named()[which];
                let an = g[i] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 * an.abs().max(1.0),
                    "{s:?}: {name}[{i}]: finite difference {fd:.6} vs backward {an:.6}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 60);
    }
}

#[test]
fn bad_inputs_are_refused() {
    let mut rng = rng("bad_inputs_are_refused");
    let s = shape(2, 16, 4, 8, 5);
    let case = make_case(&mut rng, s);
    let mut out = vec![0.0f32; s.out_len()];
    let fwd = |case: &Case, ranks: &[i32], out: &mut Vec<f32>| {
        cpu_forward_f32(&case.s, &case.chw, ranks, &case.weight, &case.bias, &case.pos, &case.cls, &case.mask, out)
    };
    assert!(fwd(&case, &case.ranks, &mut out).is_ok());

    // Shapes.
    for bad in [
        shape(2, 18, 4, 8, 5),  // image not a multiple of patch
        shape(2, 16, 4, 8, 0),  // C = 0
        shape(2, 16, 4, 8, 17), // C = N
        shape(0, 16, 4, 8, 5),
        shape(2, 16, 0, 8, 5),
        shape(2, 16, 4, 0, 5),
    ] {
        let e = bad.validate().unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{bad:?}: {e}");
        let e = cpu_forward_f32(
            &bad,
            &case.chw,
            &case.ranks,
            &case.weight,
            &case.bias,
            &case.pos,
            &case.cls,
            &case.mask,
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{bad:?}: {e}");
    }
    // The CUDA path also refuses dim % 8 != 0; the CPU path takes it.
    let odd = shape(2, 16, 4, 12, 5);
    assert!(odd.validate().is_ok());
    let e = odd.validate_cuda().unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "patch embedding dim", .. }), "{e}");
    assert!(s.validate_cuda().is_ok());
    // More channels than a grid has rows of blocks (the weight-gradient reduction's): refused,
    // and the largest that fits is taken.
    let e = shape(1, 16, 4, 65_536, 5).validate_cuda().unwrap_err();
    assert!(e.to_string().contains("dim 65536"), "{e}");
    assert!(shape(1, 16, 4, 65_528, 5).validate_cuda().is_ok());

    // Ranks.
    let n = s.n_tokens();
    let mut bad = case.ranks.clone();
    bad[n] = 3; // sample 1: rank[0] != 0
    let e = fwd(&case, &bad, &mut out).unwrap_err();
    assert!(matches!(e, Error::Shape { tensor: "ranks", .. }), "{e}");
    let mut bad = case.ranks.clone();
    bad[2] = bad[1]; // duplicate
    assert!(matches!(fwd(&case, &bad, &mut out).unwrap_err(), Error::Shape { tensor: "ranks", .. }));
    let mut bad = case.ranks.clone();
    bad[3] = n as i32; // out of range
    assert!(matches!(fwd(&case, &bad, &mut out).unwrap_err(), Error::Shape { tensor: "ranks", .. }));
    assert!(matches!(fwd(&case, &case.ranks[1..], &mut out).unwrap_err(), Error::Shape { tensor: "ranks", .. }));

    // Lengths, each tensor named.
    let short = |v: &[f32]| v[..v.len() - 1].to_vec();
    let c = &case;
    let checks: Vec<(&str, Result<(), Error>)> = vec![
        ("pixels (f32 [B, 3, S, S])", {
            cpu_forward_f32(&s, &short(&c.chw), &c.ranks, &c.weight, &c.bias, &c.pos, &c.cls, &c.mask, &mut out)
        }),
        (
            "weight",
            cpu_forward_f32(&s, &c.chw, &c.ranks, &short(&c.weight), &c.bias, &c.pos, &c.cls, &c.mask, &mut out),
        ),
        ("bias", cpu_forward_f32(&s, &c.chw, &c.ranks, &c.weight, &short(&c.bias), &c.pos, &c.cls, &c.mask, &mut out)),
        (
            "pos_embed",
            cpu_forward_f32(&s, &c.chw, &c.ranks, &c.weight, &c.bias, &short(&c.pos), &c.cls, &c.mask, &mut out),
        ),
        (
            "cls_token",
            cpu_forward_f32(&s, &c.chw, &c.ranks, &c.weight, &c.bias, &c.pos, &short(&c.cls), &c.mask, &mut out),
        ),
        (
            "mask_positional_token",
            cpu_forward_f32(&s, &c.chw, &c.ranks, &c.weight, &c.bias, &c.pos, &c.cls, &short(&c.mask), &mut out),
        ),
        ("out", cpu_forward_f32(&s, &c.chw, &c.ranks, &c.weight, &c.bias, &c.pos, &c.cls, &c.mask, &mut short(&out))),
        ("pixels (uint8 [B, S, S, 3])", {
            cpu_forward_u8(&s, &c.hwc[1..], &c.norm, &c.ranks, &c.weight, &c.bias, &c.pos, &c.cls, &c.mask, &mut out)
        }),
    ];
    for (name, r) in checks {
        match r {
            Err(Error::Shape { tensor, .. }) => assert_eq!(tensor, name),
            other => panic!("{name}: expected a shape error, got {other:?}"),
        }
    }
    let bad_norm = Normalize { mean: [0.5; 3], std: [0.2, 0.0, 0.2] };
    let e = cpu_forward_u8(&s, &c.hwc, &bad_norm, &c.ranks, &c.weight, &c.bias, &c.pos, &c.cls, &c.mask, &mut out)
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "pixel normalisation", .. }), "{e}");

    // Backward lengths.
    let d_out = uniform(&mut rng, s.out_len(), 1.0);
    let mut g = Grads32::random(&mut rng, &s, 0.1);
    let px = Pixels::F32 { chw: &c.chw };
    let e = cpu_backward(&s, px, &c.ranks, &d_out[1..], &mut g.w, &mut g.b, &mut g.pos, &mut g.cls, &mut g.mask);
    assert!(matches!(e, Err(Error::Shape { tensor: "d_out", .. })));
    let mut w = short(&g.w);
    let e = cpu_backward(&s, px, &c.ranks, &d_out, &mut w, &mut g.b, &mut g.pos, &mut g.cls, &mut g.mask);
    assert!(matches!(e, Err(Error::Shape { tensor: "dweight", .. })));
    let mut pos = short(&g.pos);
    let e = cpu_backward(&s, px, &c.ranks, &d_out, &mut g.w, &mut g.b, &mut pos, &mut g.cls, &mut g.mask);
    assert!(matches!(e, Err(Error::Shape { tensor: "dpos_embed", .. })));
    let mut m = short(&g.mask);
    let e = cpu_backward(&s, px, &c.ranks, &d_out, &mut g.w, &mut g.b, &mut g.pos, &mut g.cls, &mut m);
    assert!(matches!(e, Err(Error::Shape { tensor: "dmask_token", .. })));
}

#[test]
fn pixel_order_names_parse_and_bad_names_are_refused() {
    for order in PixelOrder::ALL {
        assert_eq!(PixelOrder::parse_name(order.name()).unwrap(), order);
    }
    let e = PixelOrder::parse_name("HWC").unwrap_err();
    assert!(e.contains("chw or hwc") && e.contains("MAPET_PATCH_EMBED_ORDER"), "{e}");
    // The pair the backend runs: the measured defaults when neither variable is set (hwc-ws-raw
    // both ways on compute capability 9.0 only), the forward's order for the
    // backward when only the forward's is set, each by name when given, and an unknown name
    // refused naming its variable.
    use PixelOrder::{Chw, Hwc, HwcWs, HwcWsRaw};
    let (hopper, ampere) = ((9, 0), (8, 0));
    let pair = |f, b, cc| PixelOrder::pair_named(f, b, cc).unwrap();
    assert_eq!(pair(None, None, hopper), (HwcWsRaw, HwcWsRaw));
    assert_eq!(pair(None, None, ampere), (Hwc, Hwc));
    assert_eq!(pair(Some("chw"), None, hopper), (Chw, Chw));
    assert_eq!(pair(Some("hwc-ws"), None, hopper), (HwcWs, HwcWs));
    assert_eq!(pair(None, Some("hwc-ws"), hopper), (HwcWsRaw, HwcWs));
    assert_eq!(pair(None, Some("chw"), ampere), (Hwc, Chw));
    assert_eq!(pair(Some("hwc"), Some("hwc-ws"), ampere), (Hwc, HwcWs));
    for (f, b, var) in [(Some("ws"), None, PixelOrder::VAR), (None, Some("ws"), PixelOrder::BACKWARD_VAR)] {
        let bad = PixelOrder::pair_named(f, b, hopper).unwrap_err().to_string();
        assert!(bad.contains(var) && bad.contains("\"ws\""), "{bad}");
    }
}

// ------------------------------------------------------------------------------------------ GPU

/// Device copies of a case's inputs.
struct DeviceCase {
    hwc: DeviceBuffer<u8>,
    chw: DeviceBuffer<f32>,
    ranks: DeviceBuffer<i32>,
    weight: DeviceBuffer<bf16>,
    bias: DeviceBuffer<f32>,
    pos: DeviceBuffer<f32>,
    cls: DeviceBuffer<f32>,
    mask: DeviceBuffer<f32>,
}

fn upload(gpu: &Gpu, c: &Case) -> DeviceCase {
    DeviceCase {
        hwc: gpu.upload(&c.hwc).unwrap(),
        chw: gpu.upload(&c.chw).unwrap(),
        ranks: gpu.upload(&c.ranks).unwrap(),
        weight: gpu.upload_bf16(&c.weight).unwrap(),
        bias: gpu.upload(&c.bias).unwrap(),
        pos: gpu.upload(&c.pos).unwrap(),
        cls: gpu.upload(&c.cls).unwrap(),
        mask: gpu.upload(&c.mask).unwrap(),
    }
}

/// The variable that names, comma-separated, the pixel orders the GPU tests run (`hwc,hwc-ws`);
/// unset, all of them. The f32 entry counts as `chw`. So that the run script can find which orders
/// pass on their own when one fails (a kernel fault is sticky and fails every later launch of the
/// process; a hang ends it).
const ORDERS_VAR: &str = "MAPET_TEST_PATCH_ORDERS";

/// Whether [`ORDERS_VAR`] keeps `order`; an unknown name fails the test, naming the variable.
fn listed(order: PixelOrder) -> bool {
    PixelOrder::listed_in(ORDERS_VAR).unwrap_or_else(|e| panic!("{e}")).contains(&order)
}

/// A GPU entry point: f32 CHW pixels, or uint8 HWC pixels contracted in one of the orders.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Entry {
    F32,
    U8(PixelOrder),
}

impl Entry {
    const ALL: [Entry; 5] = [
        Entry::F32,
        Entry::U8(PixelOrder::Chw),
        Entry::U8(PixelOrder::Hwc),
        Entry::U8(PixelOrder::HwcWs),
        Entry::U8(PixelOrder::HwcWsRaw),
    ];

    /// Whether `gpu` runs this entry (the warp-specialised kernels need compute capability 9.0) and
    /// `MAPET_TEST_PATCH_ORDERS` keeps it ([`listed`]); says so when it does not.
    fn runs_on(self, gpu: &Gpu) -> bool {
        let order = match self {
            Entry::F32 => PixelOrder::Chw,
            Entry::U8(order) => order,
        };
        if !listed(order) {
            eprintln!("skipping the {} entry: {ORDERS_VAR} leaves out {}", self.name(), order.name());
            return false;
        }
        let ok = match self {
            Entry::F32 => true,
            Entry::U8(order) => order.supported_on(gpu),
        };
        if !ok {
            eprintln!("skipping the {} entry: {} is not a compute capability 9.0 device", self.name(), gpu.name());
        }
        ok
    }

    fn name(self) -> String {
        match self {
            Entry::F32 => "f32".into(),
            Entry::U8(order) => format!("u8, {} order", order.name()),
        }
    }
}

fn gpu_forward(gpu: &Gpu, c: &Case, dc: &DeviceCase, entry: Entry) -> mapet::Result<Vec<f32>> {
    let mut out = gpu.alloc::<bf16>(c.s.out_len())?;
    out.poison()?;
    match entry {
        Entry::U8(order) => cuda_forward_u8(
            gpu, order, &c.s, &dc.hwc, &c.norm, &dc.ranks, &dc.weight, &dc.bias, &dc.pos, &dc.cls, &dc.mask, &mut out,
        )?,
        Entry::F32 => {
            cuda_forward_f32(gpu, &c.s, &dc.chw, &dc.ranks, &dc.weight, &dc.bias, &dc.pos, &dc.cls, &dc.mask, &mut out)?
        }
    }
    // A kernel that never finishes ends the binary within seconds, naming the launch.
    mapet::testing::finish_or_exit(gpu, &format!("patch embedding forward, {}, {:?}", entry.name(), c.s))?;
    out.to_host_f32()
}

fn gpu_backward(
    gpu: &Gpu,
    c: &Case,
    dc: &DeviceCase,
    entry: Entry,
    d_out: &DeviceBuffer<bf16>,
    init: &Grads32,
) -> mapet::Result<Grads32> {
    let mut w = gpu.upload(&init.w)?;
    let mut b = gpu.upload(&init.b)?;
    let mut pos = gpu.upload(&init.pos)?;
    let mut cls = gpu.upload(&init.cls)?;
    let mut mask = gpu.upload(&init.mask)?;
    let (pixels, order) = match entry {
        Entry::U8(order) => (DevicePixels::U8 { hwc: &dc.hwc, norm: c.norm }, order),
        Entry::F32 => (DevicePixels::F32 { chw: &dc.chw }, PixelOrder::Chw),
    };
    cuda_backward(gpu, order, &c.s, pixels, &dc.ranks, d_out, &mut w, &mut b, &mut pos, &mut cls, &mut mask)?;
    mapet::testing::finish_or_exit(gpu, &format!("patch embedding backward, {}, {:?}", entry.name(), c.s))?;
    Ok(Grads32 { w: w.to_host()?, b: b.to_host()?, pos: pos.to_host()?, cls: cls.to_host()?, mask: mask.to_host()? })
}

/// The kernel against the CPU baseline (pixels and weight rounded to bf16, f32 arithmetic, output
/// rounded to bf16) and the f64 truth, forward and backward, for every entry.
fn check_against_cpu(gpu: &Gpu, rng: &mut impl Rng, s: PatchEmbedShape) {
    let case = make_case(rng, s);
    let dc = upload(gpu, &case);
    let d_out_host = uniform_bf16(rng, s.out_len(), 1.0);
    let d_out = gpu.upload_bf16(&d_out_host).unwrap();
    let init = Grads32::random(rng, &s, 0.5);
    let mut weight_bf16 = case.weight.clone();
    round_bf16(&mut weight_bf16);
    for entry in Entry::ALL.into_iter().filter(|e| e.runs_on(gpu)) {
        let u8_pixels = entry != Entry::F32;
        let what = entry.name();
        eprintln!("{s:?}, {what} pixels");
        let (x_true, mut x_kernel) = if u8_pixels {
            (normalized_f64(&s, &case.hwc, &case.norm), normalize_u8(&s, &case.hwc, &case.norm).unwrap())
        } else {
            (to_f64(&case.chw), case.chw.clone())
        };
        round_bf16(&mut x_kernel);

        // Forward.
        let truth = naive_forward(&s, &x_true, &case.ranks, &case.weight, &case.bias, &case.pos, &case.cls, &case.mask);
        let mut baseline = vec![f32::NAN; s.out_len()];
        cpu_forward_f32(
            &s,
            &x_kernel,
            &case.ranks,
            &weight_bf16,
            &case.bias,
            &case.pos,
            &case.cls,
            &case.mask,
            &mut baseline,
        )
        .unwrap();
        round_bf16(&mut baseline);
        let kernel = gpu_forward(gpu, &case, &dc, entry).unwrap();
        assert_within_baseline(&format!("forward ({what} pixels)"), &kernel, &baseline, &truth, 2.0, 1e-5);

        // Backward, accumulated onto `init`.
        let truth = naive_backward(&s, &x_true, &case.ranks, &d_out_host, &init);
        let mut baseline = init.clone();
        baseline.cpu_backward(&s, Pixels::F32 { chw: &x_kernel }, &case.ranks, &d_out_host);
        let kernel = gpu_backward(gpu, &case, &dc, entry, &d_out, &init).unwrap();
        for (((name, k), (_, b)), t) in kernel.named().into_iter().zip(baseline.named()).zip(truth.named()) {
            assert_within_baseline(&format!("{name} ({what} pixels)"), k, b, t, 3.0, 1e-5);
        }
    }
}

/// (image, patch) pairs: the fast paths (p % 8 == 0) and the scalar path with K tails.
const GPU_GEOMETRIES: &[(usize, usize)] = &[(32, 8), (64, 16), (224, 16), (28, 7), (12, 4), (15, 3), (48, 24)];
const GPU_DIMS: &[usize] = &[8, 24, 136, 192, 768];

#[test]
fn gpu_matches_cpu_on_fixed_shapes() {
    let Some(gpu) = gpu_poisoning_or_skip("gpu_matches_cpu_on_fixed_shapes") else { return };
    let mut rng = rng("gpu_matches_cpu_on_fixed_shapes");
    // The ViT-B/16 geometry with its context size, and a small one.
    check_against_cpu(&gpu, &mut rng, shape(2, 224, 16, 768, 50));
    check_against_cpu(&gpu, &mut rng, shape(3, 32, 8, 24, 1));
    // More samples than the batch-sum kernel's 4 slices x 4 unrolled loads (three passes over
    // the batch, the last partial), and 33 groups of 8 channels (two blocks of 32 groups, the
    // second partial).
    check_against_cpu(&gpu, &mut rng, shape(40, 32, 8, 264, 5));
    // More samples than the token sums stage ranks for at once (512): a second, partial chunk,
    // restaged after a barrier.
    check_against_cpu(&gpu, &mut rng, shape(1030, 32, 8, 24, 5));
    // More slices than the hwc-ws forwards' token rows take (24 column pairs): 27 and 48 slices
    // (patch 24 and 32), where the load a slice ahead finds no pair left.
    check_against_cpu(&gpu, &mut rng, shape(2, 48, 24, 200, 3));
    check_against_cpu(&gpu, &mut rng, shape(1, 64, 32, 40, 3));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, max_shrink_iters: 4, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu_proptest(
        geometry in proptest::sample::select(GPU_GEOMETRIES),
        dim in proptest::sample::select(GPU_DIMS),
        batch in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_poisoning_or_skip("gpu_matches_cpu_proptest") else { return Ok(()) };
        let seed = seed ^ mapet::testing::fresh_seed();
        eprintln!("gpu_matches_cpu_proptest: case seed {seed}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (image, patch) = geometry;
        let batch = if image >= 128 { batch.min(2) } else { batch };
        let s = shape_with_random_c(&mut rng, batch, image, patch, dim);
        check_against_cpu(&gpu, &mut rng, s);
    }
}

#[test]
fn gpu_refuses_unsupported_and_bad_lengths() {
    let Some(gpu) = gpu_poisoning_or_skip("gpu_refuses_unsupported_and_bad_lengths") else { return };
    let mut rng = rng("gpu_refuses_unsupported_and_bad_lengths");
    // Odd dim: the CPU takes it, the GPU refuses it.
    for dim in [7, 12, 100] {
        let s = shape_with_random_c(&mut rng, 2, 16, 8, dim);
        let case = make_case(&mut rng, s);
        let dc = upload(&gpu, &case);
        for entry in Entry::ALL {
            let e = gpu_forward(&gpu, &case, &dc, entry).unwrap_err();
            assert!(matches!(e, Error::Unsupported { what: "patch embedding dim", .. }), "{e}");
        }
        let d_out = gpu.upload_bf16(&uniform(&mut rng, s.out_len(), 1.0)).unwrap();
        let init = Grads32::random(&mut rng, &s, 0.1);
        let e = gpu_backward(&gpu, &case, &dc, Entry::F32, &d_out, &init).err().unwrap();
        assert!(matches!(e, Error::Unsupported { what: "patch embedding dim", .. }), "{e}");
    }
    // Wrong lengths are named.
    let s = shape_with_random_c(&mut rng, 2, 16, 8, 16);
    let case = make_case(&mut rng, s);
    let mut dc = upload(&gpu, &case);
    dc.ranks = gpu.upload(&case.ranks[1..]).unwrap();
    assert!(matches!(gpu_forward(&gpu, &case, &dc, Entry::F32).unwrap_err(), Error::Shape { tensor: "ranks", .. }));
    let mut dc = upload(&gpu, &case);
    dc.pos = gpu.upload(&case.pos[1..]).unwrap();
    let hwc = Entry::U8(PixelOrder::Hwc);
    assert!(matches!(gpu_forward(&gpu, &case, &dc, hwc).unwrap_err(), Error::Shape { tensor: "pos_embed", .. }));
    let dc = upload(&gpu, &case);
    let d_out = gpu.upload_bf16(&uniform(&mut rng, s.out_len() - 1, 1.0)).unwrap();
    let init = Grads32::random(&mut rng, &s, 0.1);
    let e = gpu_backward(&gpu, &case, &dc, hwc, &d_out, &init).err().unwrap();
    assert!(matches!(e, Error::Shape { tensor: "d_out", .. }), "{e}");
    let bad_norm = Normalize { mean: [0.5; 3], std: [0.2, f32::NAN, 0.2] };
    let mut bad_case = make_case(&mut rng, s);
    bad_case.norm = bad_norm;
    let dc = upload(&gpu, &bad_case);
    let e = gpu_forward(&gpu, &bad_case, &dc, hwc).unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "pixel normalisation", .. }), "{e}");
}

/// The forward's elements for which `wrong` holds, by the patch row's place in a 128-row tile
/// (16-row slice, row mod 8) and by the column's place in a 192- and a 128-channel tile (8-column
/// chunk, column pair): the fragment and tile coordinates of the wgmma kernels. CLS and mask rows
/// count along "not a patch row" only.
fn forward_misses(c: &Case, wrong: impl Fn(usize) -> bool) -> Misses {
    let (n, d, rows) = (c.s.n_tokens(), c.s.dim, c.s.n_tokens() + 2 * c.s.n_predicted());
    // Patch row m of each content row b*R + rank(t).
    let mut patch_row = vec![None; c.s.batch * rows];
    for b in 0..c.s.batch {
        for t in 1..n {
            let r = c.ranks[b * n + t] as usize;
            patch_row[b * rows + r] = Some(b * (n - 1) + t - 1);
        }
    }
    let m = |i: usize| patch_row[i / d];
    misses(
        c.s.out_len(),
        wrong,
        &[
            ("not a patch row", &|i| m(i).is_none().then_some(0)),
            ("16-row slice of a 128-row tile", &|i| m(i).map(|m| m % 128 / 16)),
            ("patch row mod 8", &|i| m(i).map(|m| m % 8)),
            ("8-column chunk of a 192-channel tile", &|i| Some(i % d % 192 / 8)),
            ("8-column chunk of a 128-channel tile", &|i| Some(i % d % 128 / 8)),
            ("column pair in a chunk", &|i| Some(i % 8 / 2)),
        ],
    )
}

/// The weight gradient's elements for which `wrong` holds, by the places of the channel and of
/// the k' index in their 128-wide tiles (the weight is in CHW order, k = (c p + ky) p + kx; the
/// kernels contract in k' = (ky p + kx) 3 + c).
fn weight_grad_misses(s: &PatchEmbedShape, wrong: impl Fn(usize) -> bool) -> Misses {
    let (k, p) = (s.patch_len(), s.patch);
    let k_hwc = |i: usize| {
        let (c, rem) = (i % k / (p * p), i % k % (p * p));
        rem * 3 + c
    };
    misses(
        s.weight_len(),
        wrong,
        &[
            ("16-channel slice of a 128-channel tile", &|i| Some(i / k % 128 / 16)),
            ("channel mod 8", &|i| Some(i / k % 8)),
            ("8-wide k' chunk of a 128-wide tile", &|i| Some(k_hwc(i) % 128 / 8)),
            ("k' pair in a chunk", &|i| Some(k_hwc(i) % 8 / 2)),
        ],
    )
}

/// The miss reports of the GPU comparisons (no GPU needed): they count each wrong element in the
/// buckets it belongs to.
#[test]
fn miss_reports_place_the_wrong_elements() {
    let mut r = rng("miss_reports_place_the_wrong_elements");
    let c = make_case(&mut r, shape(2, 32, 8, 24, 5));
    // Every column of the content row of sample 1, token 4: patch row 16 + 3 = 19.
    let (n, d) = (c.s.n_tokens(), c.s.dim);
    let row = (n + 2 * c.s.n_predicted()) + c.ranks[n + 4] as usize;
    let m = forward_misses(&c, |i| i / d == row);
    assert_eq!(m.wrong.len(), d);
    assert_eq!((m.count("patch row mod 8", 3), m.count("16-row slice of a 128-row tile", 1)), (24, 24));
    assert_eq!((m.count("column pair in a chunk", 0), m.count("not a patch row", 0)), (6, 0));
    // Channel 9, c = 1, ky = 0, kx = 2 (p = 8: k = 64 + 2, k' = 2 * 3 + 1 = 7).
    let m = weight_grad_misses(&c.s, |i| i == 9 * c.s.patch_len() + 66);
    assert_eq!(m.count("channel mod 8", 1), 1);
    assert_eq!((m.count("8-wide k' chunk of a 128-wide tile", 0), m.count("k' pair in a chunk", 3)), (1, 1));
}

/// The warp-specialised weight gradient's splits (no GPU needed): whole 64-row slices, at most
/// BWD_WS_MAX_ROWS rows each (its row table must fit beside the ring), together covering every
/// patch row with no empty split, and one wave of blocks at ViT-B.
#[test]
fn warp_specialised_weight_splits_cover_the_rows_in_whole_slices() {
    for (batch, image, patch, dim) in [(128, 224, 16, 768), (1, 32, 8, 24), (512, 224, 16, 768), (3, 64, 32, 200)] {
        let s = shape(batch, image, patch, dim, 1);
        for sm_count in [1, 78, 132, 144] {
            let (splits, rows) = weight_grad_splits_ws(&s, sm_count);
            let m = batch * s.n_patches();
            let at = format!("{s:?} on {sm_count} SMs: {splits} splits of {rows} rows");
            assert!(rows % 64 == 0 && rows <= BWD_WS_MAX_ROWS, "{at}");
            assert!(splits * rows >= m && (splits - 1) * rows < m, "{at}");
        }
    }
    let vit_b = shape(128, 224, 16, 768, 50);
    assert_eq!(weight_grad_splits_ws(&vit_b, 132), (7, 3584), "18 tiles x 7 splits: one wave of 126 blocks");
}

/// How far bf16 rounding of the normalised pixels moves the weight gradient, measured on `samples`
/// of its elements drawn at random: the largest |sum over patch rows of d_out (x - bf16(x))|, with x
/// the exactly normalised pixel and bf16(x) what the mma.sync kernels multiply (`normalize_u8`,
/// rounded). `hwc-ws` multiplies exact raw pixels instead, so this is how far apart the two kernels
/// may honestly land.
fn pixel_rounding_gap(rng: &mut impl Rng, c: &Case, d_out: &[f32], samples: usize) -> f64 {
    let s = &c.s;
    let (n, rows, d, p, img, g) = (s.n_tokens(), s.out_rows(), s.dim, s.patch, s.image, s.grid());
    let exact = normalized_f64(s, &c.hwc, &c.norm);
    let mut rounded = normalize_u8(s, &c.hwc, &c.norm).unwrap();
    round_bf16(&mut rounded);
    let mut gap = 0f64;
    for _ in 0..samples {
        let (ch, cc, ky, kx) =
            (rng.random_range(0..d), rng.random_range(0..3), rng.random_range(0..p), rng.random_range(0..p));
        let mut sum = 0f64;
        for b in 0..s.batch {
            for t in 1..n {
                let r = c.ranks[b * n + t] as usize;
                let (py, px) = ((t - 1) / g, (t - 1) % g);
                let i = ((b * 3 + cc) * img + py * p + ky) * img + px * p + kx;
                sum += d_out[(b * rows + r) * d + ch] as f64 * (exact[i] - rounded[i] as f64);
            }
        }
        gap = gap.max(sum.abs());
    }
    gap
}

/// What the raw-pixel forward (`hwc-ws-raw`) multiplies and adds, formed on the CPU the way its
/// kernels form them: the pixels as u - 127 (exact; CHW f32), the weight as f16(256 W s[c]) / 256
/// (W the bf16 weight the card gets; CHW order; the card multiplies f16(256 W s[c]) by the exact
/// (u - 127) / 256, the same products) and the bias as bias + sum_k W (h[c] + 127 s[c]) (in f64
/// here, where mapet_patch_embed_weight_hwc_raw sums in f32: the last bits differ), with s =
/// 1 / (255 std) and h = -mean / std taken from the launcher's own Normalize::affine.
fn raw_pixel_inputs(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (s, n) = (&c.s, c.s.image);
    let (scale, shift) = c.norm.affine();
    let mut x = vec![0f32; s.pixels_len()];
    for b in 0..s.batch {
        for y in 0..n {
            for xx in 0..n {
                for ch in 0..3 {
                    x[((b * 3 + ch) * n + y) * n + xx] = c.hwc[((b * n + y) * n + xx) * 3 + ch] as f32 - 127.0;
                }
            }
        }
    }
    let (pp, k) = (s.patch * s.patch, s.patch_len());
    let mut w = c.weight.clone();
    round_bf16(&mut w);
    let mut w_raw = vec![0f32; w.len()];
    let mut bias = vec![0f32; s.dim];
    for d in 0..s.dim {
        let mut fold = c.bias[d] as f64;
        for j in 0..k {
            let ch = j / pp;
            let wj = w[d * k + j];
            w_raw[d * k + j] = half::f16::from_f32(wj * scale[ch] * 256.0).to_f32() / 256.0;
            fold += wj as f64 * (shift[ch] + 127.0 * scale[ch]) as f64;
        }
        bias[d] = fold as f32;
    }
    (x, w_raw, bias)
}

/// The raw-pixel forward's arithmetic, run on the CPU (raw_pixel_inputs through the CPU forward,
/// the output rounded to bf16 once): within the bound check_against_cpu holds every kernel to
/// (2 x the CPU baseline's error against the f64 truth) for that test's inputs, so the card's
/// test passes if the kernels compute what they are written to. The baseline rounds each
/// normalised pixel to bf16; this rounds each scaled weight to f16 instead (about 0.85 times the
/// baseline's error here: most of what is left is the output's rounding to bf16).
#[test]
fn raw_pixel_forward_arithmetic_is_within_the_gpu_tests_bound() {
    let mut rng = rng("raw_pixel_forward_arithmetic_is_within_the_gpu_tests_bound");
    for s in [shape(1, 224, 16, 64, 50), shape(3, 32, 8, 24, 1), shape(4, 64, 16, 136, 7), shape(2, 64, 32, 40, 3)] {
        let case = make_case(&mut rng, s);
        let x_true = normalized_f64(&s, &case.hwc, &case.norm);
        let truth = naive_forward(&s, &x_true, &case.ranks, &case.weight, &case.bias, &case.pos, &case.cls, &case.mask);
        let mut x_kernel = normalize_u8(&s, &case.hwc, &case.norm).unwrap();
        round_bf16(&mut x_kernel);
        let mut weight_bf16 = case.weight.clone();
        round_bf16(&mut weight_bf16);
        let forward = |x: &[f32], w: &[f32], bias: &[f32]| {
            let mut out = vec![f32::NAN; s.out_len()];
            cpu_forward_f32(&s, x, &case.ranks, w, bias, &case.pos, &case.cls, &case.mask, &mut out).unwrap();
            round_bf16(&mut out);
            out
        };
        let baseline = forward(&x_kernel, &weight_bf16, &case.bias);
        let (x_raw, w_raw, bias_raw) = raw_pixel_inputs(&case);
        let raw = forward(&x_raw, &w_raw, &bias_raw);
        assert_within_baseline(&format!("{s:?} raw-pixel forward, on the CPU"), &raw, &baseline, &truth, 2.0, 1e-5);
    }
}

/// The largest difference, over `samples` random (patch row, channel) pairs, between the sums the
/// raw-pixel forward forms (raw_pixel_inputs) and those of the mma.sync HWC kernel (bf16-rounded
/// normalised pixels times the bf16 weight, plus the bias), before either rounds its output.
fn raw_forward_gap(rng: &mut impl Rng, c: &Case, samples: usize) -> f64 {
    let s = &c.s;
    let (n, d, p, img, g, k) = (s.n_tokens(), s.dim, s.patch, s.image, s.grid(), s.patch_len());
    let (x_raw, w_raw, bias_raw) = raw_pixel_inputs(c);
    let mut x = normalize_u8(s, &c.hwc, &c.norm).unwrap();
    round_bf16(&mut x);
    let mut w = c.weight.clone();
    round_bf16(&mut w);
    let mut gap = 0f64;
    for _ in 0..samples {
        let (b, t, ch) = (rng.random_range(0..s.batch), rng.random_range(1..n), rng.random_range(0..d));
        let (py, px) = ((t - 1) / g, (t - 1) % g);
        let (mut raw, mut mma) = (bias_raw[ch] as f64, c.bias[ch] as f64);
        for j in 0..k {
            let (cc, ky, kx) = (j / (p * p), j / p % p, j % p);
            let i = ((b * 3 + cc) * img + py * p + ky) * img + px * p + kx;
            raw += w_raw[ch * k + j] as f64 * x_raw[i] as f64;
            mma += w[ch * k + j] as f64 * x[i] as f64;
        }
        gap = gap.max((raw - mma).abs());
    }
    gap
}

/// The sm_90a-only orders (`hwc-ws`, `hwc-ws-raw`) are refused, with an error that names the order
/// and the compute capability, where they cannot run; where they can, they agree with the mma.sync
/// HWC kernels (and the tests above check them against the CPU on such a device).
#[test]
fn hopper_orders_run_only_on_compute_capability_9_0() {
    let test = "hopper_orders_run_only_on_compute_capability_9_0";
    let Some(gpu) = gpu_poisoning_or_skip(test) else { return };
    let mut rng = rng(test);
    let orders = [PixelOrder::HwcWs, PixelOrder::HwcWsRaw];
    if gpu.compute_capability() != (9, 0) {
        let s = shape_with_random_c(&mut rng, 2, 32, 8, 24);
        let case = make_case(&mut rng, s);
        let dc = upload(&gpu, &case);
        let d_out = gpu.upload_bf16(&uniform(&mut rng, s.out_len(), 1.0)).unwrap();
        let init = Grads32::random(&mut rng, &s, 0.1);
        for order in orders {
            assert!(!order.supported_on(&gpu));
            let forward = gpu_forward(&gpu, &case, &dc, Entry::U8(order)).unwrap_err();
            let backward = gpu_backward(&gpu, &case, &dc, Entry::U8(order), &d_out, &init).err().unwrap();
            for e in [forward, backward] {
                let msg = e.to_string();
                assert!(matches!(e, Error::Unsupported { what: "pixel order", .. }), "{e}");
                assert!(msg.contains(order.name()) && msg.contains("9.0"), "{msg}");
            }
        }
        return;
    }
    // On 9.0 the Hopper orders are compared with the hwc kernels: each needs both listed.
    let orders: Vec<PixelOrder> = orders.into_iter().filter(|&o| listed(o) && listed(PixelOrder::Hwc)).collect();
    if orders.is_empty() {
        eprintln!("SKIP {test}: {ORDERS_VAR} leaves out hwc, or both Hopper orders");
        return;
    }
    let hwc = Entry::U8(PixelOrder::Hwc);
    // Tile edges: 200 and 392 channels end in a partial 128-channel tile (and 192-channel tile of
    // hwc-ws), 5 * 16 and 48 * 196 patch rows in a partial 128-row tile; p = 8, 16 and 32 give
    // K = 192, 768 and 3072 (the weight gradient's k' tiles, partial for 192). At 32 and 48
    // images of 224 x 224, hwc-ws's blocks take more than one tile each (196 and 222 tiles).
    for (batch, image, patch, dim) in
        [(2, 32, 8, 24), (5, 64, 16, 200), (32, 224, 16, 768), (48, 224, 16, 392), (2, 64, 32, 64)]
    {
        let s = shape_with_random_c(&mut rng, batch, image, patch, dim);
        let case = make_case(&mut rng, s);
        let dc = upload(&gpu, &case);
        let d_out_host = uniform_bf16(&mut rng, s.out_len(), 1.0);
        let d_out = gpu.upload_bf16(&d_out_host).unwrap();
        let init = Grads32::random(&mut rng, &s, 0.1);
        let reference = gpu_forward(&gpu, &case, &dc, hwc).unwrap();
        let reference_grads = gpu_backward(&gpu, &case, &dc, hwc, &d_out, &init).unwrap();
        let scale = reference_grads.w.iter().fold(0f32, |m, v| m.max(v.abs()));
        // The weight gradient's bf16 rounding gap is the same for both orders (hwc-ws-raw's
        // backward is hwc-ws's).
        let gap = pixel_rounding_gap(&mut rng, &case, &d_out_host, 4096);
        eprintln!("{s:?}: pixel rounding moves the weight gradient by up to {gap:.3e} (largest element {scale:.3e})");
        for &order in &orders {
            let name = order.name();
            // Against the mma.sync HWC kernels: the same bf16 products, summed in another order
            // (within a 16-deep step; hwc-ws also starts from bias + pos_embed). Forward: each
            // output is rounded to bf16 once, so the two may land one bf16 ulp apart, at most
            // 2^-7 = 7.8e-3 of the value (hence 1e-2). Weight gradient: f32 sums of 32 rows of
            // products of magnitude up to about 1 here differ by a few f32 ulps, around 1e-6 of
            // the largest element; 1e-4 of it leaves room for the tensor cores' internal order
            // while a wrong layout, which moves elements by the order of the largest one, cannot
            // pass.
            // hwc-ws-raw rounds each scaled weight to f16 where the mma.sync kernel rounds each
            // normalised pixel to bf16: their sums differ by up to the gap measured on 4096
            // random outputs (raw_forward_gap), allowed 3 times over for the outputs not sampled
            // (on the CPU, for four of this test's shapes, the largest gap over all outputs came
            // to 1.0-1.37 times the sampled one, 4-6e-3 in all).
            let fwd_gap =
                if order == PixelOrder::HwcWsRaw { 3.0 * raw_forward_gap(&mut rng, &case, 4096) as f32 } else { 0.0 };
            let out = gpu_forward(&gpu, &case, &dc, Entry::U8(order)).unwrap();
            mapet::testing::assert_all_written(&format!("{name} forward"), &out);
            let near = |a: f32, b: f32, tol: f32| (a - b).abs() <= tol;
            let m =
                forward_misses(&case, |i| !near(out[i], reference[i], 1e-2 * reference[i].abs().max(1.0) + fwd_gap));
            if let Some(&i) = m.wrong.first() {
                eprintln!("{}", m.report(&format!("the {name} forward")));
                panic!("{s:?}: forward element {i}: {name} {}, mma.sync {}", out[i], reference[i]);
            }
            // hwc-ws's weight gradient multiplies the raw pixels (exact in bf16) and normalises
            // the sums, where the mma.sync kernel multiplies bf16-rounded normalised pixels: the
            // two differ by the sum of those roundings, measured here on 4096 random elements
            // (pixel_rounding_gap); 3 times its largest covers the elements not sampled (on the
            // CPU the largest move over all elements came to 1.1-1.7 times the sampled one, about
            // 2e-3 of the largest element), and a wrong layout, which moves elements by the order
            // of the largest one, still fails.
            let grads = gpu_backward(&gpu, &case, &dc, Entry::U8(order), &d_out, &init).unwrap();
            let (w, w_ref) = (&grads.w, &reference_grads.w);
            let tol = 1e-4 * scale + 3.0 * gap as f32;
            let m = weight_grad_misses(&s, |i| !near(w[i], w_ref[i], tol));
            if let Some(&i) = m.wrong.first() {
                eprintln!("{}", m.report(&format!("the {name} weight gradient")));
                panic!("{s:?}: weight gradient element {i}: {name} {}, mma.sync {}", w[i], w_ref[i]);
            }
        }
    }
}

/// Runs every entry's forward and backward twice on each of `shapes`, calling `before(gpu, run)`
/// ahead of run 0 and run 1, and asserts that both runs give the same bits, that every forward
/// element was written, and that the backward changed every gradient.
fn two_runs_agree(gpu: &Gpu, test: &str, shapes: &[PatchEmbedShape], before: impl Fn(&Gpu, usize)) {
    let mut rng = rng(test);
    for &s in shapes {
        let case = make_case(&mut rng, s);
        let dc = upload(gpu, &case);
        let d_out = gpu.upload_bf16(&uniform(&mut rng, s.out_len(), 1.0)).unwrap();
        let init = Grads32::random(&mut rng, &s, 0.1);
        for entry in Entry::ALL.into_iter().filter(|e| e.runs_on(gpu)) {
            let name = entry.name();
            let mut runs = Vec::new();
            for run in 0..2 {
                before(gpu, run);
                let f = gpu_forward(gpu, &case, &dc, entry).unwrap();
                mapet::testing::assert_all_written("forward", &f);
                runs.push((f, gpu_backward(gpu, &case, &dc, entry, &d_out, &init).unwrap()));
            }
            let ((f1, g1), (f2, g2)) = (&runs[0], &runs[1]);
            assert!(
                f1.iter().zip(f2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{test}, {s:?} {name}: forwards differ"
            );
            for (((grad, a), (_, b)), (_, i)) in g1.named().into_iter().zip(g2.named()).zip(init.named()) {
                assert!(a != i, "{test}, {s:?} {name}: {grad} unchanged by the backward");
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{test}, {s:?} {name}: {grad} differs between the two runs"
                );
            }
        }
    }
}

#[test]
fn gpu_is_deterministic() {
    let Some(gpu) = gpu_poisoning_or_skip("gpu_is_deterministic") else { return };
    two_runs_agree(&gpu, "gpu_is_deterministic", &[shape(8, 224, 16, 768, 50), shape(3, 28, 7, 24, 9)], |_, _| {});
}

/// Programmatic dependent launches (`Gpu::set_dependent_launches`, compute capability 9.0)
/// change when a kernel may start, never what it computes: every kernel waits for the one
/// before it first. Each entry's forward and backward give the same bits without (run 0) and
/// with them (run 1). Skips, saying so, where the device has no dependent launches.
#[test]
fn dependent_launches_give_the_same_bits() {
    let test = "dependent_launches_give_the_same_bits";
    let Some(gpu) = gpu_poisoning_or_skip(test) else { return };
    gpu.set_dependent_launches(true);
    if !gpu.dependent_launches() {
        eprintln!("SKIP {test}: {} has no dependent launches", gpu.name());
        return;
    }
    two_runs_agree(&gpu, test, &[shape(8, 224, 16, 768, 50), shape(3, 64, 16, 40, 5)], |g, run| {
        g.set_dependent_launches(run == 1)
    });
}
