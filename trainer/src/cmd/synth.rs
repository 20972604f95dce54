//! `mapet synth`: a synthetic image folder with a token file, shaped like ImageNet (JPEG,
//! quality 90, 500x375-class sizes), so that the loader, `mapet pretrain` and `mapet bench-data`
//! can be measured end to end on a host that holds no dataset. The pictures are smooth colour
//! waves with noise (they decode like photographs, not like flat colour or white noise) and the
//! token ids are uniform: the loss of a run on them says nothing about learning.
//!
//! Layout: `OUT/images/cCCC/IIIIIII.jpg` with the images split evenly over the classes in order,
//! so that the index order (sorted relative paths) is the generation order; `OUT/tokens.npy`
//! `[images, grid²]` (int16 while the vocabulary fits, else int32), row r for index entry r. The
//! same seed writes the same bytes.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{parse, Parsed};
use crate::data::npy::NpyDtype;
use crate::data::tokens::write_tokens;

/// The command's usage.
pub const USAGE: &str = "usage: mapet synth --out DIR [--images 1024] [--classes 10] [--vocab 8192] [--grid 14]
                   [--seed 0] [--threads T]
  Writes a synthetic ImageNet-like set for benchmarks and smoke tests: DIR/images/cCCC/*.jpg
  (JPEG quality 90; 500x375, 375x500, 500x333 and 640x480) and DIR/tokens.npy [images, grid^2]
  with uniform random ids below --vocab (grid 14: 224-pixel images in 16-pixel patches).
  --threads T  encoder threads (default: every core)";

/// The sizes cycled through, as (width, height): ImageNet's most common shapes.
pub const SIZES: [(u32, u32); 4] = [(500, 375), (375, 500), (500, 333), (640, 480)];

/// A smooth, noisy picture of `w` x `h` drawn from `rng`: a colour wave per channel plus uniform
/// noise of +-20, so that JPEG coding and decoding cost about what they cost on photographs.
pub fn photo_like(rng: &mut impl Rng, w: u32, h: u32) -> RgbImage {
    let f: [f32; 6] = std::array::from_fn(|_| rng.random_range(0.01..0.08));
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(60.0..190.0));
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f32, y as f32);
        image::Rgb(std::array::from_fn(|c| {
            let v = base[c] + 50.0 * (f[c] * x).sin() * (f[c + 3] * y).cos() + rng.random_range(-20.0..20.0);
            v.clamp(0.0, 255.0) as u8
        }))
    })
}

/// Image `i` of a set made with `seed`, as JPEG bytes (quality 90). Each image has its own
/// generator, so the bytes do not depend on how the work is split over threads.
pub fn jpeg_bytes(seed: u64, i: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(i as u64 + 1);
    let (w, h) = SIZES[i % SIZES.len()];
    let img = photo_like(&mut rng, w, h);
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("encoding to memory cannot fail");
    out.into_inner()
}

/// What [`write_set`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSet {
    /// The image folder (`OUT/images`).
    pub images: PathBuf,
    /// The token file (`OUT/tokens.npy`).
    pub tokens: PathBuf,
    /// Bytes of JPEG written.
    pub jpeg_bytes: u64,
}

/// Writes `images` pictures over `classes` folders and their tokens (see the module docs).
pub fn write_set(
    out: &Path,
    images: usize,
    classes: usize,
    vocab: usize,
    grid: usize,
    seed: u64,
    threads: usize,
) -> Result<SynthSet, String> {
    if images == 0 || classes == 0 || vocab == 0 || grid == 0 || threads == 0 {
        return Err("--images, --classes, --vocab, --grid and --threads must be positive".into());
    }
    if vocab > i32::MAX as usize {
        return Err(format!("--vocab {vocab}: at most {}", i32::MAX));
    }
    let dir = out.join("images");
    // An earlier set's images would mix with this one's (and outnumber its token rows); its
    // token file, or a checkpoint's files, would be replaced.
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!(
            "--out {}: {} already holds an image set; give a new or empty folder",
            out.display(),
            dir.display()
        ));
    }
    for held in ["tokens.npy", "meta.json"] {
        if out.join(held).exists() {
            return Err(format!(
                "--out {}: it already holds {held} (a data set's or a checkpoint's); give a new or empty folder",
                out.display()
            ));
        }
    }
    let per_class = images.div_ceil(classes);
    let path_of = |i: usize| dir.join(format!("c{:03}", i / per_class)).join(format!("{i:07}.jpg"));
    for c in 0..images.div_ceil(per_class) {
        let d = dir.join(format!("c{c:03}"));
        std::fs::create_dir_all(&d).map_err(|e| format!("--out: creating {}: {e}", d.display()))?;
    }
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let failure = std::sync::Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (path_of, bytes, failure) = (&path_of, &bytes, &failure);
            s.spawn(move || {
                for i in (t..images).step_by(threads) {
                    let jpeg = jpeg_bytes(seed, i);
                    let path = path_of(i);
                    if let Err(e) = std::fs::write(&path, &jpeg) {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(format!("{}: {e}", path.display()));
                        return;
                    }
                    bytes.fetch_add(jpeg.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(format!("--out: writing {e}"));
    }
    let cols = grid * grid;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<i32> = (0..images * cols).map(|_| rng.random_range(0..vocab as i32)).collect();
    let dtype = if vocab <= i16::MAX as usize + 1 { NpyDtype::I16 } else { NpyDtype::I32 };
    let tokens = out.join("tokens.npy");
    write_tokens(&tokens, dtype, cols, &ids).map_err(|e| format!("--out: {e}"))?;
    Ok(SynthSet { images: dir, tokens, jpeg_bytes: bytes.into_inner() })
}

/// Runs `mapet synth` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let valued = ["out", "images", "classes", "vocab", "grid", "seed", "threads"];
    let a = match parse("synth", args, &valued, &[])? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Args(a) => a,
    };
    let out = PathBuf::from(a.required("synth", "out", "DIR")?);
    let images = a.positive("images", 1024)?;
    let classes = a.positive("classes", 10)?;
    let vocab = a.positive("vocab", 8192)?;
    let grid = a.positive("grid", 14)?;
    let seed: u64 = a.number("seed", 0)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = a.positive("threads", cores)?;
    let t0 = std::time::Instant::now();
    let set = write_set(&out, images, classes, vocab, grid, seed, threads)?;
    println!(
        "synth: {images} JPEGs ({:.1} MiB) in {} and tokens [{images}, {}] in {} ({:.1} s)",
        set.jpeg_bytes as f64 / (1 << 20) as f64,
        set.images.display(),
        grid * grid,
        set.tokens.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
