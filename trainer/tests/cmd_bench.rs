//! `mapet bench`: a CPU run of a tiny model through the binary (its JSON has every field, with
//! sane values), the FLOP formula against ViT-B's figure and a hand count, and bad flags named in
//! their errors.

mod data_common;

use std::collections::HashMap;
use std::process::Command;

use mapet::model::ModelConfig;
use mapet_trainer::cmd_bench::{flops_per_image, parse_args, peak_tflops_for, run, BenchDevice};

/// A flat JSON object's values: numbers as `Num`, strings as `Str`, `null` as `Null`.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Num(f64),
    Str(String),
    Null,
}

/// Parses one flat JSON object (no nesting, no arrays: what `--json` prints); panics otherwise.
fn parse_flat_json(text: &str) -> HashMap<String, Value> {
    let s: Vec<char> = text.trim().chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    let string = |i: &mut usize| -> String {
        assert_eq!(s[*i], '"', "expected a string at {i}");
        *i += 1;
        let mut out = String::new();
        while s[*i] != '"' {
            if s[*i] == '\\' {
                *i += 1;
                match s[*i] {
                    'n' => out.push('\n'),
                    'u' => {
                        let hex: String = s[*i + 1..*i + 5].iter().collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                        *i += 4;
                    }
                    c => out.push(c),
                }
            } else {
                out.push(s[*i]);
            }
            *i += 1;
        }
        *i += 1;
        out
    };
    let mut map = HashMap::new();
    skip_ws(&mut i);
    assert_eq!(s[i], '{', "not a JSON object: {text}");
    i += 1;
    loop {
        skip_ws(&mut i);
        if s[i] == '}' {
            break;
        }
        let key = string(&mut i);
        skip_ws(&mut i);
        assert_eq!(s[i], ':', "expected ':' after {key}");
        i += 1;
        skip_ws(&mut i);
        let value = if s[i] == '"' {
            Value::Str(string(&mut i))
        } else {
            let start = i;
            while i < s.len() && !matches!(s[i], ',' | '}') && !s[i].is_whitespace() {
                i += 1;
            }
            let token: String = s[start..i].iter().collect();
            if token == "null" {
                Value::Null
            } else {
                Value::Num(token.parse().unwrap_or_else(|_| panic!("{key}: bad number {token:?}")))
            }
        };
        assert!(map.insert(key.clone(), value).is_none(), "duplicate key {key}");
        skip_ws(&mut i);
        match s[i] {
            ',' => i += 1,
            '}' => break,
            c => panic!("unexpected {c:?} after {key}"),
        }
    }
    assert_eq!(i + 1, s.len(), "trailing text after the object");
    map
}

fn tiny_args() -> Vec<String> {
    [
        "bench",
        "--device",
        "cpu",
        "--model",
        "vit-t",
        "--set",
        "model.image=32",
        "--set",
        "model.patch=8",
        "--set",
        "model.dim=64",
        "--set",
        "model.depth=2",
        "--set",
        "model.heads=1",
        "--set",
        "model.vocab=32",
        "--set",
        "model.context=5",
        "--batch",
        "4",
        "--set",
        "train.micro_batches=2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn cpu_bench_prints_json_with_every_field() {
    let out = Command::new(data_common::mapet_bin()).args(tiny_args()).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "mapet bench failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    let j = parse_flat_json(&stdout);
    let num = |k: &str| match j.get(k) {
        Some(Value::Num(x)) => *x,
        other => panic!("{k}: expected a number, got {other:?}"),
    };
    let keys = [
        "device",
        "device_name",
        "image",
        "patch",
        "dim",
        "depth",
        "heads",
        "vocab",
        "context",
        "params",
        "batch",
        "micro_batches",
        "steps",
        "warmup",
        "images_per_s",
        "step_ms",
        "step_ms_min",
        "step_ms_max",
        "forward_ms",
        "backward_ms",
        "optimizer_ms",
        "gflop_per_image",
        "tflops",
        "peak_tflops",
        "mfu",
        "peak_memory_bytes",
        "memory_measure",
        "model_device_bytes",
        "optimizer_device_bytes",
        "loss_first",
        "loss_last",
        "kernels",
        "gemm_tuned_configurations",
        "gemm_algorithms",
    ];
    for k in keys {
        assert!(j.contains_key(k), "field {k} missing");
    }
    assert_eq!(j.len(), keys.len(), "unexpected fields: {:?}", j.keys().filter(|k| !keys.contains(&k.as_str())));
    assert_eq!(j["device"], Value::Str("cpu".into()));
    // The kernel choices and GEMM tuning are the GPU's.
    assert_eq!(j["kernels"], Value::Null);
    assert_eq!(j["gemm_tuned_configurations"], Value::Num(0.0));
    // No cuBLASLt on the CPU: no algorithm to report.
    assert_eq!(j["gemm_algorithms"], Value::Str(String::new()));
    let cfg = ModelConfig { image: 32, patch: 8, dim: 64, depth: 2, heads: 1, vocab: 32, context: 5 };
    for (k, want) in [
        ("image", 32.0),
        ("patch", 8.0),
        ("dim", 64.0),
        ("depth", 2.0),
        ("heads", 1.0),
        ("vocab", 32.0),
        ("context", 5.0),
        ("batch", 4.0),
        ("micro_batches", 2.0),
        ("steps", 3.0),
        ("warmup", 1.0),
    ] {
        assert_eq!(num(k), want, "{k}");
    }
    let layout = mapet::model::ParamLayout::new(cfg).unwrap();
    assert_eq!(num("params"), layout.num_params() as f64);

    let step = num("step_ms");
    assert!(step > 0.0 && num("images_per_s") > 0.0);
    assert!((num("images_per_s") - 4.0 / (step * 1e-3)).abs() <= 1e-6 * num("images_per_s"));
    assert!(num("step_ms_min") <= step && step <= num("step_ms_max"));
    // The phases are those of the median step (3 steps: the middle one), and on the CPU a step's
    // backward is the step less the forward and the optimizer: they add up to the step, unless
    // noise made the separate forward pass slower than a whole step (backward then reads 0).
    let phases = [num("forward_ms"), num("backward_ms"), num("optimizer_ms")];
    assert!(num("forward_ms") > 0.0 && num("optimizer_ms") > 0.0, "every phase takes time: {phases:?}");
    let sum: f64 = phases.iter().sum();
    assert!(
        (sum - step).abs() <= 1e-9 * step || num("backward_ms") == 0.0,
        "phases sum to {sum:.6} ms, step {step:.6} ms"
    );

    let flops = flops_per_image(&cfg);
    assert!((num("gflop_per_image") - flops.total / 1e9).abs() <= 1e-9 * flops.total);
    let tflops = flops.total * 4.0 / (step * 1e-3) / 1e12;
    assert!((num("tflops") - tflops).abs() <= 1e-6 * tflops);
    // No MFU on the CPU, no device memory; the host's peak resident set instead.
    for k in ["peak_tflops", "mfu", "model_device_bytes", "optimizer_device_bytes"] {
        assert_eq!(j[k], Value::Null, "{k}");
    }
    if cfg!(target_os = "linux") {
        assert!(num("peak_memory_bytes") > 1e6, "peak resident set {}", num("peak_memory_bytes"));
    }
    // Loss near ln(vocab) for a fresh model.
    for k in ["loss_first", "loss_last"] {
        let l = num(k);
        assert!(l.is_finite() && (l - 32f64.ln()).abs() < 1.0, "{k} = {l}");
    }
}

#[test]
fn text_report_runs() {
    let mut args = tiny_args();
    args.retain(|a| a != "--json");
    let out = Command::new(data_common::mapet_bin()).args(&args).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["images/s", "forward", "backward", "optimizer", "GFLOP/image", "no MFU on the CPU", "peak memory"] {
        assert!(stdout.contains(want), "`{want}` missing from:\n{stdout}");
    }
}

#[test]
fn flop_formula_gives_vit_b_about_255_gflop() {
    let f = flops_per_image(&ModelConfig::VIT_B);
    eprintln!("ViT-B: {f:?}");
    // N = 197, P = 147, R = 491, L = 344, D = 768.
    let d2 = 768.0f64 * 768.0;
    let gemm = 2.0 * 196.0 * 768.0 * 768.0 + 12.0 * (20.0 * 491.0 + 4.0 * 344.0) * d2 + 2.0 * 147.0 * 768.0 * 8192.0;
    let attention = 12.0 * 4.0 * 12.0 * 491.0 * 197.0 * 64.0;
    assert!((f.forward_gemm - gemm).abs() <= 1e-9 * gemm);
    assert!((f.forward_attention - attention).abs() <= 1e-9 * attention);
    assert!((f.total - (3.0 * gemm + 3.5 * attention)).abs() <= 1e-9 * f.total);
    assert!((f.forward + f.backward - f.total).abs() <= 1e-9 * f.total);
    let total = f.total / 1e9;
    assert!((total - 255.0).abs() < 0.02 * 255.0, "ViT-B: {total:.1} GFLOP/image, the issue quotes ~255");
    assert!((total - 256.45).abs() < 0.01, "ViT-B: {total:.2} GFLOP/image (module notes: 256.45)");

    // A small config counted by hand: image 16, patch 8 (N = 5), C = 2 (P = 3, R = 11, L = 8),
    // D = 64, H = 1, depth 1, V = 10.
    let cfg = ModelConfig { image: 16, patch: 8, dim: 64, depth: 1, heads: 1, vocab: 10, context: 2 };
    let f = flops_per_image(&cfg);
    let patch = 2.0 * 4.0 * 192.0 * 64.0;
    let blocks = (2.0 * 11.0 + 4.0 * 8.0 + 2.0 * 11.0 + 8.0 * 11.0 + 8.0 * 11.0) * 64.0 * 64.0;
    let decoder = 2.0 * 3.0 * 64.0 * 10.0;
    assert_eq!(f.forward_gemm, patch + blocks + decoder);
    assert_eq!(f.forward_attention, 4.0 * 11.0 * 5.0 * 64.0);
    assert_eq!(f.backward, 2.0 * f.forward_gemm + 2.5 * f.forward_attention);

    // Smaller models, fewer FLOPs.
    let t = flops_per_image(&ModelConfig::VIT_T).total;
    let s = flops_per_image(&ModelConfig::VIT_S).total;
    assert!(t < s && s < flops_per_image(&ModelConfig::VIT_B).total);
}

#[test]
fn device_peaks() {
    assert_eq!(peak_tflops_for("NVIDIA H100 80GB HBM3"), Some(989.0));
    assert_eq!(peak_tflops_for("NVIDIA H200"), Some(989.0));
    assert_eq!(peak_tflops_for("NVIDIA H100 PCIe"), Some(756.0));
    assert_eq!(peak_tflops_for("NVIDIA A100-SXM4-80GB"), Some(312.0));
    assert_eq!(peak_tflops_for("NVIDIA GeForce RTX 4090"), None);
}

#[test]
fn flags_parse_and_bad_ones_are_named() {
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let o = parse_args(&args(&["--model", "vit-s", "--batch", "8", "--steps", "5", "--device", "cpu"])).unwrap();
    assert_eq!((o.config.model.preset.as_str(), o.config.train.batch, o.steps, o.warmup), ("vit-s", 8, 5, 3));
    assert_eq!((o.device, o.batch_given, o.json), (BenchDevice::Cpu, true, false));
    let o = parse_args(&args(&["--json", "--set", "train.batch=16", "--set", "model.depth=4"])).unwrap();
    assert!(o.json && o.batch_given);
    assert_eq!((o.config.train.batch, o.config.model_config().unwrap().depth, o.steps), (16, 4, 20));
    assert_eq!(o.device, BenchDevice::Auto);
    assert!(!parse_args(&[]).unwrap().batch_given);

    for (bad, name) in [
        (&["--steps", "0"][..], "--steps"),
        (&["--steps", "many"][..], "--steps"),
        (&["--warmup", "-1"][..], "--warmup"),
        (&["--batch", "0"][..], "--batch"),
        (&["--device", "tpu"][..], "--device"),
        (&["--model", "vit-q"][..], "--model"),
        (&["--peak-tflops", "0"][..], "--peak-tflops"),
        (&["--frob", "1"][..], "--frob"),
        (&["--steps"][..], "--steps"),
        (&["--set", "model.nosuch=3"][..], "nosuch"),
        (&["--set", "train.drop_path=2"][..], "drop_path"),
        (&["--batch", "6", "--set", "train.micro_batches=4"][..], "micro_batches"),
        (&["extra"][..], "extra"),
    ] {
        let err = run(&args(bad)).expect_err(&format!("{bad:?} must be refused"));
        assert!(err.contains(name), "{bad:?}: the error should name {name}: {err}");
    }
}

/// The GPU path through the binary: a tiny head-dim-64 model (skips without a GPU).
#[test]
fn gpu_bench_prints_json_with_device_fields() {
    let test = "gpu_bench_prints_json_with_device_fields";
    if mapet::testing::gpu_or_skip(test).is_none() {
        return;
    }
    let mut args = tiny_args();
    for (from, to) in [("cpu", "cuda"), ("model.dim=64", "model.dim=128"), ("model.heads=1", "model.heads=2")] {
        let i = args.iter().position(|a| a == from).unwrap();
        args[i] = to.into();
    }
    let out = Command::new(data_common::mapet_bin()).args(&args).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "mapet bench failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    let j = parse_flat_json(&stdout);
    let num = |k: &str| match j.get(k) {
        Some(Value::Num(x)) => *x,
        other => panic!("{k}: expected a number, got {other:?}"),
    };
    assert_eq!(j["device"], Value::Str("cuda".into()));
    let step = num("step_ms");
    assert!(step > 0.0 && num("images_per_s") > 0.0);
    let phases = [num("forward_ms"), num("backward_ms"), num("optimizer_ms")];
    assert!(phases.iter().all(|&p| p > 0.0), "every phase takes time: {phases:?}");
    let sum: f64 = phases.iter().sum();
    assert!((sum - step).abs() <= 0.35 * step, "phases sum to {sum:.3} ms, step {step:.3} ms");
    let state = num("model_device_bytes") + num("optimizer_device_bytes");
    assert!(
        num("peak_memory_bytes") >= 0.9 * state,
        "peak {} below the model and optimizer's {state}",
        num("peak_memory_bytes")
    );
    if let Value::Str(name) = &j["device_name"] {
        match peak_tflops_for(name) {
            Some(peak) => {
                assert_eq!(num("peak_tflops"), peak);
                assert!((num("mfu") - num("tflops") / peak).abs() <= 1e-9);
            }
            None => assert_eq!(j["mfu"], Value::Null),
        }
    }
    for k in ["loss_first", "loss_last"] {
        let l = num(k);
        assert!(l.is_finite() && (l - 32f64.ln()).abs() < 1.0, "{k} = {l}");
    }
    // Every GEMM configuration of the step, led by the pin of the algorithm it ran, as
    // MAPET_GEMM_PIN takes it (MxNxK=@CONFIG).
    let Value::Str(algorithms) = &j["gemm_algorithms"] else { panic!("gemm_algorithms: {:?}", j["gemm_algorithms"]) };
    let lines: Vec<&str> = algorithms.lines().collect();
    assert!(lines.len() >= 4, "a step runs more GEMM configurations than {lines:?}");
    for line in lines {
        let pin = line.split(": ").next().unwrap();
        let pins =
            mapet::cuda::gemm::parse_pins(pin).unwrap_or_else(|e| panic!("{line:?} does not start with a pin: {e}"));
        assert!(matches!(pins[..], [(_, mapet::cuda::gemm::PinChoice::Config(_))]), "{line:?}");
    }
}
