//! Cases in the golden format (`weights.*`, `batch.*`, header metadata; see
//! `tests/data/golden/README.md`): reading one, running one forward and backward with drop path
//! off, and writing the results under the same names (`out.loss`, `out.logits`,
//! `out.predicted_index`, `grads.<official name>`). This is what `mapet check-step` does, and how
//! anyone checks this implementation against the authors' PyTorch model.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{write_f32_safetensors, SafeTensorsFile};
use crate::model::cpu::{Batch, CpuModel, ForwardOutput, Images};
use crate::model::params::{ModelConfig, ParamLayout};
use crate::perm;

/// A case read from disk.
pub struct Case {
    /// The model's sizes, from the header metadata.
    pub config: ModelConfig,
    /// The flat parameter buffer.
    pub params: Vec<f32>,
    /// The batch.
    pub batch: Batch,
}

fn ints_to_i32(path: &Path, name: &str, v: Vec<i64>) -> Result<Vec<i32>> {
    v.into_iter()
        .map(|x| {
            i32::try_from(x).map_err(|_| Error::File {
                path: path.to_path_buf(),
                detail: format!("tensor `{name}` holds {x}, out of the i32 range"),
            })
        })
        .collect()
}

impl Case {
    /// Reads a case; every missing key or tensor is an error naming the file and the key.
    pub fn load(path: &Path) -> Result<Case> {
        let file = SafeTensorsFile::open(path)?;
        if !file.metadata().contains_key("img_size") {
            return Err(Error::File {
                path: path.to_path_buf(),
                detail: "not a case in the golden format: its header metadata has no img_size (the format is \
                         tests/data/golden/README.md's)"
                    .into(),
            });
        }
        let g = |k: &str| file.metadata_usize(k);
        let config = ModelConfig {
            image: g("img_size")?,
            patch: g("patch_size")?,
            dim: g("embed_dim")?,
            depth: g("depth")?,
            heads: g("num_heads")?,
            vocab: g("vocab_size")?,
            context: g("context_tokens")?,
        };
        let layout = ParamLayout::new(config)?;
        let params = layout.load_safetensors(path, "weights.")?;
        let (ishape, images) = file.f32_tensor("batch.images")?;
        let batch = ishape.first().copied().unwrap_or(0);
        let tokens = ints_to_i32(path, "batch.tokens", file.i64_tensor("batch.tokens")?.1)?;
        let ranks = ints_to_i32(path, "batch.ranks", file.i64_tensor("batch.ranks")?.1)?;
        let batch = Batch { batch, images: Images::F32(images), tokens, ranks };
        batch.validate(&config).map_err(|e| Error::File { path: path.to_path_buf(), detail: e.to_string() })?;
        Ok(Case { config, params, batch })
    }
}

/// Results of one step, under the golden names, as (name, shape, values).
pub struct StepOutput {
    /// Every output tensor.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl StepOutput {
    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| &v[..])
    }

    /// Writes every tensor as f32 safetensors (atomically).
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        let views: Vec<(String, Vec<usize>, &[f32])> =
            self.tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), &v[..])).collect();
        write_f32_safetensors(path, &views, metadata)
    }
}

/// One forward and backward of `case` on the CPU, drop path off.
pub fn run_cpu(case: &Case) -> Result<StepOutput> {
    let model = CpuModel::new(case.config)?;
    let layout = &model.layout;
    let mut grads = vec![0.0f32; layout.total];
    let out = model.step(&case.params, &case.batch, None, Some(&mut grads), true)?;
    step_output(case, layout, out, &grads)
}

/// One forward and backward of `case` on the CPU with the GPU backend's bf16 roundings
/// ([`crate::emulate::Bf16Emulation`]), drop path off: what bf16 activations alone cost in
/// accuracy, on any machine.
pub fn run_bf16_emulation(case: &Case) -> Result<StepOutput> {
    use crate::emulate::{rounded, Bf16Emulation};
    use crate::model::net::{self, Activations, Weights};
    let layout = ParamLayout::new(case.config)?;
    let be = Bf16Emulation;
    let mut acts = Activations::new(&be, &case.config, case.batch.batch.max(1))?;
    let act = rounded(&case.params);
    let weights = Weights::<Bf16Emulation> { master: &case.params, act: &act };
    let mut grads = vec![0.0f32; layout.total];
    let out = net::step(&be, &layout, &mut acts, weights, &case.batch, None, Some(&mut grads[..]), true)?;
    step_output(case, &layout, out, &grads)
}

/// One forward and backward of `case` on GPU 0 ([`crate::model::cuda::CudaModel`]: bf16
/// activations, f32 weights and gradients), drop path off. Needs head dim 64 and `dim % 8 == 0`.
pub fn run_cuda(case: &Case) -> Result<StepOutput> {
    let gpu = std::sync::Arc::new(crate::cuda::Gpu::first()?);
    let mut model = crate::model::cuda::CudaModel::new(gpu, case.config, case.batch.batch)?;
    model.upload_params(&case.params)?;
    let out = model.step(&case.batch, None, true, true)?;
    let grads = model.download_grads()?;
    step_output(case, &model.layout, out, &grads)
}

/// The golden-format tensors of one step's results.
fn step_output(case: &Case, layout: &ParamLayout, out: ForwardOutput, grads: &[f32]) -> Result<StepOutput> {
    let cfg = case.config;
    let (n, c, p, v) = (cfg.n_tokens(), cfg.context, cfg.n_pred(), cfg.vocab);
    let b = case.batch.batch;

    // Logits come in rank order; the golden format lists predicted tokens by ascending index.
    let logits_rank = out
        .logits
        .ok_or_else(|| Error::Unsupported { what: "step output", detail: "the step was run without logits".into() })?;
    let mut logits = Vec::with_capacity(b * p * v);
    let mut predicted = Vec::with_capacity(b * p);
    for s in 0..b {
        let ranks: Vec<u32> = case.batch.ranks[s * n..(s + 1) * n].iter().map(|&r| r as u32).collect();
        for t in perm::predicted_index(&ranks, c) {
            let row = s * p + ranks[t as usize] as usize - c;
            logits.extend_from_slice(&logits_rank[row * v..(row + 1) * v]);
            predicted.push(t as f32);
        }
    }
    let mut tensors = vec![
        ("out.loss".to_string(), vec![1], vec![out.loss]),
        ("out.logits".to_string(), vec![b, p, v], logits),
        ("out.predicted_index".to_string(), vec![b, p], predicted),
    ];
    for spec in &layout.specs {
        tensors.push((format!("grads.{}", spec.name), spec.shape.clone(), grads[spec.range()].to_vec()));
    }
    Ok(StepOutput { tensors })
}

/// How one output tensor of a step compares with a case's reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The tensor's golden name (`out.loss`, `grads.<official name>`, ...).
    pub name: String,
    /// Norm of the difference over the norm of the reference (the difference's norm where the
    /// reference is all zeros); for `out.predicted_index`, 0 when every index is the reference's
    /// and 1 otherwise. NaN or infinite when the output is.
    pub rel_err: f64,
}

/// The relative error bars of the golden README: float32 arithmetic (the CPU model) 1e-4, bf16
/// GEMM inputs and activations (the GPU model, and the CPU model with its roundings emulated)
/// 2e-2.
pub const F32_TOLERANCE: f64 = 1e-4;
pub const BF16_TOLERANCE: f64 = 2e-2;

/// Compares every tensor of `out` with the reference of the same name in the case file at
/// `path` (f64): `None` when the file holds no reference (`out.loss` absent: a case to run, not
/// a golden one); an error when it holds some but not all of them, or one of another size.
pub fn compare(path: &Path, out: &StepOutput) -> Result<Option<Vec<Comparison>>> {
    let truth = SafeTensorsFile::open(path)?;
    if !truth.names().iter().any(|n| n == "out.loss") {
        return Ok(None);
    }
    let file_err = |detail: String| Error::File { path: path.to_path_buf(), detail };
    let mut rows = Vec::with_capacity(out.tensors.len());
    for (name, _, got) in &out.tensors {
        let rel_err = if name == "out.predicted_index" {
            let (_, want) = truth.i64_tensor(name)?;
            let same = got.len() == want.len() && got.iter().zip(&want).all(|(&g, &w)| g as i64 == w);
            if same {
                0.0
            } else {
                1.0
            }
        } else {
            let (_, want) = truth.f64_tensor(name)?;
            if want.len() != got.len() {
                return Err(file_err(format!(
                    "reference `{name}` has {} values, the step gave {}",
                    want.len(),
                    got.len()
                )));
            }
            crate::testing::rel_err(got, &want)
        };
        rows.push(Comparison { name: name.clone(), rel_err });
    }
    Ok(Some(rows))
}
