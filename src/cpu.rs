//! CPU helpers shared by the f32 reference implementations: a real GEMM (matrixmultiply, with
//! its own threading) and small utilities. The references are plain and readable first; rayon
//! parallelises them over rows where that is free.

/// C[m, n] = alpha * A[m, k] * op(B) + beta * C, all row-major f32.
/// `b_transposed` selects op(B) = B^T with B stored [n, k] (the layout of a Linear weight
/// [out, in]), else op(B) = B with B stored [k, n].
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm: buffers too small");
    if m == 0 || n == 0 {
        return;
    }
    let (rsb, csb) = if b_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// C[m, n] = alpha * A^T B + beta * C with A stored [k, m] and B stored [k, n], all row-major:
/// the weight gradient of a Linear layer (dW[out, in] = dY^T X with dY [rows, out], X [rows, in]).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_tn(m: usize, n: usize, k: usize, alpha: f32, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm_tn: buffers too small");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Rounds every value to the nearest bf16 and back: the CPU image of what a bf16 tensor holds.
pub fn round_bf16(x: &mut [f32]) {
    for v in x {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sgemm_matches_naive_both_layouts() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::random());
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for bt in [false, true] {
            let mut c = vec![0.5f32; m * n];
            sgemm(m, n, k, 2.0, &a, &b, bt, 1.0, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0f64;
                    for l in 0..k {
                        let bv = if bt { b[j * k + l] } else { b[l * n + j] };
                        s += a[i * k + l] as f64 * bv as f64;
                    }
                    let want = 2.0 * s + 0.5;
                    assert!((c[i * n + j] as f64 - want).abs() < 1e-5, "({i},{j}) bt={bt}");
                }
            }
        }
    }

    #[test]
    fn sgemm_tn_matches_naive() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::random());
        let (m, n, k) = (6, 4, 11);
        let a: Vec<f32> = (0..k * m).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut c = vec![0.25f32; m * n];
        sgemm_tn(m, n, k, 1.5, &a, &b, 1.0, &mut c);
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|l| a[l * m + i] as f64 * b[l * n + j] as f64).sum();
                assert!((c[i * n + j] as f64 - (1.5 * s + 0.25)).abs() < 1e-5, "({i},{j})");
            }
        }
    }
}
