//! The `mapet` subcommands beyond pre-training, one module each, every one exposing
//! `run(args) -> Result<(), String>` over its arguments (the words after the command name):
//!
//! - [`eval`]: loss and predicted-token accuracy of a checkpoint over a whole image set;
//! - [`export`]: a checkpoint's backbone under timm's ViT names, as safetensors;
//! - [`tokenize`]: k-means visual tokens (pixel or external features) for an image set;
//! - [`bench_data`]: decoding throughput of the data pipeline per thread count;
//! - [`synth`]: a synthetic ImageNet-like image folder and token file for benchmarks.
//!
//! Every error names the flag or file at fault; `-h`/`--help` prints the command's usage.

pub mod bench_data;
pub mod eval;
pub mod export;
pub mod synth;
pub mod tokenize;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::data::ImageIndex;

/// The parsed arguments of a subcommand: `--flag value` pairs (each flag once) and switches.
pub(crate) struct Args {
    flags: HashMap<String, String>,
    switches: Vec<String>,
}

/// Outcome of [`parse`]: the arguments, or a request for the usage text.
pub(crate) enum Parsed {
    Args(Args),
    Help,
}

/// Parses `args` for a command: `valued` flags take a value, `switches` (like `--json`) take none.
/// Refuses positional arguments and unknown flags by name; `-h`/`--help` asks for the usage.
pub(crate) fn parse(command: &str, args: &[String], valued: &[&str], switches: &[&str]) -> Result<Parsed, String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Parsed::Help);
    }
    let mut rest = Vec::with_capacity(args.len());
    let mut on = Vec::new();
    let mut expect_value = false;
    for a in args {
        let name = a.strip_prefix("--");
        if !expect_value && name.is_some_and(|n| switches.contains(&n)) {
            on.push(name.unwrap_or_default().to_string());
            continue;
        }
        expect_value = name.is_some_and(|n| valued.contains(&n));
        rest.push(a.clone());
    }
    let mut known: Vec<&str> = valued.to_vec();
    known.extend_from_slice(switches);
    let (pos, flags) = crate::cli::parse_flags(&rest, &known).map_err(|e| format!("{command}: {e}"))?;
    if let Some(p) = pos.first() {
        return Err(format!("{command} takes no positional argument (got `{p}`); see `mapet {command} --help`"));
    }
    Ok(Parsed::Args(Args { flags, switches: on }))
}

impl Args {
    /// The value of `--name`, if given.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(String::as_str)
    }

    /// The value of `--name`, or an error saying the command needs it (`what` shows its form).
    pub(crate) fn required(&self, command: &str, name: &str, what: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("{command} needs `--{name} {what}`; see `mapet {command} --help`"))
    }

    /// `--name` parsed as a `T`, or `default` when absent; a malformed value names the flag.
    pub(crate) fn number<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: `{v}` is not a valid number")),
        }
    }

    /// `--name` as a positive number (at least 1), or `default`.
    pub(crate) fn positive(&self, name: &str, default: usize) -> Result<usize, String> {
        let v = self.number(name, default)?;
        if v == 0 {
            return Err(format!("--{name}: must be at least 1"));
        }
        Ok(v)
    }

    /// Whether the switch `--name` was given.
    pub(crate) fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }
}

/// The image index of `--data`: a folder (walked and sorted) or a manifest (paths relative to the
/// manifest's folder), as `mapet pretrain` reads it. Errors name the flag and the path.
pub fn open_index(data: &Path) -> Result<ImageIndex, String> {
    open_index_as(data, "--data")
}

/// [`open_index`], its errors naming `origin` (the flag or config key that gave the path).
pub fn open_index_as(data: &Path, origin: &str) -> Result<ImageIndex, String> {
    let index = if data.is_dir() {
        ImageIndex::from_folder(data)
    } else if data.is_file() {
        let root = match data.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        ImageIndex::from_manifest(data, &root)
    } else {
        return Err(format!("{origin}: {}: no such folder or manifest file", data.display()));
    };
    index.map_err(|e| format!("{origin}: {e}"))
}

/// `path` made comparable with another: canonical where it exists, else its folder's canonical
/// form joined with its name (an output not written yet).
pub fn resolved(path: &Path) -> PathBuf {
    // The deepest part of the path that exists, canonical, and the rest (not created yet) after it.
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut head = absolute.as_path();
    loop {
        if let Ok(c) = head.canonicalize() {
            return rest.iter().rev().fold(c, |p, part| p.join(part));
        }
        match (head.parent(), head.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                head = parent;
            }
            _ => return absolute,
        }
    }
}

/// Refuses to write the output `out` (given by `out_flag`) where it would destroy an input of
/// the same command: the very file an `inputs` entry (flag, path) names, or a file inside the
/// folder it names (a checkpoint's).
pub fn refuse_overwriting_inputs(out_flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<(), String> {
    let target = resolved(out);
    for (flag, input) in inputs {
        let input_at = resolved(input);
        let what = if target == input_at {
            "is"
        } else if input.is_dir() && target.starts_with(&input_at) {
            "is inside"
        } else {
            continue;
        };
        return Err(format!(
            "{out_flag} {} {what} {flag} {}, which this command reads: write it elsewhere",
            out.display(),
            input.display()
        ));
    }
    Ok(())
}

/// `path` with its extension replaced by `suffix` (`tokens.npy` + `.report.json` ->
/// `tokens.report.json`).
pub(crate) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}"))
}

/// A JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (`null` for NaN or an infinity, which JSON cannot write).
pub(crate) fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}
