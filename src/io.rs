//! safetensors files: reading tensors of any float/int dtype the golden cases and checkpoints use
//! as f32/f64/i64, and writing f32 tensors atomically (a temporary file renamed into place, so an
//! existing file stays valid until the new one is complete). Errors name the file and tensor.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

/// Errors of file I/O, naming the file.
fn file_err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::File { path: path.to_path_buf(), detail: detail.to_string() }
}

/// A safetensors file read fully into memory.
pub struct SafeTensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl SafeTensorsFile {
    /// Reads and parses the header (the tensors are decoded on demand).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafeTensorsFile { path: path.to_path_buf(), bytes })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    /// The header's string metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default()
    }

    /// One metadata value parsed as usize, naming the key when missing or malformed.
    pub fn metadata_usize(&self, key: &str) -> Result<usize> {
        let m = self.metadata();
        let v = m.get(key).ok_or_else(|| file_err(&self.path, format!("header metadata has no `{key}`")))?;
        v.parse().map_err(|_| file_err(&self.path, format!("header metadata `{key}` = {v:?} is not an integer")))
    }

    /// Names of all tensors.
    pub fn names(&self) -> Vec<String> {
        self.parsed().names().into_iter().map(String::from).collect()
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let st = SafeTensors::deserialize(&self.bytes).expect("validated in open");
        st.tensor(name).map_err(|_| file_err(&self.path, format!("has no tensor `{name}`")))
    }

    /// A float tensor (f64, f32, bf16 or f16 on disk) as f64, with its shape.
    pub fn f64_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let v = self.view(name)?;
        let d = v.data();
        let values: Vec<f64> = match v.dtype() {
            Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::BF16 => {
                d.chunks_exact(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect()
            }
            Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect(),
            other => {
                return Err(file_err(&self.path, format!("tensor `{name}` has dtype {other:?}, expected a float")))
            }
        };
        Ok((v.shape().to_vec(), values))
    }

    /// A float tensor as f32.
    pub fn f32_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, v) = self.f64_tensor(name)?;
        Ok((shape, v.into_iter().map(|x| x as f32).collect()))
    }

    /// An integer tensor (i64, i32, i16, u16, u8) as i64.
    pub fn i64_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let v = self.view(name)?;
        let d = v.data();
        let values: Vec<i64> = match v.dtype() {
            Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I32 => d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            Dtype::I16 => d.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            Dtype::U16 => d.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            Dtype::U8 => d.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(file_err(&self.path, format!("tensor `{name}` has dtype {other:?}, expected an integer")))
            }
        };
        Ok((v.shape().to_vec(), values))
    }
}

/// Writes f32 tensors (name, shape, values) with string metadata, atomically.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes: &[u8] = bytemuck::cast_slice(values);
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| file_err(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() { None } else { Some(metadata) };
    let bytes = safetensors::tensor::serialize(views, meta).map_err(|e| file_err(path, e))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path.tmp`, syncs it, then renames it over `path`: a reader sees either the
/// old file or the complete new one, and a failed write (a full disk) leaves the old one intact.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(path, format!("cannot write: {e}"))
    })
}
