//! One image file to the model's input: decode, square center crop, bicubic resize, color jitter.
//!
//! Output: uint8 HWC `[S, S, 3]`, RGB, rows top to bottom. Normalisation (ImageNet mean and
//! standard deviation) happens later, inside the patch embedding.
//!
//! - **Decode**: JPEG and PNG, recognised by content (not by extension), with the `image` crate
//!   (zune-jpeg underneath for JPEG). Grayscale, CMYK, 16-bit and alpha images become 8-bit RGB
//!   (alpha is dropped, as PIL's `convert("RGB")` does). A JPEG without an end-of-image marker
//!   after its image data is refused as truncated (the decoder returns such a file without an
//!   error, with the missing rows made up, where PIL raises one).
//! - **Crop**: the largest centered square, side = the shorter side; offset `floor((long -
//!   short) / 2)` along the longer side.
//! - **Resize**: bicubic to `S x S` with the Catmull-Rom kernel (Keys' cubic with a = -0.5, the
//!   kernel of PIL's `BICUBIC` and of the `image` crate's `FilterType::CatmullRom`), widened by
//!   the scale when shrinking (antialiasing, as both do): output pixel o samples the input at
//!   center c = (o + 0.5) * in / out, input pixel i weighs `k((i + 0.5 - c) / max(in / out, 1))`
//!   over `|i + 0.5 - c| < 2 max(in / out, 1)`, weights normalised to sum 1. Separable, vertical
//!   pass then horizontal, in f32, rounded (half up) and clamped once at the end. It is written
//!   here rather than called from `image::imageops::resize` (which computes the same weights; the
//!   two agree within one level, see the tests) because that one goes pixel by pixel through a
//!   generic view and took 3.5 ms for a 375x375 -> 224 crop, more than the JPEG decode, where this
//!   one takes about 1.2 ms (vectorised vertical pass). A crop already `S x S` is copied as is.
//! - **Color jitter** as torchvision's `ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)`:
//!   three factors drawn uniformly from [0.6, 1.4], applied in a random order:
//!   brightness `x * b`; contrast `m + c (x - m)` with m the mean over the image of its grayscale
//!   `0.299 R + 0.587 G + 0.114 B`; saturation `g + s (x - g)` with g the pixel's grayscale. Each
//!   step works in f32 and clamps to [0, 255]; the result is rounded to the nearest integer once,
//!   at the end (torchvision's tensor path; its PIL path rounds after every step).

use ::image::{ImageFormat, ImageReader, RgbImage};
use rand::Rng;

/// The strength of torchvision's `ColorJitter(0.4, 0.4, 0.4)`: factors uniform in [1 - 0.4, 1 + 0.4].
pub const JITTER_STRENGTH: f32 = 0.4;

/// Decodes a JPEG or PNG file's bytes to 8-bit RGB. The error is a short reason, for the skip list.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    let reader =
        ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) => check_jpeg_complete(bytes)?,
        Some(ImageFormat::Png) => {}
        Some(other) => return Err(format!("unsupported image format {other:?} (expected JPEG or PNG)")),
        None => return Err("not a JPEG or PNG image".into()),
    }
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(format!("empty image ({}x{})", img.width(), img.height()));
    }
    Ok(img.into_rgb8())
}

/// Refuses a JPEG with no end-of-image marker (FF D9) after the start of its first scan (FF DA).
/// The first scan is found by walking the marker segments from the start by their lengths, so
/// an EXIF thumbnail (inside an APP1 segment, with its own scan and end marker) is stepped over;
/// from the first scan on, a 0xFF byte in entropy-coded data is always followed by 0x00 or a
/// restart marker, so FF D9 cannot appear there by chance. Trailing bytes after the end marker
/// are allowed. Files whose segments do not parse are left to the decoder to judge.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    let mut i = 2; // after SOI (FF D8), which format detection has seen
    let sos = loop {
        while i + 1 < bytes.len() && bytes[i] == 0xFF && bytes[i + 1] == 0xFF {
            i += 1; // fill bytes
        }
        if i + 1 >= bytes.len() {
            return Err(format!("truncated JPEG: the file ends before its image data ({} bytes)", bytes.len()));
        }
        if bytes[i] != 0xFF {
            return Ok(());
        }
        match bytes[i + 1] {
            0xDA => break i,
            0xD9 => return Err("JPEG ends (end-of-image marker) before any image data".into()),
            0x01 | 0xD0..=0xD7 => i += 2,
            _ if i + 3 < bytes.len() => i += 2 + u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize,
            _ => return Err(format!("truncated JPEG: the file ends inside a header segment ({} bytes)", bytes.len())),
        }
    };
    if bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(format!("truncated JPEG: no end-of-image marker after the image data ({} bytes)", bytes.len()))
    }
}

/// The centered square of side `min(w, h)`, resized to `size x size` (see the module docs).
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h) as usize;
    let (x0, y0) = ((w as usize - side) / 2, (h as usize - side) / 2);
    let (stride, size) = (w as usize * 3, size as usize);
    let src = img.as_raw();
    let row = |y: usize| &src[(y0 + y) * stride + x0 * 3..(y0 + y) * stride + (x0 + side) * 3];
    let mut out = vec![0u8; size * size * 3];
    if side == size {
        for (y, dst) in out.chunks_exact_mut(size * 3).enumerate() {
            dst.copy_from_slice(row(y));
        }
    } else {
        // Vertical pass: tmp row oy = sum_i w_i * crop row (start + i), whole rows at a time
        // (vectorises); then the horizontal pass along each tmp row.
        let weights = taps(side, size);
        let mut tmp = vec![0f32; size * side * 3]; // [oy, x, c]
        for (oy, acc) in tmp.chunks_exact_mut(side * 3).enumerate() {
            let (start, ws) = weights.get(oy);
            for (i, &wt) in ws.iter().enumerate() {
                for (a, &v) in acc.iter_mut().zip(row(start + i)) {
                    *a += wt * v as f32;
                }
            }
        }
        for (dst, src) in out.chunks_exact_mut(size * 3).zip(tmp.chunks_exact(side * 3)) {
            for (ox, px) in dst.chunks_exact_mut(3).enumerate() {
                let (start, ws) = weights.get(ox);
                let mut acc = [0f32; 3];
                for (&wt, p) in ws.iter().zip(src[start * 3..].chunks_exact(3)) {
                    acc[0] += wt * p[0];
                    acc[1] += wt * p[1];
                    acc[2] += wt * p[2];
                }
                for c in 0..3 {
                    px[c] = to_u8(acc[c]);
                }
            }
        }
    }
    RgbImage::from_raw(size as u32, size as u32, out).expect("size * size * 3 bytes")
}

/// Rounds half up and clamps to [0, 255] (`f32::round` is a libm call without SSE4.1).
#[inline]
fn to_u8(x: f32) -> u8 {
    (x + 0.5).clamp(0.0, 255.0) as u8
}

/// Catmull-Rom: Keys' cubic convolution kernel with a = -0.5, support [-2, 2].
fn catmull_rom(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        (1.5 * x - 2.5) * x * x + 1.0
    } else if x < 2.0 {
        ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    } else {
        0.0
    }
}

/// The resampling weights of every output pixel along one axis.
struct Taps {
    /// (first input pixel, offset of its weights in `weights`, number of weights) per output.
    spans: Vec<(usize, usize, usize)>,
    weights: Vec<f32>,
}

impl Taps {
    fn get(&self, o: usize) -> (usize, &[f32]) {
        let (start, off, len) = self.spans[o];
        (start, &self.weights[off..off + len])
    }
}

/// Weights for `n_in` inputs to `n_out` outputs (see the module docs).
fn taps(n_in: usize, n_out: usize) -> Taps {
    let scale = n_in as f64 / n_out as f64;
    let widen = scale.max(1.0);
    let support = 2.0 * widen;
    let mut spans = Vec::with_capacity(n_out);
    let mut weights = Vec::new();
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support).floor().max(0.0) as usize).min(n_in - 1);
        let hi = ((center + support).ceil() as usize).clamp(lo + 1, n_in);
        let w: Vec<f64> = (lo..hi).map(|i| catmull_rom((i as f64 + 0.5 - center) / widen)).collect();
        let sum: f64 = w.iter().sum();
        spans.push((lo, weights.len(), w.len()));
        weights.extend(w.iter().map(|x| (x / sum) as f32));
    }
    Taps { spans, weights }
}

/// One image's color jitter: the three factors and the order they are applied in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    /// Brightness factor (1 = unchanged).
    pub brightness: f32,
    /// Contrast factor (1 = unchanged).
    pub contrast: f32,
    /// Saturation factor (1 = unchanged).
    pub saturation: f32,
    /// The order of the steps: 0 brightness, 1 contrast, 2 saturation.
    pub order: [u8; 3],
}

impl Jitter {
    /// Draws the order (a uniform permutation of the three steps, Fisher-Yates), then the
    /// brightness, contrast and saturation factors, each uniform in [1 - strength, 1 + strength].
    pub fn sample(rng: &mut impl Rng, strength: f32) -> Self {
        let mut order = [0u8, 1, 2];
        for i in (1..3).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let (lo, hi) = (1.0 - strength, 1.0 + strength);
        let mut factor = || lo + (hi - lo) * rng.random::<f32>();
        let brightness = factor();
        let contrast = factor();
        let saturation = factor();
        Self { brightness, contrast, saturation, order }
    }
}

const GRAY: [f32; 3] = [0.299, 0.587, 0.114];

/// Applies `jitter` in place to uint8 HWC RGB pixels (any number of pixels).
pub fn color_jitter(pixels: &mut [u8], jitter: &Jitter) {
    let mut x: Vec<f32> = pixels.iter().map(|&u| u as f32).collect();
    let gray = |p: &[f32]| GRAY[0] * p[0] + GRAY[1] * p[1] + GRAY[2] * p[2];
    for step in jitter.order {
        match step {
            0 => x.iter_mut().for_each(|v| *v = (*v * jitter.brightness).clamp(0.0, 255.0)),
            1 => {
                let n = (x.len() / 3).max(1);
                let mean = (x.chunks_exact(3).map(|p| gray(p) as f64).sum::<f64>() / n as f64) as f32;
                let c = jitter.contrast;
                x.iter_mut().for_each(|v| *v = (mean + c * (*v - mean)).clamp(0.0, 255.0));
            }
            _ => {
                let s = jitter.saturation;
                for p in x.chunks_exact_mut(3) {
                    let g = gray(p);
                    p.iter_mut().for_each(|v| *v = (g + s * (*v - g)).clamp(0.0, 255.0));
                }
            }
        }
    }
    for (u, v) in pixels.iter_mut().zip(&x) {
        *u = to_u8(*v);
    }
}

/// A file's bytes to uint8 HWC `[size, size, 3]`: decode, crop, resize, then `jitter` if given.
pub fn preprocess(bytes: &[u8], size: u32, jitter: Option<&Jitter>) -> Result<Vec<u8>, String> {
    let img = decode(bytes)?;
    let mut pixels = resize_center_crop(&img, size).into_raw();
    if let Some(j) = jitter {
        color_jitter(&mut pixels, j);
    }
    Ok(pixels)
}
