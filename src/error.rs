//! The crate's error type. Every fallible call returns `Result<T>`; nothing in the library panics
//! on bad input: shapes, sizes and alignment are checked on the host before any launch.

use thiserror::Error;

/// Errors of the mapet crate.
#[derive(Debug, Error)]
pub enum Error {
    /// A tensor's size does not match what the operation needs.
    #[error("shape mismatch for `{tensor}`: expected {expected}, got {got}")]
    Shape { tensor: &'static str, expected: String, got: String },

    /// A tensor of the right size holding a value out of its range (a token id past the
    /// vocabulary, ranks that are not a permutation).
    #[error("bad value in `{tensor}`: expected {expected}, got {got}")]
    Value { tensor: &'static str, expected: String, got: String },

    /// A size, stride or option the kernel (or the operation itself) does not support.
    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },

    /// A device pointer or stride that breaks the alignment a kernel needs.
    #[error("misaligned `{tensor}`: {detail}")]
    Alignment { tensor: &'static str, detail: String },

    /// A file that cannot be read or written, or whose content is not what was expected.
    #[error("{}: {detail}", path.display())]
    File { path: std::path::PathBuf, detail: String },

    /// A loss or gradient norm that is NaN or infinite; the training state was left unchanged.
    #[error("non-finite {what} at training step {step}: the update was skipped and the state is unchanged")]
    NonFinite { step: u64, what: &'static str },

    /// The crate was built without nvcc, so there are no kernels to run.
    #[error("CUDA kernels were not built into this binary: {0}")]
    KernelsNotBuilt(&'static str),

    /// No usable CUDA driver or device on this machine.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// Work queued on the GPU that did not finish in the time allowed ([`crate::cuda::Gpu::synchronize_within`]):
    /// most likely a kernel that waits forever on a barrier. The device stays busy with it until
    /// the process exits, so a caller can only report and exit.
    #[error("GPU work did not finish within {limit:?} ({what}): a kernel is most likely hung; it holds the device until this process exits")]
    Hung { what: String, limit: std::time::Duration },

    /// An error reported by the CUDA driver.
    #[error("CUDA driver error{context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// An error reported by cuBLASLt.
    #[error("cuBLASLt error{context}: {source}")]
    Cublas {
        context: String,
        #[source]
        source: cudarc::cublaslt::result::CublasError,
    },
}

/// Result with the crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<cudarc::driver::DriverError> for Error {
    fn from(source: cudarc::driver::DriverError) -> Self {
        Error::Driver { context: String::new(), source }
    }
}

impl From<cudarc::cublaslt::result::CublasError> for Error {
    fn from(source: cudarc::cublaslt::result::CublasError) -> Self {
        Error::Cublas { context: String::new(), source }
    }
}

/// A run-time switch of two values, read from environment variable `var` (`value`: its value,
/// `None` when unset): `false` for `off` or unset, `true` for `on` (surrounding spaces ignored),
/// else an [`Error::Unsupported`] about `what` that names the variable, the value and both
/// choices, each with what it means (`off_means`, `on_means`).
pub fn switch_named(
    var: &str,
    value: Option<&str>,
    what: &'static str,
    (off, off_means): (&str, &str),
    (on, on_means): (&str, &str),
) -> Result<bool> {
    match value.map(str::trim) {
        None => Ok(false),
        Some(v) if v == off => Ok(false),
        Some(v) if v == on => Ok(true),
        Some(v) => Err(Error::Unsupported {
            what,
            detail: format!("{var}={v:?}: give `{off}` ({off_means}) or `{on}` ({on_means})"),
        }),
    }
}

/// Checks that `got == expected` elements, naming the tensor otherwise.
pub fn check_len(tensor: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Shape { tensor, expected: format!("{expected} elements"), got: format!("{got} elements") })
    }
}
