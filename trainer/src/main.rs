//! `mapet`: the MaPeT pre-training command.
//!
//! ```text
//! mapet check-step CASE.safetensors --out OUT.safetensors [--device cpu]
//! mapet info
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  mapet check-step CASE.safetensors --out OUT.safetensors [--device cpu|cuda]
      one forward and backward (drop path off) of a case in the golden format; writes out.loss,
      out.logits, out.predicted_index and grads.<name> for every parameter, as f32
  mapet info
      which backend this machine can use, and the resources of every compiled kernel";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check-step") => check_step(&args[1..]),
        Some("info") => info(),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mapet: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `--flag value` pairs from positional arguments; refuses unknown flags.
fn parse_flags(args: &[String], known: &[&str]) -> Result<(Vec<String>, HashMap<String, String>), String> {
    let mut positional = Vec::new();
    let mut flags = HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            if !known.contains(&name) {
                return Err(format!(
                    "unknown flag `--{name}` (known: {})",
                    known.iter().map(|k| format!("--{k}")).collect::<Vec<_>>().join(", ")
                ));
            }
            let value = it.next().ok_or_else(|| format!("flag `--{name}` needs a value"))?;
            flags.insert(name.to_string(), value.clone());
        } else {
            positional.push(a.clone());
        }
    }
    Ok((positional, flags))
}

fn check_step(args: &[String]) -> Result<(), String> {
    let (pos, flags) = parse_flags(args, &["out", "device"])?;
    let [case] = pos.as_slice() else {
        return Err(format!("check-step takes one case file\n{USAGE}"));
    };
    let out = PathBuf::from(flags.get("out").ok_or("check-step needs `--out OUT.safetensors`")?);
    let device = flags.get("device").map(String::as_str).unwrap_or("cpu");
    let case = mapet::model::golden::Case::load(case.as_ref()).map_err(|e| e.to_string())?;
    let result = match device {
        "cpu" => mapet::model::golden::run_cpu(&case),
        "cuda" => mapet::model::golden::run_cuda(&case),
        other => return Err(format!("`--device {other}`: expected cpu or cuda")),
    }
    .map_err(|e| e.to_string())?;
    let loss = result.get("out.loss").map(|l| l[0]).unwrap_or(f32::NAN);
    let meta =
        HashMap::from([("device".to_string(), "cpu".to_string()), ("source".to_string(), case_name(case_path(&pos)))]);
    result.save(&out, meta).map_err(|e| e.to_string())?;
    println!("loss {loss:.6}; wrote {} tensors to {}", result.tensors.len(), out.display());
    Ok(())
}

fn case_path(pos: &[String]) -> &str {
    pos.first().map(String::as_str).unwrap_or("")
}

fn case_name(path: &str) -> String {
    std::path::Path::new(path).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

fn info() -> Result<(), String> {
    match mapet::cuda::unavailable_reason() {
        None => {
            let gpu = mapet::cuda::Gpu::first().map_err(|e| e.to_string())?;
            println!("backend: cuda on {} ({} SMs)", gpu.name(), gpu.sm_count());
        }
        Some(why) => println!("backend: cpu (no GPU: {why})"),
    }
    let kernels = mapet::cuda::report::all();
    if kernels.is_empty() {
        println!("no CUDA kernels compiled into this binary");
    }
    for k in kernels {
        println!(
            "{:<14} {:<34} {:<7} {:>3} regs {:>6} B smem {:>4} B spill",
            k.module,
            k.kernel,
            k.arch,
            k.registers,
            k.shared_bytes,
            k.spill_stores + k.spill_loads
        );
    }
    Ok(())
}
