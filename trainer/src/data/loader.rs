//! The loader: reproducible batches of pixels, token ids and ranks, decoded on worker threads.
//!
//! ```text
//! epoch order (seeded shuffle of positions)
//!   │ positions handed out in order (an atomic counter), at most `window` ahead of the assembler
//!   ▼
//! `threads` decoder threads: read, decode, crop, resize, jitter ─ (position, pixels | reason) ─┐
//!                                                                                               ▼
//! assembler thread: takes the results back in epoch order, skips (and records) unreadable
//! images, fills batches with tokens and ranks ─> bounded channel (`prefetch` batches) ─> Epoch
//! ```
//!
//! When training on a GPU, [`Loader::use_pinned`] makes the assembler write each batch's pixels
//! straight into a page-locked buffer of a pool: the copy engine then reads them itself, and the
//! training thread neither copies them into a staging buffer nor waits for the upload. A buffer
//! returns to its pool when its batch is dropped and is refilled only after its last upload ends.
//!
//! Everything in a batch depends only on `(seed, epoch)` and the files: the order of the epoch,
//! each image's pixels (its jitter is keyed by its id), its ranks (keyed by its id) and which
//! images are skipped. The assembler consumes results strictly in epoch order, so the batches are
//! the same whatever the number of threads or their timing. An unreadable image (missing,
//! corrupt, truncated, not an image, or one the decoder panics on) is skipped: the next image in
//! the order takes its place, so batches stay full, and the image is recorded in
//! [`Loader::skipped`]. When an epoch's skipped images exceed `max_skip_fraction` of its images,
//! the epoch ends with [`DataError::TooManySkipped`].
//!
//! A run resumed in the middle of an epoch restarts it at the position after its last batch
//! ([`Batch::next_position`], [`Loader::epoch_from`]) and gets the batches a fresh run would
//! have got from there.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use mapet::cuda::pinned::{HostBytes, PinnedPool};

use super::pixels::{preprocess, Jitter, JITTER_STRENGTH};
use super::{epoch_order, file_err, image_ranks, stream_rng, DataError, ImageIndex, Result, Stream, Tokens};

/// Settings of a [`Loader`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Side S of the square images given to the model (224 for the paper's models).
    pub image_size: usize,
    /// Images per batch.
    pub batch: usize,
    /// Decoder threads.
    pub threads: usize,
    /// Complete batches kept ready ahead of the consumer (the bounded channel's capacity).
    pub prefetch: usize,
    /// Color jitter (brightness, contrast, saturation 0.4) on or off.
    pub jitter: bool,
    /// Seed of the epoch order, the permutations and the jitter.
    pub seed: u64,
    /// Drop the last, incomplete batch of an epoch (the default) or yield it short.
    pub drop_last: bool,
    /// Shuffle each epoch (seeded by `(seed, epoch)`) or keep the index order.
    pub shuffle: bool,
    /// The fraction of an epoch's images that may be skipped before the epoch fails (0.01).
    pub max_skip_fraction: f64,
}

impl LoaderConfig {
    /// Training defaults for `image_size` and `batch`: as many threads as the machine has,
    /// 2 batches prefetched, jitter on, seed 0, drop_last, shuffle, at most 1% skipped.
    pub fn new(image_size: usize, batch: usize) -> Self {
        Self {
            image_size,
            batch,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4),
            prefetch: 2,
            jitter: true,
            seed: 0,
            drop_last: true,
            shuffle: true,
            max_skip_fraction: 0.01,
        }
    }
}

/// One batch, ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The epoch it belongs to.
    pub epoch: u64,
    /// The id of each image (its row in the token file) `[B]`.
    pub indices: Vec<usize>,
    /// uint8 RGB pixels, HWC per image `[B, S, S, 3]`: page-locked when the loader was given a
    /// pool ([`Loader::use_pinned`]), else an ordinary vector.
    pub pixels: HostBytes,
    /// Target codebook ids of the patches, raster order `[B, N-1]`.
    pub tokens: Vec<i32>,
    /// Rank of each token in its image's permutation `[B, N]` (rank 0 for CLS).
    pub ranks: Vec<i32>,
    /// S.
    pub image_size: usize,
    /// N (CLS + patches).
    pub n_tokens: usize,
    /// The epoch position after this batch's last image: where [`Loader::epoch_from`] resumes.
    pub next_position: usize,
}

impl Batch {
    /// Images in the batch (B).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True for a batch without images (never yielded by the loader).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The batch as the model takes it: the uint8 HWC pixels as they are (moved, not copied),
    /// normalized with `norm` inside the patch embedding (on the GPU, in the kernel).
    pub fn into_model_batch(self, norm: mapet::ops::patch_embed::Normalize) -> mapet::model::cpu::Batch {
        mapet::model::cpu::Batch {
            batch: self.len(),
            images: mapet::model::cpu::Images::U8 { hwc: self.pixels, norm },
            tokens: self.tokens,
            ranks: self.ranks,
        }
    }

    /// The batch with its pixels normalized on the host with `norm` to f32 `[B, 3, S, S]` (the
    /// form of the golden cases; [`Self::into_model_batch`] is what training uses).
    pub fn to_f32_batch(&self, norm: &mapet::ops::patch_embed::Normalize) -> mapet::model::cpu::Batch {
        let s2 = self.image_size * self.image_size;
        let mut images = vec![0f32; self.len() * 3 * s2];
        for (b, img) in self.pixels.chunks_exact(3 * s2).enumerate() {
            for (i, px) in img.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    images[(b * 3 + c) * s2 + i] = norm.apply(px[c], c);
                }
            }
        }
        mapet::model::cpu::Batch {
            batch: self.len(),
            images: mapet::model::cpu::Images::F32(images),
            tokens: self.tokens.clone(),
            ranks: self.ranks.clone(),
        }
    }
}

/// An image the loader could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The epoch it was skipped in.
    pub epoch: u64,
    /// Its id.
    pub id: usize,
    /// Its full path.
    pub path: PathBuf,
    /// Why (the read or decode error).
    pub reason: String,
}

/// How many skipped images [`Loader::skipped`] keeps by name (the count goes on past it).
pub const SKIPPED_KEPT: usize = 10_000;

struct Shared {
    index: ImageIndex,
    tokens: Tokens,
    cfg: LoaderConfig,
    skipped: Mutex<SkipLog>,
    /// Where batches' pixels are assembled: page-locked buffers of this pool, or vectors.
    pinned: Mutex<Option<PinnedPool>>,
}

#[derive(Default)]
struct SkipLog {
    /// The first [`SKIPPED_KEPT`] skipped images.
    kept: Vec<Skipped>,
    /// All skipped images.
    total: usize,
}

/// Batches of an image index with its token file (see the module docs).
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// Checks the settings and that `tokens` has one row per image of the index `index` was cut
    /// from; errors name the token file or the setting.
    pub fn new(index: ImageIndex, tokens: Tokens, cfg: LoaderConfig) -> Result<Self> {
        if tokens.rows() != index.source_len() {
            return Err(file_err(
                tokens.path(),
                format!(
                    "token file has {} rows but the image index of {} has {} images",
                    tokens.rows(),
                    index.root().display(),
                    index.source_len()
                ),
            ));
        }
        let bad = |what: String| Err(DataError::Config(what));
        if cfg.image_size == 0 || cfg.image_size > 1 << 15 {
            return bad(format!("image_size must be in 1..=32768, got {}", cfg.image_size));
        }
        if cfg.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if cfg.threads == 0 {
            return bad("threads must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&cfg.max_skip_fraction) {
            return bad(format!("max_skip_fraction must be in [0, 1], got {}", cfg.max_skip_fraction));
        }
        if cfg.drop_last && index.len() < cfg.batch {
            return bad(format!(
                "{} images under {} do not fill one batch of {} (and drop_last is set)",
                index.len(),
                index.root().display(),
                cfg.batch
            ));
        }
        let skipped = Mutex::new(SkipLog::default());
        Ok(Self { shared: Arc::new(Shared { index, tokens, cfg, skipped, pinned: Mutex::new(None) }) })
    }

    /// Assembles the pixels of the batches of epochs started from now on in page-locked buffers
    /// of `pool` (each batch holds one until it is dropped), so that a GPU uploads them by DMA
    /// without a staging copy. The pool's buffers must hold a whole batch.
    pub fn use_pinned(&self, pool: PinnedPool) -> Result<()> {
        let cfg = &self.shared.cfg;
        let need = cfg.batch * cfg.image_size * cfg.image_size * 3;
        if pool.capacity() < need {
            return Err(DataError::Config(format!(
                "pinned buffers of {} bytes cannot hold a batch of {} images of {}x{} ({need} bytes)",
                pool.capacity(),
                cfg.batch,
                cfg.image_size,
                cfg.image_size
            )));
        }
        *self.shared.pinned.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool);
        Ok(())
    }

    /// The batches of `epoch`, from its start.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.start(epoch, 0)
    }

    /// The batches of `epoch` from epoch position `position` on (a [`Batch::next_position`]):
    /// the batches a run that started the epoch from 0 got after that point.
    pub fn epoch_from(&self, epoch: u64, position: usize) -> Result<Epoch> {
        if position > self.len() {
            return Err(DataError::Config(format!(
                "resume position {position} is past the end of an epoch of {} images",
                self.len()
            )));
        }
        Ok(self.start(epoch, position))
    }

    /// Images in an epoch.
    pub fn len(&self) -> usize {
        self.shared.index.len()
    }

    /// True when the index is empty (never, for a loader that was built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batches in an epoch when no image is skipped (each skip can only lower it).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.len(), self.shared.cfg.batch);
        if self.shared.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// N: tokens per image (the token file's columns + 1 for CLS).
    pub fn n_tokens(&self) -> usize {
        self.shared.tokens.cols() + 1
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// The image index.
    pub fn index(&self) -> &ImageIndex {
        &self.shared.index
    }

    /// The images skipped so far, all epochs, in epoch order within each epoch (the first
    /// [`SKIPPED_KEPT`] of them; [`Self::skipped_count`] counts them all).
    pub fn skipped(&self) -> Vec<Skipped> {
        self.shared.skipped.lock().unwrap_or_else(|e| e.into_inner()).kept.clone()
    }

    /// How many images were skipped so far, all epochs (an image unreadable in every epoch
    /// counts once per epoch).
    pub fn skipped_count(&self) -> usize {
        self.shared.skipped.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    fn start(&self, epoch: u64, position: usize) -> Epoch {
        let cfg = &self.shared.cfg;
        let order = Arc::new(epoch_order(self.len(), cfg.seed, epoch, cfg.shuffle));
        let flow = Arc::new(Flow {
            next: AtomicUsize::new(position),
            cursor: Mutex::new(position),
            advanced: Condvar::new(),
            window: cfg.batch.max(2 * cfg.threads),
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        let (result_tx, result_rx) = unbounded();
        let (batch_tx, batch_rx) = bounded(cfg.prefetch);
        let mut threads = Vec::with_capacity(cfg.threads + 1);
        for t in 0..cfg.threads {
            let (shared, order, worker_flow, tx) =
                (self.shared.clone(), order.clone(), flow.clone(), result_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("mapet-data-{t}"))
                .spawn(move || decode_worker(&shared, &order, &worker_flow, epoch, tx));
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    flow.halt();
                    return Epoch::failed(DataError::Worker(format!("cannot start a decoder thread: {e}")));
                }
            }
        }
        drop(result_tx);
        let (shared, flow2) = (self.shared.clone(), flow.clone());
        let spawned = std::thread::Builder::new()
            .name("mapet-data-batch".into())
            .spawn(move || assemble(&shared, &order, &flow2, epoch, position, result_rx, batch_tx));
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                flow.halt();
                return Epoch::failed(DataError::Worker(format!("cannot start the batch thread: {e}")));
            }
        }
        Epoch { rx: Some(batch_rx), flow: Some(flow), threads, done: false, error: None }
    }
}

/// The flow control between the decoder threads and the assembler.
struct Flow {
    /// The next epoch position to hand out.
    next: AtomicUsize,
    /// The position the assembler waits for; decoders stay below `cursor + window`.
    cursor: Mutex<usize>,
    advanced: Condvar,
    window: usize,
    /// Set when the consumer drops the epoch.
    stop: AtomicBool,
    /// Set by the assembler when it delivered the whole epoch (or its error).
    finished: AtomicBool,
}

impl Flow {
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        self.advanced.notify_all();
    }
}

type Decoded = std::result::Result<Vec<u8>, String>;

fn decode_worker(shared: &Shared, order: &[usize], flow: &Flow, epoch: u64, tx: Sender<(usize, Decoded)>) {
    let cfg = &shared.cfg;
    loop {
        if flow.stop.load(Ordering::Relaxed) {
            return;
        }
        let p = flow.next.fetch_add(1, Ordering::Relaxed);
        if p >= order.len() {
            return;
        }
        {
            let mut cursor = flow.cursor.lock().unwrap_or_else(|e| e.into_inner());
            while p >= *cursor + flow.window && !flow.stop.load(Ordering::SeqCst) {
                cursor = flow.advanced.wait(cursor).unwrap_or_else(|e| e.into_inner());
            }
        }
        if flow.stop.load(Ordering::SeqCst) {
            return;
        }
        let position = order[p];
        let id = shared.index.id(position);
        let path = shared.index.full_path(position);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let bytes = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
            let jitter = cfg
                .jitter
                .then(|| Jitter::sample(&mut stream_rng(cfg.seed, epoch, id as u64, Stream::Jitter), JITTER_STRENGTH));
            preprocess(&bytes, cfg.image_size as u32, jitter.as_ref())
        }))
        .unwrap_or_else(|_| Err("the decoder panicked on this file".into()));
        if tx.send((p, result)).is_err() {
            return;
        }
    }
}

fn assemble(
    shared: &Shared,
    order: &[usize],
    flow: &Flow,
    epoch: u64,
    start: usize,
    results: Receiver<(usize, Decoded)>,
    out: Sender<Result<Batch>>,
) {
    let cfg = &shared.cfg;
    let (s, b) = (cfg.image_size, cfg.batch);
    let n_tokens = shared.tokens.cols() + 1;
    let image_bytes = s * s * 3;
    // Page-locked buffers when the loader has a pool; if page-locking fails (the system's limit
    // on locked memory, say), ordinary vectors for the rest of the epoch, saying so once: the
    // run goes on, its uploads just take a staging copy.
    let mut pool = shared.pinned.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut new_batch = || -> Batch {
        let pinned = pool.as_ref().map(|p| p.take());
        let pixels = match pinned {
            Some(Ok(p)) => HostBytes::Pinned(p),
            Some(Err(e)) => {
                eprintln!("note: pixels go to pageable memory for the rest of epoch {epoch}: {e}");
                pool = None;
                HostBytes::Vec(Vec::with_capacity(b * image_bytes))
            }
            None => HostBytes::Vec(Vec::with_capacity(b * image_bytes)),
        };
        Batch {
            epoch,
            indices: Vec::with_capacity(b),
            pixels,
            tokens: Vec::with_capacity(b * (n_tokens - 1)),
            ranks: Vec::with_capacity(b * n_tokens),
            image_size: s,
            n_tokens,
            next_position: start,
        }
    };
    // A driver failure while filling a batch ends the epoch with that error.
    let fail = |e: DataError| {
        let _ = out.send(Err(e));
        flow.finished.store(true, Ordering::SeqCst);
        flow.halt();
    };
    let mut batch = new_batch();
    let mut pending: BTreeMap<usize, Decoded> = BTreeMap::new();
    let mut skipped = 0usize;
    let mut first_skip = String::new();
    for p in start..order.len() {
        let decoded = loop {
            if let Some(d) = pending.remove(&p) {
                break d;
            }
            match results.recv() {
                Ok((q, d)) => {
                    pending.insert(q, d);
                }
                Err(_) => return, // the epoch was dropped (or a decoder died: reported by Epoch)
            }
        };
        {
            let mut cursor = flow.cursor.lock().unwrap_or_else(|e| e.into_inner());
            *cursor = p + 1;
            flow.advanced.notify_all();
        }
        let position = order[p];
        let id = shared.index.id(position);
        match decoded {
            Ok(pixels) => {
                // The decoder gives exactly S*S*3 bytes and a batch holds at most B images, so
                // this fits the pinned buffer; a driver failure while waiting ends the epoch.
                if let Err(e) = batch.pixels.extend_from_slice(&pixels) {
                    // The wait reports the first error pending on the device, which may come from
                    // the training thread's work rather than from this buffer's upload.
                    return fail(DataError::Worker(format!(
                        "waiting for the GPU before writing a batch's pixels (the error may come from other work on \
                         the device): {e}"
                    )));
                }
                batch.indices.push(id);
                let t0 = batch.tokens.len();
                batch.tokens.resize(t0 + n_tokens - 1, 0);
                shared.tokens.row_into(id, &mut batch.tokens[t0..]);
                batch.ranks.extend(image_ranks(cfg.seed, epoch, id, n_tokens));
                if batch.len() == b {
                    batch.next_position = p + 1;
                    if out.send(Ok(std::mem::replace(&mut batch, new_batch()))).is_err() {
                        return;
                    }
                }
            }
            Err(reason) => {
                let path = shared.index.full_path(position);
                if skipped == 0 {
                    first_skip = format!("{}: {reason}", path.display());
                }
                skipped += 1;
                let mut log = shared.skipped.lock().unwrap_or_else(|e| e.into_inner());
                log.total += 1;
                if log.kept.len() < SKIPPED_KEPT {
                    log.kept.push(Skipped { epoch, id, path, reason });
                }
                drop(log);
                if skipped as f64 > cfg.max_skip_fraction * order.len() as f64 {
                    let _ = out.send(Err(DataError::TooManySkipped {
                        epoch,
                        skipped,
                        total: order.len(),
                        limit: cfg.max_skip_fraction,
                        first: first_skip,
                    }));
                    flow.finished.store(true, Ordering::SeqCst);
                    flow.halt();
                    return;
                }
            }
        }
    }
    if !batch.is_empty() && !cfg.drop_last {
        batch.next_position = order.len();
        if out.send(Ok(batch)).is_err() {
            return;
        }
    }
    flow.finished.store(true, Ordering::SeqCst);
}

/// The batches of one epoch, in order; an iterator of `Result<Batch>`. After an error it yields
/// nothing more. Dropping it stops its threads.
pub struct Epoch {
    rx: Option<Receiver<Result<Batch>>>,
    flow: Option<Arc<Flow>>,
    threads: Vec<JoinHandle<()>>,
    done: bool,
    error: Option<DataError>,
}

impl Epoch {
    fn failed(error: DataError) -> Self {
        Epoch { rx: None, flow: None, threads: Vec::new(), done: false, error: Some(error) }
    }

    fn stop(&mut self) {
        if let Some(flow) = &self.flow {
            flow.halt();
        }
        self.rx = None; // unblocks the assembler's send
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.done {
            return None;
        }
        if let Some(e) = self.error.take() {
            self.done = true;
            return Some(Err(e));
        }
        let received = self.rx.as_ref()?.recv();
        match received {
            Ok(Ok(batch)) => Some(Ok(batch)),
            Ok(Err(e)) => {
                self.done = true;
                self.stop();
                Some(Err(e))
            }
            Err(_) => {
                self.done = true;
                let finished = self.flow.as_ref().is_some_and(|f| f.finished.load(Ordering::SeqCst));
                self.stop();
                (!finished)
                    .then(|| Err(DataError::Worker("the batch thread stopped before the end of the epoch".into())))
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.stop();
    }
}
