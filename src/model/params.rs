//! The model's configuration and its parameters: one flat f32 buffer with named views that carry
//! the authors' state-dict names and shapes (SPEC.md, "Parameter names"), the weight-decay mask,
//! the authors' initialisation, and safetensors I/O under those names.
//!
//! Names are for files and messages; the model's step reads its parameters through
//! [`ParamRanges`], a table of element ranges built once with the layout.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};

/// Sizes of one MaPeT model (SPEC.md, "Sizes"). Serialized as a checkpoint's `meta.json` stores
/// it (`config`: one number a field, under the field's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Square image side in pixels.
    pub image: usize,
    /// Square patch side in pixels.
    pub patch: usize,
    /// Embedding width D.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads; head dim = dim / heads.
    pub heads: usize,
    /// Codebook size.
    pub vocab: usize,
    /// Context tokens C (CLS included), 0 < C < N.
    pub context: usize,
}

impl ModelConfig {
    /// ViT-T/16 MaPeT.
    pub const VIT_T: ModelConfig =
        ModelConfig { image: 224, patch: 16, dim: 192, depth: 12, heads: 3, vocab: 8192, context: 50 };
    /// ViT-S/16 MaPeT.
    pub const VIT_S: ModelConfig =
        ModelConfig { image: 224, patch: 16, dim: 384, depth: 12, heads: 6, vocab: 8192, context: 50 };
    /// ViT-B/16 MaPeT.
    pub const VIT_B: ModelConfig =
        ModelConfig { image: 224, patch: 16, dim: 768, depth: 12, heads: 12, vocab: 8192, context: 50 };

    /// Every size by name (`image`, `patch`, `dim`, `depth`, `heads`, `vocab`, `context`), in that
    /// order: for messages that say which differ.
    pub fn fields(&self) -> [(&'static str, usize); 7] {
        [
            ("image", self.image),
            ("patch", self.patch),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("vocab", self.vocab),
            ("context", self.context),
        ]
    }

    /// A named preset: "vit-t", "vit-s" or "vit-b".
    pub fn preset(name: &str) -> Option<ModelConfig> {
        match name {
            "vit-t" | "vit_t" | "tiny" => Some(Self::VIT_T),
            "vit-s" | "vit_s" | "small" => Some(Self::VIT_S),
            "vit-b" | "vit_b" | "base" => Some(Self::VIT_B),
            _ => None,
        }
    }

    /// Tokens per sample: CLS + patches.
    pub fn n_tokens(&self) -> usize {
        1 + (self.image / self.patch).pow(2)
    }

    /// Predicted tokens per sample.
    pub fn n_pred(&self) -> usize {
        self.n_tokens() - self.context
    }

    /// Rows per sample through the blocks: N content + P mask (content stream) + P query stream.
    pub fn rows_per_sample(&self) -> usize {
        self.n_tokens() + 2 * self.n_pred()
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Checks every constraint of SPEC.md; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, detail: String| Err(Error::Unsupported { what, detail });
        if self.patch == 0 || self.image == 0 || !self.image.is_multiple_of(self.patch) {
            return bad(
                "image/patch",
                format!("image {} must be a positive multiple of patch {}", self.image, self.patch),
            );
        }
        if self.dim == 0 || self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return bad("dim/heads", format!("dim {} must be a positive multiple of heads {}", self.dim, self.heads));
        }
        if self.depth == 0 || self.vocab == 0 {
            return bad("depth/vocab", format!("depth {} and vocab {} must be positive", self.depth, self.vocab));
        }
        let n = self.n_tokens();
        if self.context == 0 || self.context >= n {
            return bad("context", format!("context {} must satisfy 0 < C < N = {n}", self.context));
        }
        Ok(())
    }
}

/// How a parameter is initialised (the authors' scheme).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with the given std truncated to [-2, 2] in absolute units, as timm's
    /// `trunc_normal_(std=...)` does (at std 0.02 the cut is 100 std away and never binds).
    TruncNormal(f32),
    /// Normal with the given std.
    Normal(f32),
    /// A constant.
    Const(f32),
    /// PyTorch Conv2d's default: kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    UniformFanIn(usize),
}

/// One named parameter: where it lives in the flat buffer, its shape, and how it is treated.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// The authors' state-dict name.
    pub name: String,
    /// The authors' shape.
    pub shape: Vec<usize>,
    /// Offset in the flat buffer, in elements (a multiple of 8, so every view is 32-byte aligned).
    pub offset: usize,
    /// Whether AdamW decays it (SPEC.md: not 1-D params, pos_embed, cls_token; the mask token is).
    pub decay: bool,
    /// Its initialisation.
    pub init: Init,
}

impl ParamSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a zero-sized parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Element ranges of one block's parameters in the flat buffer (`blocks.{i}.<name>`; the field
/// is the name with `.` written `_`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockParams {
    /// `norm1.weight` `[D]`.
    pub norm1_weight: Range<usize>,
    /// `norm1.bias` `[D]`.
    pub norm1_bias: Range<usize>,
    /// `norm2.weight` `[D]`.
    pub norm2_weight: Range<usize>,
    /// `norm2.bias` `[D]`.
    pub norm2_bias: Range<usize>,
    /// `attn.kv.weight` `[2D, D]`: the key rows, then the value rows.
    pub attn_kv_weight: Range<usize>,
    /// `attn.kv.bias` `[2D]`.
    pub attn_kv_bias: Range<usize>,
    /// `attn.q.weight` `[D, D]`.
    pub attn_q_weight: Range<usize>,
    /// `attn.q.bias` `[D]`.
    pub attn_q_bias: Range<usize>,
    /// `attn.proj.weight` `[D, D]`.
    pub attn_proj_weight: Range<usize>,
    /// `attn.proj.bias` `[D]`.
    pub attn_proj_bias: Range<usize>,
    /// `ls1.gamma` `[D]`.
    pub ls1_gamma: Range<usize>,
    /// `mlp.fc1.weight` `[4D, D]`.
    pub mlp_fc1_weight: Range<usize>,
    /// `mlp.fc1.bias` `[4D]`.
    pub mlp_fc1_bias: Range<usize>,
    /// `mlp.fc2.weight` `[D, 4D]`.
    pub mlp_fc2_weight: Range<usize>,
    /// `mlp.fc2.bias` `[D]`.
    pub mlp_fc2_bias: Range<usize>,
    /// `ls2.gamma` `[D]`.
    pub ls2_gamma: Range<usize>,
}

/// Element ranges of every parameter in the flat buffer, by role rather than by name: what the
/// model's step indexes (built once with the [`ParamLayout`], so that a step formats no names).
/// The field is the official name with `.` written `_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamRanges {
    /// `cls_token` `[1, 1, D]`.
    pub cls_token: Range<usize>,
    /// `pos_embed` `[1, N, D]`.
    pub pos_embed: Range<usize>,
    /// `mask_positional_token` `[1, 1, D]`.
    pub mask_positional_token: Range<usize>,
    /// `patch_embed.proj.weight` `[D, 3, p, p]`.
    pub patch_embed_proj_weight: Range<usize>,
    /// `patch_embed.proj.bias` `[D]`.
    pub patch_embed_proj_bias: Range<usize>,
    /// `blocks.{i}.*`, one entry per block.
    pub blocks: Vec<BlockParams>,
    /// `norm.weight` `[D]`.
    pub norm_weight: Range<usize>,
    /// `norm.bias` `[D]`.
    pub norm_bias: Range<usize>,
    /// `decoder.weight` `[V, D]`.
    pub decoder_weight: Range<usize>,
    /// `decoder.bias` `[V]`.
    pub decoder_bias: Range<usize>,
}

impl ParamRanges {
    /// The table of a model of `depth` blocks, each range from `range(official name)` (called once
    /// per parameter; its error, naming the parameter, is returned).
    fn new(depth: usize, range: impl Fn(&str) -> Result<Range<usize>>) -> Result<Self> {
        let blocks = (0..depth)
            .map(|i| {
                let b = |name: &str| range(&format!("blocks.{i}.{name}"));
                Ok(BlockParams {
                    norm1_weight: b("norm1.weight")?,
                    norm1_bias: b("norm1.bias")?,
                    norm2_weight: b("norm2.weight")?,
                    norm2_bias: b("norm2.bias")?,
                    attn_kv_weight: b("attn.kv.weight")?,
                    attn_kv_bias: b("attn.kv.bias")?,
                    attn_q_weight: b("attn.q.weight")?,
                    attn_q_bias: b("attn.q.bias")?,
                    attn_proj_weight: b("attn.proj.weight")?,
                    attn_proj_bias: b("attn.proj.bias")?,
                    ls1_gamma: b("ls1.gamma")?,
                    mlp_fc1_weight: b("mlp.fc1.weight")?,
                    mlp_fc1_bias: b("mlp.fc1.bias")?,
                    mlp_fc2_weight: b("mlp.fc2.weight")?,
                    mlp_fc2_bias: b("mlp.fc2.bias")?,
                    ls2_gamma: b("ls2.gamma")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamRanges {
            cls_token: range("cls_token")?,
            pos_embed: range("pos_embed")?,
            mask_positional_token: range("mask_positional_token")?,
            patch_embed_proj_weight: range("patch_embed.proj.weight")?,
            patch_embed_proj_bias: range("patch_embed.proj.bias")?,
            blocks,
            norm_weight: range("norm.weight")?,
            norm_bias: range("norm.bias")?,
            decoder_weight: range("decoder.weight")?,
            decoder_bias: range("decoder.bias")?,
        })
    }
}

/// A parameter's spec by its official name, from a layout's index.
fn lookup<'a>(index: &HashMap<String, usize>, specs: &'a [ParamSpec], name: &str) -> Result<&'a ParamSpec> {
    index.get(name).map(|&i| &specs[i]).ok_or_else(|| Error::Unsupported {
        what: "parameter name",
        detail: format!("`{name}` is not a parameter of this config"),
    })
}

/// The layout of every parameter of a config in one flat buffer, in the authors' order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// The config it was built for.
    pub config: ModelConfig,
    /// Every parameter, in state-dict order.
    pub specs: Vec<ParamSpec>,
    /// Total elements of the flat buffer (with alignment padding).
    pub total: usize,
    index: HashMap<String, usize>,
    decay: Vec<u8>,
    /// Boxed: every model owns a layout, and the table is about 170 bytes.
    ranges: Box<ParamRanges>,
}

impl ParamLayout {
    /// Builds the layout of `config` (validated first).
    pub fn new(config: ModelConfig) -> Result<Self> {
        config.validate()?;
        let (d, n, p, v) = (config.dim, config.n_tokens(), config.patch, config.vocab);
        let mut list: Vec<(String, Vec<usize>, bool, Init)> = vec![
            ("cls_token".into(), vec![1, 1, d], false, Init::Normal(1e-6)),
            ("pos_embed".into(), vec![1, n, d], false, Init::TruncNormal(0.02)),
            ("mask_positional_token".into(), vec![1, 1, d], true, Init::TruncNormal(0.02)),
            ("patch_embed.proj.weight".into(), vec![d, 3, p, p], true, Init::UniformFanIn(3 * p * p)),
            ("patch_embed.proj.bias".into(), vec![d], false, Init::UniformFanIn(3 * p * p)),
        ];
        for i in 0..config.depth {
            let b = |s: &str| format!("blocks.{i}.{s}");
            let linear = |list: &mut Vec<_>, name: &str, out: usize, inp: usize| {
                list.push((b(&format!("{name}.weight")), vec![out, inp], true, Init::TruncNormal(0.02)));
                list.push((b(&format!("{name}.bias")), vec![out], false, Init::Const(0.0)));
            };
            list.push((b("norm1.weight"), vec![d], false, Init::Const(1.0)));
            list.push((b("norm1.bias"), vec![d], false, Init::Const(0.0)));
            list.push((b("norm2.weight"), vec![d], false, Init::Const(1.0)));
            list.push((b("norm2.bias"), vec![d], false, Init::Const(0.0)));
            linear(&mut list, "attn.kv", 2 * d, d);
            linear(&mut list, "attn.q", d, d);
            linear(&mut list, "attn.proj", d, d);
            list.push((b("ls1.gamma"), vec![d], false, Init::Const(0.1)));
            linear(&mut list, "mlp.fc1", 4 * d, d);
            linear(&mut list, "mlp.fc2", d, 4 * d);
            list.push((b("ls2.gamma"), vec![d], false, Init::Const(0.1)));
        }
        list.push(("norm.weight".into(), vec![d], false, Init::Const(1.0)));
        list.push(("norm.bias".into(), vec![d], false, Init::Const(0.0)));
        list.push(("decoder.weight".into(), vec![v, d], true, Init::TruncNormal(0.02)));
        list.push(("decoder.bias".into(), vec![v], false, Init::Const(0.0)));

        let mut specs = Vec::with_capacity(list.len());
        let mut offset = 0usize;
        for (name, shape, decay, init) in list {
            let spec = ParamSpec { name, shape, offset, decay, init };
            offset = (offset + spec.len()).div_ceil(8) * 8;
            specs.push(spec);
        }
        let index: HashMap<String, usize> = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let mut decay = vec![0u8; offset];
        for s in specs.iter().filter(|s| s.decay) {
            decay[s.range()].fill(1);
        }
        let ranges = Box::new(ParamRanges::new(config.depth, |name| Ok(lookup(&index, &specs, name)?.range()))?);
        Ok(ParamLayout { config, specs, total: offset, index, decay, ranges })
    }

    /// Every parameter's element range, by role (built with the layout): what the model's step
    /// reads instead of looking names up.
    pub fn ranges(&self) -> &ParamRanges {
        &self.ranges
    }

    /// The spec of a parameter by its official name.
    pub fn get(&self, name: &str) -> Result<&ParamSpec> {
        lookup(&self.index, &self.specs, name)
    }

    /// Number of real (unpadded) parameters.
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(ParamSpec::len).sum()
    }

    /// 1 where AdamW decays the element, 0 elsewhere (padding included); built once with the
    /// layout, since every optimizer step reads it.
    pub fn decay_mask(&self) -> &[u8] {
        &self.decay
    }

    /// A flat buffer initialised as the authors do, from `rng`.
    pub fn init(&self, rng: &mut impl Rng) -> Vec<f32> {
        let mut flat = vec![0.0f32; self.total];
        for s in &self.specs {
            let dst = &mut flat[s.range()];
            match s.init {
                Init::Const(c) => dst.fill(c),
                Init::Normal(std) => {
                    let n = Normal::new(0.0f32, std).expect("std is positive");
                    dst.iter_mut().for_each(|x| *x = n.sample(rng));
                }
                Init::TruncNormal(std) => {
                    let n = Normal::new(0.0f32, std).expect("std is positive");
                    for x in dst.iter_mut() {
                        *x = loop {
                            let v = n.sample(rng);
                            if v.abs() <= 2.0 {
                                break v;
                            }
                        };
                    }
                }
                Init::UniformFanIn(fan_in) => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    dst.iter_mut().for_each(|x| *x = rng.random_range(-bound..bound));
                }
            }
        }
        flat
    }

    /// Writes `flat` as safetensors under the official names and shapes (f32), with `metadata`.
    pub fn save_safetensors(&self, flat: &[f32], path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        crate::error::check_len("parameters", flat.len(), self.total)?;
        let tensors: Vec<(String, Vec<usize>, &[f32])> =
            self.specs.iter().map(|s| (s.name.clone(), s.shape.clone(), &flat[s.range()])).collect();
        crate::io::write_f32_safetensors(path, &tensors, metadata)
    }

    /// Reads a flat buffer from a safetensors file holding every parameter under
    /// `prefix + official name` with its exact shape (f32 or f64). Names or shapes that do not
    /// match are errors naming the file and the tensor.
    pub fn load_safetensors(&self, path: &Path, prefix: &str) -> Result<Vec<f32>> {
        let file = crate::io::SafeTensorsFile::open(path)?;
        let mut flat = vec![0.0f32; self.total];
        for s in &self.specs {
            let name = format!("{prefix}{}", s.name);
            let (shape, values) = file.f32_tensor(&name)?;
            if shape != s.shape {
                return Err(Error::Shape {
                    tensor: "checkpoint tensor",
                    expected: format!("`{name}` with shape {:?} in {}", s.shape, path.display()),
                    got: format!("shape {shape:?}"),
                });
            }
            flat[s.range()].copy_from_slice(&values);
        }
        Ok(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn vit_b_layout_matches_the_official_keys() {
        let layout = ParamLayout::new(ModelConfig::VIT_B).unwrap();
        let tsv = include_str!("../../tests/data/official_keys_vit_base.tsv");
        let official: Vec<(String, Vec<usize>)> = tsv
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (name, shape) = l.split_once('\t').unwrap();
                let dims = shape.trim_matches(['[', ']']).split(',').map(|d| d.trim().parse().unwrap()).collect();
                (name.to_string(), dims)
            })
            .collect();
        let ours: Vec<(String, Vec<usize>)> = layout.specs.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
        assert_eq!(ours, official);
        assert_eq!(layout.specs.iter().filter(|s| s.offset % 8 != 0).count(), 0);
    }

    #[test]
    fn range_table_matches_the_names() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::random());
        let mut config = ModelConfig::VIT_T;
        config.depth = rng.random_range(1..5);
        let layout = ParamLayout::new(config).unwrap();
        let t = layout.ranges();
        assert_eq!(t.blocks.len(), config.depth);
        // The table in state-dict order is the specs' ranges in order, so each field holds the
        // range of the name it is named after.
        let mut ours = vec![
            &t.cls_token,
            &t.pos_embed,
            &t.mask_positional_token,
            &t.patch_embed_proj_weight,
            &t.patch_embed_proj_bias,
        ];
        for b in &t.blocks {
            ours.extend([
                &b.norm1_weight,
                &b.norm1_bias,
                &b.norm2_weight,
                &b.norm2_bias,
                &b.attn_kv_weight,
                &b.attn_kv_bias,
                &b.attn_q_weight,
                &b.attn_q_bias,
                &b.attn_proj_weight,
                &b.attn_proj_bias,
                &b.ls1_gamma,
                &b.mlp_fc1_weight,
                &b.mlp_fc1_bias,
                &b.mlp_fc2_weight,
                &b.mlp_fc2_bias,
                &b.ls2_gamma,
            ]);
        }
        ours.extend([&t.norm_weight, &t.norm_bias, &t.decoder_weight, &t.decoder_bias]);
        let want: Vec<_> = layout.specs.iter().map(ParamSpec::range).collect();
        assert_eq!(ours.into_iter().cloned().collect::<Vec<_>>(), want);
        let i = rng.random_range(0..config.depth);
        assert_eq!(t.blocks[i].mlp_fc2_bias, layout.get(&format!("blocks.{i}.mlp.fc2.bias")).unwrap().range());
    }

    #[test]
    fn decay_mask_follows_the_recipe() {
        let layout = ParamLayout::new(ModelConfig::VIT_T).unwrap();
        let mask = layout.decay_mask();
        for s in &layout.specs {
            let decayed = mask[s.range()].iter().all(|&m| m == 1);
            let want = s.shape.iter().filter(|&&d| d > 1).count() > 1 && s.name != "pos_embed" && s.name != "cls_token"
                || s.name == "mask_positional_token";
            assert_eq!(decayed, want, "{}", s.name);
        }
    }

    #[test]
    fn init_statistics() {
        let layout = ParamLayout::new(ModelConfig::VIT_T).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::random());
        let flat = layout.init(&mut rng);
        let w = &flat[layout.get("blocks.3.mlp.fc1.weight").unwrap().range()];
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.001, "trunc_normal(std 0.02) has std 0.02, got {std}");
        assert!(flat[layout.get("blocks.0.ls1.gamma").unwrap().range()].iter().all(|&x| x == 0.1));
        assert!(flat[layout.get("norm.weight").unwrap().range()].iter().all(|&x| x == 1.0));
        let cls = &flat[layout.get("cls_token").unwrap().range()];
        assert!(cls.iter().all(|x| x.abs() < 1e-5) && cls.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn bad_configs_are_refused_naming_the_field() {
        let mut c = ModelConfig::VIT_T;
        c.context = c.n_tokens();
        assert!(ParamLayout::new(c).unwrap_err().to_string().contains("context"));
        let mut c = ModelConfig::VIT_T;
        c.image = 225;
        assert!(ParamLayout::new(c).unwrap_err().to_string().contains("image"));
        let mut c = ModelConfig::VIT_T;
        c.heads = 5;
        assert!(ParamLayout::new(c).unwrap_err().to_string().contains("heads"));
    }
}
