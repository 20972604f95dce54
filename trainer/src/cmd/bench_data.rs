//! `mapet bench-data`: decoding throughput of the data pipeline ([`crate::data::bench_data`]):
//! images per second through read, decode, crop, resize, jitter and batch assembly, for each
//! thread count, and per core (per decoder thread).

use std::path::PathBuf;

use super::{json_f64, open_index, parse, Parsed};
use crate::data::bench_data;

/// The command's usage.
pub const USAGE: &str = "usage: mapet bench-data --data DIR|MANIFEST [--image 224] [--threads 1,2,4,8,16]
                        [--images 512] [--json]
  Images per second of the data pipeline (read, decode, center crop, resize, jitter, batching) for
  each decoder thread count, and per core; files are read once first so the page cache is warm.
  --images N   how many images, spread evenly over the index (default 512; all when fewer)
  --json       print one JSON object per thread count (one per line) instead of the table";

/// Parses `--threads 1,2,4`: positive counts, comma-separated.
pub fn parse_threads(list: &str) -> Result<Vec<usize>, String> {
    list.split(',')
        .map(|t| match t.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("--threads {list}: `{t}` is not a positive thread count (expected e.g. 1,2,4,8)")),
        })
        .collect()
}

/// Runs `mapet bench-data` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let a = match parse("bench-data", args, &["data", "image", "threads", "images"], &["json"])? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Args(a) => a,
    };
    let data = PathBuf::from(a.required("bench-data", "data", "DIR")?);
    let image = a.positive("image", 224)?;
    let threads = parse_threads(a.get("threads").unwrap_or("1,2,4,8,16"))?;
    let images = a.positive("images", 512)?;
    let json = a.switch("json");
    let index = open_index(&data)?;
    let rows = bench_data(&index, image, &threads, images).map_err(|e| e.to_string())?;
    if !json {
        println!(
            "bench-data: {} images of {} at {image}px; {} cores on this machine",
            rows.first().map_or(0, |r| r.images + r.skipped),
            data.display(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        println!(
            "{:>8} {:>8} {:>8} {:>10} {:>12} {:>14}",
            "threads", "images", "skipped", "seconds", "images/s", "images/s/core"
        );
    }
    for r in &rows {
        let per_core = r.images_per_s / r.threads as f64;
        if json {
            println!(
                "{{\"threads\": {}, \"images\": {}, \"skipped\": {}, \"seconds\": {}, \"images_per_s\": {}, \
                 \"images_per_s_per_core\": {}}}",
                r.threads,
                r.images,
                r.skipped,
                json_f64(r.seconds),
                json_f64(r.images_per_s),
                json_f64(per_core)
            );
        } else {
            println!(
                "{:>8} {:>8} {:>8} {:>10.3} {:>12.1} {:>14.1}",
                r.threads, r.images, r.skipped, r.seconds, r.images_per_s, per_core
            );
        }
    }
    Ok(())
}
