//! Token files: the target codebook id of every patch of every image, `[num_images, N-1]`.
//!
//! A token file is a `.npy` array of int16, uint16, int32 or int64 (the authors store int16),
//! row i holding the ids of image i (its id in the [`ImageIndex`](super::ImageIndex)) for the
//! N-1 patches in raster order. [`Tokens::load`] checks it before training: the dtype, that the
//! array is 2-D, that it has one row per image and N-1 columns, and that every id is in
//! [0, vocab). The ids stay in the file's dtype in memory (ImageNet-1k at int16 is 0.5 GB) and
//! are widened to i32 per row.

use std::path::{Path, PathBuf};

use super::npy::{self, NpyData, NpyDtype};
use super::{file_err, Result};

/// A checked token array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    path: PathBuf,
    rows: usize,
    cols: usize,
    vocab: usize,
    data: NpyData,
}

impl Tokens {
    /// Reads the token file at `path` and checks it against `images` images, `n_patches` = N-1
    /// patches per image and codebook size `vocab`. Each failure is an error naming the file and
    /// what is wrong (for an id out of range: the first offending image and patch).
    pub fn load(path: &Path, images: usize, n_patches: usize, vocab: usize) -> Result<Self> {
        let (header, mut r) = npy::open_checked(path)?;
        let [rows, cols] = header.shape[..] else {
            return Err(file_err(
                path,
                format!(
                    "token array has shape {:?}; expected 2-D [images, patches] = [{images}, {n_patches}]",
                    header.shape
                ),
            ));
        };
        if rows != images {
            return Err(file_err(
                path,
                format!("token array has {rows} rows but there are {images} images (shape {:?})", header.shape),
            ));
        }
        if cols != n_patches {
            return Err(file_err(
                path,
                format!(
                    "token array has {cols} ids per image but the model has {n_patches} patches (N-1); shape {:?}",
                    header.shape
                ),
            ));
        }
        let data = npy::read_data(&mut r, header.dtype, rows * cols)
            .map_err(|e| file_err(path, format!("cannot read data: {e}")))?;
        Self::new(path.to_path_buf(), rows, cols, vocab, data)
    }

    /// [`Self::load`] for the images of `index` (one row per image of the index it was cut
    /// from) and the patches and codebook of `model`.
    pub fn load_for(path: &Path, index: &super::ImageIndex, model: &mapet::model::ModelConfig) -> Result<Self> {
        Self::load(path, index.source_len(), model.n_tokens() - 1, model.vocab)
    }

    /// Tokens held in memory (a synthetic data set, or a tokenizer's output before writing),
    /// with the same checks as [`Self::load`]; `label` names them in errors.
    pub fn from_ids(label: &str, rows: usize, cols: usize, vocab: usize, ids: Vec<i32>) -> Result<Self> {
        if ids.len() != rows * cols {
            return Err(file_err(label, format!("{} ids given for [{rows}, {cols}]", ids.len())));
        }
        Self::new(PathBuf::from(label), rows, cols, vocab, NpyData::I32(ids))
    }

    fn new(path: PathBuf, rows: usize, cols: usize, vocab: usize, data: NpyData) -> Result<Self> {
        if cols == 0 || vocab == 0 {
            return Err(file_err(
                &path,
                format!("need at least one patch and one codebook entry, got {cols} and {vocab}"),
            ));
        }
        if let Some(i) = first_out_of_range(&data, vocab as i64) {
            return Err(file_err(
                &path,
                format!(
                    "token id {} at image {}, patch {} is outside the codebook [0, {vocab})",
                    data.get(i),
                    i / cols,
                    i % cols
                ),
            ));
        }
        Ok(Self { path, rows, cols, vocab, data })
    }

    /// The file the tokens came from (or the label given to [`Self::from_ids`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of images (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Ids per image: N-1.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The codebook size the ids were checked against.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The dtype the ids are stored in.
    pub fn dtype(&self) -> NpyDtype {
        self.data.dtype()
    }

    /// Writes the ids of image `row` into `out` (`cols()` values).
    pub fn row_into(&self, row: usize, out: &mut [i32]) {
        let (start, end) = (row * self.cols, (row + 1) * self.cols);
        match &self.data {
            NpyData::I16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &x)| *o = x as i32),
            NpyData::U16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &x)| *o = x as i32),
            NpyData::I32(v) => out.copy_from_slice(&v[start..end]),
            // Checked in [0, vocab) at load, so it fits.
            NpyData::I64(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &x)| *o = x as i32),
        }
    }

    /// The ids of image `row`.
    pub fn row(&self, row: usize) -> Vec<i32> {
        let mut out = vec![0; self.cols];
        self.row_into(row, &mut out);
        out
    }
}

/// The position of the first element outside [0, vocab).
fn first_out_of_range(data: &NpyData, vocab: i64) -> Option<usize> {
    match data {
        NpyData::I16(v) => v.iter().position(|&x| x < 0 || x as i64 >= vocab),
        NpyData::U16(v) => v.iter().position(|&x| x as i64 >= vocab),
        NpyData::I32(v) => v.iter().position(|&x| x < 0 || x as i64 >= vocab),
        NpyData::I64(v) => v.iter().position(|&x| x < 0 || x >= vocab),
    }
}

/// Writes token ids `[ids.len() / cols, cols]` to a `.npy` file of `dtype` (a tokenizer's
/// output; int16 is what the authors use). Errors when an id does not fit the dtype.
pub fn write_tokens(path: &Path, dtype: NpyDtype, cols: usize, ids: &[i32]) -> Result<()> {
    if cols == 0 || !ids.len().is_multiple_of(cols) {
        return Err(file_err(path, format!("{} ids do not form rows of {cols}", ids.len())));
    }
    let data = NpyData::from_i64(dtype, ids.iter().map(|&x| x as i64))
        .map_err(|e| file_err(path, format!("cannot store token ids as {}: {e}", dtype.name())))?;
    npy::write_npy(path, &[ids.len() / cols, cols], &data)
}

/// Token ids `[rows, cols]` written as they are produced, a block at a time (a tokenizer labelling
/// a set chunk by chunk): the same file as [`write_tokens`], without holding every id. The file
/// appears at `path` only once [`TokenWriter::finish`] has checked that every id was written.
#[derive(Debug)]
pub struct TokenWriter {
    npy: npy::NpyWriter,
    path: PathBuf,
    dtype: NpyDtype,
    written: usize,
}

impl TokenWriter {
    /// Starts a token file of `rows` x `cols` ids of `dtype` at `path`.
    pub fn create(path: &Path, dtype: NpyDtype, rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(file_err(path, "token rows of 0 ids"));
        }
        Ok(TokenWriter {
            npy: npy::NpyWriter::create(path, dtype, &[rows, cols])?,
            path: path.into(),
            dtype,
            written: 0,
        })
    }

    /// Appends the next ids (in row-major order; any count, not only whole rows). Errors when an
    /// id does not fit the dtype or when there are more ids than the shape holds.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let data = NpyData::from_i64(self.dtype, ids.iter().map(|&x| x as i64)).map_err(|e| {
            file_err(
                &self.path,
                format!("cannot store token ids as {} (from id {}): {e}", self.dtype.name(), self.written),
            )
        })?;
        self.npy.write(&data)?;
        self.written += ids.len();
        Ok(())
    }

    /// Checks that every id was written and puts the file in place.
    pub fn finish(self) -> Result<()> {
        self.npy.finish()
    }
}
