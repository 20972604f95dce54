//! The permutation of MaPeT and the rank-order layout the model works in.
//!
//! Token 0 is CLS, tokens 1..N-1 are patches in raster order. Each sample draws a permutation with
//! CLS first and the patches in uniformly random order; `ranks[t]` is the position of token t in it
//! (`ranks[0] == 0`), and `order[r]` is the token at position r (the inverse permutation). The C
//! tokens with rank < C are the context; the P = N - C tokens with rank >= C are predicted.
//!
//! Two orders of the same rows appear:
//! - raster order: the N tokens by token index, and the P predicted tokens (mask rows, query
//!   rows, logits) by ascending token index, i.e. in [`predicted_index`] order. This is the order
//!   of the authors' model and of the golden files.
//! - rank order: the N tokens by rank, and the P predicted tokens by rank (rank C first). Inside
//!   the model everything per-token is permutation-equivariant, so the model gathers its inputs
//!   into this order once ([`gather_rank_order`], [`gather_predicted_rank_order`]) and scatters
//!   its per-token outputs back ([`scatter_raster_order`], [`scatter_predicted_index_order`]).
//!
//! In rank order, SPEC.md's visibility table becomes one fixed pattern that depends only on N and
//! C (see `cuda/params.h`, `MapetAttention`): [`row_kind_rank`], [`key_kind_rank`] and
//! [`visible_bounds`] describe it, and [`visible`] is the table itself, by ranks.
//! [`naive_raster_masks`] builds the authors' dense boolean masks in raster order, for tests.

use rand::Rng;

use crate::error::{Error, Result};

/// A random permutation of `n_tokens` tokens as ranks: CLS (token 0) has rank 0, the patches
/// 1..N-1 get a uniformly random order (Fisher-Yates). `ranks[t]` = position of token t.
pub fn sample_ranks(rng: &mut impl Rng, n_tokens: usize) -> Vec<u32> {
    // order[r] = token at position r; shuffle positions 1..N, keep CLS at 0.
    let mut order: Vec<u32> = (0..n_tokens as u32).collect();
    for i in (2..n_tokens).rev() {
        let j = rng.random_range(1..=i);
        order.swap(i, j);
    }
    let mut ranks = vec![0u32; n_tokens];
    for (r, &t) in order.iter().enumerate() {
        ranks[t as usize] = r as u32;
    }
    ranks
}

/// The inverse permutation: `order[rank] = token`. Expects a valid permutation (see
/// [`validate_ranks`]); entries out of range are skipped, leaving `u32::MAX` in their place.
pub fn order_from_ranks(ranks: &[u32]) -> Vec<u32> {
    let mut order = vec![u32::MAX; ranks.len()];
    for (t, &r) in ranks.iter().enumerate() {
        if let Some(slot) = order.get_mut(r as usize) {
            *slot = t as u32;
        }
    }
    order
}

/// Checks that `ranks` is a permutation of 0..N (N > 0) with `ranks[0] == 0` (CLS first).
pub fn validate_ranks(ranks: &[u32]) -> Result<()> {
    let n = ranks.len();
    if n == 0 {
        return Err(Error::Shape { tensor: "ranks", expected: "at least 1 token".into(), got: "0 tokens".into() });
    }
    let mut seen = vec![false; n];
    for (t, &r) in ranks.iter().enumerate() {
        match seen.get_mut(r as usize) {
            Some(s) if !*s => *s = true,
            Some(_) => {
                return Err(Error::Shape {
                    tensor: "ranks",
                    expected: format!("a permutation of 0..{n}"),
                    got: format!("rank {r} repeated (at token {t})"),
                })
            }
            None => {
                return Err(Error::Shape {
                    tensor: "ranks",
                    expected: format!("a permutation of 0..{n}"),
                    got: format!("rank {r} at token {t}"),
                })
            }
        }
    }
    if ranks[0] != 0 {
        return Err(Error::Unsupported {
            what: "ranks",
            detail: format!("CLS (token 0) must have rank 0, got {}", ranks[0]),
        });
    }
    Ok(())
}

/// The predicted tokens (rank >= C) in ascending token index: the golden files'
/// `out.predicted_index`, and the order of the authors' mask tokens, query rows and logits.
pub fn predicted_index(ranks: &[u32], n_context: usize) -> Vec<u32> {
    ranks.iter().enumerate().filter(|&(_, &r)| r as usize >= n_context).map(|(t, _)| t as u32).collect()
}

/// Checks `src` holds `rows` rows of `d` and `ranks` is valid.
fn check_rows(tensor: &'static str, len: usize, rows: usize, d: usize, ranks: &[u32]) -> Result<()> {
    validate_ranks(ranks)?;
    let expected = rows.checked_mul(d).ok_or_else(|| Error::Unsupported {
        what: "row width",
        detail: format!("{rows} rows of {d} overflow usize"),
    })?;
    if len != expected {
        return Err(Error::Shape {
            tensor,
            expected: format!("{rows} x {d} = {expected} elements"),
            got: format!("{len} elements"),
        });
    }
    Ok(())
}

fn check_context(ranks: &[u32], n_context: usize) -> Result<()> {
    if n_context == 0 || n_context >= ranks.len() {
        return Err(Error::Unsupported {
            what: "n_context",
            detail: format!("need 0 < n_context < n_tokens, got n_context = {n_context}, n_tokens = {}", ranks.len()),
        });
    }
    Ok(())
}

/// Rows [N, d] in raster (token) order -> rank order: row `ranks[t]` of the result is row t of
/// `src_raster`.
pub fn gather_rank_order<T: Copy>(src_raster: &[T], ranks: &[u32], d: usize) -> Result<Vec<T>> {
    check_rows("src_raster", src_raster.len(), ranks.len(), d, ranks)?;
    let mut out = src_raster.to_vec();
    for (t, &r) in ranks.iter().enumerate() {
        let r = r as usize;
        out[r * d..(r + 1) * d].copy_from_slice(&src_raster[t * d..(t + 1) * d]);
    }
    Ok(out)
}

/// Rows [N, d] in rank order -> raster order: row t of the result is row `ranks[t]` of `src_rank`.
/// The inverse of [`gather_rank_order`].
pub fn scatter_raster_order<T: Copy>(src_rank: &[T], ranks: &[u32], d: usize) -> Result<Vec<T>> {
    check_rows("src_rank", src_rank.len(), ranks.len(), d, ranks)?;
    let mut out = src_rank.to_vec();
    for (t, &r) in ranks.iter().enumerate() {
        let r = r as usize;
        out[t * d..(t + 1) * d].copy_from_slice(&src_rank[r * d..(r + 1) * d]);
    }
    Ok(out)
}

/// For each predicted token, in [`predicted_index`] order: (its position i in that order, its
/// row `rank - C` in rank order).
fn predicted_pairs(ranks: &[u32], n_context: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    ranks.iter().filter(move |&&r| r as usize >= n_context).enumerate().map(move |(i, &r)| (i, r as usize - n_context))
}

/// Rows [P, d] of the predicted tokens in [`predicted_index`] order -> rank order (row j of the
/// result is the predicted token of rank C + j). `0 < n_context < N` is required.
pub fn gather_predicted_rank_order<T: Copy>(
    src_index: &[T],
    ranks: &[u32],
    n_context: usize,
    d: usize,
) -> Result<Vec<T>> {
    check_context(ranks, n_context)?;
    check_rows("src_index", src_index.len(), ranks.len() - n_context, d, ranks)?;
    let mut out = src_index.to_vec();
    for (i, j) in predicted_pairs(ranks, n_context) {
        out[j * d..(j + 1) * d].copy_from_slice(&src_index[i * d..(i + 1) * d]);
    }
    Ok(out)
}

/// Rows [P, d] of the predicted tokens in rank order (row j = rank C + j) -> [`predicted_index`]
/// order. The inverse of [`gather_predicted_rank_order`].
pub fn scatter_predicted_index_order<T: Copy>(
    src_rank: &[T],
    ranks: &[u32],
    n_context: usize,
    d: usize,
) -> Result<Vec<T>> {
    check_context(ranks, n_context)?;
    check_rows("src_rank", src_rank.len(), ranks.len() - n_context, d, ranks)?;
    let mut out = src_rank.to_vec();
    for (i, j) in predicted_pairs(ranks, n_context) {
        out[i * d..(i + 1) * d].copy_from_slice(&src_rank[j * d..(j + 1) * d]);
    }
    Ok(out)
}

/// What an attention row is: a content token of h, a mask token of h, or a query-stream token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Content,
    MaskInH,
    Query,
}

/// What an attention key is: a content token of h or a mask token of h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Content,
    Mask,
}

/// SPEC.md's visibility table, literally: does a row of kind `row` whose token has rank
/// `row_rank` attend to a key of kind `key` whose token has rank `key_rank`?
///
/// | row | content key (rank k) | mask key (rank k) |
/// |---|---|---|
/// | content (rank r) | k < C or k <= r | k > r |
/// | mask in h | k < C | always |
/// | query (rank r) | k < r | k >= r |
pub fn visible(row: RowKind, row_rank: usize, key: KeyKind, key_rank: usize, n_context: usize) -> bool {
    let (r, k, c) = (row_rank, key_rank, n_context);
    match (row, key) {
        (RowKind::Content, KeyKind::Content) => k < c || k <= r,
        (RowKind::Content, KeyKind::Mask) => k > r,
        (RowKind::MaskInH, KeyKind::Content) => k < c,
        (RowKind::MaskInH, KeyKind::Mask) => true,
        (RowKind::Query, KeyKind::Content) => k < r,
        (RowKind::Query, KeyKind::Mask) => k >= r,
    }
}

/// Kind and rank of query row `row` of the rank-order layout (`row < N + 2P`):
/// [0, N) content (rank = row), [N, N+P) mask tokens of h (rank C + row - N),
/// [N+P, N+2P) query stream (rank C + row - N - P).
pub fn row_kind_rank(n_tokens: usize, n_context: usize, row: usize) -> (RowKind, usize) {
    let p = n_tokens.saturating_sub(n_context);
    if row < n_tokens {
        (RowKind::Content, row)
    } else if row < n_tokens + p {
        (RowKind::MaskInH, n_context + row - n_tokens)
    } else {
        (RowKind::Query, n_context + row - n_tokens - p)
    }
}

/// Kind and rank of key row `key` of the rank-order layout (`key < N + P`): [0, N) content
/// (rank = key), [N, N+P) mask tokens (rank C + key - N).
pub fn key_kind_rank(n_tokens: usize, n_context: usize, key: usize) -> (KeyKind, usize) {
    if key < n_tokens {
        (KeyKind::Content, key)
    } else {
        (KeyKind::Mask, n_context + key - n_tokens)
    }
}

/// The keys query row `row` of the rank-order layout sees: [0, a) and [m, N+P), returned as
/// (a, m). Always a <= m and a + (N + P - m) = N.
/// - content row (rank r): a = max(C, r+1), m = N - C + max(C, r+1)
/// - mask row:             a = C,           m = N
/// - query row (rank r):   a = r,           m = N - C + r
pub fn visible_bounds(n_tokens: usize, n_context: usize, row: usize) -> (usize, usize) {
    let (n, c) = (n_tokens, n_context);
    match row_kind_rank(n, c, row) {
        (RowKind::Content, r) => {
            let a = c.max(r + 1);
            (a, n + (a - c))
        }
        (RowKind::MaskInH, _) => (c, n),
        (RowKind::Query, r) => (r, (n + r).saturating_sub(c)),
    }
}

/// The authors' dense boolean masks in RASTER order, built straight from SPEC.md's table by ranks
/// (deliberately naive, for tests): `(content, query)`, true = visible.
///
/// `content` is [(N+P) x (N+P)]: rows and keys are the N tokens in raster order followed by the P
/// mask tokens in [`predicted_index`] order. `query` is [P x (N+P)]: rows are the query-stream
/// tokens in [`predicted_index`] order, keys as above.
#[doc(hidden)]
pub fn naive_raster_masks(ranks: &[u32], n_context: usize) -> (Vec<bool>, Vec<bool>) {
    let c = n_context;
    let n = ranks.len();
    let pidx = predicted_index(ranks, c);
    let p = pidx.len();
    let l = n + p;
    let rc: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let rp: Vec<usize> = pidx.iter().map(|&t| ranks[t as usize] as usize).collect();

    let mut content = vec![false; l * l];
    for row in 0..n {
        let r = rc[row];
        for key in 0..n {
            let k = rc[key];
            content[row * l + key] = k < c || k <= r;
        }
        for (i, &k) in rp.iter().enumerate() {
            content[row * l + n + i] = k > r;
        }
    }
    for i in 0..p {
        let row = n + i;
        for key in 0..n {
            content[row * l + key] = rc[key] < c;
        }
        for j in 0..p {
            content[row * l + n + j] = true;
        }
    }

    let mut query = vec![false; p * l];
    for (i, &r) in rp.iter().enumerate() {
        for key in 0..n {
            query[i * l + key] = rc[key] < r;
        }
        for (j, &k) in rp.iter().enumerate() {
            query[i * l + n + j] = k >= r;
        }
    }
    (content, query)
}
