//! A minimal `.npy` reader and writer for the integer arrays of token files, and a reader of float
//! arrays (external features) by blocks of rows.
//!
//! The format (NumPy's `NEP 1`): the magic `\x93NUMPY`, a major and minor version byte, the
//! header length (u16 little-endian in version 1, u32 in versions 2 and 3), then the header: a
//! Python dict literal `{'descr': '<i2', 'fortran_order': False, 'shape': (R, C), }` padded with
//! spaces and ending in a newline, then the raw data. Supported: little-endian int16, uint16,
//! int32 and int64 (`<i2 <u2 <i4 <i8`), C order, any shape. Written files use version 1 (2 when
//! the header is too long for a u16) with the header padded so the data starts at a multiple of
//! 64 bytes, as NumPy writes them, and are written to `PATH.tmp` and renamed into place, whole
//! ([`write_npy`]) or a block at a time ([`NpyWriter`]). Float arrays (`<f4 <f8`) are read as f32,
//! whole ([`read_npy_f32`]) or by ranges of rows without reading the rest ([`NpyF32Reader`]).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{file_err, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The element types this reader and writer support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<i2`
    I16,
    /// `<u2`
    U16,
    /// `<i4`
    I32,
    /// `<i8`
    I64,
}

impl NpyDtype {
    /// Every supported dtype.
    pub const ALL: [NpyDtype; 4] = [NpyDtype::I16, NpyDtype::U16, NpyDtype::I32, NpyDtype::I64];

    /// The header's `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::I16 => "<i2",
            NpyDtype::U16 => "<u2",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::I16 | NpyDtype::U16 => 2,
            NpyDtype::I32 => 4,
            NpyDtype::I64 => 8,
        }
    }

    /// NumPy's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::I16 => "int16",
            NpyDtype::U16 => "uint16",
            NpyDtype::I32 => "int32",
            NpyDtype::I64 => "int64",
        }
    }

    fn from_descr(descr: &str) -> std::result::Result<Self, String> {
        if let Some(d) = NpyDtype::ALL.into_iter().find(|d| d.descr() == descr) {
            return Ok(d);
        }
        let supported = "int16, uint16, int32 or int64 (little-endian: <i2, <u2, <i4, <i8)";
        if let Some(rest) = descr.strip_prefix('>') {
            if NpyDtype::ALL.iter().any(|d| &d.descr()[1..] == rest) {
                return Err(format!("dtype `{descr}` is big-endian; expected {supported}"));
            }
        }
        Err(format!("dtype `{descr}` is not supported; expected {supported}"))
    }
}

/// The elements of an array, in C order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NpyData {
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl NpyData {
    /// The element type.
    pub fn dtype(&self) -> NpyDtype {
        match self {
            NpyData::I16(_) => NpyDtype::I16,
            NpyData::U16(_) => NpyDtype::U16,
            NpyData::I32(_) => NpyDtype::I32,
            NpyData::I64(_) => NpyDtype::I64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            NpyData::I16(v) => v.len(),
            NpyData::U16(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
        }
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened to i64.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            NpyData::I16(v) => v[i] as i64,
            NpyData::U16(v) => v[i] as i64,
            NpyData::I32(v) => v[i] as i64,
            NpyData::I64(v) => v[i],
        }
    }

    /// `values` narrowed to `dtype`; errors with the first value that does not fit.
    pub fn from_i64(dtype: NpyDtype, values: impl IntoIterator<Item = i64>) -> std::result::Result<Self, String> {
        fn narrow<T: TryFrom<i64>>(values: impl IntoIterator<Item = i64>, name: &str) -> Result2<Vec<T>> {
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| T::try_from(v).map_err(|_| format!("element {i} = {v} does not fit in {name}")))
                .collect()
        }
        Ok(match dtype {
            NpyDtype::I16 => NpyData::I16(narrow(values, dtype.name())?),
            NpyDtype::U16 => NpyData::U16(narrow(values, dtype.name())?),
            NpyDtype::I32 => NpyData::I32(narrow(values, dtype.name())?),
            NpyDtype::I64 => NpyData::I64(values.into_iter().collect()),
        })
    }
}

type Result2<T> = std::result::Result<T, String>;

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyArray {
    /// The shape (C order).
    pub shape: Vec<usize>,
    /// The elements.
    pub data: NpyData,
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// The element type.
    pub dtype: NpyDtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements (product of the shape).
    pub fn elements(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
}

/// Reads and checks the header of an open `.npy` file, leaving `r` at the start of the data.
/// The error is the reason, without the path.
pub fn read_header(r: &mut impl Read) -> std::result::Result<NpyHeader, String> {
    let raw = read_raw_header(r)?;
    let dtype = NpyDtype::from_descr(&raw.descr)?;
    Ok(NpyHeader { dtype, shape: raw.shape, data_offset: raw.data_offset })
}

/// A header whose `descr` is not yet checked against a reader's dtypes.
struct RawHeader {
    descr: String,
    shape: Vec<usize>,
    data_offset: usize,
}

/// Reads the magic, version and header dict, refusing Fortran order; leaves `r` at the data.
fn read_raw_header(r: &mut impl Read) -> Result2<RawHeader> {
    let mut pre = [0u8; 8];
    read_prefix(r, &mut pre, "the magic string and version")?;
    if &pre[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic string)".into());
    }
    let (major, minor) = (pre[6], pre[7]);
    let len_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => return Err(format!(".npy format version {major}.{minor} is not supported (1.0, 2.0, 3.0 are)")),
    };
    let mut len = [0u8; 4];
    read_prefix(r, &mut len[..len_bytes], "the header length")?;
    let header_len = u32::from_le_bytes(len) as usize;
    let mut header = vec![0u8; header_len];
    read_prefix(r, &mut header, &format!("the {header_len}-byte header"))?;
    let text: String = if major == 3 {
        String::from_utf8(header).map_err(|_| "header is not UTF-8".to_string())?
    } else {
        header.iter().map(|&b| b as char).collect() // latin-1
    };
    let (descr, fortran, shape) = parse_header_dict(&text).map_err(|e| format!("bad header {text:?}: {e}"))?;
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err("array is in Fortran order; only C order is supported (save with np.ascontiguousarray)".into());
    }
    Ok(RawHeader { descr, shape, data_offset: 6 + 2 + len_bytes + header_len })
}

fn read_prefix(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result2<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("truncated header: the file ends inside {what}"),
        _ => format!("cannot read {what}: {e}"),
    })
}

/// Reads `count` elements of `dtype` (little-endian) from `r`.
pub fn read_data(r: &mut impl Read, dtype: NpyDtype, count: usize) -> std::io::Result<NpyData> {
    macro_rules! read_as {
        ($t:ty, $variant:ident) => {{
            let mut v = vec![<$t>::default(); count];
            r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
            if cfg!(target_endian = "big") {
                v.iter_mut().for_each(|x| *x = <$t>::from_le(*x));
            }
            NpyData::$variant(v)
        }};
    }
    Ok(match dtype {
        NpyDtype::I16 => read_as!(i16, I16),
        NpyDtype::U16 => read_as!(u16, U16),
        NpyDtype::I32 => read_as!(i32, I32),
        NpyDtype::I64 => read_as!(i64, I64),
    })
}

/// Opens `path`, reads its header and checks that the file holds exactly the data it announces.
pub(crate) fn open_checked(path: &Path) -> Result<(NpyHeader, std::io::BufReader<File>)> {
    let file = File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| file_err(path, e.to_string()))?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let header = read_header(&mut r).map_err(|e| file_err(path, e))?;
    let bytes = header
        .elements()
        .and_then(|n| n.checked_mul(header.dtype.size()))
        .ok_or_else(|| file_err(path, format!("shape {:?} is too large", header.shape)))?;
    let have = file_len.saturating_sub(header.data_offset as u64);
    if have < bytes as u64 {
        return Err(file_err(
            path,
            format!(
                "truncated data: shape {:?} of {} needs {bytes} bytes after the header, the file has {have}",
                header.shape,
                header.dtype.name()
            ),
        ));
    }
    if have > bytes as u64 {
        return Err(file_err(
            path,
            format!(
                "{} bytes beyond the data of shape {:?} of {} (not a single array?)",
                have - bytes as u64,
                header.shape,
                header.dtype.name()
            ),
        ));
    }
    Ok((header, r))
}

/// Reads a whole `.npy` file of a supported dtype.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let (header, mut r) = open_checked(path)?;
    let count = header.elements().unwrap_or(0);
    let data = read_data(&mut r, header.dtype, count).map_err(|e| file_err(path, format!("cannot read data: {e}")))?;
    Ok(NpyArray { shape: header.shape, data })
}

/// Writes `data` with `shape` (C order) to `path`, atomically (`PATH.tmp` renamed into place).
pub fn write_npy(path: &Path, shape: &[usize], data: &NpyData) -> Result<()> {
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(data.len()) {
        return Err(file_err(path, format!("shape {shape:?} does not match the {} elements given", data.len())));
    }
    let mut w = NpyWriter::create(path, data.dtype(), shape)?;
    w.write(data)?;
    w.finish()
}

/// A `.npy` file written a piece at a time, for arrays produced in blocks: the header (the whole
/// shape, known up front) goes first, then the elements in C order as they come, into `PATH.tmp`;
/// [`NpyWriter::finish`] checks that every element was written and renames it into place. A writer
/// dropped before `finish` (an error on the way) removes `PATH.tmp`, so `path` is only ever
/// replaced by a complete file.
#[derive(Debug)]
pub struct NpyWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<File>>,
    dtype: NpyDtype,
    expected: usize,
    written: usize,
}

impl NpyWriter {
    /// Starts `path` (as `PATH.tmp`) with the header of an array of `dtype` and `shape`.
    pub fn create(path: &Path, dtype: NpyDtype, shape: &[usize]) -> Result<Self> {
        let expected = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| file_err(path, format!("shape {shape:?} is too large")))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| cannot_write(path, e))?;
        let w = Some(BufWriter::with_capacity(1 << 20, file));
        let mut writer = NpyWriter { path: path.to_path_buf(), tmp, w, dtype, expected, written: 0 };
        let header = header_bytes(dtype, shape);
        let w = writer.w.as_mut().expect("just created");
        w.write_all(&header).map_err(|e| cannot_write(path, e))?; // dropping `writer` removes PATH.tmp
        Ok(writer)
    }

    /// Appends `data` (of the writer's dtype; at most the elements still missing).
    pub fn write(&mut self, data: &NpyData) -> Result<()> {
        if data.dtype() != self.dtype {
            return Err(file_err(
                &self.path,
                format!("{} elements given to an array of {}", data.dtype().name(), self.dtype.name()),
            ));
        }
        if data.len() > self.expected - self.written {
            return Err(file_err(
                &self.path,
                format!(
                    "{} elements given, {} more than the shape holds",
                    data.len(),
                    data.len() + self.written - self.expected
                ),
            ));
        }
        let w = self.w.as_mut().expect("an unfinished writer holds its file");
        let result = match data {
            NpyData::I16(v) => v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())),
            NpyData::U16(v) => v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())),
            NpyData::I32(v) => v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())),
            NpyData::I64(v) => v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())),
        };
        result.map_err(|e| cannot_write(&self.path, e))?;
        self.written += data.len();
        Ok(())
    }

    /// Checks that every element was written, flushes, syncs and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(file_err(
                &self.path,
                format!("{} of the {} elements were written", self.written, self.expected),
            ));
        }
        let w = self.w.take().expect("an unfinished writer holds its file");
        let result = (|| -> std::io::Result<()> {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            cannot_write(&self.path, e)
        })
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            drop(w);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn cannot_write(path: &Path, e: std::io::Error) -> super::DataError {
    file_err(path, format!("cannot write: {e}"))
}

/// The magic, version, length and padded header of an array (NumPy's layout).
fn header_bytes(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}", dtype.descr());
    let padded = |pre: usize| dict.len() + 1 + (64 - (pre + dict.len() + 1) % 64) % 64;
    let (version, len_bytes) = if padded(10) <= u16::MAX as usize { (1u8, 2) } else { (2u8, 4) };
    let pre = 6 + 2 + len_bytes;
    let pad = padded(pre) - dict.len() - 1;
    dict.extend(std::iter::repeat_n(' ', pad));
    dict.push('\n');
    let mut out = Vec::with_capacity(pre + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if len_bytes == 2 {
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out
}

/// A header dict's value: a string, a boolean or a tuple of integers.
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses `{'descr': ..., 'fortran_order': ..., 'shape': (...), }` into (descr, fortran, shape).
fn parse_header_dict(text: &str) -> Result2<(String, bool, Vec<usize>)> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = match p.value()? {
            Value::Str(k) => k,
            _ => return Err(format!("expected a string key at byte {}", p.i)),
        };
        p.expect(b':')?;
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr = Some(s),
            ("fortran_order", Value::Bool(b)) => fortran = Some(b),
            ("shape", Value::Tuple(t)) => shape = Some(t),
            ("descr" | "fortran_order" | "shape", _) => {
                return Err(format!("key '{key}' has a value of the wrong type"))
            }
            (other, _) => return Err(format!("unexpected key '{other}'")),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text after the dict at byte {}", p.i));
    }
    Ok((
        descr.ok_or("missing key 'descr'")?,
        fortran.ok_or("missing key 'fortran_order'")?,
        shape.ok_or("missing key 'shape'")?,
    ))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result2<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result2<Value> {
        self.skip_ws();
        match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => {
                let start = self.i + 1;
                let end = self.s[start..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or_else(|| format!("unterminated string at byte {}", self.i))?;
                self.i = start + end + 1;
                Ok(Value::Str(String::from_utf8_lossy(&self.s[start..start + end]).into_owned()))
            }
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    dims.push(self.integer()?);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(Value::Tuple(dims))
            }
            _ if self.s[self.i..].starts_with(b"True") => {
                self.i += 4;
                Ok(Value::Bool(true))
            }
            _ if self.s[self.i..].starts_with(b"False") => {
                self.i += 5;
                Ok(Value::Bool(false))
            }
            _ => Err(format!("unexpected value at byte {}", self.i)),
        }
    }

    fn integer(&mut self) -> Result2<usize> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
        let n = digits.parse().map_err(|_| format!("expected a dimension at byte {start}"))?;
        if self.s.get(self.i) == Some(&b'L') {
            self.i += 1; // Python 2's long suffix
        }
        Ok(n)
    }
}

/// Reads a whole `.npy` file of floats as f32: `<f4` as is, `<f8` rounded to f32 (external
/// features, e.g. an encoder's patch embeddings). Returns (shape, values in C order). Errors name
/// the file: another dtype, Fortran order, a truncated or oversized file.
pub fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut f = NpyF32Reader::open(path)?;
    let mut values = Vec::new();
    f.read_elements_into(0..f.elements(), &mut values)?;
    Ok((f.shape, values))
}

/// A float `.npy` file (`<f4`, or `<f8` rounded to f32) opened to read parts of it: the header is
/// read and checked once (dtype, C order, and that the file holds exactly the bytes its shape
/// announces), then each read seeks to the elements it wants and reads nothing else, so that an
/// array larger than memory can be read a block of rows at a time. Errors name the file.
#[derive(Debug)]
pub struct NpyF32Reader {
    path: PathBuf,
    file: File,
    shape: Vec<usize>,
    /// Bytes per element: 4 (`<f4`) or 8 (`<f8`).
    size: usize,
    data_offset: u64,
    elements: usize,
    row_len: usize,
}

impl NpyF32Reader {
    /// Opens `path` and checks its header and length.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |detail: String| file_err(path, detail);
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let raw = read_raw_header(&mut std::io::BufReader::new(&file)).map_err(bad)?;
        let size = match raw.descr.as_str() {
            "<f4" => 4,
            "<f8" => 8,
            other => {
                return Err(bad(format!(
                    "dtype `{other}` is not supported for features; expected float32 or float64 (little-endian: <f4, \
                     <f8)"
                )))
            }
        };
        let shape = raw.shape;
        let too_large = || bad(format!("shape {shape:?} is too large"));
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_large)?;
        let row_len = shape.iter().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_large)?;
        let bytes = elements.checked_mul(size).ok_or_else(too_large)? as u64;
        let have = file_len.saturating_sub(raw.data_offset as u64);
        let descr = &raw.descr;
        if have < bytes {
            return Err(bad(format!(
                "truncated data: shape {shape:?} of {descr} needs {bytes} bytes after the header, the file has {have}"
            )));
        }
        if have > bytes {
            return Err(bad(format!(
                "{} bytes beyond the data of shape {shape:?} of {descr} (not a single array?)",
                have - bytes
            )));
        }
        Ok(NpyF32Reader {
            path: path.to_path_buf(),
            file,
            shape,
            size,
            data_offset: raw.data_offset as u64,
            elements,
            row_len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// NumPy's name of the file's dtype: `float32` or `float64`.
    pub fn dtype_name(&self) -> &'static str {
        if self.size == 4 {
            "float32"
        } else {
            "float64"
        }
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Rows of the leading axis (1 for a 0-d array).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row of the leading axis (the product of the other dimensions).
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Rows `rows` of the leading axis, in C order (`rows.len() · row_len()` values).
    pub fn read_rows(&mut self, rows: Range<usize>) -> Result<Vec<f32>> {
        if rows.start > rows.end || rows.end > self.rows() {
            return Err(file_err(&self.path, format!("rows {rows:?} are outside the {} rows", self.rows())));
        }
        let mut out = Vec::with_capacity(rows.len() * self.row_len);
        self.read_elements_into(rows.start * self.row_len..rows.end * self.row_len, &mut out)?;
        Ok(out)
    }

    /// Appends the elements at flat (C-order) positions `elements` to `out`: only those bytes are
    /// read. On an error `out` is left as it was.
    pub fn read_elements_into(&mut self, elements: Range<usize>, out: &mut Vec<f32>) -> Result<()> {
        if elements.start > elements.end || elements.end > self.elements {
            return Err(file_err(
                &self.path,
                format!("elements {elements:?} are outside the {} elements", self.elements),
            ));
        }
        let offset = self.data_offset + (elements.start * self.size) as u64;
        let start = out.len();
        let result = (|| -> std::io::Result<()> {
            self.file.seek(SeekFrom::Start(offset))?;
            if self.size == 4 {
                out.resize(start + elements.len(), 0.0);
                let dst = &mut out[start..];
                self.file.read_exact(bytemuck::cast_slice_mut(dst))?;
                if cfg!(target_endian = "big") {
                    dst.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
            } else {
                out.reserve(elements.len());
                let mut buf = vec![0u8; 8 * elements.len().min(1 << 16)];
                let mut left = elements.len();
                while left > 0 {
                    let piece = &mut buf[..8 * left.min(1 << 16)];
                    self.file.read_exact(piece)?;
                    out.extend(
                        piece.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
                    );
                    left -= piece.len() / 8;
                }
            }
            Ok(())
        })();
        result.map_err(|e| {
            out.truncate(start);
            file_err(&self.path, format!("cannot read elements {elements:?} at byte {offset}: {e}"))
        })
    }
}
