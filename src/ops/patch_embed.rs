//! Patch embedding: pixels to the rank-ordered first rows of both streams, forward and backward.
//!
//! With S = `image`, p = `patch`, G = S / p, N = 1 + G², C = `n_context`, P = N - C and K = 3p²,
//! each sample's output has R = N + 2P rows of `dim` channels, in rank order (DESIGN.md, "Rank
//! order inside the model"; `cuda/params.h`, `MapetAttention`):
//!
//! - row `rank[t]` for token t: `(t == 0 ? cls_token : conv(image)[t-1] + bias) + pos_embed[t]`,
//!   where conv is `Conv2d(3, dim, p, stride p)` and patch i = py·G + px is token i + 1;
//! - rows N + j and N + P + j (j < P): `mask_token + pos_embed[token of rank C + j]` (the mask
//!   tokens of the content stream h, then the query stream g).
//!
//! Images come as uint8 `[B, S, S, 3]` (HWC as decoded) with a per-channel [`Normalize`]
//! (`x = (u/255 - mean[c]) / std[c]`), or as already normalised f32 `[B, 3, S, S]`. Ranks are i32
//! `[B, N]`: a permutation with `rank[0] = 0`. The weight is `[dim, 3, p, p]` (f32 on the CPU, a
//! bf16 copy on the GPU); bias, cls and mask tokens `[dim]` and pos_embed `[N, dim]` are f32.
//!
//! The backward gives f32 gradients of weight, bias, pos_embed, cls_token and mask_token, all
//! **accumulated** (+=); there is no gradient to the pixels. The CUDA backward is deterministic:
//! the weight gradient's contraction is split over blocks with one partial per split, summed in a
//! fixed order, and the other gradients loop over the batch in order (no float atomics). For a
//! given shape the split count depends only on the device's SM count, so two runs on the same
//! card model give bit-identical gradients.
//!
//! The CPU functions are the f32 reference (im2col + [`crate::cpu::sgemm`]); the CUDA functions
//! launch `cuda/patch_embed.cu` (see its header for the kernel design).

use cudarc::driver::LaunchConfig;
use half::bf16;

use crate::cpu::sgemm;
use crate::cuda::hopper::tensor_map_bf16;
use crate::cuda::params::{MapetPatchEmbedBwd, MapetPatchEmbedFwd, MapetPatchEmbedFwdWs};
use crate::cuda::{blocks_for, check_aligned, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};
use crate::ops::KernelChoice;

/// The kernels' module. Every kernel in it starts with `dependent_launch_start()`
/// (cuda/dependent_launch.cuh), so the launchers start them all through
/// [`Gpu::launch_dependent`], which makes them programmatic dependent launches where asked for
/// (`MAPET_DEPENDENT_LAUNCH=1`, [`Gpu::set_dependent_launches`]); a test holds the source to it.
const MODULE: &str = "patch_embed";
/// Block size of the GEMM kernels and their tile sizes (cuda/patch_embed.cu).
const GEMM_THREADS: u32 = 256;
const FWD_TILE_M: usize = 128;
const FWD_TILE_N: usize = 128;
/// The warp-specialised forward (`hwc-ws`): its name, channels a tile (rows as FWD_TILE_M),
/// block size, and dynamic shared memory: 4 stages of 16 + 24 KB, a staging tile of 64 rows of
/// 400 bytes for each consumer warpgroup, and 1 KB to align them (cuda/patch_embed.cu,
/// kWsSmemBytes; `tests::ws_forward_shared_memory_is_the_kernels` checks the sum).
const FWD_WS_KERNEL: &str = "mapet_patch_embed_fwd_u8_hwc_ws";
/// The raw-pixel forward ([`PixelOrder::HwcWsRaw`]) and the kernel that prepares its weight and
/// bias (a block of `WEIGHT_RAW_THREADS` a channel).
const FWD_WS_RAW_KERNEL: &str = "mapet_patch_embed_fwd_u8_hwc_ws_raw";
const WEIGHT_RAW_KERNEL: &str = "mapet_patch_embed_weight_hwc_raw";
const WEIGHT_RAW_THREADS: u32 = 256;
const FWD_WS_TILE_N: usize = 192;
const FWD_WS_THREADS: u32 = 384;
const FWD_WS_SMEM: u32 = 4 * 40 * 1024 + 2 * 64 * 400 + 1024;
const _: () = assert!(FWD_WS_SMEM <= 227 << 10, "more than an H100/H200 block may take");
/// The warp-specialised weight gradient (`hwc-ws`): its name, block size, tile (channels x k'),
/// contraction rows a slice, the most rows a split may have, and its ring of 4 stages of 48 KB
/// with 1024 bytes to align it (cuda/patch_embed.cu, kWbC, kWbN, kWbRows, kWbRingBytes; its
/// dynamic shared memory is that and 8 bytes a split row), the reduction of its raw-pixel
/// partials, and its static shared memory (the ring's barriers, as ptxas counts them).
const BWD_WS_KERNEL: &str = "mapet_patch_embed_bwd_weight_u8_hwc_ws";
const BWD_WS_REDUCE: &str = "mapet_patch_embed_bwd_weight_reduce_hwc_raw";
const BWD_WS_THREADS: u32 = 384;
const BWD_WS_TILE_C: usize = 128;
const BWD_WS_TILE_K: usize = 256;
const BWD_WS_SLICE: usize = 64;
pub const BWD_WS_MAX_ROWS: usize = 4096;
const BWD_WS_RING_BYTES: u32 = 4 * 48 * 1024 + 1024;
const BWD_WS_STATIC_SMEM: u32 = 128;
const _: () = assert!(
    BWD_WS_RING_BYTES + 8 * BWD_WS_MAX_ROWS as u32 + BWD_WS_STATIC_SMEM <= 227 << 10,
    "the longest split's table must fit beside the ring on an H100/H200"
);
const BWD_TILE: usize = 128;
const BWD_STEP: usize = 32;
/// The HWC mma.sync weight gradient's dynamic shared memory (cuda/patch_embed.cu, BwdHwcSmem): a
/// ring of 4 stages of d_out rows (32 x 136 bf16) and raw pixel bytes (32 x 128), and two tiles
/// of normalised pixels (32 x 136 bf16).
const BWD_HWC_SMEM: u32 = 4 * (32 * 136 * 2 + 32 * 128) + 2 * 32 * 136 * 2;
/// `mapet_patch_embed_bwd_tokens`' block: 8-channel groups x batch slices (kTokGroups, kTokSlices).
const TOKEN_GROUPS: u64 = 32;
const TOKEN_SLICES: u64 = 4;

/// Sizes of one patch-embedding call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchEmbedShape {
    /// Images in the batch (B).
    pub batch: usize,
    /// Side of the square image in pixels (S).
    pub image: usize,
    /// Side of a square patch in pixels (p); `image % patch == 0`.
    pub patch: usize,
    /// Embedding dimension (D).
    pub dim: usize,
    /// Context tokens C (CLS included), `0 < C < N`.
    pub n_context: usize,
}

impl PatchEmbedShape {
    /// Patches per side, S / p.
    pub fn grid(&self) -> usize {
        self.image / self.patch
    }

    /// Tokens per sample N = 1 + (S/p)².
    pub fn n_tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }

    /// Patches per sample, N - 1.
    pub fn n_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Predicted tokens per sample P = N - C.
    pub fn n_predicted(&self) -> usize {
        self.n_tokens() - self.n_context
    }

    /// Output rows per sample, N + 2P.
    pub fn out_rows(&self) -> usize {
        self.n_tokens() + 2 * self.n_predicted()
    }

    /// Elements of one flattened patch, K = 3p².
    pub fn patch_len(&self) -> usize {
        3 * self.patch * self.patch
    }

    /// Elements of the image batch, B·3·S² (either layout).
    pub fn pixels_len(&self) -> usize {
        self.batch * 3 * self.image * self.image
    }

    /// Elements of `ranks`, B·N.
    pub fn ranks_len(&self) -> usize {
        self.batch * self.n_tokens()
    }

    /// Elements of the weight, D·3·p².
    pub fn weight_len(&self) -> usize {
        self.dim * self.patch_len()
    }

    /// Elements of `pos_embed`, N·D.
    pub fn pos_len(&self) -> usize {
        self.n_tokens() * self.dim
    }

    /// Elements of the output (and of `d_out`), B·(N + 2P)·D.
    pub fn out_len(&self) -> usize {
        self.batch * self.out_rows() * self.dim
    }

    /// Checks the sizes every implementation needs: positive sizes, a patch dividing the image,
    /// and `0 < n_context < N`.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |detail: String| Err(Error::Unsupported { what: "patch embedding shape", detail });
        if self.batch == 0 || self.image == 0 || self.patch == 0 || self.dim == 0 {
            return unsupported(format!("every size must be positive, got {self:?}"));
        }
        if !self.image.is_multiple_of(self.patch) {
            return unsupported(format!("image {} is not a multiple of patch {}", self.image, self.patch));
        }
        let n = self.n_tokens();
        if self.n_context == 0 || self.n_context >= n {
            return unsupported(format!("n_context must satisfy 0 < C < N = {n}, got C = {}", self.n_context));
        }
        Ok(())
    }

    /// [`Self::validate`] plus what the CUDA kernels need: `dim % 8 == 0` (16-byte rows) and
    /// sizes whose element counts and grids fit the kernels' 32-bit indices.
    pub fn validate_cuda(&self) -> Result<()> {
        self.validate()?;
        if !self.dim.is_multiple_of(8) {
            return Err(Error::Unsupported {
                what: "patch embedding dim",
                detail: format!("the CUDA path needs dim % 8 == 0, got dim = {}", self.dim),
            });
        }
        let limit = i32::MAX as usize;
        let checks = [
            ("pixels", self.pixels_len()),
            ("output rows", self.batch * self.out_rows()),
            ("patch rows", self.batch * self.n_patches()),
            ("weight", self.weight_len()),
        ];
        for (what, n) in checks {
            if n > limit {
                return Err(Error::Unsupported {
                    what: "patch embedding size",
                    detail: format!("{what}: {n} elements exceed the kernels' 32-bit indexing"),
                });
            }
        }
        let m_tiles = (self.batch * self.n_patches()).div_ceil(FWD_TILE_M);
        if m_tiles > 65_535 || self.batch > 65_535 || self.n_tokens() > 65_535 {
            return Err(Error::Unsupported {
                what: "patch embedding size",
                detail: format!("batch {} x {} tokens is too large for one grid", self.batch, self.n_tokens()),
            });
        }
        // The weight-gradient reduction's grid has a row of blocks per channel.
        if self.dim > 65_535 {
            return Err(Error::Unsupported {
                what: "patch embedding size",
                detail: format!("dim {} is too large for one grid (at most 65535 channels)", self.dim),
            });
        }
        Ok(())
    }

    /// What the `hwc-ws` forward (`mapet_patch_embed_fwd_u8_hwc_ws`, not the `-raw` one) needs
    /// beyond [`Self::validate_cuda`]: its weight kernel has a grid row for each channel and
    /// each token, so `dim + N <= 65535`. The forward checks it, where that kernel is the one
    /// chosen, before it allocates anything.
    pub fn validate_hwc_ws(&self) -> Result<()> {
        if self.dim + self.n_tokens() > 65_535 {
            return Err(Error::Unsupported {
                what: "patch embedding size",
                detail: format!(
                    "`hwc-ws` needs dim + tokens <= 65535 (one grid row each), got {} + {}: use `hwc-ws-raw` or `hwc`",
                    self.dim,
                    self.n_tokens()
                ),
            });
        }
        Ok(())
    }
}

/// Per-channel normalisation of uint8 pixels: `x = (u / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    /// Mean per channel (R, G, B), in [0, 1] units.
    pub mean: [f32; 3],
    /// Standard deviation per channel, in [0, 1] units.
    pub std: [f32; 3],
}

impl Normalize {
    /// The ImageNet mean and standard deviation.
    pub const IMAGENET: Normalize = Normalize { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

    /// Refuses non-finite values and a zero standard deviation.
    pub fn validate(&self) -> Result<()> {
        let ok = self.mean.iter().all(|m| m.is_finite()) && self.std.iter().all(|s| s.is_finite() && *s != 0.0);
        if ok {
            Ok(())
        } else {
            Err(Error::Unsupported {
                what: "pixel normalisation",
                detail: format!("mean and std must be finite and std non-zero, got {self:?}"),
            })
        }
    }

    /// The normalised value of byte `u` in channel `c` (the CPU reference's formula).
    pub fn apply(&self, u: u8, c: usize) -> f32 {
        (u as f32 / 255.0 - self.mean[c]) / self.std[c]
    }

    /// (scale, shift) with x = u·scale + shift, as the kernels evaluate it (the launchers pass
    /// these; tests that emulate a kernel's arithmetic take them from here).
    pub fn affine(&self) -> ([f32; 3], [f32; 3]) {
        let scale = [0, 1, 2].map(|c| 1.0 / (255.0 * self.std[c]));
        let shift = [0, 1, 2].map(|c| -self.mean[c] / self.std[c]);
        (scale, shift)
    }
}

/// Host images for [`cpu_backward`].
#[derive(Debug, Clone, Copy)]
pub enum Pixels<'a> {
    /// uint8 `[B, S, S, 3]` with its normalisation.
    U8 { hwc: &'a [u8], norm: Normalize },
    /// Normalised f32 `[B, 3, S, S]`.
    F32 { chw: &'a [f32] },
}

/// Device images for [`cuda_backward`].
#[derive(Clone, Copy)]
pub enum DevicePixels<'a> {
    /// uint8 `[B, S, S, 3]` with its normalisation.
    U8 { hwc: &'a dyn DeviceRead<u8>, norm: Normalize },
    /// Normalised f32 `[B, 3, S, S]`.
    F32 { chw: &'a dyn DeviceRead<f32> },
}

/// Normalises uint8 HWC images into f32 CHW, the layout of [`cpu_forward_f32`]; this is exactly
/// what [`cpu_forward_u8`] does first.
pub fn normalize_u8(shape: &PatchEmbedShape, hwc: &[u8], norm: &Normalize) -> Result<Vec<f32>> {
    shape.validate()?;
    norm.validate()?;
    check_len("pixels (uint8 [B, S, S, 3])", hwc.len(), shape.pixels_len())?;
    let s = shape.image;
    let mut chw = vec![0.0f32; shape.pixels_len()];
    for b in 0..shape.batch {
        for y in 0..s {
            for x in 0..s {
                for c in 0..3 {
                    let u = hwc[((b * s + y) * s + x) * 3 + c];
                    chw[((b * 3 + c) * s + y) * s + x] = norm.apply(u, c);
                }
            }
        }
    }
    Ok(chw)
}

/// Checks that every sample's ranks are a permutation of 0..N with rank[0] = 0.
fn check_ranks(shape: &PatchEmbedShape, ranks: &[i32]) -> Result<()> {
    check_len("ranks", ranks.len(), shape.ranks_len())?;
    let n = shape.n_tokens();
    let mut seen = vec![false; n];
    for (b, sample) in ranks.chunks_exact(n).enumerate() {
        seen.fill(false);
        let bad = |got: String| {
            Err(Error::Shape {
                tensor: "ranks",
                expected: format!("each row a permutation of 0..{n} with rank[0] = 0"),
                got,
            })
        };
        if sample[0] != 0 {
            return bad(format!("sample {b}: rank[0] = {}", sample[0]));
        }
        for (t, &r) in sample.iter().enumerate() {
            if r < 0 || r as usize >= n {
                return bad(format!("sample {b}: rank[{t}] = {r}"));
            }
            if std::mem::replace(&mut seen[r as usize], true) {
                return bad(format!("sample {b}: rank {r} appears twice"));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_forward_lens(
    shape: &PatchEmbedShape,
    weight: usize,
    bias: usize,
    pos_embed: usize,
    cls_token: usize,
    mask_token: usize,
    out: usize,
) -> Result<()> {
    check_len("weight", weight, shape.weight_len())?;
    check_len("bias", bias, shape.dim)?;
    check_len("pos_embed", pos_embed, shape.pos_len())?;
    check_len("cls_token", cls_token, shape.dim)?;
    check_len("mask_positional_token", mask_token, shape.dim)?;
    check_len("out", out, shape.out_len())
}

fn check_backward_lens(
    shape: &PatchEmbedShape,
    d_out: usize,
    dweight: usize,
    dbias: usize,
    dpos: usize,
    dcls: usize,
    dmask: usize,
) -> Result<()> {
    check_len("d_out", d_out, shape.out_len())?;
    check_len("dweight", dweight, shape.weight_len())?;
    check_len("dbias", dbias, shape.dim)?;
    check_len("dpos_embed", dpos, shape.pos_len())?;
    check_len("dcls_token", dcls, shape.dim)?;
    check_len("dmask_token", dmask, shape.dim)
}

/// The patches as rows: A[b·(N-1) + i][k] with k = (c·p + ky)·p + kx, from f32 CHW images.
fn im2col(shape: &PatchEmbedShape, chw: &[f32]) -> Vec<f32> {
    let (s, p, g, k_len) = (shape.image, shape.patch, shape.grid(), shape.patch_len());
    let mut a = vec![0.0f32; shape.batch * shape.n_patches() * k_len];
    for (row, dst) in a.chunks_exact_mut(k_len).enumerate() {
        let b = row / shape.n_patches();
        let i = row % shape.n_patches();
        let (py, px) = (i / g, i % g);
        for c in 0..3 {
            for ky in 0..p {
                let src = ((b * 3 + c) * s + py * p + ky) * s + px * p;
                dst[(c * p + ky) * p..(c * p + ky + 1) * p].copy_from_slice(&chw[src..src + p]);
            }
        }
    }
    a
}

/// CPU reference forward from uint8 HWC images: [`normalize_u8`], then [`cpu_forward_f32`].
#[allow(clippy::too_many_arguments)]
pub fn cpu_forward_u8(
    shape: &PatchEmbedShape,
    hwc: &[u8],
    norm: &Normalize,
    ranks: &[i32],
    weight: &[f32],
    bias: &[f32],
    pos_embed: &[f32],
    cls_token: &[f32],
    mask_token: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let chw = normalize_u8(shape, hwc, norm)?;
    cpu_forward_f32(shape, &chw, ranks, weight, bias, pos_embed, cls_token, mask_token, out)
}

/// CPU reference forward from normalised f32 CHW images; writes every element of `out`
/// `[B, N + 2P, D]`.
#[allow(clippy::too_many_arguments)]
pub fn cpu_forward_f32(
    shape: &PatchEmbedShape,
    chw: &[f32],
    ranks: &[i32],
    weight: &[f32],
    bias: &[f32],
    pos_embed: &[f32],
    cls_token: &[f32],
    mask_token: &[f32],
    out: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    check_len("pixels (f32 [B, 3, S, S])", chw.len(), shape.pixels_len())?;
    check_ranks(shape, ranks)?;
    check_forward_lens(shape, weight.len(), bias.len(), pos_embed.len(), cls_token.len(), mask_token.len(), out.len())?;
    let (d, n, c, np, rows) = (shape.dim, shape.n_tokens(), shape.n_context, shape.n_predicted(), shape.out_rows());
    let m = shape.batch * shape.n_patches();
    let a = im2col(shape, chw);
    let mut conv = vec![0.0f32; m * d];
    sgemm(m, d, shape.patch_len(), 1.0, &a, weight, true, 0.0, &mut conv);
    for (b, sample) in out.chunks_exact_mut(rows * d).enumerate() {
        let rank = &ranks[b * n..(b + 1) * n];
        for t in 0..n {
            let r = rank[t] as usize;
            let pos = &pos_embed[t * d..(t + 1) * d];
            let row = &mut sample[r * d..(r + 1) * d];
            if t == 0 {
                for ((o, &v), &e) in row.iter_mut().zip(cls_token).zip(pos) {
                    *o = v + e;
                }
            } else {
                let x = &conv[(b * (n - 1) + t - 1) * d..][..d];
                for (((o, &v), &bb), &e) in row.iter_mut().zip(x).zip(bias).zip(pos) {
                    *o = (v + bb) + e;
                }
            }
            if r >= c {
                let j = r - c;
                for row_index in [n + j, n + np + j] {
                    let row = &mut sample[row_index * d..(row_index + 1) * d];
                    for ((o, &v), &e) in row.iter_mut().zip(mask_token).zip(pos) {
                        *o = v + e;
                    }
                }
            }
        }
    }
    Ok(())
}

/// CPU reference backward: adds the gradients of weight `[D, 3, p, p]`, bias, pos_embed,
/// cls_token and mask_token given `d_out` `[B, N + 2P, D]`.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward(
    shape: &PatchEmbedShape,
    pixels: Pixels<'_>,
    ranks: &[i32],
    d_out: &[f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dpos_embed: &mut [f32],
    dcls_token: &mut [f32],
    dmask_token: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    let normalized;
    let chw = match pixels {
        Pixels::U8 { hwc, norm } => {
            normalized = normalize_u8(shape, hwc, &norm)?;
            &normalized[..]
        }
        Pixels::F32 { chw } => {
            check_len("pixels (f32 [B, 3, S, S])", chw.len(), shape.pixels_len())?;
            chw
        }
    };
    check_ranks(shape, ranks)?;
    check_backward_lens(
        shape,
        d_out.len(),
        dweight.len(),
        dbias.len(),
        dpos_embed.len(),
        dcls_token.len(),
        dmask_token.len(),
    )?;
    let (d, n, c, np, rows) = (shape.dim, shape.n_tokens(), shape.n_context, shape.n_predicted(), shape.out_rows());
    let m = shape.batch * shape.n_patches();
    // G^T [D, M]: column b·(N-1) + t-1 is d_out's row of token t of sample b.
    let mut g_t = vec![0.0f32; d * m];
    for b in 0..shape.batch {
        let sample = &d_out[b * rows * d..(b + 1) * rows * d];
        let rank = &ranks[b * n..(b + 1) * n];
        for t in 0..n {
            let r = rank[t] as usize;
            let content = &sample[r * d..(r + 1) * d];
            let dpos = &mut dpos_embed[t * d..(t + 1) * d];
            for (o, &v) in dpos.iter_mut().zip(content) {
                *o += v;
            }
            if t == 0 {
                for (o, &v) in dcls_token.iter_mut().zip(content) {
                    *o += v;
                }
            } else {
                let col = b * (n - 1) + t - 1;
                for (i, (o, &v)) in dbias.iter_mut().zip(content).enumerate() {
                    *o += v;
                    g_t[i * m + col] = v;
                }
            }
            if r >= c {
                let j = r - c;
                let h = &sample[(n + j) * d..(n + j + 1) * d];
                let q = &sample[(n + np + j) * d..(n + np + j + 1) * d];
                for i in 0..d {
                    let s = h[i] + q[i];
                    dpos[i] += s;
                    dmask_token[i] += s;
                }
            }
        }
    }
    let a = im2col(shape, chw);
    sgemm(d, shape.patch_len(), m, 1.0, &g_t, &a, false, 1.0, dweight);
    Ok(())
}

/// The order in which the uint8 kernels contract the K = 3p² pixel values of a patch. Both give
/// the same function (up to the f32 summation order); tests/patch_embed.rs checks both against
/// the CPU reference. The f32 entry always contracts in the weight's own CHW order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelOrder {
    /// The weight's order k = (c·p + ky)·p + kx: eight consecutive k are eight pixels of one
    /// channel, three 8-byte loads of interleaved HWC bytes for 8 values.
    Chw,
    /// The pixels' own HWC order k' = (ky·p + kx)·3 + c (when p % 8 == 0; other patch sizes use
    /// [`PixelOrder::Chw`]): eight consecutive k' are eight consecutive bytes, one 8-byte load,
    /// and the forward's loads run two steps ahead, the weight gradient's copies three (a
    /// four-stage cp.async ring). The forward multiplies by a copy of the weight permuted the same
    /// way (D·K bf16 of scratch); the reduction of the weight gradient's partials puts it back in
    /// CHW order. On an H200 at ViT-B, batch 128, forward + backward took 0.372 ms against 0.598 ms
    /// in CHW order (BENCHMARKS.md, seventh run). The default off compute capability 9.0
    /// ([`PixelOrder::defaults_for`]: the order has no default apart from the device).
    Hwc,
    /// [`PixelOrder::Hwc`] with the forward and the weight gradient warp-specialised
    /// (`mapet_patch_embed_fwd_u8_hwc_ws`, `mapet_patch_embed_bwd_weight_u8_hwc_ws`): one
    /// warpgroup loads, slices ahead, into a ring of shared-memory stages (the forward's weight by
    /// TMA and its pixels normalised through registers; the weight gradient's d_out by cp.async
    /// and its raw pixels, plus one, exact in bf16, with the normalisation applied by its
    /// reduction), and two warpgroups run wgmma on them. Compute capability 9.0 only (H100/H200;
    /// elsewhere an error says so). In the seventh run its tests passed on an H200, and at ViT-B
    /// its forward took 0.150 ms against `Hwc`'s 0.175. Its weight gradient, rewritten since
    /// (128 x 256 tiles in one wave, raw pixels in the 128-byte swizzle), passed its tests on an
    /// H200 in the eighth run, where its backward took 0.152 ms against `Hwc`'s 0.203, and forward
    /// plus backward 0.313 (BENCHMARKS.md). [`PixelOrder::HwcWsRaw`] keeps this backward.
    HwcWs,
    /// [`PixelOrder::HwcWs`] with its forward on raw pixels too
    /// (`mapet_patch_embed_fwd_u8_hwc_ws_raw`): (u - 127) / 256, exact in f16 (two instructions a
    /// pair of pixels, where normalising them takes seven and a select), times an f16 copy of the
    /// weight scaled by 256 and each channel's s, from sums that start at the bias plus the
    /// shifts' share (`mapet_patch_embed_weight_hwc_raw` makes both each call). Each product's one
    /// rounding moves from the pixel (bf16) to the weight (f16, three more bits): on the CPU its
    /// outputs are nearer the truth than the bf16 baseline's. Its backward is `hwc-ws`'s. Compute
    /// capability 9.0 only. In the eighth run its tests passed on an H200, and at ViT-B its forward
    /// took 0.153 ms against `HwcWs`'s 0.157, forward plus backward 0.308 ms against 0.363 for
    /// the pair that was the default until then (`hwc-ws` forward, `hwc` backward): the default on
    /// compute capability 9.0, both ways ([`PixelOrder::defaults_for`]). 0.3042 ms in the ninth
    /// run; since then its backward has two launches fewer and its forward reads the CLS and
    /// mask-token rows from a bf16 table (unverified on GPU).
    HwcWsRaw,
}

impl PixelOrder {
    /// Every order, for tests and benches.
    pub const ALL: [PixelOrder; 4] = [PixelOrder::Chw, PixelOrder::Hwc, PixelOrder::HwcWs, PixelOrder::HwcWsRaw];

    /// Whether the HWC kernels run for this shape (uint8 pixels are implied by the caller).
    fn hwc_for(self, shape: &PatchEmbedShape) -> bool {
        matches!(self, PixelOrder::Hwc | PixelOrder::HwcWs | PixelOrder::HwcWsRaw) && shape.patch.is_multiple_of(8)
    }

    /// Whether this order can run on `gpu`: the warp-specialised kernels need compute capability
    /// 9.0 (their sm_90a cubins; other devices would run the compute_80 PTX, whose copies of them
    /// trap).
    pub fn supported_on(self, gpu: &Gpu) -> bool {
        !self.hopper_only() || gpu.compute_capability() == (9, 0)
    }

    /// Whether this order runs sm_90a-only kernels.
    fn hopper_only(self) -> bool {
        matches!(self, PixelOrder::HwcWs | PixelOrder::HwcWsRaw)
    }

    /// The environment variable that picks the backward's order apart from the forward's.
    pub const BACKWARD_VAR: &'static str = "MAPET_PATCH_EMBED_BACKWARD_ORDER";

    /// The fastest (forward, backward) pair measured on a device of compute capability `cc`:
    /// `hwc-ws-raw` both ways on 9.0 (H100/H200; its backward is `hwc-ws`'s), `hwc` both ways
    /// elsewhere.
    pub fn defaults_for(cc: (u32, u32)) -> (PixelOrder, PixelOrder) {
        if cc == (9, 0) {
            (PixelOrder::HwcWsRaw, PixelOrder::HwcWsRaw)
        } else {
            (PixelOrder::Hwc, PixelOrder::Hwc)
        }
    }

    /// The (forward, backward) orders the CUDA backend runs on a device of compute capability
    /// `cc`: the forward's is the one [`KernelChoice::VAR`] names, the backward's the one
    /// [`Self::BACKWARD_VAR`] names, else the forward's when only that is set, else
    /// [`Self::defaults_for`]. The backward reads the pixels, not the forward's output, so any two
    /// orders work together.
    pub fn selected_pair(cc: (u32, u32)) -> Result<(PixelOrder, PixelOrder)> {
        let var = |name: &str| std::env::var(name).ok();
        Self::pair_named(var(Self::VAR).as_deref(), var(Self::BACKWARD_VAR).as_deref(), cc)
    }

    /// [`Self::selected_pair`] for the variables' values (`None`: unset).
    pub fn pair_named(
        forward: Option<&str>,
        backward: Option<&str>,
        cc: (u32, u32),
    ) -> Result<(PixelOrder, PixelOrder)> {
        let (fwd, bwd) = Self::defaults_for(cc);
        let fwd = Self::named_or(Self::VAR, forward, fwd)?;
        let bwd = Self::named_or(Self::BACKWARD_VAR, backward, if forward.is_some() { fwd } else { bwd })?;
        Ok((fwd, bwd))
    }
}

/// `MAPET_PATCH_EMBED_ORDER=chw|hwc|hwc-ws|hwc-ws-raw` picks the order the CUDA backend passes to
/// [`cuda_forward_u8`] and [`cuda_backward`] (read once, when the backend is made;
/// [`PixelOrder::BACKWARD_VAR`] can give the backward another).
impl KernelChoice for PixelOrder {
    const VAR: &'static str = "MAPET_PATCH_EMBED_ORDER";
    const CHOICES: &'static [Self] = &PixelOrder::ALL;

    fn name(self) -> &'static str {
        match self {
            PixelOrder::Chw => "chw",
            PixelOrder::Hwc => "hwc",
            PixelOrder::HwcWs => "hwc-ws",
            PixelOrder::HwcWsRaw => "hwc-ws-raw",
        }
    }
}

fn launch_cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn no_norm() -> ([f32; 3], [f32; 3]) {
    ([0.0; 3], [0.0; 3])
}

/// Device pointer, normalization (scale, shift), kernel name of one pixel entry, and whether that
/// kernel contracts in HWC order.
type PixelArgs = (*const std::ffi::c_void, ([f32; 3], [f32; 3]), &'static str, bool);

/// Checks the device pixels of either entry; `kernels` names the uint8 CHW-order, uint8 HWC-order
/// and f32 variants, of which `order` and the shape pick one.
fn device_pixels(
    shape: &PatchEmbedShape,
    pixels: DevicePixels<'_>,
    order: PixelOrder,
    kernels: [&'static str; 3],
) -> Result<PixelArgs> {
    Ok(match pixels {
        DevicePixels::U8 { hwc, norm } => {
            norm.validate()?;
            check_len("pixels (uint8 [B, S, S, 3])", hwc.len(), shape.pixels_len())?;
            let hwc_order = order.hwc_for(shape);
            (hwc.ptr(), norm.affine(), kernels[if hwc_order { 1 } else { 0 }], hwc_order)
        }
        DevicePixels::F32 { chw } => {
            check_len("pixels (f32 [B, 3, S, S])", chw.len(), shape.pixels_len())?;
            (chw.ptr(), no_norm(), kernels[2], false)
        }
    })
}

/// The HWC kernel `order` runs: its entry in `ws`, the warp-specialised kernels of the sm_90a-only
/// orders (refused off a compute capability 9.0 device); else `mma_sync`.
fn hwc_kernel(
    gpu: &Gpu,
    order: PixelOrder,
    mma_sync: &'static str,
    ws: &[(PixelOrder, &'static str)],
) -> Result<&'static str> {
    if order.hopper_only() && !order.supported_on(gpu) {
        let (major, minor) = gpu.compute_capability();
        return Err(Error::Unsupported {
            what: "pixel order",
            detail: format!(
                "`{}` needs a compute capability 9.0 device (H100/H200); {} is {major}.{minor}: use `hwc`",
                order.name(),
                gpu.name()
            ),
        });
    }
    Ok(ws.iter().find(|(o, _)| *o == order).map_or(mma_sync, |(_, k)| *k))
}

#[allow(clippy::too_many_arguments)]
fn cuda_forward(
    gpu: &Gpu,
    order: PixelOrder,
    shape: &PatchEmbedShape,
    pixels: DevicePixels<'_>,
    ranks: &dyn DeviceRead<i32>,
    weight: &dyn DeviceRead<bf16>,
    bias: &dyn DeviceRead<f32>,
    pos_embed: &dyn DeviceRead<f32>,
    cls_token: &dyn DeviceRead<f32>,
    mask_token: &dyn DeviceRead<f32>,
    out: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    shape.validate_cuda()?;
    let ws = [(PixelOrder::HwcWs, FWD_WS_KERNEL), (PixelOrder::HwcWsRaw, FWD_WS_RAW_KERNEL)];
    let hwc_kernel = hwc_kernel(gpu, order, "mapet_patch_embed_fwd_u8_hwc", &ws)?;
    let kernels = ["mapet_patch_embed_fwd_u8", hwc_kernel, "mapet_patch_embed_fwd_f32"];
    let (pixel_ptr, (scale, shift), kernel, hwc_order) = device_pixels(shape, pixels, order, kernels)?;
    check_len("ranks", ranks.len(), shape.ranks_len())?;
    check_forward_lens(shape, weight.len(), bias.len(), pos_embed.len(), cls_token.len(), mask_token.len(), out.len())?;
    // The kernels read and write 8- and 16-byte vectors of every tensor.
    for (tensor, ptr) in [
        ("pixels", pixel_ptr),
        ("weight", weight.ptr()),
        ("bias", bias.ptr()),
        ("pos_embed", pos_embed.ptr()),
        ("cls_token", cls_token.ptr()),
        ("mask_token", mask_token.ptr()),
        ("out", out.ptr()),
    ] {
        check_aligned(tensor, ptr, 16)?;
    }
    let raw = kernel == FWD_WS_RAW_KERNEL;
    let ws = kernel == FWD_WS_KERNEL || raw;
    // The HWC kernel multiplies by the weight permuted to [D, p, p, 3] (1.2 MB at ViT-B). The
    // warp-specialised ones copy the CLS and mask-token rows from a bf16 table of them ([N, D],
    // 302 KB), which goes on past the weight in the same scratch (params.h), and which the weight
    // kernel before them writes in blocks of its own.
    if ws && !raw {
        shape.validate_hwc_ws()?; // before anything is allocated
    }
    let scratch_len = shape.weight_len() + if ws { shape.pos_len() } else { 0 };
    let mut weight_hwc = if hwc_order { Some(gpu.alloc::<bf16>(scratch_len)?) } else { None };
    if let Some(w) = &weight_hwc {
        check_aligned("weight_hwc (scratch)", w.ptr(), 16)?;
    }
    // The raw-pixel forward starts its sums at the bias plus the shifts' share (D floats).
    let mut bias_raw = if raw { Some(gpu.alloc::<f32>(shape.dim)?) } else { None };
    let mut params = MapetPatchEmbedFwd {
        pixels: pixel_ptr,
        ranks: ranks.ptr() as *const i32,
        weight: weight.ptr(),
        bias: bias.f32_ptr(),
        pos_embed: pos_embed.f32_ptr(),
        cls_token: cls_token.f32_ptr(),
        mask_token: mask_token.f32_ptr(),
        out: out.ptr_mut(),
        weight_hwc: weight_hwc.as_mut().map_or(std::ptr::null_mut(), |w| w.ptr_mut()),
        scale,
        shift,
        batch: shape.batch as i32,
        image: shape.image as i32,
        patch: shape.patch as i32,
        dim: shape.dim as i32,
        n_context: shape.n_context as i32,
        bias_raw: bias_raw.as_mut().map_or(std::ptr::null_mut(), |b| b.ptr_mut() as *mut f32),
    };
    if raw {
        // SAFETY: block d < D reads row d of weight (D·K bf16, checked above) and bias[d], and
        // writes row d of weight_hwc (D·K, allocated above) and bias_raw[d] (D floats, allocated
        // above); block D + t (t < N) reads cls_token or mask_token and row t of pos_embed (D
        // floats each, checked above) and writes row t of the token-row table (N·D past the
        // weight in weight_hwc, allocated above). The grid is (D + N), D and N <= 65535
        // (validate_cuda).
        let cfg = launch_cfg(((shape.dim + shape.n_tokens()) as u32, 1, 1), WEIGHT_RAW_THREADS);
        unsafe { gpu.launch_dependent(MODULE, WEIGHT_RAW_KERNEL, cfg, &params)? };
        // The kernel's sums start from bias_raw where the others' start from bias.
        params.bias = params.bias_raw;
    } else if hwc_order {
        let mut grid = (blocks_for("patch embedding weight", shape.patch_len() as u64, 256)?, shape.dim as u32, 1);
        if ws {
            // Rows D.. of the grid write the token-row table, a row of it each.
            grid.0 = grid.0.max(blocks_for("patch embedding channels", shape.dim as u64, 256)?);
            grid.1 += shape.n_tokens() as u32;
        }
        // SAFETY: reads weight (D·K bf16, checked above) and writes weight_hwc (D·K, allocated
        // above), a thread per element (d, k') with k' < K in grid rows d < D <= 65535
        // (validate_cuda); for hwc-ws, grid rows D + t (D + N <= 65535, validate_hwc_ws) read
        // cls_token or mask_token and row t of pos_embed (D floats each, checked above) and write
        // row t of the token-row table (N·D past the weight in weight_hwc, allocated above).
        unsafe { gpu.launch_dependent(MODULE, "mapet_patch_embed_weight_hwc", launch_cfg(grid, 256), &params)? };
    }
    let m = (shape.batch * shape.n_patches()) as u64;
    if ws {
        let weight_hwc = weight_hwc.as_ref().map_or(std::ptr::null(), |w| w.ptr());
        let ws = MapetPatchEmbedFwdWs {
            p: params,
            weight_hwc: tensor_map_bf16(weight_hwc, shape.dim, shape.patch_len(), FWD_WS_TILE_N)?,
        };
        let tiles = shape.dim.div_ceil(FWD_WS_TILE_N) as u64 * m.div_ceil(FWD_TILE_M as u64);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for("patch embedding tiles", tiles, 1)?.min(gpu.sm_count()), 1, 1),
            block_dim: (FWD_WS_THREADS, 1, 1),
            shared_mem_bytes: FWD_WS_SMEM,
        };
        // SAFETY: as for the kernels below (the same parameters, bounds and skipped rows), and as
        // for mapet_patch_embed_fwd_rows, whose rows this kernel writes too (the CLS row of each
        // image and the two mask-token rows of each token of rank in [C, N): b·R + N + rank - C
        // and P rows on, both below (b + 1)·R); the tensor map covers weight_hwc, [D, K'] bf16
        // with rows of 2K' bytes (K' = 3p², p % 8 == 0, so a multiple of 16), and the kernel
        // takes FWD_WS_SMEM bytes of dynamic shared memory for its ring. It reads the token-row
        // table (N·D past the weight in weight_hwc, written just before) at rows tok < N of its
        // patch rows' tokens. For hwc-ws-raw,
        // weight_hwc holds f16 values (the map only copies 2-byte elements, and its zero fill is
        // +0 in both types) and params.bias is bias_raw (D floats, written above).
        unsafe { gpu.launch_dependent(MODULE, kernel, cfg, &ws)? };
        // Its consumer warpgroups write the CLS and mask-token rows under the MMAs: no second
        // kernel writes them.
        return Ok(());
    }
    let gemm_grid = (
        blocks_for("patch embedding channels", shape.dim as u64, FWD_TILE_N as u64)?,
        blocks_for("patch embedding rows", m, FWD_TILE_M as u64)?,
        1,
    );
    // SAFETY: validate_cuda bounds every index the kernel forms; the lengths of pixels, ranks,
    // weight, bias, pos_embed and out were checked above against the shape in `params`, and the
    // HWC kernel (only with p % 8 == 0) reads weight_hwc of the weight's length; patch rows whose
    // rank is outside [1, N) are skipped, so bad ranks cannot write out of bounds. D % 8 == 0 and
    // 16-byte aligned pointers (checked above) keep the vector accesses aligned.
    unsafe { gpu.launch_dependent(MODULE, kernel, launch_cfg(gemm_grid, GEMM_THREADS), &params)? };
    let rows_grid = (shape.n_tokens() as u32, shape.batch as u32, 1);
    // SAFETY: as above for ranks, pos_embed, cls/mask tokens and out; the grid is (N, B), one
    // block per token, and ranks outside [C, N) write no mask row.
    unsafe { gpu.launch_dependent(MODULE, "mapet_patch_embed_fwd_rows", launch_cfg(rows_grid, 128), &params)? };
    Ok(())
}

/// CUDA forward from uint8 HWC images (normalised in registers; for `hwc-ws-raw`, the
/// normalisation folded into an f16 copy of the weight and the bias), contracting in `order`; `out`
/// bf16 `[B, N + 2P, D]`. Every element is written when `ranks` holds valid permutations; the
/// kernel cannot check that (ranks outside [0, N) are skipped, leaving rows unwritten).
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward_u8(
    gpu: &Gpu,
    order: PixelOrder,
    shape: &PatchEmbedShape,
    hwc: &dyn DeviceRead<u8>,
    norm: &Normalize,
    ranks: &dyn DeviceRead<i32>,
    weight: &dyn DeviceRead<bf16>,
    bias: &dyn DeviceRead<f32>,
    pos_embed: &dyn DeviceRead<f32>,
    cls_token: &dyn DeviceRead<f32>,
    mask_token: &dyn DeviceRead<f32>,
    out: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    let pixels = DevicePixels::U8 { hwc, norm: *norm };
    cuda_forward(gpu, order, shape, pixels, ranks, weight, bias, pos_embed, cls_token, mask_token, out)
}

/// CUDA forward from normalised f32 CHW images; `out` bf16 `[B, N + 2P, D]`.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward_f32(
    gpu: &Gpu,
    shape: &PatchEmbedShape,
    chw: &dyn DeviceRead<f32>,
    ranks: &dyn DeviceRead<i32>,
    weight: &dyn DeviceRead<bf16>,
    bias: &dyn DeviceRead<f32>,
    pos_embed: &dyn DeviceRead<f32>,
    cls_token: &dyn DeviceRead<f32>,
    mask_token: &dyn DeviceRead<f32>,
    out: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    let pixels = DevicePixels::F32 { chw };
    cuda_forward(gpu, PixelOrder::Chw, shape, pixels, ranks, weight, bias, pos_embed, cls_token, mask_token, out)
}

/// The split of the warp-specialised weight gradient (`hwc-ws`): as many splits as one wave of
/// one block an SM holds (so that no block fills the ring twice), each split a whole number of
/// 64-row slices and at most [`BWD_WS_MAX_ROWS`] rows (its row table sits in shared memory beside
/// the ring).
pub fn weight_grad_splits_ws(shape: &PatchEmbedShape, sm_count: u32) -> (usize, usize) {
    let m = shape.batch * shape.n_patches();
    let tiles = shape.dim.div_ceil(BWD_WS_TILE_C) * shape.patch_len().div_ceil(BWD_WS_TILE_K);
    let want = (sm_count as usize / tiles).max(m.div_ceil(BWD_WS_MAX_ROWS)).clamp(1, m.div_ceil(BWD_WS_SLICE).max(1));
    let split_rows = m.div_ceil(want).div_ceil(BWD_WS_SLICE) * BWD_WS_SLICE;
    (m.div_ceil(split_rows), split_rows)
}

/// How the weight gradient's contraction over the B·(N-1) patch rows is split: (splits, rows per
/// split). About two blocks per SM in all, each split a multiple of the 32-row step and at least
/// 8 steps long.
pub fn weight_grad_splits(shape: &PatchEmbedShape, sm_count: u32) -> (usize, usize) {
    let m = shape.batch * shape.n_patches();
    let tiles = shape.dim.div_ceil(BWD_TILE) * shape.patch_len().div_ceil(BWD_TILE);
    let max_splits = m.div_ceil(8 * BWD_STEP).max(1);
    let want = (2 * sm_count as usize / tiles).clamp(1, max_splits);
    let split_rows = m.div_ceil(want).div_ceil(BWD_STEP) * BWD_STEP;
    (m.div_ceil(split_rows), split_rows)
}

/// CUDA backward: adds (+=) the f32 gradients of weight `[D, 3, p, p]`, bias, pos_embed,
/// cls_token and mask_token given bf16 `d_out` `[B, N + 2P, D]`. Deterministic. Allocates its
/// f32 scratch (splits·D·K + 2·N·D) on the stream, and in HWC order a table of 2 ints per patch
/// row. uint8 pixels are contracted in `order` (f32 pixels always in CHW order).
#[allow(clippy::too_many_arguments)]
pub fn cuda_backward(
    gpu: &Gpu,
    order: PixelOrder,
    shape: &PatchEmbedShape,
    pixels: DevicePixels<'_>,
    ranks: &dyn DeviceRead<i32>,
    d_out: &dyn DeviceRead<bf16>,
    dweight: &mut dyn DeviceWrite<f32>,
    dbias: &mut dyn DeviceWrite<f32>,
    dpos_embed: &mut dyn DeviceWrite<f32>,
    dcls_token: &mut dyn DeviceWrite<f32>,
    dmask_token: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    shape.validate_cuda()?;
    // hwc-ws-raw's backward is hwc-ws's (raw pixels already).
    let ws = [(PixelOrder::HwcWs, BWD_WS_KERNEL), (PixelOrder::HwcWsRaw, BWD_WS_KERNEL)];
    let hwc_kernel = hwc_kernel(gpu, order, "mapet_patch_embed_bwd_weight_u8_hwc", &ws)?;
    let kernels = ["mapet_patch_embed_bwd_weight_u8", hwc_kernel, "mapet_patch_embed_bwd_weight_f32"];
    let (pixel_ptr, (scale, shift), kernel, hwc_order) = device_pixels(shape, pixels, order, kernels)?;
    // The HWC kernels' partials are in their contraction order; their reduction permutes them
    // back (and for `hwc-ws`, whose partials are of raw pixels, normalises them).
    let ws = kernel == BWD_WS_KERNEL;
    let reduce = if ws {
        BWD_WS_REDUCE
    } else if hwc_order {
        "mapet_patch_embed_bwd_weight_reduce_hwc"
    } else {
        "mapet_patch_embed_bwd_weight_reduce"
    };
    check_len("ranks", ranks.len(), shape.ranks_len())?;
    check_backward_lens(
        shape,
        d_out.len(),
        dweight.len(),
        dbias.len(),
        dpos_embed.len(),
        dcls_token.len(),
        dmask_token.len(),
    )?;
    check_aligned("pixels", pixel_ptr, 16)?;
    check_aligned("d_out", d_out.ptr(), 16)?;
    let (splits, split_rows) =
        if ws { weight_grad_splits_ws(shape, gpu.sm_count()) } else { weight_grad_splits(shape, gpu.sm_count()) };
    let partial_len = splits * shape.weight_len();
    if partial_len > i64::MAX as usize / 4 || split_rows > i32::MAX as usize {
        return Err(Error::Unsupported { what: "patch embedding size", detail: format!("{splits} splits") });
    }
    let partial = gpu.alloc::<f32>(partial_len)?;
    let token_sums = gpu.alloc::<f32>(2 * shape.pos_len())?;
    // The HWC kernel's per-row table: d_out row and pixel base of every patch row.
    let patch_rows = shape.batch * shape.n_patches();
    let mut row_info = if hwc_order { Some(gpu.alloc::<i32>(2 * patch_rows)?) } else { None };
    let params = MapetPatchEmbedBwd {
        pixels: pixel_ptr,
        ranks: ranks.ptr() as *const i32,
        d_out: d_out.ptr(),
        dweight: dweight.f32_ptr(),
        dbias: dbias.f32_ptr(),
        dpos_embed: dpos_embed.f32_ptr(),
        dcls_token: dcls_token.f32_ptr(),
        dmask_token: dmask_token.f32_ptr(),
        partial: partial.f32_ptr(),
        token_sums: token_sums.f32_ptr(),
        row_info: row_info.as_mut().map_or(std::ptr::null_mut(), |r| r.ptr_mut() as *mut i32),
        scale,
        shift,
        batch: shape.batch as i32,
        image: shape.image as i32,
        patch: shape.patch as i32,
        dim: shape.dim as i32,
        n_context: shape.n_context as i32,
        splits: splits as i32,
        split_rows: split_rows as i32,
    };
    let (tile_c, tile_k) = if ws { (BWD_WS_TILE_C, BWD_WS_TILE_K) } else { (BWD_TILE, BWD_TILE) };
    let weight_grid = (
        blocks_for("patch embedding K", shape.patch_len() as u64, tile_k as u64)?,
        blocks_for("patch embedding channels", shape.dim as u64, tile_c as u64)?,
        splits as u32,
    );
    // The warp-specialised kernel's shared memory is checked before anything is launched.
    let weight_cfg = if ws {
        let shared_mem_bytes = BWD_WS_RING_BYTES + 8 * split_rows as u32;
        // Its static shared memory (the ring's barriers) counts against the same limit.
        if shared_mem_bytes + BWD_WS_STATIC_SMEM > gpu.max_shared_memory_per_block() {
            return Err(Error::Unsupported {
                what: "pixel order",
                detail: format!(
                    "`hwc-ws` needs {shared_mem_bytes} bytes of shared memory a block; {} allows {}",
                    gpu.name(),
                    gpu.max_shared_memory_per_block()
                ),
            });
        }
        LaunchConfig { grid_dim: weight_grid, block_dim: (BWD_WS_THREADS, 1, 1), shared_mem_bytes }
    } else if kernel == "mapet_patch_embed_bwd_weight_u8_hwc" {
        if BWD_HWC_SMEM > gpu.max_shared_memory_per_block() {
            return Err(Error::Unsupported {
                what: "pixel order",
                detail: format!(
                    "`hwc` needs {BWD_HWC_SMEM} bytes of shared memory a block for its weight gradient; {} allows {}",
                    gpu.name(),
                    gpu.max_shared_memory_per_block()
                ),
            });
        }
        LaunchConfig { grid_dim: weight_grid, block_dim: (GEMM_THREADS, 1, 1), shared_mem_bytes: BWD_HWC_SMEM }
    } else {
        launch_cfg(weight_grid, GEMM_THREADS)
    };
    let reduce_grid = (blocks_for("patch embedding weight", shape.patch_len() as u64, 256)?, shape.dim as u32, 1);
    let token_grid =
        (blocks_for("patch embedding channels", (shape.dim / 8) as u64, TOKEN_GROUPS)?, shape.n_tokens() as u32, 1);
    // SAFETY: grid (D/8/TOKEN_GROUPS, N), block TOKEN_GROUPS x TOKEN_SLICES as the kernel's
    // constants: reads ranks and d_out (checked above; D % 8 == 0 and d_out 16-byte aligned for its
    // 16-byte loads), skipping ranks outside [0, N); writes dpos_embed (N·D, checked) and
    // token_sums (2·N·D, allocated above), and in HWC order row_info (2·B·(N-1) ints, allocated
    // above, 256-byte aligned for its 8-byte stores: one entry for each sample and token t >= 1).
    let token_block = (TOKEN_GROUPS * TOKEN_SLICES) as u32;
    unsafe {
        gpu.launch_dependent(MODULE, "mapet_patch_embed_bwd_tokens", launch_cfg(token_grid, token_block), &params)?
    };
    // SAFETY: validate_cuda bounds every index the kernel forms; pixels, ranks and d_out were
    // checked above against the shape in `params`; `partial` holds splits·D·K floats and the grid
    // has `splits` layers; rows whose rank is outside [1, N) are read as zeros. The HWC kernels
    // read row_info, written just before on the same stream (the mma.sync one carves its copy ring
    // from the BWD_HWC_SMEM bytes of dynamic shared memory its launch gives, and traps on fewer);
    // the warp-specialised one copies its split's (at most split_rows) entries into the
    // 8·split_rows bytes its launch adds past its ring.
    unsafe { gpu.launch_dependent(MODULE, kernel, weight_cfg, &params)? };
    // SAFETY: grid (ceil(K/256), D), a thread per element (d, kc) with kc < K: reads splits·D·K
    // floats of `partial` and adds to dweight (D·K, checked above; the HWC variants write each of
    // the D·K elements once, at a permuted index); its blocks of column 0 read token_sums
    // (2·N·D, written before) and add to dbias, dcls and dmask (D each; 256 threads, the two
    // warps those sums take), and `hwc-ws`'s other blocks read their channel's column of it too.
    unsafe { gpu.launch_dependent(MODULE, reduce, launch_cfg(reduce_grid, 256), &params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwc_ws_forward_refuses_more_channels_and_tokens_than_one_grid_holds() {
        // 16,385 tokens (256 / 2 patches a side) and 50,000 channels: each fits a grid alone
        // (validate_cuda passes), their sum, hwc-ws's weight-kernel rows, does not. Refused from
        // the shape alone, before any buffer: a real call would need about 250 MB of output.
        let shape = PatchEmbedShape { batch: 1, image: 256, patch: 2, dim: 50_000, n_context: 1 };
        shape.validate_cuda().unwrap();
        let text = shape.validate_hwc_ws().unwrap_err().to_string();
        assert!(text.contains("hwc-ws") && text.contains("50000 + 16385"), "{text}");
        // Under the limit it passes: 49,144 + 16,385 = 65,529, the largest dim % 8 == 0 whose sum
        // with the tokens stays within 65,535; 49,152 does not.
        PatchEmbedShape { dim: 49_144, ..shape }.validate_hwc_ws().unwrap();
        PatchEmbedShape { dim: 49_152, ..shape }.validate_hwc_ws().unwrap_err();
    }

    /// The text of cuda/patch_embed.cu, for the tests that hold a launcher constant or a bit trick
    /// to what the kernels are written with.
    fn kernel_source() -> String {
        std::fs::read_to_string(crate::testing::project_root().join("cuda/patch_embed.cu")).unwrap()
    }

    /// Fails, naming `what`, unless `source` still contains each of `needles` verbatim.
    fn assert_has(source: &str, what: &str, needles: &[&str]) {
        for needle in needles {
            assert!(source.contains(needle), "{what} no longer has `{needle}`");
        }
    }

    /// The copy ring of `backward_weight_hwc` (cuda/patch_embed.cu), transcribed: its issues,
    /// commits, waits, conversions, MMA steps and barriers in the kernel's order, for every step
    /// count up to 40, with the waits taken at their weakest (exactly the groups
    /// `cp.async.wait_group` promises, no more). Checks that every read finds its own step's
    /// data landed (a d_out stage or a normalised tile read by the MMAs; a raw stage read by its
    /// conversion), that no copy or conversion overwrites data a later read still needs, and that
    /// between two barriers no buffer the whole block reads is also written.
    #[test]
    fn hwc_weight_copy_ring_orders_every_read_after_its_write() {
        const STAGES: usize = 4; // kBwdStages
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Slot {
            Empty,
            InFlight(usize), // a copy of this step, not yet waited for
            Landed(usize),
        }
        for steps in 0..40usize {
            let mut g = [Slot::Empty; STAGES];
            let mut raw = [Slot::Empty; STAGES];
            let mut p: [Option<usize>; 2] = [None; 2];
            let mut groups: Vec<Vec<usize>> = Vec::new(); // committed groups still in flight
            let mut pending: Vec<usize> = Vec::new(); // copies since the last commit
                                                      // Buffers read and written by the block since the last barrier ("g3", "p1", ...).
            let (mut read, mut written) = (Vec::<String>::new(), Vec::<String>::new());
            let mut mma_done = Vec::new();
            let ctx = |what: &str, s: usize| format!("steps {steps}: {what} of step {s}");
            let copy = |s: usize,
                        g: &mut [Slot; STAGES],
                        raw: &mut [Slot; STAGES],
                        pending: &mut Vec<usize>,
                        written: &mut Vec<String>,
                        mma_done: &Vec<usize>| {
                let st = s % STAGES;
                // The stage's previous step must have been read: by its MMAs (d_out) and its
                // conversion (raw; converted steps are those whose p tile was written).
                if let Slot::Landed(u) | Slot::InFlight(u) = g[st] {
                    assert!(mma_done.contains(&u), "{}: d_out stage {st} still holds step {u}", ctx("copy", s));
                }
                if let Slot::InFlight(u) = raw[st] {
                    panic!("{}: raw stage {st} still in flight with step {u}", ctx("copy", s));
                }
                g[st] = Slot::InFlight(s);
                raw[st] = Slot::InFlight(s);
                pending.push(s);
                written.push(format!("g{st}"));
            };
            let commit = |groups: &mut Vec<Vec<usize>>, pending: &mut Vec<usize>| groups.push(std::mem::take(pending));
            // wait_group<n>: every group but the newest n has landed.
            let wait = |n: usize, groups: &mut Vec<Vec<usize>>, g: &mut [Slot; STAGES], raw: &mut [Slot; STAGES]| {
                while groups.len() > n {
                    for s in groups.remove(0) {
                        g[s % STAGES] = Slot::Landed(s);
                        raw[s % STAGES] = Slot::Landed(s);
                    }
                }
            };
            let convert = |s: usize,
                           raw: &[Slot; STAGES],
                           p: &mut [Option<usize>; 2],
                           written: &mut Vec<String>,
                           mma_done: &Vec<usize>| {
                assert_eq!(raw[s % STAGES], Slot::Landed(s), "{}", ctx("conversion", s));
                if let Some(u) = p[s & 1] {
                    assert!(mma_done.contains(&u), "{}: tile {} still holds step {u}", ctx("conversion", s), s & 1);
                }
                p[s & 1] = Some(s);
                written.push(format!("p{}", s & 1));
            };
            let barrier = |read: &mut Vec<String>, written: &mut Vec<String>| {
                for r in read.iter() {
                    assert!(!written.contains(r), "steps {steps}: {r} read and written between two barriers");
                }
                read.clear();
                written.clear();
            };

            // The kernel's prologue.
            for s in 0..STAGES - 1 {
                if s < steps {
                    copy(s, &mut g, &mut raw, &mut pending, &mut written, &mma_done);
                }
                commit(&mut groups, &mut pending);
            }
            if steps > 0 {
                wait(STAGES - 2, &mut groups, &mut g, &mut raw);
                convert(0, &raw, &mut p, &mut written, &mma_done);
            }
            // The converted tile and the landed d_out rows are written as far as the block goes
            // only at the barrier; what this phase wrote is not read in it.
            barrier(&mut read, &mut written);
            // The main loop.
            for s in 0..steps {
                if s + STAGES - 1 < steps {
                    copy(s + STAGES - 1, &mut g, &mut raw, &mut pending, &mut written, &mma_done);
                }
                commit(&mut groups, &mut pending);
                assert_eq!(g[s % STAGES], Slot::Landed(s), "{}", ctx("MMAs (d_out rows)", s));
                assert_eq!(p[s & 1], Some(s), "{}", ctx("MMAs (pixels)", s));
                read.push(format!("g{}", s % STAGES));
                read.push(format!("p{}", s & 1));
                mma_done.push(s);
                if s + 1 < steps {
                    wait(STAGES - 2, &mut groups, &mut g, &mut raw);
                    convert(s + 1, &raw, &mut p, &mut written, &mma_done);
                }
                barrier(&mut read, &mut written);
            }
            wait(0, &mut groups, &mut g, &mut raw);
            assert!(groups.iter().all(|x| x.is_empty()), "steps {steps}: copies outlive the block");
            assert_eq!(mma_done, (0..steps).collect::<Vec<_>>(), "steps {steps}: every step once, in order");
        }
    }

    #[test]
    fn hwc_weight_shared_memory_is_the_kernels() {
        let source = kernel_source();
        let constant = |name| crate::testing::cuda_constant(&source, "patch_embed.cu", name);
        let (stages, rows, k) = (constant("kBwdStages"), constant("kBwdC"), constant("kBwdK"));
        assert!(source.contains("constexpr int kBwdLd = 128 + 8;"), "the padded row changed");
        assert_eq!(k, 128);
        let need = stages * (rows * 136 * 2 + rows * k) + 2 * rows * 136 * 2;
        assert_eq!(BWD_HWC_SMEM as usize, need, "BWD_HWC_SMEM against the kernel's BwdHwcSmem");
        let check = format!("static_assert(sizeof(BwdHwcSmem) == {BWD_HWC_SMEM},");
        assert!(source.contains(&check), "the kernel's own check of its size: {check}");
    }

    /// The `hwc-ws` weight gradient's conversion of pixel bytes to bf16 (`pixel_pair_plus1` in
    /// cuda/patch_embed.cu), emulated bit for bit: for every pair of bytes (u, v), the PRMT's f16
    /// pair 0x64uu, 0x64vv, minus 1023 (f16 bits 0x63FE) in f16, shifted right by 3 as one 32-bit word, plus
    /// 0x38003800, must be the bf16 pair (u + 1, v + 1). Checks the trick (the f16 exponent
    /// rebased to bf16's, the low mantissa bits that shift across the halves all zero, 0 kept off
    /// the subnormal exponent) and that the kernel still uses these constants.
    #[test]
    fn ws_weight_pixel_pairs_are_exact_bf16() {
        let source = kernel_source();
        assert_eq!(half::f16::from_f32(1023.0).to_bits(), 0x63FE, "the f16 bits of 1023");
        assert_has(
            &source,
            "pixel_pair_plus1",
            &["__byte_perm(x, 0x64u,", "\"r\"(0x63FE63FEu)", "(u >> 3) + 0x38003800u"],
        );
        let f16_sub_1023 = |bits: u16| (half::f16::from_bits(bits) - half::f16::from_f32(1023.0)).to_bits() as u32;
        for u in 0u32..256 {
            for v in 0u32..256 {
                let lo = f16_sub_1023(0x6400 | u as u16);
                let hi = f16_sub_1023(0x6400 | v as u16);
                let out = (((hi << 16) | lo) >> 3).wrapping_add(0x3800_3800);
                let want = |x: u32| half::bf16::from_f32(x as f32 + 1.0).to_bits() as u32;
                assert_eq!(out, (want(v) << 16) | want(u), "bytes {u}, {v}");
            }
        }
    }

    /// The raw-pixel forward's conversion (`pixel_pair_centered_f16`, cuda/patch_embed.cu): for
    /// every byte u, the PRMT's f16 1024 + u times 2^-8 (0x1C00) less 4.49609375 (0xC47F), rounded
    /// once as the FMA does, is exactly (u - 127) / 256; and the kernels' constants are these.
    #[test]
    fn ws_raw_forward_pixels_are_exact_f16() {
        let source = kernel_source();
        assert_has(
            &source,
            "the raw-pixel forward",
            &[
                "fma.rn.f16x2 %0, %1, %2, %3;",
                "\"r\"(0x1C001C00u), \"r\"(0xC47FC47Fu)",
                "constexpr int kRawCenter = 127;",
                "constexpr float kRawScale = 256.f;",
            ],
        );
        let (scale, offset) = (half::f16::from_bits(0x1C00), half::f16::from_bits(0xC47F));
        assert_eq!((scale.to_f64(), offset.to_f64()), (1.0 / 256.0, -(1024.0 + 127.0) / 256.0));
        for u in 0u16..256 {
            let prmt = half::f16::from_bits(0x6400 | u);
            assert_eq!(prmt.to_f64(), 1024.0 + u as f64, "the PRMT's pair for byte {u}");
            // An FMA rounds the exact a b + c once: the f64 value here is exact.
            let fma = half::f16::from_f64(prmt.to_f64() * scale.to_f64() + offset.to_f64());
            assert_eq!(fma.to_f64(), (u as f64 - 127.0) / 256.0, "byte {u}");
        }
    }

    /// The launch gives the `hwc-ws` forward the dynamic shared memory its layout takes (less
    /// makes it trap at its first launch, on a card only): the ring of stages (a 128-row A slice
    /// and a 192-row weight slice of 64 bf16 each), the two staging tiles, and the alignment
    /// slack, from the kernel's own constants.
    #[test]
    fn ws_forward_shared_memory_is_the_kernels() {
        let source = kernel_source();
        let constant = |name| crate::testing::cuda_constant(&source, "patch_embed.cu", name);
        let (m, n, k, stages) = (constant("kFwdM"), constant("kWsN"), constant("kWsK"), constant("kWsStages"));
        assert_eq!((m, n), (FWD_TILE_M, FWD_WS_TILE_N));
        assert!(source.contains("constexpr int kWsOutLd = kWsN * 2 + 16;"), "the staging row changed");
        let need = stages * (m * k * 2 + n * k * 2) + 2 * 64 * (n * 2 + 16) + 1023;
        assert!(FWD_WS_SMEM as usize >= need, "FWD_WS_SMEM {FWD_WS_SMEM} < the kernel's {need}");
    }

    /// The `hwc-ws` weight gradient's stage layout (cuda/patch_embed.cu, backward_weight_hwc_ws),
    /// transcribed: the places its producer writes each pixel and d_out element (the offset
    /// expressions below, which the kernel must still contain), read back the way wgmma reads an
    /// M/N-major operand in the 128-byte swizzle (PTX ISA's canonical layout: 8 elements a 16-byte
    /// chunk, 8 chunks a 128-byte row, 64-wide blocks `LBO` apart along M/N; 8 rows along K, 8-row
    /// groups `SBO` apart; byte address bits 4-6 XOR bits 7-9). Every (k, n) of every 16-deep
    /// step must find its own element: pixels of row 16 kk + k, k' n (LBO 8192, SBO 1024); d_out
    /// of the same row, channel 64 half + m. Also: the producer's writes cover the 48 KB stage
    /// once, and the 8 lanes of each quarter warp store the 8 different 16-byte chunks of a row
    /// (no bank conflict).
    #[test]
    fn ws_weight_stage_layout_is_what_wgmma_reads() {
        let source = kernel_source();
        assert_has(&source, "the kernel", &[
            "const uint32_t g_off = (cn >> 3) * kWbBlockBytes + gr * 128 + (((cn & 7) ^ gr) << 4);",
            "const uint32_t p_even = kWbGBytes + (cp >> 3) * kWbBlockBytes + pr * 128 + (((cp & 7) ^ pr) << 4);",
            "const uint32_t p_odd = kWbGBytes + (cp >> 3) * kWbBlockBytes + (pr + 4) * 128 + (((cp & 7) ^ (pr + 4)) << 4);",
            "cp_async16_to(stage + g_off + r * 1024,",
            "st_shared16(stage + ((r & 1) ? p_odd : p_even) + (r >> 1) * 1024,",
            "sw128_desc(a + kk * 2048), sw128_desc_lbo(b + kk * 2048, kWbBlockBytes)",
        ]);
        const BLOCK: usize = 8192;
        const G_BYTES: usize = 2 * BLOCK;
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Held {
            Pixel { row: usize, k: usize },
            DOut { row: usize, channel: usize },
        }
        let mut stage: Vec<Option<Held>> = vec![None; 6 * BLOCK / 2]; // a bf16 each
        let mut put = |byte: usize, what: Held| {
            assert!(stage[byte / 2].is_none(), "byte {byte} written twice");
            stage[byte / 2] = Some(what);
        };
        let pixel_place = |tid: usize, r: usize| {
            let (cp, pr) = (tid & 31, tid >> 5);
            let (p_even, p_odd) = (
                G_BYTES + (cp >> 3) * BLOCK + pr * 128 + (((cp & 7) ^ pr) << 4),
                G_BYTES + (cp >> 3) * BLOCK + (pr + 4) * 128 + (((cp & 7) ^ (pr + 4)) << 4),
            );
            (if r & 1 == 1 { p_odd } else { p_even }) + (r >> 1) * 1024
        };
        for tid in 0..128 {
            let (cn, gr, cp, pr) = (tid & 15, tid >> 4, tid & 31, tid >> 5);
            let g_off = (cn >> 3) * BLOCK + gr * 128 + (((cn & 7) ^ gr) << 4);
            for r in 0..8 {
                for e in 0..8 {
                    put(g_off + r * 1024 + 2 * e, Held::DOut { row: gr + 8 * r, channel: 8 * cn + e });
                }
            }
            for r in 0..16 {
                for e in 0..8 {
                    put(pixel_place(tid, r) + 2 * e, Held::Pixel { row: pr + 4 * r, k: 8 * cp + e });
                }
            }
        }
        assert!(stage.iter().all(|x| x.is_some()), "the stage is not written whole");
        let swizzle = |byte: usize| byte ^ (((byte >> 7) & 7) << 4);
        let mn_major = |start: usize, k: usize, n: usize, lbo: usize| {
            swizzle(start + (n % 8) * 2 + ((n / 8) % 8) * 16 + (n / 64) * lbo + (k % 8) * 128 + (k / 8) * 1024)
        };
        for kk in 0..4 {
            for k in 0..16 {
                let row = 16 * kk + k;
                for n in 0..256 {
                    let got = stage[mn_major(G_BYTES + kk * 2048, k, n, BLOCK) / 2];
                    assert_eq!(got, Some(Held::Pixel { row, k: n }), "pixels, step {kk}, (k, n) = ({k}, {n})");
                }
                for half in 0..2 {
                    for m in 0..64 {
                        let got = stage[mn_major(half * BLOCK + kk * 2048, k, m, 16) / 2];
                        let want = Held::DOut { row, channel: 64 * half + m };
                        assert_eq!(got, Some(want), "d_out, step {kk}, half {half}, (k, m) = ({k}, {m})");
                    }
                }
            }
        }
        for quarter in 0..16 {
            for r in 0..16 {
                let mut chunks: Vec<usize> = (0..8).map(|i| (pixel_place(8 * quarter + i, r) / 16) % 8).collect();
                chunks.sort_unstable();
                assert_eq!(chunks, (0..8).collect::<Vec<_>>(), "quarter warp {quarter}, row step {r}: a bank conflict");
            }
        }
    }

    /// The launch gives the `hwc-ws` weight gradient what its layout takes (less makes it trap at
    /// its first launch, on a card only): the ring of stages (64 rows of 128 channels of d_out and
    /// of 256 k' of pixels, bf16) with the slack to align it, from the kernel's own constants; and
    /// its tile is the grid's.
    #[test]
    fn ws_weight_shared_memory_is_the_kernels() {
        let source = kernel_source();
        let constant = |name| crate::testing::cuda_constant(&source, "patch_embed.cu", name);
        let (rows, c, n, stages) = (constant("kWbRows"), constant("kWbC"), constant("kWbN"), constant("kWbStages"));
        assert_eq!((rows, c, n), (BWD_WS_SLICE, BWD_WS_TILE_C, BWD_WS_TILE_K));
        assert!(source.contains("constexpr int kWbRingBytes = kWbStages * kWbStageBytes + 1024;"), "the ring changed");
        assert_eq!(BWD_WS_RING_BYTES as usize, stages * rows * (c + n) * 2 + 1024, "BWD_WS_RING_BYTES");
    }
}
