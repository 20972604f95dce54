//! The wgmma attention kernels are pipelined so that a chunk's elementwise work (the softmax, P,
//! dS) runs while the tensor cores compute the previous chunk's products: issue G1(n+1) and
//! G2(n), wait for G1(n+1) (`wgmma.wait_group 1`), do the elementwise work of n+1, then wait for
//! G2(n). Whether that overlap exists is decided by ptxas's scheduler, not by the source, and
//! shows nowhere but in the SASS: ptxas once issued the second wait right after the first and ran
//! all of the forward's softmax after it (cuda/hopper.cuh, `end_basic_block`). No GPU test and no
//! ptxas report would notice; the kernels compute the same values either way, only slower.
//!
//! So this test disassembles the embedded sm_90a cubins (`cuobjdump -sass`, which runs
//! `nvdisasm`; scripts/install-cuda-toolchain.sh installs both) and counts, after each
//! `WARPGROUP.DEPBAR.LE gsb0, 0x1` of a kernel, the exponentials (`MUFU.EX2`) issued before the
//! warp next waits for or issues wgmma. Each kernel's elementwise step has a known number of them
//! a thread: 32 in the forward (two 32-key chunks of 64 rows over 128 threads), 16 in dQ and in
//! dK/dV (one 32-wide chunk).
//!
//! The other checks here hold other placements that only the SASS shows: where the dK/dV kernels
//! load their chunk stats, how wide the wgmma kernels' stores are, the fused backward's barriers
//! around its tile stores, and that the patch embedding's warp-specialised forwards load their
//! token rows a slice ahead.
//!
//! Without the tools a test says so and passes, unless `MAPET_REQUIRE_KERNELS=1` (CI), where it
//! fails: the check must run somewhere on every change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (kernel, exponentials a thread its elementwise step issues between the two waits).
const PIPELINES: [(&str, usize); 9] = [
    ("mapet_attention_fwd_wgmma", 32),
    ("mapet_attention_fwd_wgmma_l2", 32),
    ("mapet_attention_fwd_wgmma_persistent", 32),
    ("mapet_attention_bwd_dq_wgmma", 16),
    ("mapet_attention_bwd_dq_wgmma_l2", 16),
    ("mapet_attention_bwd_dkdv_wgmma", 16),
    ("mapet_attention_bwd_dkdv_wgmma_peek", 16),
    ("mapet_attention_bwd_dkdv_wgmma_fused", 16),
    ("mapet_attention_bwd_dkdv_wgmma_balanced", 16),
];

#[test]
fn wgmma_pipelines_overlap_elementwise_work_with_the_tensor_cores() {
    let Some(sass) = sass_or_skip("attention", "wgmma_pipelines_overlap_elementwise_work_with_the_tensor_cores") else {
        return;
    };
    for (kernel, want) in PIPELINES {
        let body = sm90_kernel(sass, kernel);
        let counts = exponentials_after_g1_waits(body);
        eprintln!("{kernel}: exponentials between wait_group 1 and the next wgmma wait or issue: {counts:?}");
        assert!(!counts.is_empty(), "{kernel}: no `WARPGROUP.DEPBAR.LE gsb0, 0x1` (the pipeline's first wait)");
        for n in counts {
            assert!(
                n >= want,
                "{kernel}: only {n} of the elementwise step's {want} exponentials a thread run between the wait \
                 for G1 and the wait for G2; ptxas has moved the rest below the second wait, where the tensor \
                 cores are idle (cuda/hopper.cuh, end_basic_block)"
            );
        }
    }
}

/// The wgmma kernels' elementwise step decides each element's mask by predicates and selects, not
/// by a branch an element (`BSSY`, `BRA`, `BSYNC` around its exponential: three more instructions
/// an element on the issue-bound path between the G1 and G2 waits). The fused dK/dV kernel's
/// test of keys past Lk, written with `||` and `&&`, compiled to 15 such branches a chunk until
/// `dkdv_chunk_grads` made it bitwise. This counts the `BSSY` between each G1 wait and the next
/// wgmma wait or issue, which must be none; and in the dK/dV kernels, whose step has only the
/// warp-uniform branches over the masks and out of the loop, at most 3 `BRA` (33 in the fused
/// kernel before).
#[test]
fn wgmma_elementwise_steps_do_not_branch() {
    let Some(sass) = sass_or_skip("attention", "wgmma_elementwise_steps_do_not_branch") else { return };
    for (kernel, _) in PIPELINES {
        let body = sm90_kernel(sass, kernel);
        let counts = g1_step_counts(kernel, body, "BSSY");
        assert!(
            counts.iter().all(|&n| n == 0),
            "{kernel}: branches in the elementwise step after the G1 wait ({counts:?}): a mask or test there is \
             compiled as control flow (cuda/attention.cu, dkdv_chunk_grads)"
        );
        if kernel.contains("dkdv") {
            let branches = g1_step_counts(kernel, body, "BRA");
            assert!(
                branches.iter().all(|&n| n <= 3),
                "{kernel}: {branches:?} branches in the elementwise step after the G1 wait, at most 3 expected \
                 (cuda/attention.cu, dkdv_chunk_grads)"
            );
        }
    }
}

/// The dK/dV kernels' elementwise step masks a PARTIAL chunk's hidden scores (`FSEL ..., -INF`) in a
/// block of its own that a FULL chunk branches over, ahead of every exponential: at ViT-B a third
/// of a pair's chunks are FULL and run none of the 16 tests and selects (`dkdv_chunk_grads`). This
/// finds, after each G1 wait and before the next wgmma wait or issue, the 16 selects, then the 16
/// exponentials, and ahead of the selects a branch whose target lies past the last select and no
/// further than the first exponential: the jump a FULL chunk takes over them. (If ptxas turned the
/// block into predicated selects, there would be no such branch.)
#[test]
fn wgmma_dkdv_full_chunks_skip_the_masks() {
    let Some(sass) = sass_or_skip("attention", "wgmma_dkdv_full_chunks_skip_the_masks") else { return };
    for (kernel, _) in PIPELINES.iter().filter(|(k, _)| k.contains("dkdv")) {
        // (address, instruction) of every instruction of the kernel.
        let ops: Vec<(u64, &str)> = sm90_kernel(sass, kernel)
            .lines()
            .filter_map(|l| {
                let addr = l.trim_start().strip_prefix("/*")?.split_once("*/")?.0;
                Some((u64::from_str_radix(addr, 16).ok()?, instruction(l)?))
            })
            .collect();
        let waits: Vec<usize> =
            (0..ops.len()).filter(|&i| ops[i].1.starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x1")).collect();
        assert!(!waits.is_empty(), "{kernel}: no `WARPGROUP.DEPBAR.LE gsb0, 0x1` (the pipeline's G1 wait)");
        for w in waits {
            let step: Vec<(u64, &str)> = ops[w + 1..]
                .iter()
                .take_while(|(_, op)| !(op.starts_with("WARPGROUP.") || op.starts_with("HGMMA")))
                .copied()
                .collect();
            let addrs = |pred: &dyn Fn(&str) -> bool| -> Vec<u64> {
                step.iter().filter(|(_, op)| pred(op)).map(|&(a, _)| a).collect()
            };
            let masks = addrs(&|op| op.starts_with("FSEL") && op.contains("-INF"));
            let exps = addrs(&|op| op.starts_with("MUFU.EX2"));
            assert_eq!(masks.len(), 16, "{kernel}: {} selects of -inf after the G1 wait, 16 expected", masks.len());
            assert!(exps.len() >= 16 && masks[15] < exps[0], "{kernel}: an exponential ahead of the last mask");
            // The first branch of the step, and where it goes.
            let branch = step.iter().find(|(_, op)| op.starts_with("BRA "));
            let target = branch.and_then(|(_, op)| u64::from_str_radix(op.rsplit("0x").next()?.trim(), 16).ok());
            eprintln!(
                "{kernel}: branch {branch:?} to {target:x?}, masks {:x}..{:x}, first exponential {:x}",
                masks[0], masks[15], exps[0]
            );
            assert!(
                branch.is_some_and(|&(a, _)| a < masks[0]) && target.is_some_and(|t| masks[15] < t && t <= exps[0]),
                "{kernel}: no branch over the masks to the exponentials (branch {branch:?} to {target:x?}, masks \
                 {:x}..{:x}, first exponential {:x}): FULL chunks run the masks (cuda/attention.cu, dkdv_chunk_grads)",
                masks[0],
                masks[15],
                exps[0]
            );
        }
    }
}

/// The dK/dV kernel loads each chunk's per-position stats (lse, delta, first hidden key) from
/// shared memory when it issues the chunk's G1 (`load_dkdv_chunk_stats`), so that the elementwise
/// step after the G1 wait starts on its exponentials at once. Loaded after the wait, their first
/// uses stalled on shared-memory latency while the tensor cores had nothing queued but G2 (about
/// a tenth of the kernel's warp-stall samples in the seventh run's profile). ptxas may move a
/// load below the wait, and then nothing but the SASS shows it: this counts the shared-memory
/// loads between the G1 wait and the next wgmma wait or issue, which must be none.
#[test]
fn wgmma_dkdv_loads_its_chunk_stats_before_the_g1_wait() {
    let Some(sass) = sass_or_skip("attention", "wgmma_dkdv_loads_its_chunk_stats_before_the_g1_wait") else { return };
    // The default kernel and the balanced one (its plan differs, not its pipeline).
    for kernel in ["mapet_attention_bwd_dkdv_wgmma", "mapet_attention_bwd_dkdv_wgmma_balanced"] {
        let counts = g1_step_counts(kernel, sm90_kernel(sass, kernel), "LDS");
        assert!(
            counts.iter().all(|&n| n == 0),
            "{kernel}: shared-memory loads after the G1 wait ({counts:?}): the chunk stats' loads have moved \
             below it, where the elementwise step waits on them (cuda/attention.cu, load_dkdv_chunk_stats)"
        );
    }
}

/// The `wgmma-peek` dK/dV kernel loads the next chunk's stats (12 shared-memory loads a thread) at
/// the end of the current chunk's elementwise step, after the G1 wait and before the next wgmma
/// wait or issue, and none between two wgmma issues: where the default kernel's loads sit (in
/// among the G1 issues, about 9% of its samples in the eighth run's profile) and where they lost
/// more (right after all the issues, the ninth run) are both excluded.
#[test]
fn wgmma_dkdv_peek_loads_the_next_stats_in_the_elementwise_step() {
    const KERNEL: &str = "mapet_attention_bwd_dkdv_wgmma_peek";
    let Some(sass) = sass_or_skip("attention", "wgmma_dkdv_peek_loads_the_next_stats_in_the_elementwise_step") else {
        return;
    };
    let body = sm90_kernel(sass, KERNEL);
    let after_wait = g1_step_counts(KERNEL, body, "LDS");
    let among_issues = ops_between_wgmma_issues(body, "LDS");
    eprintln!("{KERNEL}: shared loads between wgmma issues {among_issues}");
    assert!(
        after_wait.iter().all(|&n| n >= 12) && among_issues == 0,
        "{KERNEL}: shared loads after the G1 waits {after_wait:?} (12 a chunk expected) and {among_issues} between \
         wgmma issues (none expected): the next chunk's stats are no longer loaded in the elementwise step \
         (cuda/attention.cu, bwd_dkdv_wgmma<true>)"
    );
}

/// The warp-specialised patch-embedding forwards write the CLS and mask-token rows under their
/// MMAs, from the bf16 token-row table (cuda/patch_embed.cu, `OtherStep`). Each slice loads the
/// next slice's first values before its wait for the previous slice's wgmma and stores the ones
/// loaded a slice before, after it: loaded next to their use, and then just before the wait, the
/// loads were the largest stall of the raw forward (eighth and ninth runs' profiles). In the SASS:
/// between the slice's last wgmma issue and its `WARPGROUP.DEPBAR.LE gsb0, 0x1`, at least four
/// 4-byte loads (two column pairs of two rows; none of 8 bytes, the f32 values' width), and none
/// of their registers stored between that wait and the next issue.
#[test]
fn hwc_ws_forwards_load_the_token_rows_a_slice_ahead() {
    let Some(sass) = sass_or_skip("patch_embed", "hwc_ws_forwards_load_the_token_rows_a_slice_ahead") else {
        return;
    };
    for kernel in ["mapet_patch_embed_fwd_u8_hwc_ws", "mapet_patch_embed_fwd_u8_hwc_ws_raw"] {
        let ops: Vec<&str> = sm90_kernel(sass, kernel).lines().filter_map(instruction).collect();
        let waits: Vec<usize> =
            (0..ops.len()).filter(|&i| ops[i].starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x1")).collect();
        assert_eq!(waits.len(), 1, "{kernel}: one `WARPGROUP.DEPBAR.LE gsb0, 0x1` expected (the slice loop's)");
        let wait = waits[0];
        let issue = (0..wait).rev().find(|&i| ops[i].starts_with("HGMMA")).expect("a wgmma issue before the wait");
        let next = (wait..ops.len()).find(|&i| ops[i].starts_with("HGMMA")).unwrap_or(ops.len());
        let before = &ops[issue..wait];
        let loaded: Vec<&str> = before
            .iter()
            .filter(|op| op.starts_with("LDG.E.CONSTANT "))
            .filter_map(|op| op.split_whitespace().nth(1).map(|r| r.trim_end_matches(',')))
            .collect();
        let wide = before.iter().filter(|op| op.starts_with("LDG.E.64")).count();
        let stored: Vec<&str> = ops[wait..next]
            .iter()
            .filter(|op| op.starts_with("STG.E "))
            .filter_map(|op| op.rsplit(',').next().map(str::trim))
            .collect();
        eprintln!("{kernel}: 4-byte loads before the wait into {loaded:?}, 8-byte {wide}; stored after it: {stored:?}");
        assert!(
            loaded.len() >= 4 && wide == 0,
            "{kernel}: {} 4-byte and {wide} 8-byte loads between the slice's last wgmma issue and its wait: the \
             next slice's token-row values are no longer loaded there",
            loaded.len()
        );
        assert!(!stored.is_empty(), "{kernel}: no row stores between the wait and the next wgmma issue");
        assert!(
            stored.iter().all(|r| !loaded.contains(r)),
            "{kernel}: the rows stored after the wait include values loaded just before it ({loaded:?} against \
             {stored:?}): they are no longer loaded a slice ahead"
        );
    }
}

/// The number of instructions of `sass` whose opcode starts with `opcode` that lie between two
/// wgmma issues (`HGMMA`) with no wgmma wait (`WARPGROUP.DEPBAR`) between them.
fn ops_between_wgmma_issues(sass: &str, opcode: &str) -> usize {
    let mut total = 0;
    let mut pending: Option<usize> = None; // after an issue: the matches seen since it
    for op in sass.lines().filter_map(instruction) {
        if op.starts_with("HGMMA") {
            total += pending.unwrap_or(0);
            pending = Some(0);
        } else if op.starts_with("WARPGROUP.DEPBAR") {
            pending = None;
        } else if let (Some(n), true) = (pending.as_mut(), op.starts_with(opcode)) {
            *n += 1;
        }
    }
    total
}

/// The wgmma kernels write their output rows (O, dQ, dK and dV) in 8-byte stores, each warp
/// store a whole 32-byte sector of each of its 8 rows (`store_frag_rows_paired`), not in the
/// 4-byte stores of the C fragments as they come, which queued up in the load/store unit at the
/// end of every tile. This counts the kernels' global stores by width: (kernel, 64-bit stores, at
/// most so many 32-bit ones, the per-row statistics: the forward's lse, dQ's delta).
#[test]
fn wgmma_kernels_store_their_rows_in_eight_byte_stores() {
    const STORES: [(&str, usize, usize); 9] = [
        ("mapet_attention_fwd_wgmma", 8, 2),
        ("mapet_attention_fwd_wgmma_l2", 8, 2),
        ("mapet_attention_fwd_wgmma_persistent", 8, 2),
        ("mapet_attention_bwd_dq_wgmma", 8, 2),
        ("mapet_attention_bwd_dq_wgmma_l2", 8, 2),
        ("mapet_attention_bwd_dkdv_wgmma", 16, 0),
        ("mapet_attention_bwd_dkdv_wgmma_peek", 16, 0),
        ("mapet_attention_bwd_dkdv_wgmma_fused", 16, 0),
        ("mapet_attention_bwd_dkdv_wgmma_balanced", 16, 0),
    ];
    let Some(sass) = sass_or_skip("attention", "wgmma_kernels_store_their_rows_in_eight_byte_stores") else { return };
    for (kernel, wide, narrow_max) in STORES {
        let body = sm90_kernel(sass, kernel);
        let stores: Vec<&str> = body.lines().filter_map(instruction).filter(|op| op.starts_with("STG")).collect();
        let n64 = stores.iter().filter(|op| op.starts_with("STG.E.64 ")).count();
        let n32 = stores.iter().filter(|op| op.starts_with("STG.E ")).count();
        eprintln!("{kernel}: {n64} 64-bit and {n32} 32-bit global stores of {}", stores.len());
        assert!(
            n64 >= wide && n32 <= narrow_max,
            "{kernel}: {n64} 64-bit and {n32} 32-bit global stores, expected {wide} and at most {narrow_max}: \
             its rows are stored in 4-byte pieces again (cuda/attention.cu, store_frag_rows_paired)"
        );
    }
}

/// The wgmma forward and dQ kernels issue each row tile's first G1 (S; S and dP) before the
/// previous tile's epilogue (the stores of O and lse; of dQ), so that the tensor cores work under
/// it: in their SASS, the last wgmma event before every 8-byte row store must be an issue
/// (`HGMMA`), not a wait (`WARPGROUP.DEPBAR`). A wait hoisted above the stores (by ptxas, or by a
/// change to the loop) would leave the kernels' results as they are and their tensor cores idle
/// there again.
#[test]
fn wgmma_row_tile_kernels_issue_the_next_tiles_g1_under_their_epilogue() {
    let Some(sass) = sass_or_skip("attention", "wgmma_row_tile_kernels_issue_the_next_tiles_g1_under_their_epilogue")
    else {
        return;
    };
    for kernel in [
        "mapet_attention_fwd_wgmma",
        "mapet_attention_fwd_wgmma_l2",
        "mapet_attention_fwd_wgmma_persistent",
        "mapet_attention_bwd_dq_wgmma",
        "mapet_attention_bwd_dq_wgmma_l2",
    ] {
        let body = sm90_kernel(sass, kernel);
        let before = last_wgmma_before(body, "STG.E.64 ");
        eprintln!("{kernel}: the last wgmma event before each 8-byte store: {before:?}");
        assert!(!before.is_empty(), "{kernel}: no 8-byte stores");
        assert!(
            before.iter().all(|op| op.starts_with("HGMMA")),
            "{kernel}: a wgmma wait precedes the epilogue's stores ({before:?}): the next row tile's first G1 no \
             longer runs under it (cuda/attention.cu, the kernel's tile loop)"
        );
    }
}

/// For each instruction of `sass` whose opcode starts with `opcode`, the last wgmma issue or wait
/// (`HGMMA...` or `WARPGROUP.DEPBAR...`) before it, in address order.
fn last_wgmma_before<'a>(sass: &'a str, opcode: &str) -> Vec<&'a str> {
    let ops: Vec<&str> = sass.lines().filter_map(instruction).collect();
    let mut last = None;
    let mut out = Vec::new();
    for op in ops {
        if op.starts_with("HGMMA") || op.starts_with("WARPGROUP.DEPBAR") {
            last = Some(op);
        } else if op.starts_with(opcode) {
            out.extend(last);
        }
    }
    out
}

/// The counter on hand-written SASS in both orders, so that it is checked wherever the
/// disassembler is missing too.
#[test]
fn exponential_count_sees_where_the_second_wait_went() {
    let overlapped = "\
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n\
        /*0110*/                   FMNMX R56, R22, R19, !PT ;\n\
        /*0120*/                   MUFU.EX2 R72, R22 ;\n\
        /*0130*/                   MUFU.EX2 R73, R19 ;\n\
        /*0140*/              @!P0 BRA 0x200 ;\n\
        /*0150*/                   MUFU.EX2 R74, R20 ;\n\
        /*0160*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0170*/                   MUFU.EX2 R75, R21 ;\n";
    assert_eq!(exponentials_after_g1_waits(overlapped), vec![3]);
    let hoisted = "\
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n\
        /*0110*/                   FSEL R22, R72, -INF , !P2 ;\n\
        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0130*/                   MUFU.EX2 R72, R22 ;\n\
        /*0140*/                   WARPGROUP.ARRIVE ;\n\
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n\
        /*0160*/                   MUFU.EX2 R73, R19 ;\n\
        /*0170*/                   HGMMA.64x64x16.F32.BF16 R24, R88, gdesc[UR16].tnspB, R24 ;\n";
    assert_eq!(exponentials_after_g1_waits(hoisted), vec![0, 1]);
    let loads_after = "\
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n\
        /*0110*/                   LDS.64 R14, [R21] ;\n\
        /*0120*/                   MUFU.EX2 R72, R22 ;\n\
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0140*/                   LDS.64 R12, [R20] ;\n";
    assert_eq!(ops_after_g1_waits(loads_after, "LDS"), vec![1]);
    let loads_among_issues = "\
        /*0100*/                   HGMMA.64x32x16.F32.BF16 R88, gdesc[UR24], RZ, !UPT ;\n\
        /*0110*/                   LDS.64 R140, [R145] ;\n\
        /*0120*/                   HGMMA.64x32x16.F32.BF16 R88, gdesc[UR24], R88, gsb0 ;\n\
        /*0130*/                   LDS.64 R136, [R145+0x20] ;\n\
        /*0140*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n\
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR12].tnspB, R24 ;\n\
        /*0160*/              @!P0 LDS.64 R8, [R145+0x40] ;\n\
        /*0170*/                   HGMMA.64x64x16.F32.BF16 R24, R124, gdesc[UR12].tnspB, R24 ;\n\
        /*0180*/                   LDS.64 R10, [R145+0x60] ;\n";
    assert_eq!(ops_between_wgmma_issues(loads_among_issues, "LDS"), 2);
    let epilogue = "\
        /*0100*/                   HGMMA.64x32x16.F32.BF16 R56, gdesc[UR24], R56, gsb0 ;\n\
        /*0110*/                   MUFU.RCP R0, R109 ;\n\
        /*0120*/                   STG.E.64 desc[UR40][R2.64], R24 ;\n\
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0140*/                   STG.E.64 desc[UR40][R2.64+0x20], R28 ;\n";
    assert_eq!(
        last_wgmma_before(epilogue, "STG.E.64 "),
        vec!["HGMMA.64x32x16.F32.BF16 R56, gdesc[UR24], R56, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0"]
    );
}

/// For each `WARPGROUP.DEPBAR.LE gsb0, 0x1` of `sass` (one function, in address order), the
/// number of `MUFU.EX2` that follow it before the next wgmma wait, fence or issue.
fn exponentials_after_g1_waits(sass: &str) -> Vec<usize> {
    ops_after_g1_waits(sass, "MUFU.EX2")
}

/// For each `WARPGROUP.DEPBAR.LE gsb0, 0x1` of `sass`, the number of instructions whose opcode
/// starts with `opcode` that follow it before the next wgmma wait, fence or issue.
/// `ops_after_g1_waits` of `kernel`'s SASS `body`, printed, and failing the test where the kernel
/// has no G1 wait at all (so that a check over the counts cannot pass on none).
fn g1_step_counts(kernel: &str, body: &str, opcode: &str) -> Vec<usize> {
    let counts = ops_after_g1_waits(body, opcode);
    eprintln!("{kernel}: {opcode} between each G1 wait and the next wgmma wait or issue: {counts:?}");
    assert!(!counts.is_empty(), "{kernel}: no `WARPGROUP.DEPBAR.LE gsb0, 0x1` (the pipeline's G1 wait)");
    counts
}

fn ops_after_g1_waits(sass: &str, opcode: &str) -> Vec<usize> {
    let ops: Vec<&str> = sass.lines().filter_map(instruction).collect();
    let mut counts = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if !op.starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x1") {
            continue;
        }
        let n = ops[i + 1..]
            .iter()
            .take_while(|op| !(op.starts_with("WARPGROUP.") || op.starts_with("HGMMA")))
            .filter(|op| op.starts_with(opcode))
            .count();
        counts.push(n);
    }
    counts
}

/// The fused dK/dV kernel (`wgmma-fused`) passes P^T and dS^T to G2 through one pair of shared
/// tiles a warpgroup, which every warp's part of G2 reads whole. So each rewrite of the tiles
/// (`STSM`) must come after a barrier that follows the last wgmma wait before it (a warp's wait
/// covers only its own products: without the barrier a warp overwrites what another warp's
/// part of the previous G2 may still read), and each G2 that reads them (`HGMMA.64x64x16`) after a
/// barrier that follows the last store (the stores of the other warps). The first version had
/// no barrier before the stores, a race a review found and nothing but a card could show.
#[test]
fn wgmma_fused_meets_its_warpgroup_around_the_tile_stores() {
    const KERNEL: &str = "mapet_attention_bwd_dkdv_wgmma_fused";
    let Some(sass) = sass_or_skip("attention", "wgmma_fused_meets_its_warpgroup_around_the_tile_stores") else {
        return;
    };
    let ops: Vec<&str> = sm90_kernel(sass, KERNEL).lines().filter_map(instruction).collect();
    // Walking back from ops[i]: whether a BAR.SYNC comes before anything `stop` matches.
    let barrier_since = |i: usize, stop: &dyn Fn(&str) -> bool| {
        ops[..i]
            .iter()
            .rev()
            .find(|op| op.starts_with("BAR.SYNC") || stop(op))
            .is_some_and(|op| op.starts_with("BAR.SYNC"))
    };
    let stores: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].starts_with("STSM")).collect();
    let g2: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].starts_with("HGMMA.64x64x16")).collect();
    eprintln!("{KERNEL}: {} tile stores, {} G2 products", stores.len(), g2.len());
    assert!(!stores.is_empty() && !g2.is_empty(), "{KERNEL}: no STSM or no HGMMA.64x64x16 in its SASS");
    for &i in &stores {
        assert!(
            barrier_since(i, &|op| op.starts_with("WARPGROUP.DEPBAR")),
            "{KERNEL}: `{}` rewrites a tile with no barrier since the last wgmma wait: another warp's part of the \
             previous G2 may still read it",
            ops[i]
        );
    }
    for &i in &g2 {
        assert!(
            barrier_since(i, &|op| op.starts_with("STSM")),
            "{KERNEL}: `{}` reads the tiles with no barrier since the last store: the other warps' stores may \
             not be in",
            ops[i]
        );
    }
}

/// The SASS opcodes (before the first dot) that read or write global memory, or may (generic
/// addresses), or start a copy that does.
const GLOBAL_ACCESS: [&str; 20] = [
    "LDG", "STG", "LD", "ST", "LDGSTS", "ATOM", "ATOMG", "RED", "REDG", "CCTL", "SULD", "SUST", "TLD", "TEX",
    "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UBLKRED", "UBLKPF",
];

/// A kernel started as a dependent launch may run while the kernel before it still writes what
/// it reads; its `griddepcontrol.wait` (SASS `ACQBULK`) must come before its first global
/// access, and its `griddepcontrol.launch_dependents` (`PREEXIT`) after the wait. The source
/// test sees `dependent_launch_start();` first in each kernel's text; this holds the code ptxas
/// made of it, which may move loads: through the read-only path (`__ldg`, `const __restrict__`)
/// they are outside the memory model that orders them after the wait. Every sm_90a kernel of
/// every op module, in the order of its instructions (the wait sits in the entry block, before
/// any branch).
#[test]
fn every_kernel_waits_before_its_first_global_access_in_the_sass() {
    let mut checked = 0;
    for (module, _) in mapet::testing::OP_MODULES {
        let Some(sass) = sass_or_skip(module, "every_kernel_waits_before_its_first_global_access_in_the_sass") else {
            return;
        };
        let section = arch_section(sass, "sm_90a");
        for part in section.split("Function : ").skip(1) {
            let name = part.lines().next().unwrap_or("?").trim();
            let ops: Vec<&str> = part
                .lines()
                .filter_map(instruction)
                .map(|i| i.split(|c: char| c == '.' || c.is_whitespace()).next().unwrap_or(""))
                .collect();
            let wait = ops.iter().position(|&o| o == "ACQBULK");
            let wait = wait.unwrap_or_else(|| panic!("{module}::{name}: no griddepcontrol.wait (ACQBULK) in its SASS"));
            if let Some(first) = ops.iter().position(|o| GLOBAL_ACCESS.contains(o)) {
                assert!(
                    wait < first,
                    "{module}::{name}: {} at instruction {first}, before the wait (ACQBULK) at {wait}",
                    ops[first]
                );
            }
            let trigger = ops.iter().position(|&o| o == "PREEXIT");
            assert!(
                trigger.is_some_and(|t| t > wait),
                "{module}::{name}: griddepcontrol.launch_dependents (PREEXIT) at {trigger:?}, not after the wait at {wait}"
            );
            checked += 1;
        }
    }
    // Every function of the modules' sm_90a code (their macros make more than the source test
    // counts): a kernel added or removed changes the count here.
    assert_eq!(checked, 75, "sm_90a kernels checked across the op modules");
}

/// The instruction of a SASS line `/*addr*/ [@pred] OPCODE operands ;`, without address and
/// predicate; None for other lines (encodings, labels, headers).
fn instruction(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("/*")?;
    let (addr, rest) = rest.split_once("*/")?;
    if !addr.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix('@') {
        Some(r) => r.split_once(char::is_whitespace)?.1.trim_start(),
        None => rest,
    };
    Some(rest.split(';').next()?.trim_end()).filter(|s| !s.is_empty())
}

/// The sm_90a SASS of `kernel` in a module's disassembly; fails the test, naming the kernel, when
/// it is not there.
fn sm90_kernel<'a>(sass: &'a str, kernel: &str) -> &'a str {
    function(arch_section(sass, "sm_90a"), kernel).unwrap_or_else(|| panic!("{kernel} is not in the sm_90a SASS"))
}

/// The part of `cuobjdump -sass` output for `arch` ("code for sm_90a" up to the next "code for").
fn arch_section<'a>(sass: &'a str, arch: &str) -> &'a str {
    let marker = format!("code for {arch}");
    let start = sass.find(&marker).unwrap_or_else(|| panic!("no `{marker}` in the disassembly"));
    let rest = &sass[start + marker.len()..];
    &rest[..rest.find("code for ").unwrap_or(rest.len())]
}

/// The SASS of `kernel` in one architecture's section: from its "Function : kernel" header to the
/// next function's.
fn function<'a>(section: &'a str, kernel: &str) -> Option<&'a str> {
    let marker = format!("Function : {kernel}\n");
    let start = section.find(&marker)? + marker.len();
    let rest = &section[start..];
    Some(&rest[..rest.find("Function : ").unwrap_or(rest.len())])
}

/// The disassembly of the embedded fatbin of `module`, or None after saying why the test `test`
/// skips: no kernels were built, or no cuobjdump is found (a failure under
/// `MAPET_REQUIRE_KERNELS=1`, as in CI, where the check must run). Each module is disassembled
/// once per process and shared by the tests.
fn sass_or_skip(module: &'static str, test: &str) -> Option<&'static str> {
    static SASS: std::sync::Mutex<Vec<(&str, &'static str)>> = std::sync::Mutex::new(Vec::new());
    if let Some(reason) = mapet::cuda::kernels::MISSING_REASON {
        eprintln!("SKIP {test}: {reason}");
        return None;
    }
    let Some(cuobjdump) = find_cuobjdump() else {
        let msg = "no cuobjdump found (MAPET_CUOBJDUMP, next to $NVCC, .cuda-toolchain/cuda/bin or PATH); \
                   scripts/install-cuda-toolchain.sh installs it";
        assert!(std::env::var("MAPET_REQUIRE_KERNELS").as_deref() != Ok("1"), "MAPET_REQUIRE_KERNELS=1: {msg}");
        eprintln!("SKIP {test}: {msg}");
        return None;
    };
    // Held while disassembling, so that two tests of one module do not both run cuobjdump.
    let mut done = SASS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, sass)) = done.iter().find(|(m, _)| *m == module) {
        return Some(sass);
    }
    let sass: &'static str = Box::leak(disassemble(module, &cuobjdump).into_boxed_str());
    done.push((module, sass));
    Some(sass)
}

/// `cuobjdump -sass` of the embedded fatbin of `module`.
fn disassemble(module: &str, cuobjdump: &Path) -> String {
    let (_, fatbin) = mapet::cuda::kernels::FATBINS
        .iter()
        .find(|(name, _)| *name == module)
        .unwrap_or_else(|| panic!("no fatbin for module {module}"));
    // A file of its own per call: the tests run in parallel threads of one process, and a shared
    // name let one test delete or rewrite the file while another's cuobjdump read it.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("mapet-{module}-{}-{call}.fatbin", std::process::id()));
    std::fs::write(&path, fatbin).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    // cuobjdump runs nvdisasm, found on PATH: put its own folder first.
    let dir = cuobjdump.parent().map(Path::to_path_buf).unwrap_or_default();
    let path_var = std::env::join_paths(
        std::iter::once(dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");
    let out = Command::new(cuobjdump)
        .arg("-sass")
        .arg(&path)
        .env("PATH", path_var)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", cuobjdump.display()));
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{} -sass failed ({}): {}",
        cuobjdump.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cuobjdump output is UTF-8")
}

/// cuobjdump: `MAPET_CUOBJDUMP`, else beside `$NVCC`, else in the project's toolchain, else on
/// PATH; each only if it runs.
fn find_cuobjdump() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("MAPET_CUOBJDUMP") {
        candidates.push(p.into());
    }
    if let Some(nvcc) = std::env::var_os("NVCC") {
        if let Some(dir) = Path::new(&nvcc).parent() {
            candidates.push(dir.join("cuobjdump"));
        }
    }
    candidates.push(mapet::testing::project_root().join(".cuda-toolchain/cuda/bin/cuobjdump"));
    candidates.push("cuobjdump".into());
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}
