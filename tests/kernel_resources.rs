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
