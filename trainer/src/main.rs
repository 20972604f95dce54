//! `mapet`: the MaPeT pre-training command.
//!
//! ```text
//! mapet pretrain [--config FILE.toml] [--data DIR --tokens FILE.npy] [--out DIR] [--resume DIR | --overwrite] ...
//! mapet check-step CASE.safetensors --out OUT.safetensors [--device cpu|cpu-bf16|cuda]
//! mapet eval --checkpoint DIR --data DIR --tokens FILE.npy [--batch N] [--seed S] [--json]
//! mapet export --checkpoint DIR --timm OUT.safetensors
//! mapet tokenize --data DIR --out tokens.npy [--k 8192] [--features pixels|FILE.npy] ...
//! mapet bench-data --data DIR|MANIFEST [--image 224] [--threads 1,2,4,...] [--images N] [--json]
//! mapet synth --out DIR [--images N] [--classes C] [--vocab V] [--grid G] [--seed S]
//! mapet bench [--model vit-b] [--batch N] [--steps N] [--device auto|cpu|cuda] [--json]
//! mapet info
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mapet_trainer::cli;

const USAGE: &str = "usage:
  mapet pretrain [--config FILE.toml] [--data DIR|MANIFEST --tokens FILE.npy] [--out DIR]
                 [--resume DIR | --overwrite] [--device auto|cpu|cuda] [--batch N] [--epochs E]
                 [--seed S] [--set section.key=value ...]
      pre-training; with no --data, the embedded demo (eleven photographs, pixel k-means tokens)
  mapet check-step CASE.safetensors --out OUT.safetensors [--device cpu|cpu-bf16|cuda]
      one forward and backward (drop path off) of a case in the golden format; writes out.loss,
      out.logits, out.predicted_index and grads.<name> for every parameter, as f32; cpu-bf16 is
      the CPU model with the GPU's bf16 roundings emulated. A case with reference outputs is
      compared with them, tensor by tensor (relative error), and fails past 1e-4 on cpu or 2e-2
      on cpu-bf16 and cuda.
  mapet eval --checkpoint DIR --data DIR|MANIFEST --tokens FILE.npy [--batch N] [--seed S]
             [--threads T] [--device auto|cpu|cuda] [--json]
      loss and predicted-token accuracy of a checkpoint over a whole image set (fixed permutations)
  mapet export --checkpoint DIR --timm OUT.safetensors
      a checkpoint's backbone under timm's ViT names (fused qkv; no mask token, no decoder)
  mapet tokenize --data DIR|MANIFEST --out tokens.npy [--k 8192] [--features pixels|FILE.npy]
                 [--image 224] [--patch 16] [--centroids FILE] ...
      k-means visual tokens, rows in index order; centroids and a report beside them
  mapet bench-data --data DIR|MANIFEST [--image 224] [--threads 1,2,4,...] [--images N] [--json]
      data pipeline throughput (images/s) per thread count and per core
  mapet synth --out DIR [--images N] [--classes C] [--vocab V] [--grid G] [--seed S] [--threads T]
      a synthetic ImageNet-like JPEG folder and token file, for benchmarks and smoke tests
  mapet bench [--model vit-t|vit-s|vit-b] [--set model.key=value ...] [--batch N] [--steps N]
              [--warmup N] [--device auto|cpu|cuda] [--peak-tflops T] [--json]
      training-step throughput on synthetic data: images/s, step time, forward / backward /
      optimizer split, model TFLOP/s and MFU, peak memory. Defaults: --model vit-b, --batch 64
      on the GPU and 4 on the CPU, --steps 20 after --warmup 3, --device auto; --json prints
      one JSON object alone on stdout (progress goes to stderr)
  mapet info
      which backend this machine can use, and the resources of every compiled kernel
  mapet COMMAND --help
      the flags of one command";

/// The part of [`USAGE`] about `command` (its usage lines and description), if it is a command.
fn command_usage(command: &str) -> Option<String> {
    let head = format!("  mapet {command}");
    let mut lines = USAGE.lines().skip_while(|l| !(*l == head || l.starts_with(&format!("{head} "))));
    let first = lines.next()?;
    let rest = lines.take_while(|l| !l.starts_with("  mapet "));
    Some(std::iter::once(first).chain(rest).collect::<Vec<_>>().join("\n"))
}

const PRETRAIN_USAGE: &str = "usage: mapet pretrain [--config FILE.toml] [--data DIR|MANIFEST --tokens FILE.npy]
                      [--out DIR] [--resume DIR | --overwrite] [--device auto|cpu|cuda]
                      [--batch N] [--epochs E] [--seed S] [--set section.key=value ...]

Pre-trains MaPeT; with no --config and no --data, on the embedded demo photographs (into
runs/demo). Writes metrics.csv, eval.csv (with a held-out split), curves.png and checkpoint/ into
the output folder.

  --config FILE.toml   the recipe (every key documented in trainer/src/config.rs)
  --data DIR|MANIFEST  training images (data.train); with --tokens FILE.npy (data.tokens)
  --out DIR            the output folder (output.dir; default runs/mapet, runs/demo for the demo)
  --resume DIR         continue the run whose checkpoint folder is DIR (usually OUT/checkpoint),
                       at the very step and image where it stopped, in the folder that holds DIR
                       unless --out or the config's output.dir names another; the recipe is this
                       command's (a change from the checkpoint's is printed), and a run already at
                       its last step trains nothing and changes nothing
  --overwrite          start a new run in an output folder that holds an earlier run's checkpoint
                       or metrics, writing over them (without it such a run is refused, and
                       nothing there changes)
  --device D           train.device: auto (the GPU when usable), cpu or cuda
  --batch N, --epochs E, --seed S
                       train.batch, train.epochs, train.seed
  --set section.key=value
                       any config key (repeatable)

Ctrl-C (or SIGTERM, SIGHUP) finishes the step, writes a checkpoint and exits with status 130.";

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`mapet ... | head`) ends the process as it
    // ends other command-line tools, rather than in a panic on the next print: Rust ignores
    // SIGPIPE by default, which turns it into a write error that println! panics on.
    // SAFETY: restoring a signal's default disposition at the start of main, before any thread
    // exists, has no precondition.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    main_with(&args)
}

/// `mapet` with the arguments `args` (the words after the program's name).
fn main_with(args: &[String]) -> ExitCode {
    // `mapet COMMAND --help` (or -h anywhere after the command) prints that command's usage: here
    // for `check-step`, `bench` and `info`; `pretrain` and the `cmd` modules print their own, longer one.
    let own_help = ["check-step", "bench", "info"];
    let wants_help = args.len() > 1 && args[1..].iter().any(|a| a == "--help" || a == "-h");
    if let Some(command) = args.first().filter(|c| wants_help && own_help.contains(&c.as_str())) {
        return match command_usage(command) {
            Some(usage) => {
                println!("usage:\n{usage}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("mapet: no usage text for `{command}`");
                ExitCode::FAILURE
            }
        };
    }
    let result = match args.first().map(String::as_str) {
        Some("pretrain") => match pretrain(&args[1..]) {
            Ok(Finished::Interrupted) => return ExitCode::from(INTERRUPTED as u8),
            other => other.map(|_| ()),
        },
        Some("check-step") => check_step(&args[1..]),
        Some("bench") => mapet_trainer::cmd_bench::run(&args[1..]),
        Some("info") => match args.get(1) {
            None => info(),
            Some(extra) => Err(format!("info takes no argument (got `{extra}`); see `mapet info --help`")),
        },
        Some("-V" | "--version") => {
            println!("mapet {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        // `mapet help COMMAND`: that command's help, as `mapet COMMAND --help` prints it.
        Some("help") if args.len() == 2 => return main_with(&[args[1].clone(), "--help".into()]),
        Some("eval") => mapet_trainer::cmd::eval::run(&args[1..]),
        Some("export") => mapet_trainer::cmd::export::run(&args[1..]),
        Some("tokenize") => mapet_trainer::cmd::tokenize::run(&args[1..]),
        Some("bench-data") => mapet_trainer::cmd::bench_data::run(&args[1..]),
        Some("synth") => mapet_trainer::cmd::synth::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            mapet_trainer::pretrain::end_progress_line();
            eprintln!("mapet: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_step(args: &[String]) -> Result<(), String> {
    let (pos, flags) = cli::parse_flags(args, &["out", "device"])?;
    let [case] = pos.as_slice() else {
        return Err(format!(
            "check-step takes one case file (got {})\nusage:\n{}",
            pos.len(),
            command_usage("check-step").unwrap_or_default()
        ));
    };
    let out = PathBuf::from(flags.get("out").ok_or("check-step needs `--out OUT.safetensors`")?);
    mapet_trainer::cmd::refuse_overwriting_inputs("--out", &out, &[("the case", case.as_ref())])?;
    let device = flags.get("device").map(String::as_str).unwrap_or("cpu");
    let case = mapet::model::golden::Case::load(case.as_ref()).map_err(|e| e.to_string())?;
    let result = match device {
        "cpu" => mapet::model::golden::run_cpu(&case),
        "cpu-bf16" => mapet::model::golden::run_bf16_emulation(&case),
        "cuda" => mapet::model::golden::run_cuda(&case),
        other => return Err(format!("`--device {other}`: expected cpu, cpu-bf16 or cuda")),
    }
    .map_err(|e| e.to_string())?;
    let loss = result.get("out.loss").map(|l| l[0]).unwrap_or(f32::NAN);
    let meta =
        HashMap::from([("device".to_string(), device.to_string()), ("source".to_string(), case_name(case_path(&pos)))]);
    result.save(&out, meta).map_err(|e| e.to_string())?;
    println!("loss {loss:.6}; wrote {} tensors to {}", result.tensors.len(), out.display());
    if !loss.is_finite() {
        return Err(format!("the loss is {loss}: a weight or pixel of the case is not finite, or the step overflowed"));
    }
    // A golden case carries the reference outputs: compare with them, held to the golden README's bar.
    use mapet::model::golden::{compare, BF16_TOLERANCE, F32_TOLERANCE};
    let Some(rows) = compare(Path::new(case_path(&pos)), &result).map_err(|e| e.to_string())? else {
        println!("the case holds no reference outputs (out.loss, out.logits, grads.*): nothing to compare");
        return Ok(());
    };
    let bar = if device == "cpu" { F32_TOLERANCE } else { BF16_TOLERANCE };
    let over: Vec<_> = rows.iter().filter(|r| r.rel_err > bar || r.rel_err.is_nan()).collect();
    let worst = rows.iter().max_by(|a, b| a.rel_err.total_cmp(&b.rel_err)).expect("a step has outputs");
    for r in rows.iter().filter(|r| ["out.loss", "out.logits", "out.predicted_index"].contains(&r.name.as_str())) {
        println!("  {:<24} relative error {:.3e}", r.name, r.rel_err);
    }
    println!(
        "against the case's reference: worst {} at {:.3e} over {} tensors; {} (the bar for --device {device} is {bar:.0e})",
        worst.name,
        worst.rel_err,
        rows.len(),
        if over.is_empty() { "pass".to_string() } else { format!("FAIL: {} over the bar", over.len()) }
    );
    if over.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = over.iter().map(|r| format!("{} {:.3e}", r.name, r.rel_err)).collect();
    let n = mapet_trainer::say::count(over.len() as u64, "tensor", "tensors");
    Err(format!("{n} beyond the relative error bar {bar:.0e}: {}", list.join(", ")))
}

fn pretrain(args: &[String]) -> Result<Finished, String> {
    use mapet_trainer::config::PretrainConfig;
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{PRETRAIN_USAGE}");
        return Ok(Finished::Done);
    }
    // `--overwrite` is a switch (no value); every other flag takes one.
    let mut overwrite = false;
    let mut rest = Vec::with_capacity(args.len());
    let mut expect_value = false;
    for a in args {
        if !expect_value && a == "--overwrite" {
            overwrite = true;
            continue;
        }
        expect_value = !expect_value && a.starts_with("--");
        rest.push(a.clone());
    }
    let known = ["config", "data", "tokens", "out", "resume", "device", "batch", "epochs", "seed", "set", "overwrite"];
    let (pos, flags) = cli::parse_flags_all(&rest, &known)?;
    if let Some(p) = pos.first() {
        return Err(format!(
            "pretrain takes no positional argument (got `{p}`); use --data DIR; see `mapet pretrain --help`"
        ));
    }
    let get = |k: &str| flags.iter().rev().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    if overwrite && get("resume").is_some() {
        return Err("--resume continues a run and --overwrite starts one over: give one of them".into());
    }
    let demo = get("config").is_none() && get("data").is_none();
    let resume = get("resume").map(PathBuf::from);
    let config_file = get("config").map(PathBuf::from);
    // A run outlives its stdout: a write to a pipe whose reader quit fails (rather than ending the
    // process, as main set SIGPIPE up for the short commands), and the loop then stops with a
    // checkpoint (mapet_trainer::say).
    // SAFETY: ignoring a signal has no precondition.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // A resumed run goes on in the folder that holds its checkpoint, unless --out or the config
    // file's output.dir says otherwise.
    let file_sets_out = config_file.as_deref().is_some_and(|f| PretrainConfig::file_sets(f, "output", "dir"));
    let resumed_out = resume
        .as_deref()
        .filter(|_| get("out").is_none() && !file_sets_out)
        .map(mapet_trainer::pretrain::run_folder_of);
    let out = match (get("out"), &resumed_out) {
        (Some(out), _) => PathBuf::from(out),
        (None, Some(folder)) => folder.clone(),
        (None, None) => PathBuf::from(if demo { "runs/demo" } else { "runs/mapet" }),
    };
    let mut cfg = match &config_file {
        Some(path) => PretrainConfig::from_file(path)?,
        None if demo => mapet_trainer::demo::config(&out),
        None => PretrainConfig::default(),
    };
    // Which flag set which key, so that a value out of range is blamed on the flag (or else on
    // the config file) that gave it.
    let mut sources: Vec<(String, String)> = Vec::new();
    if get("out").is_some() || demo || resumed_out.is_some() {
        cfg.output.dir = out;
        let flag = if resumed_out.is_some() { "--resume" } else { "--out" };
        sources.push(("output.dir".into(), flag.into()));
    }
    if let Some(d) = get("data") {
        cfg.data.train = Some(d.into());
        sources.push(("data.train".into(), "--data".into()));
    }
    if let Some(t) = get("tokens") {
        cfg.data.tokens = Some(t.into());
        sources.push(("data.tokens".into(), "--tokens".into()));
    }
    for (flag, key) in
        [("device", "train.device"), ("batch", "train.batch"), ("epochs", "train.epochs"), ("seed", "train.seed")]
    {
        if let Some(v) = get(flag) {
            let value = if flag == "device" { format!("{v:?}") } else { v.clone() };
            cfg.set_key(key, &value).map_err(|e| format!("--{flag} {v}: {e}"))?;
            sources.push((key.into(), format!("--{flag} {v}")));
        }
    }
    for (_, assignment) in flags.iter().filter(|(f, _)| f == "set") {
        cfg.set(assignment)?;
        let key = assignment.split_once('=').map(|(k, _)| k.trim()).unwrap_or_default();
        sources.push((key.into(), format!("--set {assignment}")));
    }
    cfg.validate().map_err(|e| PretrainConfig::blame(&e, &sources, config_file.as_deref()))?;
    if cfg.train.device == "cuda" {
        if let Some(why) = mapet::cuda::unavailable_reason() {
            return Err(format!("train.device = \"cuda\", but no GPU is usable here: {why}"));
        }
    }
    // A config file that names no data does not fall back to the demo's photographs.
    if let (Some(file), None) = (&config_file, &cfg.data.train) {
        return Err(format!(
            "{}: data.train and data.tokens are not set: give them there, or `--data DIR|MANIFEST --tokens FILE.npy` \
             (the demo runs with no --config and no --data)",
            file.display()
        ));
    }
    // A checkpoint to resume is checked before anything is prepared or written (the demo writes
    // its images into the output folder, which --resume may have chosen).
    if let Some(dir) = &resume {
        let saved = mapet::model::checkpoint::read_config(dir).map_err(|e| format!("--resume: {e}"))?;
        let model = cfg.model_config()?;
        if saved != model {
            let differ: Vec<String> = saved
                .fields()
                .into_iter()
                .zip(model.fields())
                .filter(|(a, b)| a.1 != b.1)
                .map(|((name, there), (_, here))| format!("{name} {there} there, {here} here"))
                .collect();
            let how = if demo {
                "it is not the demo's model: give the run's --config, or its --data, --tokens and --set model.* keys"
            } else {
                "give the run's --config, or the --set model.* keys it was trained with"
            };
            return Err(format!(
                "--resume {}: the checkpoint is of another model than this command's ({}); {how}",
                dir.display(),
                differ.join(", ")
            ));
        }
    }
    // A new run that would write over an earlier one is refused before any data is prepared (a
    // resumed one once its checkpoint has loaded, so that a bad checkpoint is named first).
    let opts = mapet_trainer::pretrain::RunOptions { resume: resume.as_deref(), overwrite, stop_after: None };
    // (The demo resumed is checked too, before it writes its images into the folder: into its own
    // it passes, into another holding a run it is refused.)
    if resume.is_none() || demo {
        mapet_trainer::pretrain::check_output_folder(&cfg.output.dir, opts)?;
    }
    // Where the data paths came from, for the errors about them.
    let origin = |key: &str, path: &Path| match (sources.iter().rev().find(|(k, _)| k == key), &config_file) {
        (Some((_, flag)), _) => flag.clone(),
        // A relative path in the file is taken from the current folder, not the file's.
        (None, Some(file)) if path.is_relative() => {
            format!("{key} in {} (relative to the current folder)", file.display())
        }
        (None, Some(file)) => format!("{key} in {}", file.display()),
        (None, None) => key.to_string(),
    };
    let data = match (&cfg.data.train, &cfg.data.tokens) {
        (Some(train), Some(tokens)) => {
            let model = cfg.model_config()?;
            let index = mapet_trainer::cmd::open_index_as(train, &origin("data.train", train))?;
            let tokens = mapet_trainer::data::Tokens::load_for(tokens, &index, &model)
                .map_err(|e| format!("{}: {e}", origin("data.tokens", tokens)))?;
            mapet_trainer::pretrain::DataSource { index, tokens, eval: None }
        }
        _ => mapet_trainer::demo::prepare(&cfg)?,
    };
    let data = mapet_trainer::pretrain::with_eval_split(&cfg, data)?;
    // Ctrl-C, and the SIGTERM (or SIGHUP) a job scheduler or `timeout` sends, stop the run after
    // its step with a checkpoint; a second one exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A signal ignored when the run started stays ignored: SIGHUP under `nohup`, SIGINT in a
    // background job of a script.
    let ignored = ignored_signals();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(INTERRUPTED);
        }
        eprintln!("\ninterrupted (Ctrl-C or a termination signal): finishing this step, then writing a checkpoint (once more to exit now)");
    })
    .map_err(|e| format!("cannot install the interrupt handler: {e}"))?;
    restore_ignored(&ignored);
    let summary = mapet_trainer::pretrain::run_with(&cfg, data, opts, stop)?;
    if summary.steps == summary.start_step && summary.interrupted {
        mapet_trainer::say!("stopped before its first step; nothing was trained");
        return Ok(Finished::Interrupted);
    }
    if summary.steps == summary.start_step {
        mapet_trainer::say!(
            "nothing to train: the checkpoint is at step {}, {} this run's {} steps (raise --epochs to train on); \
             the checkpoint and metrics in {} are unchanged",
            summary.steps,
            if summary.steps == summary.total_steps { "the end of" } else { "past" },
            summary.total_steps,
            summary.out_dir.display()
        );
        return Ok(Finished::Done);
    }
    mapet_trainer::say!(
        "{} after {}: loss {} (first step {}); metrics.csv, curves.png and checkpoint/ in {}",
        if summary.interrupted { "stopped" } else { "done" },
        mapet_trainer::say::count(summary.steps, "step", "steps"),
        mapet_trainer::pretrain::fmt_loss(summary.last_loss),
        mapet_trainer::pretrain::fmt_loss(summary.first_loss),
        summary.out_dir.display()
    );
    Ok(if summary.interrupted { Finished::Interrupted } else { Finished::Done })
}

/// The signals among SIGINT, SIGTERM and SIGHUP (those the interrupt handler takes) that this
/// process ignores.
#[cfg(unix)]
fn ignored_signals() -> Vec<i32> {
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .into_iter()
        .filter(|&sig| {
            // SAFETY: sigaction with a null new action only reads the current one into `old`,
            // a zeroed struct of the right type.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
            }
        })
        .collect()
}

/// Ignores `signals` again (after the interrupt handler was installed for all three).
#[cfg(unix)]
fn restore_ignored(signals: &[i32]) {
    for &sig in signals {
        // SAFETY: ignoring a signal has no precondition.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

#[cfg(not(unix))]
fn ignored_signals() -> Vec<i32> {
    Vec::new()
}

#[cfg(not(unix))]
fn restore_ignored(_: &[i32]) {}

/// The exit status of a run stopped by an interrupt (with its checkpoint written, or without on
/// a second one), as a shell reports a command that SIGINT ended: so a job script can tell it
/// from a run that finished.
const INTERRUPTED: i32 = 130;

/// How `mapet pretrain` ended.
enum Finished {
    Done,
    Interrupted,
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
        return Ok(());
    }
    let module_w = kernels.iter().map(|k| k.module.len()).max().unwrap_or(0).max("module".len());
    let kernel_w = kernels.iter().map(|k| k.kernel.len()).max().unwrap_or(0).max("kernel".len());
    println!(
        "{:<module_w$} {:<kernel_w$} {:<7} {:>9} {:>13} {:>11}",
        "module", "kernel", "arch", "registers", "static smem", "spill bytes"
    );
    for k in &kernels {
        println!(
            "{:<module_w$} {:<kernel_w$} {:<7} {:>9} {:>11} B {:>9} B",
            k.module,
            k.kernel,
            k.arch,
            k.registers,
            k.shared_bytes,
            k.spill_stores + k.spill_loads
        );
    }
    println!(
        "(ptxas's report: shared memory set at launch is not in it; the sm_80 code of a kernel that needs \
         compute capability 9.0, wgmma or TMA, is a stub that traps, which no launcher picks)"
    );
    Ok(())
}
