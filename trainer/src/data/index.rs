//! The image index: which images a run uses, and the id of each.
//!
//! An index is a root folder and a list of paths relative to it. The position of a path in the
//! list that an index was built from is the image's **id**: the row of its targets in the token
//! file, and the key of its permutation and jitter draws (see the `data` module docs). A subset
//! of an index (a holdout split) keeps the ids of its images, so it still reads the same token
//! file and the same images get the same draws.
//!
//! - [`ImageIndex::from_folder`]: every `.jpg`, `.jpeg` and `.png` file below the root (any
//!   depth, extensions in any case, symbolic links followed), sorted by path. Paths compare
//!   component by component, each as bytes: the order of a depth-first walk that visits the
//!   entries of every folder sorted by name, which is what `sorted(pathlib.Path.rglob(...))`
//!   gives in Python. [`ImageIndex::write_manifest`] writes the exact list, for a tokenizer that
//!   must produce its rows in the same order.
//! - [`ImageIndex::from_manifest`]: one relative path per line in the given order (blank lines
//!   are skipped, `\r\n` endings accepted).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{file_err, shuffle_in_place, stream_rng, DataError, Result, Stream};

/// A root folder and the relative paths of its images, with the id of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageIndex {
    root: PathBuf,
    paths: Vec<PathBuf>,
    ids: Vec<usize>,
    source_len: usize,
}

/// True for the extensions an image folder is searched for (`jpg`, `jpeg`, `png`, any case).
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["jpg", "jpeg", "png"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

impl ImageIndex {
    /// Every image below `root`, sorted by relative path (see the module docs).
    /// Errors when `root` is missing, not a folder, unreadable, or holds no image.
    pub fn from_folder(root: &Path) -> Result<Self> {
        let meta = std::fs::metadata(root).map_err(|e| file_err(root, format!("cannot open image folder: {e}")))?;
        if !meta.is_dir() {
            return Err(file_err(root, "not a folder (expected an image folder, or use a manifest)"));
        }
        let mut paths = Vec::new();
        let mut visited = HashSet::new();
        walk(root, Path::new(""), &mut paths, &mut visited)?;
        if paths.is_empty() {
            return Err(file_err(root, "no images (.jpg, .jpeg or .png, at any depth) in this folder"));
        }
        paths.sort();
        Self::from_paths(root, paths)
    }

    /// The images listed in `manifest`, one path relative to `root` per line, in file order.
    /// Errors when the manifest is unreadable or empty, holds an absolute path, or its first
    /// entry is not a file under `root` (a wrong root); later missing files are skipped by the
    /// loader like unreadable images.
    pub fn from_manifest(manifest: &Path, root: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| file_err(manifest, format!("cannot read image manifest: {e}")))?;
        let mut paths = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let path = PathBuf::from(line);
            if path.is_absolute() {
                return Err(file_err(
                    manifest,
                    format!("line {}: `{line}` is absolute; manifest paths are relative to the root", line_no + 1),
                ));
            }
            paths.push(path);
        }
        let Some(first) = paths.first() else {
            return Err(file_err(manifest, "the image manifest lists no image"));
        };
        let first_full = root.join(first);
        if !first_full.is_file() {
            return Err(file_err(
                manifest,
                format!(
                    "first entry `{}` is not a file under the root {} (wrong root?)",
                    first.display(),
                    root.display()
                ),
            ));
        }
        Self::from_paths(root, paths)
    }

    /// An index of the given relative paths, in the given order (ids 0..len).
    pub fn from_paths(root: &Path, paths: Vec<PathBuf>) -> Result<Self> {
        if paths.is_empty() {
            return Err(file_err(root, "an image index needs at least one image"));
        }
        let n = paths.len();
        Ok(Self { root: root.to_path_buf(), paths, ids: (0..n).collect(), source_len: n })
    }

    /// Number of images in this index.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True when the index holds no image (only a subset can be empty).
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The relative path of the image at `position`.
    pub fn path(&self, position: usize) -> &Path {
        &self.paths[position]
    }

    /// The full path (root joined) of the image at `position`.
    pub fn full_path(&self, position: usize) -> PathBuf {
        self.root.join(&self.paths[position])
    }

    /// The id of the image at `position`: its row in the token file.
    pub fn id(&self, position: usize) -> usize {
        self.ids[position]
    }

    /// The ids of all images, by position.
    pub fn ids(&self) -> &[usize] {
        &self.ids
    }

    /// The relative paths of all images, by position.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// How many images the index this one was cut from had (= `len()` for a whole index): the
    /// number of rows its token file must have.
    pub fn source_len(&self) -> usize {
        self.source_len
    }

    /// The images at `positions` (in that order), keeping their ids.
    pub fn subset(&self, positions: &[usize]) -> Result<Self> {
        if let Some(&bad) = positions.iter().find(|&&p| p >= self.len()) {
            return Err(DataError::Config(format!(
                "subset position {bad} is outside the index of {} images under {}",
                self.len(),
                self.root.display()
            )));
        }
        Ok(Self {
            root: self.root.clone(),
            paths: positions.iter().map(|&p| self.paths[p].clone()).collect(),
            ids: positions.iter().map(|&p| self.ids[p]).collect(),
            source_len: self.source_len,
        })
    }

    /// Writes the relative paths, one per line, to `path` (readable by [`Self::from_manifest`]).
    pub fn write_manifest(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for p in &self.paths {
            let s = p.to_str().ok_or_else(|| file_err(path, format!("path {} is not UTF-8", p.display())))?;
            if s.contains('\n') {
                return Err(file_err(path, format!("path {s:?} holds a line break")));
            }
            text.push_str(s);
            text.push('\n');
        }
        let mut f = std::fs::File::create(path).map_err(|e| file_err(path, format!("cannot create manifest: {e}")))?;
        f.write_all(text.as_bytes()).map_err(|e| file_err(path, format!("cannot write manifest: {e}")))
    }
}

/// Depth-first walk collecting image paths relative to `root`; `visited` holds the canonical
/// folders seen, so a symbolic link back up the tree is not followed twice.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>, visited: &mut HashSet<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let canonical = std::fs::canonicalize(&dir).map_err(|e| file_err(&dir, format!("cannot resolve folder: {e}")))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| file_err(&dir, format!("cannot list folder: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| file_err(&dir, format!("cannot list folder: {e}")))?;
        let rel_path = rel.join(entry.file_name());
        let mut file_type = entry.file_type().map_err(|e| file_err(entry.path(), e.to_string()))?;
        if file_type.is_symlink() {
            match std::fs::metadata(entry.path()) {
                Ok(m) => file_type = m.file_type(),
                Err(_) => continue, // a dangling link: not an image
            }
        }
        if file_type.is_dir() {
            walk(root, &rel_path, out, visited)?;
        } else if file_type.is_file() && is_image_path(&rel_path) {
            out.push(rel_path);
        }
    }
    Ok(())
}

/// Splits `index` into (train, holdout): a seeded random `fraction` of its images (rounded, at
/// least one) is held out. Both parts keep their images' ids and are in index order. Errors
/// when `fraction` is not in (0, 1) or either part would be empty.
pub fn split_holdout(index: &ImageIndex, fraction: f64, seed: u64) -> Result<(ImageIndex, ImageIndex)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::Config(format!("holdout fraction must be in (0, 1), got {fraction}")));
    }
    let n = index.len();
    let held = ((fraction * n as f64).round() as usize).max(1);
    if held >= n {
        return Err(DataError::Config(format!("holdout fraction {fraction} of {n} images leaves no training image")));
    }
    let mut positions: Vec<usize> = (0..n).collect();
    shuffle_in_place(&mut positions, &mut stream_rng(seed, u64::MAX - 1, u64::MAX - 1, Stream::Shuffle));
    let (mut holdout, mut train) = (positions[..held].to_vec(), positions[held..].to_vec());
    holdout.sort_unstable();
    train.sort_unstable();
    Ok((index.subset(&train)?, index.subset(&holdout)?))
}
