//! Page-locked pixel buffers: `HostBytes` on the host, and on a GPU the pool's buffers uploaded
//! by DMA, recycled, and never overwritten while an upload of them may still be reading.
//! GPU tests skip cleanly without a GPU.

use mapet::cuda::pinned::HostBytes;
use mapet::testing::{gpu_or_skip, rng};
use mapet::Error;
use rand::Rng;

fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random()).collect()
}

#[test]
fn host_bytes_vec_behaves_like_its_vector() {
    let mut rng = rng("host_bytes_vec_behaves_like_its_vector");
    let (a, b) = (random_bytes(&mut rng, 100), random_bytes(&mut rng, 37));
    let mut h = HostBytes::from(a.clone());
    h.extend_from_slice(&b).unwrap();
    let want: Vec<u8> = a.iter().chain(&b).copied().collect();
    assert_eq!(&h[..], &want[..]);
    assert_eq!(h.len(), 137);
    assert!(!h.is_pinned());
    assert_eq!(h.clone(), h);
    assert_ne!(h, HostBytes::from(a));
    assert!(format!("{h:?}").contains("137 pageable bytes"));
}

#[test]
fn pinned_upload_round_trips_recycles_and_waits_before_reuse() {
    let Some(gpu) = gpu_or_skip("pinned_upload_round_trips_recycles_and_waits_before_reuse") else { return };
    let mut rng = rng("pinned_upload_round_trips_recycles_and_waits_before_reuse");
    // Large enough that a copy takes a while (a reuse that did not wait would overwrite it).
    let n = 64 << 20;
    let pool = gpu.pinned_pool(n);
    let x = random_bytes(&mut rng, n);
    let y: Vec<u8> = x.iter().map(|v| v ^ 0x5a).collect();

    let mut a = pool.take().unwrap();
    assert_eq!((a.len(), a.capacity()), (0, n));
    a.extend_from_slice(&x[..n / 2]).unwrap();
    a.extend_from_slice(&x[n / 2..]).unwrap();
    let e = a.extend_from_slice(&[1]).unwrap_err();
    assert!(matches!(e, Error::Shape { tensor: "pinned host buffer", .. }), "{e}");
    assert_eq!(a.len(), n, "a refused write changed the length");

    // Queue some 20 ms of copies first, so that `a`'s copy starts well after this thread goes
    // on: a reuse that did not wait for it would overwrite `a` before the copy engine reads it.
    let mut z = pool.take().unwrap();
    z.extend_from_slice(&y).unwrap();
    let mut scratch = gpu.alloc::<u8>(n).unwrap();
    for _ in 0..10 {
        scratch.view_mut(0..n).unwrap().copy_from_pinned(&z).unwrap();
    }
    let mut d1 = gpu.alloc::<u8>(n).unwrap();
    d1.poison().unwrap();
    d1.view_mut(0..n).unwrap().copy_from_pinned(&a).unwrap();
    // Recycle at once, while the copy may still run: the next writer must wait for it.
    drop(a);
    assert_eq!(pool.idle(), 1);
    let mut b = pool.take().unwrap();
    assert_eq!(pool.idle(), 0, "the buffer was not recycled");
    assert!(b.is_empty());
    b.extend_from_slice(&y).unwrap();
    let mut d2 = gpu.alloc::<u8>(n).unwrap();
    d2.poison().unwrap();
    d2.view_mut(0..n).unwrap().copy_from_pinned(&b).unwrap();
    assert!(d1.to_host().unwrap() == x, "the first upload saw bytes written after it was queued");
    assert!(d2.to_host().unwrap() == y, "the second upload differs from its source");

    // A part of a buffer, and HostBytes over it.
    let mut c = pool.take().unwrap();
    c.extend_from_slice(&x[..1000]).unwrap();
    let mut d3 = gpu.alloc::<u8>(1000).unwrap();
    d3.poison().unwrap();
    d3.view_mut(0..1000).unwrap().copy_from_pinned(&c).unwrap();
    assert!(d3.to_host().unwrap() == x[..1000]);
    let e = d3.view_mut(0..999).unwrap().copy_from_pinned(&c);
    assert!(matches!(e, Err(Error::Shape { .. })), "a length mismatch was not refused");
    let host = HostBytes::Pinned(c);
    assert!(host.is_pinned() && host[..] == x[..1000]);
    assert_eq!(host.clone(), host, "a clone (a vector) differs from its pinned source");
}

/// `Gpu::synchronize_within`, the tests' guard against hung kernels: queued work that outlasts
/// the limit is reported as `Error::Hung` naming it, and the same work, given time, finishes.
#[test]
fn synchronize_within_reports_work_that_outlasts_its_limit() {
    let Some(gpu) = gpu_or_skip("synchronize_within_reports_work_that_outlasts_its_limit") else { return };
    // 600 fills of 1 GiB: about 0.2 s at a few TB/s, queued faster than the device runs them.
    let mut buf = gpu.zeros::<u8>(1 << 30).unwrap();
    for _ in 0..600 {
        buf.poison().unwrap();
    }
    let limit = std::time::Duration::from_millis(2);
    let e = gpu.synchronize_within(limit, "600 fills of 1 GiB").unwrap_err();
    assert!(matches!(e, Error::Hung { .. }) && e.to_string().contains("600 fills of 1 GiB"), "{e}");
    gpu.synchronize_within(std::time::Duration::from_secs(60), "the same fills").unwrap();
    // The fills did run: the buffer holds their bytes.
    let tail = buf.view(buf.len() - 4096..buf.len()).unwrap().to_host().unwrap();
    assert!(tail.iter().all(|&b| b == 0xFF));
}
