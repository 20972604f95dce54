//! The image pipeline of MaPeT pre-training: files to batches of uint8 pixels, token ids and ranks.
//!
//! ```text
//! ImageIndex (folder or manifest) ─┐
//! Tokens (.npy [images, N-1]) ─────┼─> Loader ─ epoch(e) ─> Batch { indices, pixels, tokens, ranks }
//! LoaderConfig ────────────────────┘       decoder threads -> in-order assembler -> bounded channel
//! ```
//!
//! - [`index`]: which images, in which order. A folder is walked recursively for `.jpg`, `.jpeg`
//!   and `.png` files (any case) and sorted; a manifest lists relative paths one per line. The
//!   position of an image in its index is its **id**: the row of its targets in the token file and
//!   the key of all its randomness. [`split_holdout`] carves an evaluation set out of an index
//!   without renumbering it.
//! - [`pixels`]: decoding (JPEG, PNG), square center crop of the shorter side, bicubic resize and
//!   color jitter, to uint8 HWC `[S, S, 3]`. Normalisation happens later, in the patch embedding
//!   (`mapet::ops::patch_embed::Normalize`).
//! - [`npy`] and [`tokens`]: a minimal `.npy` reader and writer, and the token file checks (count,
//!   shape, dtype, id range) that run before training.
//! - [`loader`]: [`Loader`] and its [`Epoch`] iterator. Batches are reproducible from
//!   `(seed, epoch)` whatever the number of threads or their timing.
//! - [`mod@bench`]: [`bench_data`], decoding throughput per thread count.
//!
//! # Randomness
//! Every random draw comes from a ChaCha8 generator whose 32-byte key is the little-endian
//! concatenation of four u64: `(seed, epoch, item, stream)` ([`stream_rng`]). The epoch's shuffle
//! uses item `u64::MAX` and [`Stream::Shuffle`] ([`split_holdout`]: epoch and item `u64::MAX - 1`);
//! an image's permutation uses its id and [`Stream::Ranks`]; its color jitter its id and
//! [`Stream::Jitter`]. So a run resumed at any batch sees exactly the permutations and jitter a
//! fresh run sees, and an image keeps its draws when it moves into a holdout split.

pub mod bench;
pub mod index;
pub mod loader;
pub mod npy;
pub mod pixels;
pub mod tokens;

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use bench::{bench_data, DataBench};
pub use index::{split_holdout, ImageIndex};
pub use loader::{Batch, Epoch, Loader, LoaderConfig, Skipped};
pub use npy::{read_npy, write_npy, NpyArray, NpyData, NpyDtype, NpyF32Reader, NpyWriter};
pub use pixels::{color_jitter, decode, preprocess, resize_center_crop, Jitter};
pub use tokens::Tokens;

/// Errors of the data pipeline. Each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder that cannot be read, or whose content is not what was expected.
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },

    /// A loader or split setting that cannot work.
    #[error("data configuration: {0}")]
    Config(String),

    /// More images of an epoch failed to decode than the configured fraction allows.
    #[error(
        "epoch {epoch}: {skipped} of {total} images could not be read ({:.3}%), more than the limit of {:.3}%; \
         first: {first}",
        100.0 * *skipped as f64 / (*total).max(1) as f64,
        100.0 * limit
    )]
    TooManySkipped { epoch: u64, skipped: usize, total: usize, limit: f64, first: String },

    /// A decoder thread stopped without delivering its images (it panicked).
    #[error("data loader thread failed: {0}")]
    Worker(String),
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn file_err(path: impl Into<PathBuf>, detail: impl Into<String>) -> DataError {
    DataError::File { path: path.into(), detail: detail.into() }
}

/// What a random stream is used for: the fourth word of its key (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// The order of an epoch's images.
    Shuffle = 0,
    /// An image's permutation (`mapet::perm::sample_ranks`).
    Ranks = 1,
    /// An image's color jitter.
    Jitter = 2,
}

/// The generator keyed by `(seed, epoch, item, stream)`, each a little-endian u64.
pub fn stream_rng(seed: u64, epoch: u64, item: u64, stream: Stream) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, epoch, item, stream as u64]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// The ranks `[N]` of image `id` in `epoch`: `mapet::perm::sample_ranks` on its own generator.
pub fn image_ranks(seed: u64, epoch: u64, id: usize, n_tokens: usize) -> Vec<i32> {
    let mut rng = stream_rng(seed, epoch, id as u64, Stream::Ranks);
    mapet::perm::sample_ranks(&mut rng, n_tokens).into_iter().map(|r| r as i32).collect()
}

/// The order of an epoch: positions `0..len`, shuffled by `(seed, epoch)` when `shuffle` is set
/// (Fisher-Yates from the back, as `rand`'s `SliceRandom::shuffle` does it, written out so the order
/// does not change with the `rand` version).
pub fn epoch_order(len: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        shuffle_in_place(&mut order, &mut stream_rng(seed, epoch, u64::MAX, Stream::Shuffle));
    }
    order
}

pub(crate) fn shuffle_in_place(items: &mut [usize], rng: &mut ChaCha8Rng) {
    use rand::Rng;
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i as u64) as usize;
        items.swap(i, j);
    }
}
