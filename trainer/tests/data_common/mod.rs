//! Helpers of the trainer's tests: small random images written as JPEG and PNG, and where the
//! `mapet` binary is.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage, RgbaImage};
use rand::Rng;

/// The `mapet` binary: `MAPET_BIN` when set (a GPU host runs the tests from a bundle, away from
/// the build's target folder), else the one cargo built for this test.
pub fn mapet_bin() -> PathBuf {
    std::env::var_os("MAPET_BIN").map(Into::into).unwrap_or_else(|| env!("CARGO_BIN_EXE_mapet").into())
}

/// A smooth random image (random gradients plus a little noise), like a photo at small scale.
pub fn smooth_rgb(rng: &mut impl Rng, w: u32, h: u32) -> RgbImage {
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(40.0..200.0));
    let gx: [f32; 3] = std::array::from_fn(|_| rng.random_range(-60.0..60.0));
    let gy: [f32; 3] = std::array::from_fn(|_| rng.random_range(-60.0..60.0));
    let mut img = RgbImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (u, v) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
        for c in 0..3 {
            let value = base[c] + gx[c] * u + gy[c] * v + rng.random_range(-12.0..12.0);
            p.0[c] = value.clamp(0.0, 255.0) as u8;
        }
    }
    img
}

/// A noise image: every byte uniform.
pub fn noise_rgb(rng: &mut impl Rng, w: u32, h: u32) -> RgbImage {
    let mut img = RgbImage::new(w, h);
    img.iter_mut().for_each(|b| *b = rng.random());
    img
}

pub fn write_jpeg(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, ImageFormat::Jpeg).unwrap();
}

pub fn write_png(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, ImageFormat::Png).unwrap();
}

pub fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A file under `dir`, with its parents made.
pub fn write_bytes(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The test tree: images of various sizes, formats and depths, plus files to ignore or skip.
pub struct Tree {
    /// Relative paths of the image-named files, sorted as the index sorts them.
    pub images: Vec<PathBuf>,
    /// Relative paths of the image-named files that cannot be decoded.
    pub bad: Vec<PathBuf>,
}

/// Writes the test tree under `root`:
/// `a/` nested folders, an uppercase `.JPG`, `.jpeg`, PNGs (RGB, RGBA, gray), a corrupt `.jpg`,
/// a truncated `.jpg`, a `.txt` (ignored) and `good` extra JPEGs in `many/`.
pub fn make_tree(root: &Path, rng: &mut impl Rng, good: usize) -> Tree {
    let mut images = Vec::new();
    let mut bad = Vec::new();
    let mut jpg = |rel: &str, img: RgbImage| {
        write_jpeg(&root.join(rel), &img);
        images.push(PathBuf::from(rel));
    };
    jpg("a/cat_01.jpg", smooth_rgb(rng, 64, 48));
    jpg("a/sub/deep/x.jpeg", smooth_rgb(rng, 33, 33));
    jpg("B/IMG_0003.JPG", smooth_rgb(rng, 100, 60));
    jpg("a/b.Jpeg", smooth_rgb(rng, 20, 90));
    for i in 0..good {
        let (w, h) = (rng.random_range(16..80), rng.random_range(16..80));
        jpg(&format!("many/{i:03}.jpg"), smooth_rgb(rng, w, h));
    }
    write_png(&root.join("a/p.png"), &smooth_rgb(rng, 40, 70));
    images.push("a/p.png".into());
    let rgba = RgbaImage::from_fn(30, 30, |x, y| image::Rgba([x as u8 * 8, y as u8 * 8, 100, (x * y) as u8]));
    rgba.save_with_format(root.join("a/rgba.PNG"), ImageFormat::Png).unwrap();
    images.push("a/rgba.PNG".into());
    let gray = image::GrayImage::from_fn(25, 40, |x, y| image::Luma([(x * 5 + y) as u8]));
    gray.save_with_format(root.join("gray.png"), ImageFormat::Png).unwrap();
    images.push("gray.png".into());
    // Unreadable files with image names.
    let noise: Vec<u8> = (0..500).map(|_| rng.random()).collect();
    write_bytes(&root.join("a/corrupt.jpg"), &noise);
    images.push("a/corrupt.jpg".into());
    bad.push("a/corrupt.jpg".into());
    let full = jpeg_bytes(&smooth_rgb(rng, 48, 48));
    write_bytes(&root.join("B/truncated.jpg"), &full[..full.len() * 2 / 3]);
    images.push("B/truncated.jpg".into());
    bad.push("B/truncated.jpg".into());
    // Ignored: not an image name.
    write_bytes(&root.join("a/notes.txt"), b"not an image");
    write_bytes(&root.join("README"), b"no extension");
    std::fs::create_dir_all(root.join("empty_dir")).unwrap();
    images.sort();
    bad.sort();
    Tree { images, bad }
}
