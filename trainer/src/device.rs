//! The device choice `auto | cpu | cuda` shared by `mapet pretrain` (`train.device`), `mapet
//! eval` and `mapet tokenize` (`--device`), and the one policy they apply:
//!
//! - `cpu`: the CPU variant.
//! - `cuda`: the GPU variant, or its error prefixed with the setting (`--device cuda: ...`,
//!   `train.device = "cuda": ...`).
//! - `auto`: the CPU variant when no GPU is usable ([`mapet::cuda::unavailable_reason`]), with a
//!   note saying why; else the GPU variant, falling back to the CPU (with a note saying why) when
//!   the GPU variant refuses the work with [`mapet::Error::Unsupported`]. Any other GPU error is
//!   an error: a GPU that is present but broken is not silently replaced.
//!
//! Any other value is refused, naming the setting and the accepted values.
//!
//! [`select`] prints nothing: it returns the fallback note, and each command prints it on the
//! stream its progress goes to. `pretrain` and `tokenize` log to stdout, so the note goes there;
//! `eval`'s stdout is its result (JSON with `--json`), so its note goes to stderr.

use std::fmt;

/// Where a device choice was given, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// A command-line flag, e.g. `--device`: messages read `--device tpu: ...`.
    Flag(&'static str),
    /// A config key, e.g. `train.device`: messages read `train.device = "tpu": ...`.
    Key(&'static str),
}

impl Setting {
    /// The setting with `value`, as messages name it.
    pub fn with_value(self, value: &str) -> String {
        match self {
            Setting::Flag(flag) => format!("{flag} {value}"),
            Setting::Key(key) => format!("{key} = {value:?}"),
        }
    }
}

/// Where to run: a GPU when one is usable (`auto`), the CPU, or a GPU or nothing (`cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// The accepted values, as messages list them.
    pub const EXPECTED: &'static str = "expected auto, cpu or cuda";

    /// Parses `value` given as `setting`; anything but `auto`, `cpu` or `cuda` is an error naming
    /// the setting and the accepted values.
    pub fn parse(value: &str, setting: Setting) -> Result<Self, String> {
        match value {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("{}: {}", setting.with_value(other), Self::EXPECTED)),
        }
    }

    /// The value's name: `auto`, `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`select`] returns: the variant built and the note saying why `auto` fell back to the
/// CPU, if it did; or the error.
pub type Selection<T> = Result<(T, Option<String>), String>;

/// Builds the variant `device` selects (see the module's policy): `gpu` builds the GPU variant
/// from `input` (borrowing it, e.g. to copy it to the device), `cpu` the CPU variant (taking it).
/// Each builder runs at most once; `gpu` never runs when no GPU is usable under `auto`, nor for
/// `cpu`. Returns the variant and, when `auto` fell back to the CPU, a one-line note saying why
/// (for the caller to print).
pub fn select<S, T>(
    device: Device,
    setting: Setting,
    input: S,
    gpu: impl FnOnce(&S) -> mapet::Result<T>,
    cpu: impl FnOnce(S) -> Result<T, String>,
) -> Selection<T> {
    select_with(device, setting, mapet::cuda::unavailable_reason(), input, gpu, cpu)
}

/// [`select`] with the answer of [`mapet::cuda::unavailable_reason`] given.
fn select_with<S, T>(
    device: Device,
    setting: Setting,
    unavailable: Option<String>,
    input: S,
    gpu: impl FnOnce(&S) -> mapet::Result<T>,
    cpu: impl FnOnce(S) -> Result<T, String>,
) -> Selection<T> {
    let named = setting.with_value(device.name());
    match device {
        Device::Cpu => Ok((cpu(input)?, None)),
        Device::Cuda => gpu(&input).map(|v| (v, None)).map_err(|e| format!("{named}: {e}")),
        Device::Auto => {
            if let Some(why) = unavailable {
                return Ok((cpu(input)?, Some(format!("{named}: no GPU ({why}): using the CPU"))));
            }
            match gpu(&input) {
                Ok(v) => Ok((v, None)),
                Err(e @ mapet::Error::Unsupported { .. }) => {
                    let note = format!("{named}: a GPU is present, but it cannot run this ({e}): using the CPU");
                    Ok((cpu(input)?, Some(note)))
                }
                Err(e) => Err(format!("{named}: a GPU is present but unusable: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const FLAG: Setting = Setting::Flag("--device");
    const KEY: Setting = Setting::Key("train.device");

    #[derive(Debug, PartialEq)]
    enum Built {
        Gpu(u32),
        Cpu(u32),
    }

    fn unsupported() -> mapet::Error {
        mapet::Error::Unsupported { what: "model width", detail: "dim 7 is not a multiple of 8".into() }
    }

    /// Runs [`select_with`] on `input`, with a GPU builder returning `gpu_result` and counting
    /// calls; returns the result and (GPU calls, CPU calls).
    fn run(
        device: Device,
        setting: Setting,
        unavailable: Option<&str>,
        gpu_result: impl FnOnce() -> mapet::Result<u32>,
    ) -> (Selection<Built>, (u32, u32)) {
        let (gpu_calls, cpu_calls) = (Cell::new(0), Cell::new(0));
        let input = vec![40u32, 2];
        let r = select_with(
            device,
            setting,
            unavailable.map(String::from),
            input,
            |v: &Vec<u32>| {
                gpu_calls.set(gpu_calls.get() + 1);
                gpu_result().map(|x| Built::Gpu(x + v[0]))
            },
            |v: Vec<u32>| {
                cpu_calls.set(cpu_calls.get() + 1);
                Ok(Built::Cpu(v.iter().sum()))
            },
        );
        (r, (gpu_calls.get(), cpu_calls.get()))
    }

    #[test]
    fn parses_the_three_values_and_refuses_others_naming_the_setting() {
        for (s, d) in [("auto", Device::Auto), ("cpu", Device::Cpu), ("cuda", Device::Cuda)] {
            assert_eq!(Device::parse(s, FLAG), Ok(d));
            assert_eq!(Device::parse(s, KEY), Ok(d));
            assert_eq!(d.to_string(), s);
        }
        for bad in ["tpu", "", "CUDA", "gpu", "cpu-bf16", " cpu"] {
            let e = Device::parse(bad, FLAG).unwrap_err();
            assert_eq!(e, format!("--device {bad}: expected auto, cpu or cuda"));
            let e = Device::parse(bad, KEY).unwrap_err();
            assert_eq!(e, format!("train.device = {bad:?}: expected auto, cpu or cuda"));
        }
    }

    #[test]
    fn cpu_never_builds_the_gpu_variant() {
        for unavailable in [None, Some("no driver")] {
            let (r, calls) = run(Device::Cpu, FLAG, unavailable, || panic!("GPU built for cpu"));
            assert_eq!(r.unwrap(), (Built::Cpu(42), None));
            assert_eq!(calls, (0, 1));
        }
    }

    #[test]
    fn cuda_builds_the_gpu_variant_or_fails_naming_the_setting() {
        let (r, calls) = run(Device::Cuda, FLAG, None, || Ok(1));
        assert_eq!(r.unwrap(), (Built::Gpu(41), None));
        assert_eq!(calls, (1, 0));
        // No fallback for `cuda`, not even on Unsupported.
        let (r, calls) = run(Device::Cuda, KEY, None, || Err(unsupported()));
        let e = r.unwrap_err();
        assert!(e.starts_with("train.device = \"cuda\": ") && e.contains("dim 7"), "{e}");
        assert_eq!(calls, (1, 0));
        let (r, _) = run(Device::Cuda, FLAG, None, || Err(mapet::Error::NoDevice("out of memory".into())));
        let e = r.unwrap_err();
        assert!(e.starts_with("--device cuda: ") && e.contains("out of memory"), "{e}");
    }

    #[test]
    fn auto_without_a_gpu_uses_the_cpu_and_says_why() {
        let (r, calls) = run(Device::Auto, FLAG, Some("libcuda is not present"), || panic!("GPU built with no GPU"));
        let (v, note) = r.unwrap();
        assert_eq!(v, Built::Cpu(42));
        assert_eq!(note.as_deref(), Some("--device auto: no GPU (libcuda is not present): using the CPU"));
        assert_eq!(calls, (0, 1));
    }

    #[test]
    fn auto_with_a_gpu_uses_it() {
        let (r, calls) = run(Device::Auto, KEY, None, || Ok(2));
        assert_eq!(r.unwrap(), (Built::Gpu(42), None));
        assert_eq!(calls, (1, 0));
    }

    #[test]
    fn auto_falls_back_to_the_cpu_on_unsupported_saying_why() {
        let (r, calls) = run(Device::Auto, KEY, None, || Err(unsupported()));
        let (v, note) = r.unwrap();
        assert_eq!(v, Built::Cpu(42));
        let note = note.unwrap();
        assert!(note.starts_with("train.device = \"auto\": a GPU is present, but it cannot run this ("), "{note}");
        assert!(note.contains("dim 7 is not a multiple of 8") && note.ends_with("using the CPU"), "{note}");
        assert!(!note.contains('\n'), "{note}");
        assert_eq!(calls, (1, 1));
    }

    #[test]
    fn auto_fails_on_other_gpu_errors() {
        for err in [
            mapet::Error::NoDevice("launch failed".into()),
            mapet::Error::Shape { tensor: "x", expected: "4".into(), got: "3".into() },
        ] {
            let text = err.to_string();
            let (r, calls) = run(Device::Auto, FLAG, None, move || Err(err));
            let e = r.unwrap_err();
            assert_eq!(e, format!("--device auto: a GPU is present but unusable: {text}"));
            assert_eq!(calls, (1, 0));
        }
    }

    #[test]
    fn cpu_builder_errors_pass_through() {
        let r = select_with(Device::Cpu, FLAG, None, (), |_| Ok(0u8), |_| Err("bad model".to_string()));
        assert_eq!(r.unwrap_err(), "bad model");
        let r = select_with(Device::Auto, FLAG, Some("none".into()), (), |_| Ok(0u8), |_| Err("bad".to_string()));
        assert_eq!(r.unwrap_err(), "bad");
    }

    /// This machine's answer, whatever it is: `auto` never errs when the GPU variant cannot be
    /// built for lack of a GPU, and `select` agrees with `unavailable_reason`.
    #[test]
    fn select_consults_the_machine() {
        let unavailable = mapet::cuda::unavailable_reason();
        let r = select(Device::Auto, FLAG, (), |_| Ok("gpu"), |_| Ok("cpu")).unwrap();
        match unavailable {
            Some(why) => {
                assert_eq!(r.0, "cpu");
                assert!(r.1.unwrap().contains(&why));
            }
            None => assert_eq!(r, ("gpu", None)),
        }
    }
}
