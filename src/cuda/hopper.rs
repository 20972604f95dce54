//! Host side of the Hopper building blocks (`cuda/hopper.cuh`): TMA tensor maps, and the two
//! check kernels of `cuda/hopper.cu` that `tests/hopper.rs` runs against host computations.
//!
//! A kernel built on TMA, mbarriers and wgmma over 128-byte-swizzled shared memory fails without
//! a visible cause when one piece is wrong: a tensor-map field, the swizzle pattern, a
//! descriptor bit. Each check isolates one of them:
//! - [`tma_roundtrip`]: one TMA box load completing on an mbarrier, read back through the
//!   swizzle pattern by hand (tensor map, TMA, mbarrier, swizzle);
//! - [`wgmma_sw128`]: a 64 x 64 product over one or two 64-wide slices of K, the operands
//!   loaded by TMA and read by wgmma through swizzled descriptors (descriptor fields, the
//!   32-byte step within a slice, the accumulator layout);
//! - [`store_transposed`]: A fragments stored transposed into a swizzled tile (stmatrix .trans,
//!   the fused attention backward's P^T and dS^T tiles);
//! - [`wgmma_rs`]: the wgmma forms the attention kernels use (A in registers with B K-major and
//!   N-major, both from shared memory with n = 32), on tiles that cp.async wrote into the swizzle
//!   by hand (register fragment layout, the zero fill and proxy fence, one tile read both ways).
//!
//! And two measurements: [`dq_reduce`], the f32 reductions a fused attention backward would make
//! (see its docs), and [`dependent_launch_overlap`], whether a programmatic dependent launch
//! starts before the kernel it follows has ended, and waits for it.
//!
//! Compute capability 9.0 only: elsewhere each returns [`Error::Unsupported`].

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::LaunchConfig;
use half::bf16;

use crate::cuda::params::{
    MapetHopperCheck, MapetHopperDqReduce, MapetHopperGemm, MapetHopperPdl, MapetHopperRs, MapetHopperTranspose,
    MapetTensorMap,
};
use crate::cuda::{blocks_for, check_aligned, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};

const MODULE: &str = "hopper";
/// Rows and columns of a TMA box (64 bf16 = the 128 bytes of the swizzle).
pub const BOX: usize = 64;

/// A tensor map over the row-major bf16 matrix `[rows, cols]` at `ptr` (a device address), in
/// boxes of `box_rows` x [`BOX`] columns (128 bytes) with 128-byte swizzle; elements outside the
/// matrix load as zeros. The row pitch (2·cols bytes) must be a multiple of 16, `ptr` 16-byte
/// aligned, and 1 <= box_rows <= 256.
pub fn tensor_map_bf16(ptr: *const c_void, rows: usize, cols: usize, box_rows: usize) -> Result<MapetTensorMap> {
    if rows == 0 || cols == 0 || !(2 * cols).is_multiple_of(16) || !(1..=256).contains(&box_rows) {
        return Err(Error::Unsupported {
            what: "tensor map",
            detail: format!(
                "[{rows}, {cols}] bf16 in boxes of {box_rows} rows: needs rows, cols >= 1, rows of a multiple of 16 \
                 bytes and boxes of 1 to 256 rows"
            ),
        });
    }
    let dims = [cols as u64, rows as u64];
    let strides = [2 * cols as u64];
    let boxes = [BOX as u32, box_rows as u32];
    let elem_strides = [1u32, 1u32];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every pointer is to a live local array of the length the call reads for rank 2
    // (dims and box sizes 2, strides 1); `map` is written by the call before it is read.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    status.result().map_err(|e| Error::Driver {
        context: format!(" encoding a tensor map of [{rows}, {cols}] bf16"),
        source: e,
    })?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    Ok(MapetTensorMap { opaque: map.opaque })
}

fn require_9_0(gpu: &Gpu) -> Result<()> {
    let (major, minor) = gpu.compute_capability();
    if (major, minor) != (9, 0) {
        return Err(Error::Unsupported {
            what: "Hopper check",
            detail: format!("TMA and wgmma need a compute capability 9.0 device; {} is {major}.{minor}", gpu.name()),
        });
    }
    Ok(())
}

fn check_matrix(name: &'static str, m: &dyn DeviceRead<bf16>, rows: usize, cols: usize) -> Result<()> {
    check_len(name, m.len(), rows * cols)?;
    check_aligned(name, m.ptr(), 16)
}

/// The [`BOX`] x [`BOX`] box of the row-major bf16 matrix `a` `[rows, cols]` whose top-left
/// element is (`r0`, `c0`), loaded by TMA and read back through the 128-byte swizzle: row-major
/// `[BOX, BOX]`, zeros where the box leaves the matrix. `c0` must be a multiple of 8: a TMA
/// load whose innermost coordinate is not 16 bytes into a row stops the kernel with an illegal
/// instruction (not in the driver's documentation of the tensor map, but reported on H100s).
pub fn tma_roundtrip(
    gpu: &Gpu,
    a: &dyn DeviceRead<bf16>,
    rows: usize,
    cols: usize,
    r0: usize,
    c0: usize,
) -> Result<Vec<bf16>> {
    require_9_0(gpu)?;
    check_matrix("a", a, rows, cols)?;
    if r0 >= rows || c0 >= cols {
        return Err(Error::Unsupported { what: "box", detail: format!("({r0}, {c0}) is outside [{rows}, {cols}]") });
    }
    if !c0.is_multiple_of(8) {
        return Err(Error::Unsupported {
            what: "box",
            detail: format!("column {c0} is not a multiple of 8 (TMA needs 16-byte aligned rows)"),
        });
    }
    let map = tensor_map_bf16(a.ptr(), rows, cols, BOX)?;
    let mut out = gpu.alloc::<bf16>(BOX * BOX)?;
    out.poison()?;
    let p = MapetHopperCheck { a: map, b: map, out: out.ptr_mut(), r0: r0 as i32, c0: c0 as i32, k_atoms: 1 };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the tensor map covers `a` exactly (its length checked above) and TMA reads only
    // inside it; the kernel writes the BOX·BOX elements of `out`.
    unsafe { gpu.launch(MODULE, "mapet_hopper_tma_roundtrip", cfg, &p)? };
    out.to_host()
}

/// `A Bᵀ` for bf16 `a` and `b`, both row-major `[BOX, k]` with `k` = 64 or 128, by TMA loads and
/// wgmma over 128-byte-swizzled tiles: row-major f32 `[BOX, BOX]`.
pub fn wgmma_sw128(gpu: &Gpu, a: &dyn DeviceRead<bf16>, b: &dyn DeviceRead<bf16>, k: usize) -> Result<Vec<f32>> {
    require_9_0(gpu)?;
    if k != BOX && k != 2 * BOX {
        return Err(Error::Unsupported { what: "wgmma check", detail: format!("k = {k}: 64 or 128") });
    }
    check_matrix("a", a, BOX, k)?;
    check_matrix("b", b, BOX, k)?;
    let (map_a, map_b) = (tensor_map_bf16(a.ptr(), BOX, k, BOX)?, tensor_map_bf16(b.ptr(), BOX, k, BOX)?);
    let mut out = gpu.alloc::<f32>(BOX * BOX)?;
    out.poison()?;
    let p = MapetHopperCheck { a: map_a, b: map_b, out: out.ptr_mut(), r0: 0, c0: 0, k_atoms: (k / BOX) as i32 };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: each tensor map covers its [BOX, k] matrix exactly (lengths checked above); the
    // kernel loads k / BOX boxes of each and writes the BOX·BOX floats of `out`.
    unsafe { gpu.launch(MODULE, "mapet_hopper_wgmma_sw128", cfg, &p)? };
    out.to_host()
}

/// `A Bᵀ` for bf16 `a` row-major `[BOX, BOX]` and `b` row-major `[3 BOX, BOX]` (n = 192), by TMA
/// loads (B's three 64-row boxes stacked along N) and one m64n192k16 wgmma a 16-deep step, the
/// product the `hwc-ws` patch-embedding forward runs: row-major f32 `[BOX, 3 BOX]`.
pub fn wgmma_sw128_n192(gpu: &Gpu, a: &dyn DeviceRead<bf16>, b: &dyn DeviceRead<bf16>) -> Result<Vec<f32>> {
    require_9_0(gpu)?;
    let n = 3 * BOX;
    check_matrix("a", a, BOX, BOX)?;
    check_matrix("b", b, n, BOX)?;
    let (map_a, map_b) = (tensor_map_bf16(a.ptr(), BOX, BOX, BOX)?, tensor_map_bf16(b.ptr(), n, BOX, BOX)?);
    let mut out = gpu.alloc::<f32>(BOX * n)?;
    out.poison()?;
    let p = MapetHopperCheck { a: map_a, b: map_b, out: out.ptr_mut(), r0: 0, c0: 0, k_atoms: 1 };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: each tensor map covers its matrix exactly (lengths checked above); the kernel loads
    // one box of a and three of b and writes the BOX·3·BOX floats of `out`.
    unsafe { gpu.launch(MODULE, "mapet_hopper_wgmma_sw128_n192", cfg, &p)? };
    out.to_host()
}

/// The attention kernels' wgmma products on bf16 `a` and `b`, both row-major `[BOX, BOX]`, with
/// the rows of `b` from `b_rows` on read as zeros (1 <= `b_rows` <= [`BOX`]), all row-major f32:
/// `A B[0:32]ᵀ` (`[BOX, 32]`, A in registers, B K-major), `A B` (`[BOX, BOX]`, A in registers,
/// B N-major), `A B[32:64]ᵀ` (`[BOX, 32]`, A and B from shared memory), `Aᵀ B[0:32]ᵀ`
/// (`[BOX, 32]`, A's tile read M-major from shared memory) and `Aᵀ B` (`[BOX, BOX]`, both read
/// MN-major).
pub fn wgmma_rs(gpu: &Gpu, a: &dyn DeviceRead<bf16>, b: &dyn DeviceRead<bf16>, b_rows: usize) -> Result<WgmmaRsOut> {
    require_9_0(gpu)?;
    check_matrix("a", a, BOX, BOX)?;
    check_matrix("b", b, BOX, BOX)?;
    if !(1..=BOX).contains(&b_rows) {
        return Err(Error::Unsupported { what: "wgmma check", detail: format!("b_rows = {b_rows}: 1 to {BOX}") });
    }
    let mut out = gpu.alloc::<f32>(BOX * 32 + BOX * BOX + 2 * BOX * 32 + BOX * BOX)?;
    out.poison()?;
    let p = MapetHopperRs { a: a.ptr(), b: b.ptr(), out: out.f32_ptr(), b_rows: b_rows as i32 };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: a and b hold BOX·BOX elements each (checked above) and are 16-byte aligned, as the
    // kernel's 4-byte and 16-byte loads need; it reads rows < b_rows of b and writes the
    // BOX·32 + BOX·BOX + 2·BOX·32 + BOX·BOX floats of `out`.
    unsafe { gpu.launch(MODULE, "mapet_hopper_wgmma_rs", cfg, &p)? };
    let all = out.to_host()?;
    let (kmajor, rest) = all.split_at(BOX * 32);
    let (nmajor, rest) = rest.split_at(BOX * BOX);
    let (shared_a, rest) = rest.split_at(BOX * 32);
    let (mmajor_a, mn_major) = rest.split_at(BOX * 32);
    Ok(WgmmaRsOut {
        kmajor: kmajor.to_vec(),
        nmajor: nmajor.to_vec(),
        shared_a: shared_a.to_vec(),
        mmajor_a: mmajor_a.to_vec(),
        mn_major: mn_major.to_vec(),
    })
}

/// What [`wgmma_rs`] computes.
#[derive(Debug, Clone)]
pub struct WgmmaRsOut {
    /// `A B[0:32]ᵀ`, `[BOX, 32]`: A in registers, B K-major.
    pub kmajor: Vec<f32>,
    /// `A B`, `[BOX, BOX]`: A in registers, B N-major.
    pub nmajor: Vec<f32>,
    /// `A B[32:64]ᵀ`, `[BOX, 32]`: A and B from shared memory, B from its fifth 8-row atom on.
    pub shared_a: Vec<f32>,
    /// `Aᵀ B[0:32]ᵀ`, `[BOX, 32]`: A's tile read M-major from shared memory (its rows as K), B
    /// K-major: the form of the fused attention backward's dQᵀ = Kᵀ dSᵀ.
    pub mmajor_a: Vec<f32>,
    /// `Aᵀ B`, `[BOX, BOX]`: both tiles read MN-major from shared memory (their rows as K): the
    /// form of the fused backward's dV += Pᵀ dO and dK += dSᵀ Q.
    pub mn_major: Vec<f32>,
}

/// `Aᵀ` (`[32, BOX]`, row-major f32) for a bf16 `a`, row-major `[BOX, 32]`, by the way the fused
/// attention backward stores P^T and dS^T: each warp loads its 16 rows of `a` as mma.sync A
/// fragments and `sw128_store_frags_transposed` (stmatrix .trans) writes them into a 128-byte
/// swizzled tile, which the kernel reads back through the swizzle pattern.
pub fn store_transposed(gpu: &Gpu, a: &dyn DeviceRead<bf16>) -> Result<Vec<f32>> {
    require_9_0(gpu)?;
    check_matrix("a", a, BOX, 32)?;
    let mut out = gpu.alloc::<f32>(32 * BOX)?;
    out.poison()?;
    let p = MapetHopperTranspose { a: a.ptr(), out: out.f32_ptr() };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: a holds BOX·32 elements (checked above), 16-byte aligned; the kernel reads them as
    // 4-byte pairs and writes the 32·BOX floats of `out`.
    unsafe { gpu.launch(MODULE, "mapet_hopper_store_transposed", cfg, &p)? };
    out.to_host()
}

/// Rows and columns of C that one block of [`gemm_tn`] computes.
pub const GEMM_TILE: (usize, usize) = (128, 256);
/// Dynamic shared memory of `mapet_hopper_gemm_tn`: 4 stages of 48 KB, and 1 KB to align them.
const GEMM_SMEM: u32 = 4 * 48 * 1024 + 1024;

/// `C = A Bᵀ` for bf16 `a` `[m, k]`, `b` `[n, k]` and `c` `[m, n]` (row-major, `c` written), on
/// `mapet_hopper_gemm_tn` (TMA loads into a 4-stage ring, a producer warpgroup, two consumer
/// warpgroups of m64n256k16 wgmma; f32 accumulation). EXPERIMENTAL: a measure of the Hopper
/// pieces against cuBLASLt (`benches/hopper.rs`); nothing in the model calls it. `k % 8 == 0`
/// and 16-byte aligned operands; compute capability 9.0 only.
#[allow(clippy::too_many_arguments)]
pub fn gemm_tn(
    gpu: &Gpu,
    a: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<bf16>,
    c: &mut dyn DeviceWrite<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    require_9_0(gpu)?;
    if m == 0 || n == 0 || k == 0 || !k.is_multiple_of(8) || m > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::Unsupported {
            what: "Hopper GEMM",
            detail: format!("m = {m}, n = {n}, k = {k}: each at least 1, k a multiple of 8"),
        });
    }
    check_matrix("a", a, m, k)?;
    check_matrix("b", b, n, k)?;
    check_len("c", c.len(), m * n)?;
    check_aligned("c", c.ptr(), 16)?;
    let (tile_m, tile_n) = GEMM_TILE;
    let p = MapetHopperGemm {
        a: tensor_map_bf16(a.ptr(), m, k, tile_m)?,
        b: tensor_map_bf16(b.ptr(), n, k, tile_n)?,
        c: c.ptr_mut(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
    };
    let grid =
        (blocks_for("GEMM columns", n as u64, tile_n as u64)?, blocks_for("GEMM rows", m as u64, tile_m as u64)?, 1);
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (384, 1, 1), shared_mem_bytes: GEMM_SMEM };
    // SAFETY: the tensor maps cover `a` and `b` exactly (lengths checked above), so TMA reads
    // nothing outside them; the kernel writes only elements (row < m, col < n) of `c`, which
    // holds m·n.
    unsafe { gpu.launch(MODULE, "mapet_hopper_gemm_tn", cfg, &p) }
}

/// How [`dq_reduce`] adds its tiles into the accumulator (`MAPET_DQ_REDUCE_*` in
/// `cuda/params.h`, whose numbers the discriminants are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DqReduce {
    /// Nothing added: the zeroing, the conversion and the discard alone, the baseline.
    None = 0,
    /// 16 `red.global.add.f32` a thread a tile.
    Red1 = 1,
    /// 8 `red.global.add.v2.f32` a thread a tile (two adjacent positions of one dim).
    Red2 = 2,
    /// 4 `red.global.add.v4.f32` a thread a tile (four adjacent positions, after one exchange
    /// of pairs between lanes t and t ^ 1).
    Red4 = 3,
    /// 8 plain 8-byte stores a thread a tile in place of the reductions: what the same bytes
    /// cost as writes. Racy, so its sums are meaningless and no test checks them.
    Store = 4,
}

impl DqReduce {
    /// Every mode, the baseline first.
    pub const ALL: [DqReduce; 5] = [DqReduce::None, DqReduce::Red1, DqReduce::Red2, DqReduce::Red4, DqReduce::Store];

    /// Its name in bench lines.
    pub fn name(self) -> &'static str {
        match self {
            DqReduce::None => "none (zero, convert, discard)",
            DqReduce::Red1 => "red.add.f32",
            DqReduce::Red2 => "red.add.v2.f32",
            DqReduce::Red4 => "red.add.v4.f32",
            DqReduce::Store => "plain stores (racy)",
        }
    }
}

/// Threads of a [`dq_reduce`] block: the three warpgroups of the wgmma dK/dV kernel.
pub const DQ_REDUCE_THREADS: u32 = 384;

/// Dynamic shared memory a [`dq_reduce`] block asks for and leaves unused: enough that one block
/// runs an SM at a time, as the wgmma dK/dV kernel's shared memory allows (so that, as there,
/// only about one pair's accumulator an SM is live in L2 at once).
const DQ_REDUCE_HELD_SMEM: u32 = 160 * 1024;

/// Positions of a [`dq_reduce`] pair's accumulator: `lq` rounded up to a multiple of 32.
pub fn dq_reduce_positions(lq: usize) -> usize {
    lq.div_ceil(32) * 32
}

/// A measurement of what accumulating dQ inside the attention's dK/dV kernel would cost, with
/// nothing else around it (`mapet_hopper_dq_reduce`; `MapetHopperDqReduce` in `cuda/params.h`
/// says exactly what it does). One block of three warpgroups a pair, as the dK/dV kernel: it
/// zeroes the pair's f32 accumulator (`acc`, `[pairs, 64, positions]` with positions =
/// [`dq_reduce_positions`]`(lq)`), each warpgroup adds `items` tiles of 64 dims x 32 positions into
/// it as `mode` says, then the block converts it into `dq` (bf16 `[pairs, lq, 64]`, written) and
/// drops its lines from L2 without writing them back. At ViT-B (1536 pairs, `lq` = 491, about 24
/// tiles a warpgroup) the reductions come to 906 MB. EXPERIMENTAL: `benches/hopper.rs` times each
/// mode against [`DqReduce::None`]; nothing in the model calls it. Compute capability 9.0 only.
pub fn dq_reduce(
    gpu: &Gpu,
    acc: &mut dyn DeviceWrite<f32>,
    dq: &mut dyn DeviceWrite<bf16>,
    pairs: usize,
    lq: usize,
    items: usize,
    mode: DqReduce,
) -> Result<()> {
    require_9_0(gpu)?;
    if pairs == 0 || lq == 0 || pairs > i32::MAX as usize || lq > 1 << 20 || items > 1 << 20 {
        return Err(Error::Unsupported {
            what: "dQ reduction measurement",
            detail: format!(
                "{pairs} pairs of {lq} rows, {items} tiles a warpgroup: at least one pair and one row, at most 2^20 rows \
                 and tiles"
            ),
        });
    }
    check_len("acc", acc.len(), pairs * 64 * dq_reduce_positions(lq))?;
    check_len("dq", dq.len(), pairs * lq * 64)?;
    // 128 bytes: the L2 discard drops whole 128-byte lines from the start of each pair's part
    // (64 * positions floats, a multiple of 128 bytes), and must drop none of another's.
    check_aligned("acc", acc.ptr(), 128)?;
    check_aligned("dq", dq.ptr(), 16)?;
    let p = MapetHopperDqReduce {
        acc: acc.ptr_mut() as *mut f32,
        dq: dq.ptr_mut(),
        lq: lq as i32,
        items: items as i32,
        mode: mode as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (pairs as u32, 1, 1),
        block_dim: (DQ_REDUCE_THREADS, 1, 1),
        shared_mem_bytes: DQ_REDUCE_HELD_SMEM,
    };
    // SAFETY: block `pair` writes, reads and discards only its own 64·positions floats of `acc`
    // (whole 128-byte lines: `acc` is 128-byte aligned and positions a multiple of 32) and writes
    // its lq·64 elements of `dq`, both lengths checked above for `pairs` blocks; the 16-byte
    // accesses are aligned (checked).
    unsafe { gpu.launch(MODULE, "mapet_hopper_dq_reduce", cfg, &p) }
}

/// What [`dependent_launch_overlap`] saw, in `%globaltimer` nanoseconds (one clock for the whole
/// device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdlTimes {
    /// When the primary kernel ended (after its spin).
    pub primary_end: u64,
    /// When the secondary started, before its `griddepcontrol.wait`.
    pub secondary_start: u64,
    /// When its wait returned.
    pub secondary_waited: u64,
}

/// Launches `mapet_hopper_pdl_primary`, which spins `spin_ns` after letting its dependents start,
/// and right after it `mapet_hopper_pdl_secondary`, as a programmatic dependent launch when
/// `dependent` (else plainly), on this [`Gpu`]'s stream; returns when each did what
/// (`MapetHopperPdl` in `cuda/params.h`). A plain launch starts after the primary's end; a
/// dependent one should start during its spin, and its wait return after its end. Compute
/// capability 9.0 only; `spin_ns` at most a second.
pub fn dependent_launch_overlap(gpu: &Gpu, spin_ns: u64, dependent: bool) -> Result<PdlTimes> {
    require_9_0(gpu)?;
    if spin_ns > 1_000_000_000 {
        return Err(Error::Unsupported {
            what: "dependent-launch check",
            detail: format!("a spin of {spin_ns} ns; at most 1 s"),
        });
    }
    let mut times = gpu.upload(&[u64::MAX; 3])?;
    let p = MapetHopperPdl { times: times.ptr_mut() as *mut u64, spin_ns: spin_ns as i64 };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: each kernel writes only its own of the three u64 of `times`; the secondary touches
    // no global memory before its dependent_launch_start() (it reads the clock there).
    unsafe {
        gpu.launch(MODULE, "mapet_hopper_pdl_primary", cfg, &p)?;
        if dependent {
            gpu.launch_dependent_always(MODULE, "mapet_hopper_pdl_secondary", cfg, &p)?;
        } else {
            gpu.launch(MODULE, "mapet_hopper_pdl_secondary", cfg, &p)?;
        }
    }
    let t = times.to_host()?;
    Ok(PdlTimes { primary_end: t[0], secondary_start: t[1], secondary_waited: t[2] })
}
