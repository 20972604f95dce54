//! Data pipeline throughput: images per second through the loader, per thread count.

use std::time::Instant;

use super::{DataError, ImageIndex, Loader, LoaderConfig, Result, Tokens};

/// One measurement of [`bench_data`].
#[derive(Debug, Clone, PartialEq)]
pub struct DataBench {
    /// Decoder threads.
    pub threads: usize,
    /// Images delivered in batches.
    pub images: usize,
    /// Images skipped as unreadable.
    pub skipped: usize,
    /// Wall time from the start of the epoch to its last batch.
    pub seconds: f64,
    /// `images / seconds`.
    pub images_per_s: f64,
}

/// Runs `images` images of `index` (spread evenly over it; all of them when it is smaller)
/// through the loader's whole path (read, decode, crop, resize to `image_size`, jitter, batch
/// assembly) once per entry of `threads`, after one pass that reads every file so the page cache
/// is warm for all. Token ids are dummies; skipped files are counted, never fatal.
pub fn bench_data(index: &ImageIndex, image_size: usize, threads: &[usize], images: usize) -> Result<Vec<DataBench>> {
    if images == 0 || threads.is_empty() {
        return Err(DataError::Config("bench_data needs at least one image and one thread count".into()));
    }
    let m = images.min(index.len());
    let positions: Vec<usize> = (0..m).map(|i| i * index.len() / m).collect();
    let subset = index.subset(&positions)?;
    for p in 0..subset.len() {
        let _ = std::fs::read(subset.full_path(p));
    }
    let tokens = Tokens::from_ids("(dummy tokens)", index.source_len(), 1, 1, vec![0; index.source_len()])?;
    let mut out = Vec::with_capacity(threads.len());
    for &t in threads {
        let cfg = LoaderConfig {
            threads: t,
            prefetch: 4,
            jitter: true,
            drop_last: false,
            shuffle: false,
            max_skip_fraction: 1.0,
            ..LoaderConfig::new(image_size, m.min(64))
        };
        let loader = Loader::new(subset.clone(), tokens.clone(), cfg)?;
        let start = Instant::now();
        let mut delivered = 0;
        for batch in loader.epoch(0) {
            delivered += batch?.len();
        }
        let seconds = start.elapsed().as_secs_f64();
        out.push(DataBench {
            threads: t,
            images: delivered,
            skipped: loader.skipped_count(),
            seconds,
            images_per_s: delivered as f64 / seconds.max(1e-9),
        });
    }
    Ok(out)
}
