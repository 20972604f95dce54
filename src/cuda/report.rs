//! ptxas's `-v` report of every kernel, parsed: registers, spills, stack frame, shared memory.
//! build.rs keeps the report of each `cuda/*.cu`; tests fail on any spill in any kernel.

use super::kernels::PTXAS_REPORTS;

/// Resource use of one kernel for one target architecture, as ptxas reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// The module (`cuda/<module>.cu`).
    pub module: String,
    /// The kernel's (mangled, unless `extern "C"`) name.
    pub kernel: String,
    /// The target, for example `sm_90a`.
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of stack frame per thread.
    pub stack_bytes: u32,
    /// Bytes stored to local memory by spills.
    pub spill_stores: u32,
    /// Bytes loaded from local memory by spills.
    pub spill_loads: u32,
    /// Bytes of static shared memory.
    pub shared_bytes: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses one ptxas `-v` report.
pub fn parse(module: &str, report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut current: Option<KernelResources> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(done) = current.take() {
                out.push(done);
            }
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split("for '").nth(1).and_then(|s| s.split('\'').next()).unwrap_or("").to_string();
            current = Some(KernelResources {
                module: module.to_string(),
                kernel,
                arch,
                registers: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared_bytes: 0,
            });
        } else if let Some(k) = current.as_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out.extend(current);
    out
}

/// Every kernel of every module compiled into this binary (empty when built without nvcc).
pub fn all() -> Vec<KernelResources> {
    PTXAS_REPORTS.iter().flat_map(|(m, r)| parse(m, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report_with_a_spill() {
        let text = "ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n\
ptxas info    : Function properties for k1\n\
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k2' for 'sm_80'\n\
ptxas info    : Function properties for k2\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 6 registers, used 0 barriers, 360 bytes cmem[0]\n";
        let r = parse("m", text);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].kernel.as_str(), r[0].arch.as_str()), ("k1", "sm_90a"));
        assert_eq!((r[0].registers, r[0].stack_bytes, r[0].spill_stores, r[0].spill_loads), (168, 16, 8, 4));
        assert_eq!(r[0].shared_bytes, 1024);
        assert_eq!((r[1].registers, r[1].spill_stores), (6, 0));
    }
}
