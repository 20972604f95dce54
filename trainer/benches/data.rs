//! Data pipeline throughput on synthetic ImageNet-like JPEGs (`mapet synth`'s, quality 90):
//! time per stage (decode, crop + resize to 224, jitter) on one thread, then the loader's
//! images/s per thread count. `cargo bench -p mapet-trainer --bench data [-- --images N]` (default
//! 512; other arguments, such as criterion's, are ignored).

use std::time::Instant;

use mapet_trainer::cmd::synth::jpeg_bytes;
use mapet_trainer::data::pixels::JITTER_STRENGTH;
use mapet_trainer::data::{bench_data, color_jitter, decode, resize_center_crop, ImageIndex, Jitter};
use rand::SeedableRng;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let images: usize = match args.iter().position(|a| a == "--images") {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).expect("--images takes a positive count"),
        None => 512,
    };
    assert!(images > 0, "--images takes a positive count");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut total_bytes = 0;
    for i in 0..images {
        let path = dir.path().join(format!("{:02}/{i:05}.jpg", i % 10));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let jpeg = jpeg_bytes(1, i);
        total_bytes += jpeg.len();
        std::fs::write(&path, jpeg).unwrap();
    }
    let index = ImageIndex::from_folder(dir.path()).unwrap();
    println!("{images} JPEGs, mean {} KiB", total_bytes / images / 1024);

    let files: Vec<Vec<u8>> = (0..index.len()).map(|p| std::fs::read(index.full_path(p)).unwrap()).collect();
    let (mut t_dec, mut t_rs, mut t_jit) = (0.0, 0.0, 0.0);
    for bytes in &files {
        let t = Instant::now();
        let img = decode(bytes).unwrap();
        t_dec += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut px = resize_center_crop(&img, 224).into_raw();
        t_rs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        color_jitter(&mut px, &Jitter::sample(&mut rng, JITTER_STRENGTH));
        t_jit += t.elapsed().as_secs_f64();
    }
    let ms = |s: f64| 1e3 * s / files.len() as f64;
    println!(
        "one thread, per image: decode {:.2} ms, crop+resize {:.2} ms, jitter {:.2} ms",
        ms(t_dec),
        ms(t_rs),
        ms(t_jit)
    );

    let max = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let threads: Vec<usize> = [1, 2, 4, 8, 16, 32].into_iter().filter(|&t| t <= max).collect();
    for r in bench_data(&index, 224, &threads, images).unwrap() {
        println!(
            "threads {:>3}: {:>8.1} images/s ({} images in {:.2} s)",
            r.threads, r.images_per_s, r.images, r.seconds
        );
    }
}
