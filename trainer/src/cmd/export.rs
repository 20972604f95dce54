//! `mapet export`: a checkpoint's backbone under timm's `VisionTransformer` names, for
//! fine-tuning with timm (`load_state_dict` into a ViT of the same sizes built with
//! `class_token=True`, `qkv_bias=True`, `init_values` set so that the blocks have layer scale, and
//! the head left to the fine-tuning).
//!
//! Renames: MaPeT's separate query and key-value projections become timm's fused `attn.qkv`,
//! rows `[q; k; v]` (q's D rows, then kv's 2D rows as they are: k then v), the same order
//! timm splits `qkv` in; every other backbone tensor keeps its name and shape. The pre-training
//! parts are left out: `mask_positional_token` and the `decoder.*` head. Values are f32,
//! written to a temporary file renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mapet::model::{checkpoint, ParamLayout};

use super::{parse, Parsed};

/// The command's usage.
pub const USAGE: &str = "usage: mapet export --checkpoint DIR --timm OUT.safetensors
  Writes a checkpoint's backbone under timm's ViT names (cls_token, pos_embed, patch_embed.proj.*,
  blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}.*, norm.*), f32, without the
  mask token and the decoder; attn.qkv = q rows then the kv rows (k, v).";

/// One named tensor: (name, shape, values).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The backbone of `params` (a flat buffer of `layout`) under timm's names: (name, shape, values),
/// in the layout's order.
pub fn timm_tensors(layout: &ParamLayout, params: &[f32]) -> Result<Vec<NamedTensor>, String> {
    if params.len() != layout.total {
        return Err(format!("{} parameters given for a layout of {}", params.len(), layout.total));
    }
    let get = |name: &str| -> Result<(Vec<usize>, &[f32]), String> {
        let s = layout.get(name).map_err(|e| e.to_string())?;
        Ok((s.shape.clone(), &params[s.range()]))
    };
    let mut out = Vec::with_capacity(layout.specs.len());
    let d = layout.config.dim;
    for spec in &layout.specs {
        let name = spec.name.as_str();
        if name == "mask_positional_token" || name.starts_with("decoder.") {
            continue;
        }
        if let Some(prefix) = name.strip_suffix(".attn.kv.weight").or_else(|| name.strip_suffix(".attn.kv.bias")) {
            let kind = if name.ends_with("weight") { "weight" } else { "bias" };
            let (_, q) = get(&format!("{prefix}.attn.q.{kind}"))?;
            let (_, kv) = get(name)?;
            let mut qkv = Vec::with_capacity(q.len() + kv.len());
            qkv.extend_from_slice(q);
            qkv.extend_from_slice(kv);
            let shape = if kind == "weight" { vec![3 * d, d] } else { vec![3 * d] };
            out.push((format!("{prefix}.attn.qkv.{kind}"), shape, qkv));
            continue;
        }
        if name.contains(".attn.q.") {
            continue; // fused into attn.qkv above
        }
        let (shape, values) = get(name)?;
        out.push((name.to_string(), shape, values.to_vec()));
    }
    Ok(out)
}

/// Runs `mapet export` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let a = match parse("export", args, &["checkpoint", "timm"], &[])? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Args(a) => a,
    };
    let dir = PathBuf::from(a.required("export", "checkpoint", "DIR")?);
    let out = PathBuf::from(a.required("export", "timm", "OUT.safetensors")?);
    super::refuse_overwriting_inputs("--timm", &out, &[("--checkpoint", &dir)])?;
    let n = export(&dir, &out)?;
    println!("wrote {n} tensors of the backbone under timm's names to {}", out.display());
    Ok(())
}

/// Writes the backbone of the checkpoint `dir` to `out`; returns the number of tensors.
pub fn export(dir: &Path, out: &Path) -> Result<usize, String> {
    let config = checkpoint::read_config(dir).map_err(|e| format!("--checkpoint: {e}"))?;
    let ck = checkpoint::load_params(dir, &config).map_err(|e| format!("--checkpoint: {e}"))?;
    let layout = ParamLayout::new(config).map_err(|e| e.to_string())?;
    let tensors = timm_tensors(&layout, &ck.params)?;
    let views: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    let c = config;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("source".to_string(), format!("mapet checkpoint {} at step {}", ck.dir.display(), ck.step)),
        ("img_size".to_string(), c.image.to_string()),
        ("patch_size".to_string(), c.patch.to_string()),
        ("embed_dim".to_string(), c.dim.to_string()),
        ("depth".to_string(), c.depth.to_string()),
        ("num_heads".to_string(), c.heads.to_string()),
    ]);
    mapet::io::write_f32_safetensors(out, &views, metadata).map_err(|e| format!("--timm: {e}"))?;
    Ok(views.len())
}
