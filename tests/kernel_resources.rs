//! Every kernel compiled into the crate must have no register spills and no stack frame on any
//! target: a spill in a hot kernel is a bug (DESIGN.md). Reads ptxas's `-v` reports kept by
//! build.rs. Built without nvcc there is nothing to check, and the test says so; with
//! `MAPET_REQUIRE_KERNELS=1` (CI) the build itself fails without nvcc, so the check always runs.

use mapet::cuda::report;

#[test]
fn no_kernel_spills() {
    if let Some(reason) = mapet::cuda::kernels::MISSING_REASON {
        eprintln!("SKIP no_kernel_spills: {reason}");
        return;
    }
    let all = report::all();
    for k in &all {
        eprintln!(
            "{}::{} [{}]: {} registers, {} B stack, {} B spill stores, {} B spill loads, {} B smem",
            k.module, k.kernel, k.arch, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads, k.shared_bytes
        );
    }
    let bad: Vec<_> = all.iter().filter(|k| k.spill_stores > 0 || k.spill_loads > 0).collect();
    assert!(bad.is_empty(), "kernels with spills: {bad:#?}");
    // Every module that was compiled must report at least one kernel for each target.
    for (module, text) in mapet::cuda::kernels::PTXAS_REPORTS {
        for arch in ["sm_90a", "sm_80"] {
            assert!(
                report::parse(module, text).iter().any(|k| k.arch == arch),
                "module {module} has no kernel compiled for {arch}; its report:\n{text}"
            );
        }
    }
}

/// No kernel may have its wgmma serialised by ptxas ("Potential Performance Loss: wgmma.mma_async
/// instructions are serialized ..."): the kernel still computes the right values, but every
/// wgmma then waits for the previous one, and the overlap the wgmma kernels are written for is
/// gone without any other sign (cuda/attention.cu, the wgmma forward, says what causes it).
#[test]
fn no_wgmma_serialisation() {
    if let Some(reason) = mapet::cuda::kernels::MISSING_REASON {
        eprintln!("SKIP no_wgmma_serialisation: {reason}");
        return;
    }
    for (module, text) in mapet::cuda::kernels::PTXAS_REPORTS {
        let bad: Vec<&str> =
            text.lines().filter(|l| l.contains("wgmma.mma_async instructions are serialized")).collect();
        assert!(bad.is_empty(), "module {module}: ptxas serialises wgmma:\n{}", bad.join("\n"));
    }
}

/// The warp-specialised kernels hand registers from their producer warpgroup to their two
/// consumer warpgroups with `setmaxnreg`: the consumers' `inc` waits until the pool the block was
/// launched with (ptxas's register count x 384 threads) holds what all three warpgroups then ask
/// for. A launch count under that makes the consumers wait forever, with no error and no trap;
/// ptxas may lower the count after any change of kernel or toolchain, so it is checked here.
#[test]
fn setmaxnreg_pools_fit_the_launch_registers() {
    if let Some(reason) = mapet::cuda::kernels::MISSING_REASON {
        eprintln!("SKIP setmaxnreg_pools_fit_the_launch_registers: {reason}");
        return;
    }
    // (kernel, its source, the constants regs_release / regs_claim take there), the values read
    // from the source, so that the check follows any change of them.
    let handoffs = [
        ("mapet_patch_embed_fwd_u8_hwc_ws", "patch_embed.cu", "kWsProducerRegs", "kWsConsumerRegs"),
        ("mapet_hopper_gemm_tn", "hopper.cu", "kGemmProducerRegs", "kGemmConsumerRegs"),
    ];
    let all = report::all();
    for (kernel, file, producer, consumer) in handoffs {
        let source = std::fs::read_to_string(mapet::testing::project_root().join("cuda").join(file)).unwrap();
        let (producer, consumer) = (
            mapet::testing::cuda_constant(&source, file, producer),
            mapet::testing::cuda_constant(&source, file, consumer),
        );
        let k = all
            .iter()
            .find(|k| k.kernel == kernel && k.arch == "sm_90a")
            .unwrap_or_else(|| panic!("{kernel} has no sm_90a report"));
        let (pool, asked) = (k.registers as usize * 384, 128 * producer + 256 * consumer);
        assert!(
            pool >= asked,
            "{kernel}: launched with {} registers a thread ({pool} for the block), but its warpgroups \
             ask for {asked} after setmaxnreg: the consumers would wait forever",
            k.registers
        );
    }
}
