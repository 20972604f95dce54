//! Every operation of the model, one module each: the CPU reference (`cpu_*`) and the CUDA
//! launcher (`cuda_*`) side by side, with the host-side checks they share.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod gradnorm;
pub mod kmeans;
pub mod layernorm;
pub mod patch_embed;
pub mod residual;

use crate::error::{Error, Result};

/// A run-time choice between kernels that compute the same function: a measurement knob, kept
/// until a GPU run settles which one wins. Each has named values, a default (the variant verified
/// on a GPU: the type's `Default`, or a device's choice where it depends on the device) and an
/// environment variable that overrides it.
pub trait KernelChoice: Copy + 'static {
    /// The environment variable that picks a value by name.
    const VAR: &'static str;
    /// Every value, for tests and benches.
    const CHOICES: &'static [Self];

    /// The value's name, as `VAR` gives it.
    fn name(self) -> &'static str;

    /// The value called `name`; an error listing the names otherwise.
    fn parse_name(name: &str) -> std::result::Result<Self, String> {
        Self::parse_name_of(Self::VAR, name)
    }

    /// [`KernelChoice::parse_name`] for a value read from the variable `var` (a type may be
    /// picked by more than one).
    fn parse_name_of(var: &str, name: &str) -> std::result::Result<Self, String> {
        Self::CHOICES.iter().copied().find(|c| c.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::CHOICES.iter().map(|c| c.name()).collect();
            format!("{name:?} is not a value of {var}; use {}", names.join(" or "))
        })
    }

    /// The value `VAR` names when it is set, else the type's default (for a type whose default
    /// does not depend on the device; `PixelOrder`'s does, see `PixelOrder::selected_pair`); an
    /// unknown name is an error naming the variable.
    fn selected() -> Result<Self>
    where
        Self: Default,
    {
        Self::named_or(Self::VAR, std::env::var(Self::VAR).ok().as_deref(), Self::default())
    }

    /// The value another variable `var` names when it is set, else `fallback`: a backward's
    /// choice, say, that follows the forward's unless it is given.
    fn selected_or(var: &str, fallback: Self) -> Result<Self> {
        Self::named_or(var, std::env::var(var).ok().as_deref(), fallback)
    }

    /// [`KernelChoice::selected_or`] for the variable's value `name` (`None`: unset).
    fn named_or(var: &str, name: Option<&str>, fallback: Self) -> Result<Self> {
        name.map_or(Ok(fallback), |v| Self::named(var, v))
    }

    /// The value called `name`, read from the variable `var`; an error naming `var` otherwise.
    fn named(var: &str, name: &str) -> Result<Self> {
        Self::parse_name_of(var, name).map_err(|detail| Error::Unsupported { what: "kernel choice", detail })
    }

    /// The values the variable `var` lists, comma-separated (`tiled,resident`), or every value when
    /// it is unset: the variants a test or bench covers, so that one whose fault or hang would end
    /// the process can be left out of a rerun of the others. An unknown name is an error naming `var`.
    fn listed_in(var: &str) -> Result<Vec<Self>> {
        Self::listed(var, std::env::var(var).ok().as_deref())
    }

    /// [`KernelChoice::listed_in`] for the variable's value `list` (`None`: unset).
    fn listed(var: &str, list: Option<&str>) -> Result<Vec<Self>> {
        match list {
            None => Ok(Self::CHOICES.to_vec()),
            Some(list) => list.split(',').map(|name| Self::named(var, name.trim())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel of every op module starts with `dependent_launch_start()`
    /// (cuda/dependent_launch.cuh), which makes it safe for
    /// [`crate::cuda::Gpu::launch_dependent`], the only way the launchers start them: a kernel
    /// without it, started as a dependent launch, would run while the kernel before it still
    /// writes what it reads. A new module's kernels must be added here.
    #[test]
    fn every_kernel_waits_for_the_one_before_it_first() {
        let modules = crate::testing::OP_MODULES;
        for (module, expected) in modules {
            let kernels = crate::testing::assert_kernels_wait_first(&format!("{module}.cu"), &format!("{module}.rs"));
            assert_eq!(kernels, expected, "cuda/{module}.cu: kernels (or kernel-making macros) found");
        }
        // Every op module is listed (the ops' sources one to one with cuda/*.cu, less the test-only
        // hopper.cu).
        let listed: Vec<String> = std::fs::read_dir(crate::testing::project_root().join("cuda"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".cu").map(str::to_string))
            .filter(|m| m != "hopper")
            .collect();
        for m in &listed {
            assert!(modules.iter().any(|(name, _)| name == m), "cuda/{m}.cu is not checked here");
        }
    }
}
