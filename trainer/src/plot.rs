//! A small PNG line plot of training curves (loss and accuracy against step), drawn into an RGB
//! buffer with a built-in 5x7 bitmap font and written with the `png` crate. No plotting library:
//! two panels, axes with min/max labels, one polyline per series.

use std::io::BufWriter;
use std::path::Path;

const W: usize = 900;
const H: usize = 600;
const BG: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];

/// One curve: a label, a colour and (x, y) points.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: [u8; 3],
    pub points: &'a [(f64, f64)],
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        let mut px = vec![0u8; W * H * 3];
        for c in px.chunks_exact_mut(3) {
            c.copy_from_slice(&BG);
        }
        Canvas { px }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, 2 pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 5x7 font, scaled 2x, top-left at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i as i64 * 12 + col * 2 + ox, y + row as i64 * 2 + oy, c);
                        }
                    }
                }
            }
        }
    }
}

/// Rows of a 5x7 glyph (bit 4 = leftmost column). Unknown characters draw as blanks.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        _ => [0; 7],
    }
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e7 {
        format!("{v:.0}")
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws one panel in the pixel box (x0, y0, x1, y1).
fn panel(cv: &mut Canvas, (x0, y0, x1, y1): (i64, i64, i64, i64), title: &str, series: &[Series<'_>]) {
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    cv.text(x0, y0 - 22, title, AXIS);
    if xmin > xmax {
        return;
    }
    // A single value (one step, a flat curve) sits in the middle of a range around it.
    let widen = |lo: &mut f64, hi: &mut f64| {
        if *hi - *lo < 1e-12 {
            let half = if *lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
            (*lo, *hi) = (*lo - half, *hi + half);
        }
    };
    widen(&mut xmin, &mut xmax);
    widen(&mut ymin, &mut ymax);
    for k in 1..4 {
        let y = y1 - (y1 - y0) * k / 4;
        cv.line((x0, y), (x1, y), GRID);
    }
    cv.line((x0, y1), (x1, y1), AXIS);
    cv.line((x0, y0), (x0, y1), AXIS);
    cv.text(x0 - 4, y1 + 8, &fmt_num(xmin), AXIS);
    let xl = fmt_num(xmax);
    cv.text(x1 - 12 * xl.len() as i64, y1 + 8, &xl, AXIS);
    cv.text(x1 + 8, y1 - 14, &fmt_num(ymin), AXIS);
    cv.text(x1 + 8, y0, &fmt_num(ymax), AXIS);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let fx = (x - xmin) / (xmax - xmin);
        let fy = (y - ymin) / (ymax - ymin);
        (x0 + (fx * (x1 - x0) as f64) as i64, y1 - (fy * (y1 - y0) as f64) as i64)
    };
    for (i, s) in series.iter().enumerate() {
        let finite: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let mut prev: Option<(i64, i64)> = None;
        for &p in &finite {
            let q = to_px(p);
            if let Some(pq) = prev {
                cv.line(pq, q, s.color);
            }
            // A lone point has no line through it: a square marks it.
            if finite.len() == 1 {
                for d in -3..=3 {
                    cv.line((q.0 - 3, q.1 + d), (q.0 + 3, q.1 + d), s.color);
                }
            }
            prev = Some(q);
        }
        cv.text(x0 + 160 + i as i64 * 160, y0 - 22, s.label, s.color);
    }
}

/// Writes a two-panel PNG: loss series on top, accuracy series below, against step.
pub fn write_curves(path: &Path, loss: &[Series<'_>], accuracy: &[Series<'_>]) -> std::io::Result<()> {
    let mut cv = Canvas::new();
    panel(&mut cv, (70, 40, 760, 270), "loss", loss);
    panel(&mut cv, (70, 340, 760, 560), "accuracy", accuracy);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(std::io::Error::other)?;
    writer.write_image_data(&cv.px).map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_decodable_png_with_curves() {
        let dir = std::env::temp_dir().join(format!("mapet-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let loss: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 5.0 * (-(i as f64) / 20.0).exp() + 1.0)).collect();
        let acc: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64 / 60.0)).collect();
        write_curves(
            &path,
            &[Series { label: "train", color: [200, 40, 40], points: &loss }],
            &[Series { label: "train", color: [40, 40, 200], points: &acc }],
        )
        .unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        // The loss curve's colour is present, and more than a few pixels of it.
        let red = buf.chunks_exact(3).filter(|p| p == &[200, 40, 40]).count();
        assert!(red > 200, "only {red} pixels of the loss curve");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_point_is_marked_in_the_middle_of_its_panel() {
        let mut cv = Canvas::new();
        let color = [10, 200, 10];
        let (x0, y0, x1, y1) = (70, 40, 760, 270);
        panel(&mut cv, (x0, y0, x1, y1), "loss", &[Series { label: "eval", color, points: &[(1.0, 4.2)] }]);
        let mut hit = Vec::new();
        for y in (y0 + 1)..y1 {
            for x in (x0 + 1)..x1 {
                let i = (y as usize * W + x as usize) * 3;
                if cv.px[i..i + 3] == color {
                    hit.push((x, y));
                }
            }
        }
        // A marker of several pixels, centred in the plot area (not on an edge, as at the
        // range's end).
        assert!(hit.len() >= 20, "{} pixels", hit.len());
        let (cx, cy) = (
            hit.iter().map(|p| p.0).sum::<i64>() / hit.len() as i64,
            hit.iter().map(|p| p.1).sum::<i64>() / hit.len() as i64,
        );
        assert!((cx - (x0 + x1) / 2).abs() <= 4 && (cy - (y0 + y1) / 2).abs() <= 4, "marker at ({cx}, {cy})");
    }
}
