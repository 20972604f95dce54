// Hopper (sm_90a) building blocks: mbarriers, TMA tile loads, and wgmma on 128-byte-swizzled
// shared memory. Everything here exists only where __CUDA_ARCH_FEAT_SM90_ALL is defined (the
// sm_90a cubins); kernels that use it trap elsewhere.
//
// The 128-byte swizzle, as TMA writes it and wgmma reads it: a tile whose rows are 128 bytes (64
// bf16) is stored as 1024-byte atoms of 8 rows; within an atom, the 16-byte chunk j of row r sits
// at chunk j ^ r. Byte o = 128 r + b of the unswizzled atom is at o ^ ((r & 7) << 4). Atoms must
// start 1024-byte aligned for the pattern to be the address bits' (the descriptors' base offset
// is then 0).
#pragma once

#include <stdint.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t hopper_smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of the 16-byte chunk j (0..7) of row r in a 128-byte-swizzled tile that starts on
// an atom: the one statement of the pattern above for the code that addresses such tiles by hand.
__device__ __forceinline__ uint32_t sw128_offset(int r, int j) {
    return static_cast<uint32_t>(128 * r + ((j ^ (r & 7)) << 4));
}

// The first address at or after the given one on a 1024-byte boundary, where the atoms of a
// 128-byte-swizzled tile must start: kernels that place such tiles in dynamic shared memory ask
// for 1 KB more than they use and start there.
__device__ __forceinline__ uint32_t sw128_align(uint32_t saddr) { return (saddr + 1023) & ~1023u; }
__device__ __forceinline__ unsigned char* sw128_align(unsigned char* p) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~static_cast<uintptr_t>(1023));
}

// ---- mbarrier: a 64-bit shared-memory object that completes a phase when `count` arrivals and
// the expected transaction bytes have come in; waiters poll the phase's parity.

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(hopper_smem_addr(bar)), "r"(count) : "memory");
}

// Makes initialised mbarriers visible to the async proxy (TMA); a block barrier must follow
// before other threads use them.
__device__ __forceinline__ void mbar_fence_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The barriers of a ring of S stages: full[s] completes when a stage has been filled (after
// `full_count` arrivals), empty[s] when its consumers are done with it (`empty_count`). Thread 0
// initialises them; a block barrier must follow before any thread uses them.
template <int S>
__device__ __forceinline__ void mbar_init_ring(uint64_t (&full)[S], uint64_t (&empty)[S], uint32_t full_count,
                                               uint32_t empty_count) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(&full[s], full_count);
            mbar_init(&empty[s], empty_count);
        }
        mbar_fence_init();
    }
}

// One arrival that also announces `bytes` of transactions (the TMA copies of this phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(hopper_smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// Whether the phase of the given parity has completed (the hardware may suspend the thread a
// while before it answers no).
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(hopper_smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// Waits until the phase of the given parity has completed. A phase that never completes (a
// transaction count that does not match the copies, a parity out of step) would hang the kernel
// and whatever waits on it; after 4 seconds this traps instead, so the launch fails with an error.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    uint64_t t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    while (!mbar_try_wait(bar, parity)) {
        uint64_t t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 > 4000000000ull) __trap();
    }
}

// ---- TMA: the box at (inner coordinate c0, outer coordinate c1) of the tensor map at `map` (a
// __grid_constant__ parameter's address) into shared memory at `dst` (1024-byte aligned for the
// 128-byte swizzle), completing `bytes` of the mbarrier's transactions. c0 times the element size
// must be a multiple of 16 bytes: an unaligned innermost coordinate is an illegal instruction on
// sm_90 (the kernels here load at multiples of 64 elements).
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            hopper_smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(hopper_smem_addr(bar))
        : "memory");
}

// ---- wgmma on K-major tiles in 128-byte swizzle: rows of 64 bf16 of K, 8-row atoms of 1024 B
// stacked along M/N. Matrix descriptor fields (PTX ISA, "Matrix Descriptor Format"): start
// address >> 4 (bits 0-13), leading byte offset >> 4 (16-29; not used by a swizzled K-major
// operand whose 16-deep step lies within one 128-byte row, and set to 1), stride byte offset >> 4
// (32-45; 1024 between 8-row atoms), base offset (49-51; 0 for 1024-aligned atoms), swizzle mode
// (62-63; 1 = 128 bytes). The k-th 16-deep step of a 64-wide atom starts 32 k bytes in: the
// hardware applies the swizzle to the addresses it forms from there. For an M/N-major operand the
// leading byte offset is the distance between 64-element blocks along M/N instead: the value 1 fits
// only operands one block (64 elements) wide; wider ones take sw128_desc_lbo (the `hwc-ws` weight
// gradient's pixels, cuda/patch_embed.cu).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr) {
    return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
           (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// sw128_desc for an M/N-major operand wider than one 64-element block: its blocks, each a
// [rows x 128 bytes] swizzled region, lie `block_bytes` apart (the leading byte offset; a multiple
// of 16 below 2^18).
__device__ __forceinline__ uint64_t sw128_desc_lbo(uint32_t saddr, uint32_t block_bytes) {
    return (sw128_desc(saddr) & ~(static_cast<uint64_t>(0x3FFF) << 16)) | (static_cast<uint64_t>(block_bytes >> 4) << 16);
}

// sw128_desc(saddr + bytes) from desc = sw128_desc(saddr), for bytes a multiple of 16 and
// saddr + bytes < 2^18 (every shared address): the start address field takes the offset with no
// carry out of its 14 bits, so one 32-bit add on the low word replaces sw128_desc's mask, shift
// and or. The wgmma loops hoist a tile's descriptor and step through its rows with this.
__device__ __forceinline__ uint64_t sw128_desc_plus(uint64_t desc, uint32_t bytes) {
    return (desc & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(desc) + (bytes >> 4));
}

// The accumulator operands of the wgmma wrappers below: the first n registers %0 .. %(n - 1) in
// the instruction's text (MAPET_WG_REGS_n) and the matching read-write constraints on d[0 .. n - 1]
// (MAPET_WG_ACC_n), for n a multiple of 16. The operands after them are numbered from n.
#define MAPET_WG_REGS_16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define MAPET_WG_REGS_32 \
    MAPET_WG_REGS_16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MAPET_WG_REGS_64 \
    MAPET_WG_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" \
    ", %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MAPET_WG_REGS_96 \
    MAPET_WG_REGS_64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79" \
    ", %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define MAPET_WG_REGS_128 \
    MAPET_WG_REGS_96 ", %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111" \
    ", %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define MAPET_WG_ACC16(o)                                                                                          \
    "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]),    \
        "+f"(d[o + 7]), "+f"(d[o + 8]), "+f"(d[o + 9]), "+f"(d[o + 10]), "+f"(d[o + 11]), "+f"(d[o + 12]),         \
        "+f"(d[o + 13]), "+f"(d[o + 14]), "+f"(d[o + 15])
#define MAPET_WG_ACC_16 MAPET_WG_ACC16(0)
#define MAPET_WG_ACC_32 MAPET_WG_ACC_16, MAPET_WG_ACC16(16)
#define MAPET_WG_ACC_64 MAPET_WG_ACC_32, MAPET_WG_ACC16(32), MAPET_WG_ACC16(48)
#define MAPET_WG_ACC_96 MAPET_WG_ACC_64, MAPET_WG_ACC16(64), MAPET_WG_ACC16(80)
#define MAPET_WG_ACC_128 MAPET_WG_ACC_96, MAPET_WG_ACC16(96), MAPET_WG_ACC16(112)

__device__ __forceinline__ void wgmma_fence_acc() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_groups() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait_groups() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d (32 f32 a thread) += A (64 x 16, descriptor a) B^T (B 64 x 16, descriptor b), both K-major.
// Lane (g, t) of warp w of the warpgroup holds, for n-chunk j < 8: d[4j], d[4j+1] = row 16w + g,
// columns 8j + 2t, +1; d[4j+2], d[4j+3] = row 16w + g + 8, the same columns.
// Accumulate = 0: d = A B^T (d is not read; a first step).
template <int Accumulate = 1>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_32 "}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : MAPET_WG_ACC_32
        : "l"(a), "l"(b), "n"(Accumulate));
}

// d (128 f32 a thread) += A (64 x 16, descriptor a) B (16 x 256, descriptor b); the accumulator
// layout of wgmma_m64n64k16 with 32 n-chunks of 8. TransA / TransB: 0 (the default) for a K-major
// operand (K contiguous within a 16-byte core-matrix row; B given as B^T), 1 for an M/N-major one
// (M or N contiguous).
template <int TransA = 0, int TransB = 0>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_128 "}, "
        "%128, %129, p, 1, 1, %130, %131;\n}\n"
        : MAPET_WG_ACC_128
        : "l"(a), "l"(b), "n"(TransA), "n"(TransB));
}

// d (96 f32 a thread) += A (64 x 16, descriptor a) B^T (B 192 x 16, descriptor b), both K-major;
// the accumulator layout of wgmma_m64n64k16 with 24 n-chunks of 8. F16: both operands f16
// instead of bf16.
template <bool F16 = false>
__device__ __forceinline__ void wgmma_m64n192k16(float (&d)[96], uint64_t a, uint64_t b) {
    if constexpr (F16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 "
            "{" MAPET_WG_REGS_96 "}, "
            "%96, %97, p, 1, 1, 0, 0;\n}\n"
            : MAPET_WG_ACC_96
            : "l"(a), "l"(b));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
            "{" MAPET_WG_REGS_96 "}, "
            "%96, %97, p, 1, 1, 0, 0;\n}\n"
            : MAPET_WG_ACC_96
            : "l"(a), "l"(b));
    }
}

// Hands registers between the warpgroups of a warp-specialised kernel: a producer gives up what
// it does not need, consumers take it (PTX setmaxnreg; counts are multiples of 8 in [24, 256]).
template <int N>
__device__ __forceinline__ void regs_release() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_claim() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// One arrival on an mbarrier (no transactions).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(hopper_smem_addr(bar)) : "memory");
}

// Makes this thread's generic-proxy writes to shared memory (plain stores, cp.async copies once
// waited for) visible to the async proxy, which wgmma's descriptor operands are read through. A
// block barrier must follow before another thread's wgmma reads them.
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- Bulk stores (the copy engine, async proxy): `bytes` (a multiple of 16) from shared memory at
// ssrc to global memory at gdst, both 16-byte aligned, in this thread's open bulk group. The
// shared source must have been written before a fence_proxy_async_smem of each writer and a
// barrier; it may be overwritten only after bulk_wait_read of the issuing thread.
__device__ __forceinline__ void bulk_store(void* gdst, uint32_t ssrc, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gdst), "r"(ssrc), "r"(bytes)
                 : "memory");
}

// Closes this thread's open bulk group.
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Waits until all but the newest N of this thread's bulk groups have read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Waits until all but the newest N of this thread's bulk groups are complete (their writes done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// One 16-byte cp.async into shared memory, reading `bytes` (16, or 0 to zero-fill) from src.
__device__ __forceinline__ void sw128_copy16(uint32_t dst, const char* src, uint32_t bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// The walk of sw128_gather_rows: for each row r of the tile that thread i of n copies a chunk of
// (chunk j = i % 8 of rows i / 8, i / 8 + n / 8, ...), copy(the chunk's offset in the swizzled
// tile, the source row row_of(r) clamped to a real one, the bytes to read: 16, or 0 from
// row_end on, j).
template <typename RowOf, typename Copy>
__device__ __forceinline__ void sw128_gather_walk(int rows, int row_end, int i, int n, RowOf row_of, Copy copy) {
    const int j = i & 7;
    for (int r = i >> 3; r < rows; r += n >> 3) {
        const int row = row_of(r);
        copy(sw128_offset(r, j), static_cast<int64_t>(min(row, row_end - 1)), row < row_end ? 16u : 0u, j);
    }
}

// Starts cp.async copies of rows row_of(0), ..., row_of(rows - 1) of a matrix of 64 bf16 columns
// (row r at byte src + r * stride_bytes) into 128-byte-swizzled shared memory at dst (1024-byte
// aligned): the r-th at dst + 128 r, its 16-byte chunk j at chunk j ^ (r & 7), the layout TMA
// writes with CU_TENSOR_MAP_SWIZZLE_128B. Rows >= row_end (>= 1) are zero-filled (src-size 0; the
// address is clamped to a real row). Thread i of n (n a multiple of 8) moves chunk i % 8 of the
// i / 8-th, the (i / 8 + n / 8)-th, ...: 8 consecutive threads read one 128-byte row. Wait with
// sw128_load_wait.
template <typename RowOf>
__device__ __forceinline__ void sw128_gather_rows(uint32_t dst, const void* src, int64_t stride_bytes, int rows,
                                                  int row_end, int i, int n, RowOf row_of) {
    sw128_gather_walk(rows, row_end, i, n, row_of, [&](uint32_t offset, int64_t row, uint32_t bytes, int j) {
        sw128_copy16(dst + offset, static_cast<const char*>(src) + row * stride_bytes + 16 * j, bytes);
    });
}

// sw128_gather_rows of the same rows of two matrices (a at src_a, stride_a bytes a row, into
// dst_a; b likewise), each row found once for both.
template <typename RowOf>
__device__ __forceinline__ void sw128_gather_rows2(uint32_t dst_a, const void* src_a, int64_t stride_a, uint32_t dst_b,
                                                   const void* src_b, int64_t stride_b, int rows, int row_end, int i,
                                                   int n, RowOf row_of) {
    sw128_gather_walk(rows, row_end, i, n, row_of, [&](uint32_t offset, int64_t row, uint32_t bytes, int j) {
        sw128_copy16(dst_a + offset, static_cast<const char*>(src_a) + row * stride_a + 16 * j, bytes);
        sw128_copy16(dst_b + offset, static_cast<const char*>(src_b) + row * stride_b + 16 * j, bytes);
    });
}

// Asks L2 to fetch the 32-byte sector at p (only that sector is sure to come) ahead of a load that
// will read it: a hint, with no result, no wait and nothing to order. The wgmma attention kernels
// issue it for their next row tile's rows at the current tile's start, so that its copies find
// them in L2 rather than DRAM, and under MAPET_L2_AHEAD for the next wave's first operands.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// sw128_gather_rows of rows [0, rows) in order.
__device__ __forceinline__ void sw128_load_rows(uint32_t dst, const void* src, int64_t stride_bytes, int rows,
                                                int row_end, int i, int n) {
    sw128_gather_rows(dst, src, stride_bytes, rows, row_end, i, n, [](int r) { return r; });
}

// Waits for all of this thread's cp.async copies, then fences them for wgmma (see above).
__device__ __forceinline__ void sw128_load_wait() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    fence_proxy_async_smem();
}

// Waits for this thread's committed cp.async groups but the newest N, then fences them for wgmma.
template <int N>
__device__ __forceinline__ void sw128_load_wait_groups() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
    fence_proxy_async_smem();
}

// Ends the current basic block, at the cost of a compare and a never-taken branch (%nsmid, the
// number of SMs, is never 0). Why: ptxas's scheduler starts a wgmma.wait_group as early as it
// can and moves independent work below it, as it would move work below a load to hide the load's
// latency. A wait blocks the warp instead, so the work meant to overlap with the tensor cores
// then runs after them. What did not hold the work above the wait (checked in the SASS of
// cuda/attention.cu's wgmma kernels): the empty asm of pin_regs (gone by the time ptxas
// schedules), a shared-memory store, a proxy fence or __syncwarp in between, and even the loop's
// back edge (ptxas moved 13 of dQ's 16 exponentials below the next iteration's wait). A block
// that ends in a branch ptxas cannot resolve did, in the forward, dQ and dK/dV kernels;
// tests/kernel_schedule.rs checks that it still does in every wgmma attention kernel.
// The trap path waits for the warpgroup's wgmma first: ptxas would otherwise add that wait itself
// and report it (C7517) at every build.
__device__ __forceinline__ void end_basic_block() {
    uint32_t sms;
    asm volatile("mov.u32 %0, %%nsmid;\n" : "=r"(sms));
    if (sms == 0) {
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        __trap();
        __builtin_unreachable();
    }
}

// Pins registers at this point of the program: an empty asm that "writes" them, so the compiler
// moves no definition of them past it and no use of them ahead of it. Around wgmma: before the
// fence that precedes an issue (accumulators and A fragments fully formed), and after the wait
// for its group (accumulators read, A fragments rewritten, only from there on). Without them the
// compiler may sink a register's definition past the fence, and ptxas then inserts its own
// warpgroup.arrive and serialises the wgmma.
template <int N>
__device__ __forceinline__ void pin_regs(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin_regs(uint32_t (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(x[i])::"memory");
}

// ---- wgmma with A from registers. Warp w of the warpgroup holds rows 16w..16w+15 of A in the
// mma.sync m16n8k16 A layout: lane (g, t) has a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..),
// a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..), two bf16 a register, the lower column in the low half.
// A C fragment pair of an accumulator (n-chunks 2c, 2c+1, packed to bf16) is exactly the A of the
// 16-deep step c: what lets P = softmax(S) feed P V without leaving the registers.

// d (16 f32 a thread) = A (64 x 16, registers) B^T (B 32 x 16, K-major descriptor b), plus d when
// Accumulate (a constant, so that ptxas sees that a first step does not read d). d is laid out
// as wgmma_m64n64k16's, with 4 n-chunks of 8.
template <int Accumulate>
__device__ __forceinline__ void wgmma_m64n32k16_rs(float (&d)[16], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_16 "}, "
        "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : MAPET_WG_ACC_16
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(Accumulate));
}

// d (16 f32 a thread) = A (64 x 16, K-major descriptor a) B^T (B 32 x 16, K-major descriptor b),
// plus d when Accumulate. d as wgmma_m64n32k16_rs's.
template <int Accumulate>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_16 "}, "
        "%16, %17, p, 1, 1, 0, 0;\n}\n"
        : MAPET_WG_ACC_16
        : "l"(a), "l"(b), "n"(Accumulate));
}

// d (16 f32 a thread) = A (64 x 16) B^T (B 32 x 16, K-major descriptor b), plus d when
// Accumulate, with A read M-major from shared memory (imm-trans-a): a [16 x 64] row-major tile in
// 128-byte swizzle whose rows are A's K and whose 64 columns are its M, descriptor a. The same
// canonical layout as the N-major B of wgmma_m64n64k16_rs_nmajor (atoms of 8 K-rows x 64
// elements, the next 8 rows a stride byte offset of 1024 on; the 16-deep step k starts 2048 k
// bytes in): so a swizzled [keys x 64] K tile serves as A = K^T (dims by keys). What dQ^T =
// K^T dS^T takes in the fused attention backward.
template <int Accumulate>
__device__ __forceinline__ void wgmma_m64n32k16_ss_mmajor(float (&d)[16], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_16 "}, "
        "%16, %17, p, 1, 1, 1, 0;\n}\n"
        : MAPET_WG_ACC_16
        : "l"(a), "l"(b), "n"(Accumulate));
}

// d (32 f32 a thread) += A (64 x 16) B (16 x 64), both from shared memory and both MN-major
// (imm-trans-a and imm-trans-b): A a [16 x 64] tile whose rows are its K and columns its M, as
// wgmma_m64n32k16_ss_mmajor's; B a [16 x 64] tile whose rows are its K and columns its N, as
// wgmma_m64n64k16_rs_nmajor's. d laid out as wgmma_m64n64k16's.
__device__ __forceinline__ void wgmma_m64n64k16_ss_mn(float (&d)[32], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_32 "}, "
        "%32, %33, p, 1, 1, 1, 1;\n}\n"
        : MAPET_WG_ACC_32
        : "l"(a), "l"(b));
}

// Named barrier `id` (1..15; 0 is __syncthreads') over `threads` threads (a multiple of 32), e.g.
// the 128 of one warpgroup.
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at named barrier `id` over `threads` threads without waiting: the producer's half of a
// hand-off whose consumers wait there with named_barrier. Its shared-memory writes before it are
// visible to them once their wait returns.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// named_barrier for threads that reach it from different places in the program. bar.sync (and
// __syncthreads) is the .aligned form, which promises that every thread runs the same barrier
// instruction; barrier.sync without it does not.
__device__ __forceinline__ void named_barrier_anywhere(int id, int threads) {
    asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// d (32 f32 a thread) += A (64 x 16, registers) B (B 16 x 64, N-major: a [16 x 64] row-major tile
// in 128-byte swizzle, descriptor b), the layout of wgmma_m64n64k16's d. N-major with 128-byte
// swizzle (PTX ISA, "Shared Memory Matrix Layout"): atoms of 8 K-rows x 64 N-elements (128 bytes
// a row), stacked along K every stride byte offset (1024: sw128_desc's) bytes; the leading byte
// offset would step between 64-wide N blocks, of which N = 64 has one. So the same swizzled
// [rows x 64] tile serves as a K-major B (rows = N) and as this N-major one (rows = K); the
// 16-deep step k starts 16 k rows (2048 k bytes) in.
__device__ __forceinline__ void wgmma_m64n64k16_rs_nmajor(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{" MAPET_WG_REGS_32 "}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : MAPET_WG_ACC_32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// out[0..3] += {x, y, z, w} for a 16-byte aligned out, as one reduction performed at L2 (PTX ISA 8.1,
// sm_90; relaxed, gpu scope). It flushes subnormal values to zero (the SASS is REDG ...FTZ):
// below 1.2e-38 in magnitude, far under anything a bf16 result keeps here.
__device__ __forceinline__ void red_add_v4(float* out, float x, float y, float z, float w) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(out), "f"(x), "f"(y), "f"(z), "f"(w)
                 : "memory");
}

// Adds a warpgroup's m64n32 f32 accumulator d (d[4 j + e]: row 16 w + g for e < 2, 16 w + g + 8
// otherwise, column 8 j + 2 t + (e & 1); w the warp in the warpgroup, g = lane / 4, t = lane % 4)
// into the row-major f32 matrix at `at` (its row 0, column 0; `ld` floats a row; `at` and `ld`
// multiples of 4 floats) by four red_add_v4 a thread: lanes t and t ^ 1 first trade a pair, so
// that the even lane holds four adjacent columns of row g and the odd lane four of row g + 8.
__device__ __forceinline__ void red_add_acc_tile(float* at, int64_t ld, const float (&d)[16]) {
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
    const bool odd = t & 1;
    // The even lane's row g from column 2t, the odd lane's row g + 8 from column 2(t - 1).
    float* row = at + static_cast<int64_t>(16 * w + g + (odd ? 8 : 0)) * ld + 2 * (t & 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float* v = d + 4 * j;
        const float r0 = __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[2], 1);
        const float r1 = __shfl_xor_sync(0xffffffffu, odd ? v[1] : v[3], 1);
        // Selects, not two branches each with a reduction of its own.
        red_add_v4(row + 8 * j, odd ? r0 : v[0], odd ? r1 : v[1], odd ? v[2] : r0, odd ? v[3] : r1);
    }
}

// Drops `bytes` (a multiple of 128) of global memory from `p` (128-byte aligned) out of L2 without
// writing them back: the lines of a scratch buffer whose contents are dead. Thread i of n.
__device__ __forceinline__ void discard_l2(const void* p, int bytes, int i, int n) {
    const char* c = static_cast<const char*>(p);
    for (int l = i; l < bytes / 128; l += n)
        asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(c + 128 * static_cast<int64_t>(l)) : "memory");
}

// Stores a warpgroup's A fragments a of a [64 x 32] bf16 matrix X (warp w's rows 16 w + [0, 16);
// a[c] the 16-column step c in the mma.sync A layout, as pack_chunk makes them from a wgmma
// accumulator) transposed into the tile at `tile` (1024-byte aligned): X^T, [32 x 64] bf16, row
// r = column r of X, 128 bytes a row in the 128-byte swizzle (sw128_offset). stmatrix .trans
// writes each 8 x 8 fragment matrix column by column: matrix i of step c (i = 0..3: rows + 8 (i &
// 1), columns + 8 (i >> 1), the A layout's registers) lands as 8 tile rows of 8 elements (16
// bytes, one swizzle chunk), whose addresses lanes 8 i .. 8 i + 7 give. The fused attention
// backward stores P^T and dS^T so (keys x positions in, positions x keys out), for G2 to read.
__device__ __forceinline__ void sw128_store_frags_transposed(uint32_t tile, const uint32_t (&a)[2][4], int warp,
                                                             int lane) {
    const int i = lane >> 3, k = lane & 7;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int row = 16 * c + 8 * (i >> 1) + k;
        const int chunk = 2 * warp + (i & 1);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                         tile + sw128_offset(row, chunk)),
                     "r"(a[c][0]), "r"(a[c][1]), "r"(a[c][2]), "r"(a[c][3])
                     : "memory");
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
