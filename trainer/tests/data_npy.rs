//! `.npy` reading and writing (whole, by rows, a block at a time), and the token file checks.

use std::path::Path;

use mapet_trainer::data::npy::{read_header, read_npy_f32, NpyData, NpyDtype, NpyF32Reader, NpyWriter};
use mapet_trainer::data::tokens::{write_tokens, TokenWriter};
use mapet_trainer::data::{read_npy, write_npy, Tokens};
use rand::Rng;

/// Random values of `dtype` including its extremes.
fn random_data(rng: &mut impl Rng, dtype: NpyDtype, n: usize) -> NpyData {
    let (lo, hi): (i64, i64) = match dtype {
        NpyDtype::I16 => (i16::MIN as i64, i16::MAX as i64),
        NpyDtype::U16 => (0, u16::MAX as i64),
        NpyDtype::I32 => (i32::MIN as i64, i32::MAX as i64),
        NpyDtype::I64 => (i64::MIN, i64::MAX),
    };
    let mut v: Vec<i64> = (0..n).map(|_| rng.random_range(lo..=hi)).collect();
    v[0] = lo;
    v[n - 1] = hi;
    NpyData::from_i64(dtype, v).unwrap()
}

/// A hand-made `.npy` file: `header` dict text, padded NumPy-style, version 1.0, then `data`.
fn raw_npy(path: &Path, dict: &str, data: &[u8]) {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn round_trip_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("npy_round_trip");
    for dtype in NpyDtype::ALL {
        for shape in [vec![7, 13], vec![1, 196], vec![5], vec![2, 3, 4]] {
            let n: usize = shape.iter().product();
            let data = random_data(&mut rng, dtype, n);
            let path = dir.path().join(format!("{}.npy", dtype.name()));
            write_npy(&path, &shape, &data).unwrap();
            let back = read_npy(&path).unwrap();
            assert_eq!(back.shape, shape, "{dtype:?}");
            assert_eq!(back.data, data, "{dtype:?} {shape:?}");
            // NumPy's layout: magic, version 1.0, a 64-byte aligned header with this dict.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
            let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + hlen) % 64, 0);
            assert_eq!(bytes.len(), 10 + hlen + n * dtype.size());
            let text = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
            let dims = if shape.len() == 1 {
                format!("({},)", shape[0])
            } else {
                format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
            };
            assert_eq!(
                text.trim_end(),
                format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", dtype.descr())
            );
            assert!(text.ends_with('\n'));
            // Little-endian data right after the header.
            assert_eq!(&bytes[10 + hlen..10 + hlen + dtype.size()], &data_le_first(&data)[..]);
            assert!(!dir.path().join(format!("{}.npy.tmp", dtype.name())).exists());
        }
    }
}

fn data_le_first(data: &NpyData) -> Vec<u8> {
    match data {
        NpyData::I16(v) => v[0].to_le_bytes().to_vec(),
        NpyData::U16(v) => v[0].to_le_bytes().to_vec(),
        NpyData::I32(v) => v[0].to_le_bytes().to_vec(),
        NpyData::I64(v) => v[0].to_le_bytes().to_vec(),
    }
}

#[test]
fn header_variants_numpy_may_write() {
    // Version 2.0, double quotes, keys in another order, no trailing comma, Python 2 long suffix.
    let dict = "{\"shape\": (2L, 3L), \"fortran_order\": False, \"descr\": \"<u2\"}";
    let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
    let h = format!("{dict}\n");
    bytes.extend_from_slice(&(h.len() as u32).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    let header = read_header(&mut &bytes[..]).unwrap();
    assert_eq!((header.dtype, header.shape.clone(), header.data_offset), (NpyDtype::U16, vec![2, 3], bytes.len()));
    // Fortran order is the same layout for a 1-D array (or one with a single non-trivial dim).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.npy");
    raw_npy(&p, "{'descr': '<i4', 'fortran_order': True, 'shape': (3, 1), }", &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
    assert_eq!(read_npy(&p).unwrap().data, NpyData::I32(vec![1, 2, 3]));
}

fn load_err(path: &Path, images: usize, patches: usize, vocab: usize) -> String {
    let e = Tokens::load(path, images, patches, vocab).unwrap_err().to_string();
    assert!(e.contains(&path.file_name().unwrap().to_string_lossy().into_owned()), "error must name the file: {e}");
    e
}

#[test]
fn token_file_loads_and_widens_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("token_load");
    let (rows, cols, vocab) = (9, 16, 40000);
    for dtype in NpyDtype::ALL {
        let ids: Vec<i32> = (0..rows * cols)
            .map(
                |_| if dtype == NpyDtype::I16 { rng.random_range(0..32768) } else { rng.random_range(0..vocab as i32) },
            )
            .collect();
        let path = dir.path().join(format!("tokens_{}.npy", dtype.name()));
        write_tokens(&path, dtype, cols, &ids).unwrap();
        let t = Tokens::load(&path, rows, cols, vocab).unwrap();
        assert_eq!((t.rows(), t.cols(), t.dtype(), t.vocab()), (rows, cols, dtype, vocab));
        for r in 0..rows {
            assert_eq!(t.row(r), ids[r * cols..(r + 1) * cols], "{dtype:?} row {r}");
        }
    }
    // Checked against an index and a model: one row per image, N-1 = 16 columns, ids < vocab.
    let path = dir.path().join("tokens_int32.npy");
    let paths = (0..rows).map(|i| std::path::PathBuf::from(format!("{i}.jpg"))).collect();
    let index = mapet_trainer::data::ImageIndex::from_paths(dir.path(), paths).unwrap();
    let model = mapet::model::ModelConfig { image: 16, patch: 4, dim: 8, depth: 1, heads: 1, vocab, context: 5 };
    assert_eq!(Tokens::load_for(&path, &index, &model).unwrap().cols(), 16);
    let small = mapet::model::ModelConfig { vocab: 10, ..model };
    assert!(Tokens::load_for(&path, &index, &small).unwrap_err().to_string().contains("outside the codebook [0, 10)"));
    // An id that does not fit the dtype is refused at write time.
    let e = write_tokens(&dir.path().join("big.npy"), NpyDtype::I16, 2, &[1, 40000]).unwrap_err().to_string();
    assert!(e.contains("big.npy") && e.contains("40000") && e.contains("int16"), "{e}");
    assert!(!dir.path().join("big.npy").exists());
}

#[test]
fn token_file_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("token_errors");
    let (rows, cols, vocab) = (6, 16, 100);
    let ids: Vec<i32> = (0..rows * cols).map(|_| rng.random_range(0..vocab as i32)).collect();
    let good = dir.path().join("good.npy");
    write_tokens(&good, NpyDtype::I16, cols, &ids).unwrap();
    Tokens::load(&good, rows, cols, vocab).unwrap();

    // Count: one row per image.
    let e = load_err(&good, rows + 1, cols, vocab);
    assert!(e.contains("6 rows") && e.contains("7 images"), "{e}");
    // Shape: N-1 columns; 2-D.
    let e = load_err(&good, rows, 196, vocab);
    assert!(e.contains("16 ids per image") && e.contains("196 patches"), "{e}");
    let flat = dir.path().join("flat.npy");
    write_npy(&flat, &[rows * cols], &NpyData::I32(ids.clone())).unwrap();
    let e = load_err(&flat, rows, cols, vocab);
    assert!(e.contains("2-D") && e.contains("[96]"), "{e}");
    let cube = dir.path().join("cube.npy");
    write_npy(&cube, &[rows, 4, 4], &NpyData::I32(ids.clone())).unwrap();
    assert!(load_err(&cube, rows, cols, vocab).contains("2-D"));
    // Dtype: floats, big-endian and 8-bit are refused by name.
    for (descr, size, what) in [("<f4", 4, "not supported"), (">i2", 2, "big-endian"), ("|u1", 1, "not supported")] {
        let p = dir.path().join("dtype.npy");
        raw_npy(
            &p,
            &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}"),
            &vec![0u8; rows * cols * size],
        );
        let e = load_err(&p, rows, cols, vocab);
        assert!(e.contains(descr) && e.contains(what) && e.contains("int16"), "{e}");
    }
    // Range: first offending image and patch.
    for (bad, at) in [(vocab as i32, 3 * cols + 7), (-1, 5 * cols + 15), (vocab as i32 + 1000, 0)] {
        let mut v = ids.clone();
        v[at] = bad;
        if at > 0 {
            v[at + 1..].iter_mut().step_by(5).for_each(|x| *x = -3); // later ones are not reported
        }
        let p = dir.path().join("range.npy");
        write_tokens(&p, NpyDtype::I32, cols, &v).unwrap();
        let e = load_err(&p, rows, cols, vocab);
        let want = format!("token id {bad} at image {}, patch {}", at / cols, at % cols);
        assert!(e.contains(&want) && e.contains("[0, 100)"), "{e}\nwant: {want}");
    }
    // Truncated header, truncated data, trailing bytes, not a .npy, Fortran order.
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.path().join("cut.npy");
    for cut in [4, 9, 30] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = load_err(&p, rows, cols, vocab);
        assert!(e.contains("truncated header") || (cut == 4 && e.contains("truncated")), "cut at {cut}: {e}");
    }
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    let e = load_err(&p, rows, cols, vocab);
    assert!(e.contains("truncated data") && e.contains("192 bytes"), "{e}");
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 10]);
    std::fs::write(&p, long).unwrap();
    assert!(load_err(&p, rows, cols, vocab).contains("10 bytes beyond"));
    std::fs::write(&p, b"PK\x03\x04 a zip, maybe an .npz").unwrap();
    assert!(load_err(&p, rows, cols, vocab).contains("not a .npy"));
    raw_npy(
        &p,
        &format!("{{'descr': '<i2', 'fortran_order': True, 'shape': ({rows}, {cols}), }}"),
        &vec![0u8; rows * cols * 2],
    );
    assert!(load_err(&p, rows, cols, vocab).contains("Fortran"));
    raw_npy(&p, "{'descr': '<i2', 'fortran_order': False, 'shape': (6, 16), 'extra': 1, }", &[]);
    assert!(load_err(&p, rows, cols, vocab).contains("bad header"));
    let e = load_err(&dir.path().join("missing.npy"), rows, cols, vocab);
    assert!(e.contains("cannot open"), "{e}");
}

/// A float `.npy` of `shape` holding `values`: `<f4`, or `<f8` when `f64` (the f32 values widened).
fn float_npy(path: &Path, shape: &[usize], values: &[f32], f64: bool) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let descr = if f64 { "<f8" } else { "<f4" };
    let data: Vec<u8> = if f64 {
        values.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    raw_npy(path, &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"), &data);
}

#[test]
fn float_rows_read_by_range_equal_the_whole_array() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("float_rows_read_by_range");
    let (n, p, f) = (9, 5, 3);
    let values = mapet::testing::uniform(&mut rng, n * p * f, 2.0);
    for f64 in [false, true] {
        let path = dir.path().join(format!("x{f64}.npy"));
        float_npy(&path, &[n, p, f], &values, f64);
        let (shape, whole) = read_npy_f32(&path).unwrap();
        assert_eq!((shape, &whole), (vec![n, p, f], &values));
        let mut r = NpyF32Reader::open(&path).unwrap();
        assert_eq!((r.rows(), r.row_len(), r.elements()), (n, p * f, n * p * f));
        assert_eq!(r.dtype_name(), if f64 { "float64" } else { "float32" });
        // Ranges in any order, empty ones included.
        for _ in 0..20 {
            let a = rng.random_range(0..=n);
            let b = rng.random_range(a..=n);
            assert_eq!(r.read_rows(a..b).unwrap(), &values[a * p * f..b * p * f], "rows {a}..{b}");
        }
        let mut out = vec![7.0];
        r.read_elements_into(4..11, &mut out).unwrap();
        assert_eq!(out[0], 7.0);
        assert_eq!(&out[1..], &values[4..11]);
        // Outside the array: an error naming the file, `out` untouched.
        let e = r.read_rows(3..n + 1).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()) && e.contains("outside"), "{e}");
        let e = r.read_elements_into(0..n * p * f + 1, &mut out).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        assert_eq!(out.len(), 8);
    }
}

#[test]
fn float_reader_checks_the_file_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("float_reader_checks");
    let values = mapet::testing::uniform(&mut rng, 24, 1.0);
    let name = |s: &str| dir.path().join(s);
    let err = |path: &Path| {
        let e = NpyF32Reader::open(path).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        e
    };
    let good = name("good.npy");
    float_npy(&good, &[4, 6], &values, false);
    let bytes = std::fs::read(&good).unwrap();
    // Truncated: one value short, or cut inside the header.
    let cut = name("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    let e = err(&cut);
    assert!(e.contains("truncated") && e.contains("96 bytes") && e.contains("92"), "{e}");
    std::fs::write(&cut, &bytes[..20]).unwrap();
    assert!(err(&cut).contains("truncated header"));
    // Longer than the shape announces.
    let long = name("long.npy");
    let mut more = bytes.clone();
    more.extend_from_slice(&[0; 8]);
    std::fs::write(&long, more).unwrap();
    assert!(err(&long).contains("8 bytes beyond"));
    // Other dtypes: integers, big-endian floats, half floats.
    for descr in ["<i4", ">f4", "<f2"] {
        let path = name("dtype.npy");
        raw_npy(&path, &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (4, 6), }}"), &bytes[64..]);
        let e = err(&path);
        assert!(e.contains(descr) && e.contains("float32 or float64"), "{e}");
    }
    // Fortran order.
    let fortran = name("fortran.npy");
    raw_npy(&fortran, "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 6), }", &bytes[64..]);
    assert!(err(&fortran).contains("Fortran order"));
}

#[test]
fn npy_writer_writes_blocks_and_only_complete_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("npy_writer_blocks");
    let data = random_data(&mut rng, NpyDtype::I32, 6 * 7);
    let NpyData::I32(v) = &data else { unreachable!() };
    let path = dir.path().join("blocks.npy");
    let mut w = NpyWriter::create(&path, NpyDtype::I32, &[6, 7]).unwrap();
    for piece in v.chunks(5) {
        w.write(&NpyData::I32(piece.to_vec())).unwrap();
    }
    assert!(!path.exists(), "the file appears only once finished");
    w.finish().unwrap();
    let whole = dir.path().join("whole.npy");
    write_npy(&whole, &[6, 7], &data).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&whole).unwrap());

    // Too few elements, too many, the wrong dtype, or dropped on the way: no file, no PATH.tmp.
    let short = dir.path().join("short.npy");
    let mut w = NpyWriter::create(&short, NpyDtype::I32, &[6, 7]).unwrap();
    w.write(&NpyData::I32(v[..41].to_vec())).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("short.npy") && e.contains("41 of the 42"), "{e}");
    let mut w = NpyWriter::create(&short, NpyDtype::I32, &[6, 7]).unwrap();
    w.write(&NpyData::I32(v[..40].to_vec())).unwrap();
    let e = w.write(&NpyData::I32(v[..3].to_vec())).unwrap_err().to_string();
    assert!(e.contains("1 more than the shape holds"), "{e}");
    let e = w.write(&NpyData::I16(vec![1])).unwrap_err().to_string();
    assert!(e.contains("int16") && e.contains("int32"), "{e}");
    drop(w);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn token_writer_equals_write_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("token_writer");
    let ids: Vec<u32> = (0..5 * 9).map(|_| rng.random_range(0..32767)).collect();
    let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
    let mut w = TokenWriter::create(&a, NpyDtype::I16, 5, 9).unwrap();
    for piece in ids.chunks(7) {
        w.push(piece).unwrap();
    }
    w.finish().unwrap();
    write_tokens(&b, NpyDtype::I16, 9, &ids.iter().map(|&i| i as i32).collect::<Vec<_>>()).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // An id that does not fit the dtype names the file and the dtype.
    let c = dir.path().join("c.npy");
    let mut w = TokenWriter::create(&c, NpyDtype::I16, 1, 2).unwrap();
    let e = w.push(&[3, 40000]).unwrap_err().to_string();
    assert!(e.contains("c.npy") && e.contains("int16") && e.contains("40000"), "{e}");
}
