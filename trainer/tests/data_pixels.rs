//! Decoding, center crop, bicubic resize and color jitter of single images.

mod data_common;

use data_common::{jpeg_bytes, png_bytes, smooth_rgb};
use image::{Rgb, RgbImage};
use mapet_trainer::data::pixels::JITTER_STRENGTH;
use mapet_trainer::data::{color_jitter, decode, preprocess, resize_center_crop, Jitter};
use rand::Rng;

/// A `w x h` image: `border` columns (landscape) or rows (portrait) of red on the low side and
/// blue on the high side, both as wide as the center crop leaves them, the centered square green.
fn bordered(w: u32, h: u32) -> RgbImage {
    let side = w.min(h);
    let (x0, y0) = ((w - side) / 2, (h - side) / 2);
    RgbImage::from_fn(w, h, |x, y| {
        if x < x0 || y < y0 {
            Rgb([255, 0, 0])
        } else if x >= x0 + side || y >= y0 + side {
            Rgb([0, 0, 255])
        } else {
            Rgb([30, 200, 60])
        }
    })
}

#[test]
fn center_crop_removes_the_borders_exactly() {
    // Odd and even margins, landscape and portrait, shrinking and growing.
    for (w, h, size) in [(91, 50, 25), (90, 50, 16), (50, 91, 25), (41, 60, 64), (37, 20, 20), (64, 64, 32)] {
        let png = png_bytes(&bordered(w, h));
        let out = preprocess(&png, size, None).unwrap();
        assert_eq!(out.len(), (size * size * 3) as usize);
        for (i, px) in out.chunks_exact(3).enumerate() {
            let d = (px[0] as i32 - 30).abs().max((px[1] as i32 - 200).abs()).max((px[2] as i32 - 60).abs());
            assert!(d <= 1, "{w}x{h} -> {size}: pixel {i} = {px:?} is not the center's green: border leaked");
        }
    }
    // One more column on either side would show: crop offset floor((91 - 50) / 2) = 20, so
    // column 20 is the first green one; shifting the green by one column puts red in the crop.
    let mut shifted = bordered(91, 50);
    for y in 0..50 {
        shifted.put_pixel(20, y, Rgb([255, 0, 0]));
    }
    let out = preprocess(&png_bytes(&shifted), 25, None).unwrap();
    assert!(out[0] > 60, "a red first crop column must tint the first output column, got {:?}", &out[..3]);
}

#[test]
fn already_square_at_size_is_copied_exactly() {
    let mut rng = mapet::testing::rng("square_copy");
    let img = data_common::noise_rgb(&mut rng, 24, 24);
    let out = preprocess(&png_bytes(&img), 24, None).unwrap();
    assert_eq!(out, img.into_raw());
}

/// Catmull-Rom (a = -0.5).
fn cubic(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.5 * x * x * x - 2.5 * x * x + 1.0
    } else if x < 2.0 {
        -0.5 * x * x * x + 2.5 * x * x - 4.0 * x + 2.0
    } else {
        0.0
    }
}

/// Weights of output pixel `o` over `n_in` inputs for `n_out` outputs: kernel widened by the
/// scale when shrinking, centered at (o + 0.5) * scale, normalised (PIL's bicubic resample).
fn weights(n_in: usize, n_out: usize, o: usize) -> Vec<(usize, f64)> {
    let scale = n_in as f64 / n_out as f64;
    let widen = scale.max(1.0);
    let center = (o as f64 + 0.5) * scale;
    let lo = (center - 2.0 * widen).floor().max(0.0) as usize;
    let hi = ((center + 2.0 * widen).ceil() as usize).min(n_in);
    let w: Vec<(usize, f64)> = (lo..hi).map(|i| (i, cubic((i as f64 + 0.5 - center) / widen))).collect();
    let sum: f64 = w.iter().map(|x| x.1).sum();
    w.into_iter().map(|(i, x)| (i, x / sum)).collect()
}

/// Separable bicubic resize of a square crop, in f64 (the reference).
fn reference_resize(img: &RgbImage, x0: u32, y0: u32, side: usize, size: usize) -> Vec<f64> {
    let mut tmp = vec![0f64; size * side * 3]; // [out_y, in_x, c]
    for oy in 0..size {
        for (iy, wy) in weights(side, size, oy) {
            for ix in 0..side {
                let p = img.get_pixel(x0 + ix as u32, y0 + iy as u32);
                for c in 0..3 {
                    tmp[(oy * side + ix) * 3 + c] += wy * p.0[c] as f64;
                }
            }
        }
    }
    let mut out = vec![0f64; size * size * 3];
    for oy in 0..size {
        for ox in 0..size {
            for (ix, wx) in weights(side, size, ox) {
                for c in 0..3 {
                    out[(oy * size + ox) * 3 + c] += wx * tmp[(oy * side + ix) * 3 + c];
                }
            }
        }
    }
    out
}

#[test]
fn resize_is_catmull_rom_bicubic() {
    let mut rng = mapet::testing::rng("bicubic");
    for (w, h, size) in [(80, 60, 24), (37, 51, 16), (20, 30, 48), (64, 64, 13)] {
        let img = smooth_rgb(&mut rng, w, h);
        let side = w.min(h);
        let got = resize_center_crop(&img, size).into_raw();
        let want = reference_resize(&img, (w - side) / 2, (h - side) / 2, side as usize, size as usize);
        let mut worst = 0f64;
        for (g, r) in got.iter().zip(&want) {
            worst = worst.max((*g as f64 - r.clamp(0.0, 255.0)).abs());
        }
        assert!(worst <= 1.0, "{w}x{h} -> {size}: max |image - reference| = {worst} (> 1 level)");
    }
}

#[test]
fn resize_agrees_with_the_image_crates_catmull_rom() {
    let mut rng = mapet::testing::rng("image_crate_resize");
    for (w, h, size) in [(500, 375, 224), (375, 500, 224), (90, 70, 32), (30, 45, 64)] {
        let img = smooth_rgb(&mut rng, w, h);
        let side = w.min(h);
        let crop = image::imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
        let theirs = image::imageops::resize(&crop, size, size, image::imageops::FilterType::CatmullRom);
        let ours = resize_center_crop(&img, size);
        let worst = ours.iter().zip(theirs.iter()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{w}x{h} -> {size}: differs from image::imageops::resize by {worst} levels");
    }
}

#[test]
fn jitter_off_is_deterministic_and_jitter_follows_the_formulas() {
    let mut rng = mapet::testing::rng("jitter_formulas");
    let img = smooth_rgb(&mut rng, 50, 40);
    let bytes = jpeg_bytes(&img);
    let plain = preprocess(&bytes, 32, None).unwrap();
    assert_eq!(plain, preprocess(&bytes, 32, None).unwrap(), "jitter off: same output twice");
    assert_eq!(plain, resize_center_crop(&decode(&bytes).unwrap(), 32).into_raw());

    // Reference: f64, clamp after each step, round at the end.
    for _ in 0..20 {
        let j = Jitter::sample(&mut rng, JITTER_STRENGTH);
        let mut x: Vec<f64> = plain.iter().map(|&u| u as f64).collect();
        let gray = |p: &[f64]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        for step in j.order {
            match step {
                0 => x.iter_mut().for_each(|v| *v = (*v * j.brightness as f64).clamp(0.0, 255.0)),
                1 => {
                    let m = x.chunks(3).map(gray).sum::<f64>() / (x.len() / 3) as f64;
                    x.iter_mut().for_each(|v| *v = (m + j.contrast as f64 * (*v - m)).clamp(0.0, 255.0));
                }
                _ => {
                    for p in x.chunks_mut(3) {
                        let g = gray(p);
                        p.iter_mut().for_each(|v| *v = (g + j.saturation as f64 * (*v - g)).clamp(0.0, 255.0));
                    }
                }
            }
        }
        let got = preprocess(&bytes, 32, Some(&j)).unwrap();
        for (i, (&g, &r)) in got.iter().zip(&x).enumerate() {
            assert!((g as f64 - r).abs() <= 0.51, "jitter {j:?}: element {i} = {g}, reference {r}");
        }
    }
}

#[test]
fn jitter_steps_do_what_they_say() {
    let mut rng = mapet::testing::rng("jitter_steps");
    let plain = resize_center_crop(&smooth_rgb(&mut rng, 40, 40), 40).into_raw();
    let one = |brightness, contrast, saturation| {
        let mut p = plain.clone();
        color_jitter(&mut p, &Jitter { brightness, contrast, saturation, order: [0, 1, 2] });
        p
    };
    assert_eq!(one(1.0, 1.0, 1.0), plain, "factors of 1 change nothing");
    let gray_mean = |p: &[u8]| {
        p.chunks(3).map(|q| 0.299 * q[0] as f64 + 0.587 * q[1] as f64 + 0.114 * q[2] as f64).sum::<f64>()
            / (p.len() / 3) as f64
    };
    let std = |p: &[u8]| {
        let m = p.iter().map(|&u| u as f64).sum::<f64>() / p.len() as f64;
        (p.iter().map(|&u| (u as f64 - m).powi(2)).sum::<f64>() / p.len() as f64).sqrt()
    };
    // Brightness scales (no clipping at 0.7).
    let dark = one(0.7, 1.0, 1.0);
    for (d, p) in dark.iter().zip(&plain) {
        assert!((*d as f64 - 0.7 * *p as f64).abs() <= 0.51, "{d} vs 0.7 * {p}");
    }
    // Contrast keeps the gray mean (no clipping when shrinking) and shrinks the spread.
    let flat = one(1.0, 0.6, 1.0);
    assert!((gray_mean(&flat) - gray_mean(&plain)).abs() < 0.6);
    assert!((std(&flat) - 0.6 * std(&plain)).abs() < 0.6, "{} vs {}", std(&flat), std(&plain));
    // Saturation 0 gives gray pixels; saturation 1.4 moves channels away from the gray value.
    for p in one(1.0, 1.0, 0.0).chunks(3) {
        assert!(p[0].abs_diff(p[1]) <= 1 && p[1].abs_diff(p[2]) <= 1, "not gray: {p:?}");
    }
    let spread =
        |p: &[u8]| p.chunks(3).map(|q| (*q.iter().max().unwrap() - *q.iter().min().unwrap()) as f64).sum::<f64>();
    assert!(spread(&one(1.0, 1.0, 1.4)) > 1.2 * spread(&plain));
    // Bright factors clip at 255.
    let white = RgbImage::from_pixel(8, 8, Rgb([250, 250, 250])).into_raw();
    let mut w = white.clone();
    color_jitter(&mut w, &Jitter { brightness: 1.4, contrast: 1.0, saturation: 1.0, order: [2, 1, 0] });
    assert!(w.iter().all(|&u| u == 255));
}

#[test]
fn jitter_draws_are_plausible() {
    let mut rng = mapet::testing::rng("jitter_draws");
    let draws: Vec<Jitter> = (0..6000).map(|_| Jitter::sample(&mut rng, JITTER_STRENGTH)).collect();
    for f in [|j: &Jitter| j.brightness, |j: &Jitter| j.contrast, |j: &Jitter| j.saturation] {
        let v: Vec<f32> = draws.iter().map(f).collect();
        assert!(v.iter().all(|&x| (0.6..=1.4).contains(&x)), "factor outside [0.6, 1.4]");
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.015, "mean {mean}");
        // Uniform on a width of 0.8: variance 0.8^2 / 12.
        assert!((var / (0.64 / 12.0) - 1.0).abs() < 0.08, "variance {var}");
    }
    let mut counts = std::collections::HashMap::new();
    for j in &draws {
        let mut sorted = j.order;
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "order is a permutation");
        *counts.entry(j.order).or_insert(0usize) += 1;
    }
    assert_eq!(counts.len(), 6, "all six orders appear");
    for (order, c) in counts {
        assert!((800..1200).contains(&c), "order {order:?} drawn {c} times of 6000");
    }
    // The same generator state gives the same jitter.
    let seed = rng.random::<u64>();
    let a = Jitter::sample(&mut mapet_trainer::data::stream_rng(seed, 3, 7, mapet_trainer::data::Stream::Jitter), 0.4);
    let b = Jitter::sample(&mut mapet_trainer::data::stream_rng(seed, 3, 7, mapet_trainer::data::Stream::Jitter), 0.4);
    let c = Jitter::sample(&mut mapet_trainer::data::stream_rng(seed, 4, 7, mapet_trainer::data::Stream::Jitter), 0.4);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn decode_accepts_real_images_and_refuses_broken_ones() {
    let mut rng = mapet::testing::rng("decode");
    let img = smooth_rgb(&mut rng, 30, 20);
    let jpeg = jpeg_bytes(&img);
    let png = png_bytes(&img);
    assert_eq!(decode(&png).unwrap(), img, "PNG is lossless");
    let d = decode(&jpeg).unwrap();
    assert_eq!(d.dimensions(), (30, 20));
    let err: f64 = d.iter().zip(img.iter()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / d.len() as f64;
    assert!(err < 12.0, "JPEG decodes close to its source (mean abs diff {err})");

    // Trailing bytes after the end-of-image marker are harmless.
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"trailing junk");
    assert!(decode(&trailing).is_ok());

    // Grayscale and RGBA PNGs become RGB.
    let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
    let mut buf = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let g = decode(buf.get_ref()).unwrap();
    assert!(g.pixels().zip(gray.pixels()).all(|(p, q)| p.0 == [q.0[0]; 3]));

    // A thumbnail (a whole JPEG with its own scan and end marker) inside an APP1 segment does not
    // hide a truncated main image; junk with marker bytes after the end marker is harmless.
    let thumb = jpeg_bytes(&smooth_rgb(&mut rng, 8, 8));
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&thumb);
    let mut with_thumb = jpeg[..2].to_vec();
    with_thumb.extend_from_slice(&[0xFF, 0xE1]);
    with_thumb.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    with_thumb.extend_from_slice(&payload);
    with_thumb.extend_from_slice(&jpeg[2..]);
    assert_eq!(decode(&with_thumb).unwrap().dimensions(), (30, 20));
    let e = decode(&with_thumb[..with_thumb.len() - 40]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let mut junk = jpeg.clone();
    junk.extend_from_slice(&[0xFF, 0xDA, 1, 2, 3]);
    assert!(decode(&junk).is_ok());
    let e = decode(&jpeg[..20]).unwrap_err();
    assert!(e.contains("truncated"), "cut in the headers: {e}");

    let truncated = &jpeg[..jpeg.len() * 2 / 3];
    let e = decode(truncated).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = decode(&jpeg[..jpeg.len() - 2]).unwrap_err();
    assert!(e.contains("truncated"), "just the end marker cut: {e}");
    let e = decode(&png[..png.len() / 2]).unwrap_err();
    assert!(e.contains("decode"), "{e}");
    let noise: Vec<u8> = (0..300).map(|_| rng.random()).collect();
    assert!(decode(&noise).is_err());
    assert!(decode(b"plain text, not an image").is_err());
    assert!(decode(&[]).is_err());
    // A JPEG header with garbage data after it.
    let mut garbage = jpeg[..200.min(jpeg.len())].to_vec();
    garbage.extend((0..400).map(|_| rng.random::<u8>()));
    assert!(decode(&garbage).is_err());
}
