//! Page-locked ("pinned") host memory for the pixels of a batch, and the host-bytes type the model
//! takes them in.
//!
//! A copy from ordinary (pageable) host memory to the device goes through a driver staging
//! buffer: the calling thread copies the bytes once more and waits while it does. From page-locked
//! memory the copy engine reads the bytes itself while the host goes on queuing kernels. So when
//! training on a GPU the data loader assembles each batch straight into a buffer of a
//! [`PinnedPool`]; the buffer returns to its pool when the batch is dropped.
//!
//! The one hazard of asynchronous copies is reuse: the host must not overwrite a buffer the
//! device may still be reading. Every upload ([`crate::cuda::DeviceViewMut::copy_from_pinned`])
//! records an event after the copy, and every host write ([`PinnedBytes::extend_from_slice`])
//! first waits for that event, as does freeing the memory. Host reads need no wait: the device
//! only reads these bytes too.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use crate::error::{Error, Result};

/// A recycler of page-locked byte buffers of one capacity, for one device context. Cheap to
/// clone (all clones share the buffers) and usable from any thread.
#[derive(Clone)]
pub struct PinnedPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    ctx: Arc<CudaContext>,
    capacity: usize,
    /// Returned buffers, oldest first: `take` hands out the one whose last upload is the most
    /// likely to have ended.
    free: Mutex<VecDeque<Pinned>>,
}

/// One page-locked allocation and the event that marks the end of its last upload.
struct Pinned {
    /// Owns the allocation (freed when dropped, after the wait in `Pinned::drop`; leaked instead
    /// when that wait fails, since a copy may still read it).
    memory: Option<PinnedHostSlice<u8>>,
    /// `memory`'s first byte, taken once at allocation.
    ptr: *mut u8,
    uploaded: CudaEvent,
}

// SAFETY: `ptr` points into `memory`, which cudarc declares Send and Sync; every write through
// it goes through `&mut PinnedBytes`.
unsafe impl Send for Pinned {}
unsafe impl Sync for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The memory is freed next: no copy may still read it. cudarc's synchronize first reports
        // any error an earlier call left pending in the context (clearing it), so one failure may
        // not be this event's: wait again. If the wait still fails, leak the memory rather than
        // free bytes a copy may be reading.
        if self.uploaded.synchronize().is_err() && self.uploaded.synchronize().is_err() {
            std::mem::forget(self.memory.take());
        }
    }
}

impl PinnedPool {
    pub(crate) fn new(ctx: Arc<CudaContext>, capacity: usize) -> Self {
        PinnedPool { inner: Arc::new(PoolInner { ctx, capacity, free: Mutex::new(VecDeque::new()) }) }
    }

    /// Bytes each buffer holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Buffers allocated and currently back in the pool.
    pub fn idle(&self) -> usize {
        self.inner.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// An empty buffer (length 0) of [`PinnedPool::capacity`] bytes: a recycled one when the pool
    /// has one, else a new allocation (page-locking takes milliseconds, so a steady loop
    /// allocates only as many as it keeps in flight).
    pub fn take(&self) -> Result<PinnedBytes> {
        let recycled = self.inner.free.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let pinned = match recycled {
            Some(p) => p,
            None => {
                let alloc = |ctx: &Arc<CudaContext>| -> std::result::Result<Pinned, cudarc::driver::DriverError> {
                    // Flags 0: cached page-locked memory (not write-combined), so that host reads
                    // of the pixels (a CPU fallback, a test) stay fast.
                    // SAFETY: the bytes are uninitialised here; PinnedBytes only exposes its first
                    // `len` bytes, all written by extend_from_slice before they can be read.
                    let mut memory = unsafe { ctx.alloc_pinned_with_flags::<u8>(self.inner.capacity.max(1), 0) }?;
                    // cudarc's own event for this memory is never recorded: this returns at once.
                    let ptr = memory.as_mut_ptr()?;
                    let uploaded = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
                    Ok(Pinned { memory: Some(memory), ptr, uploaded })
                };
                alloc(&self.inner.ctx).map_err(|e| Error::Unsupported {
                    what: "pinned host memory",
                    detail: format!("cannot page-lock {} bytes: {e}", self.inner.capacity),
                })?
            }
        };
        Ok(PinnedBytes { pinned: Some(pinned), len: 0, pool: self.inner.clone() })
    }
}

/// Page-locked bytes from a [`PinnedPool`], filled like a `Vec` up to the pool's capacity;
/// returned to the pool on drop.
pub struct PinnedBytes {
    pinned: Option<Pinned>,
    len: usize,
    pool: Arc<PoolInner>,
}

impl PinnedBytes {
    fn pinned(&self) -> &Pinned {
        self.pinned.as_ref().expect("present until drop")
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.pool.capacity
    }

    /// Appends `bytes`, first waiting until no upload of this buffer is in flight; an error (and
    /// nothing written) past the capacity.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<()> {
        let end = self.len + bytes.len();
        if end > self.capacity() {
            return Err(Error::Shape {
                tensor: "pinned host buffer",
                expected: format!("at most {} bytes", self.capacity()),
                got: format!("{end} bytes"),
            });
        }
        let pinned = self.pinned();
        pinned.uploaded.synchronize()?;
        // SAFETY: [len, end) lies inside the allocation (end <= capacity), `&mut self` excludes
        // every host reader, and the wait above excludes the device.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), pinned.ptr.add(self.len), bytes.len()) };
        self.len = end;
        Ok(())
    }

    /// The context the buffer was allocated in: uploads must run on one of its streams.
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.pool.ctx
    }

    /// Marks the end of an upload of these bytes enqueued on `stream`: host writes and freeing
    /// wait for it. If the event cannot be recorded, waits for the stream instead (so the upload
    /// has ended either way) and returns the error.
    pub(crate) fn record_upload(&self, stream: &CudaStream) -> Result<()> {
        if let Err(e) = self.pinned().uploaded.record(stream) {
            let _ = stream.synchronize();
            return Err(e.into());
        }
        Ok(())
    }
}

impl std::ops::Deref for PinnedBytes {
    type Target = [u8];

    /// The bytes written. Readable while an upload of them runs (the device only reads them).
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation were written by extend_from_slice;
        // writes need `&mut self`, which this borrow excludes.
        unsafe { std::slice::from_raw_parts(self.pinned().ptr, self.len) }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        if let Some(p) = self.pinned.take() {
            self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push_back(p);
        }
    }
}

/// uint8 pixels on the host: an ordinary vector, or page-locked bytes from a [`PinnedPool`] that
/// the GPU backend uploads by DMA without a staging copy. The CPU backend reads both alike.
pub enum HostBytes {
    /// Pageable memory.
    Vec(Vec<u8>),
    /// Page-locked memory.
    Pinned(PinnedBytes),
}

impl HostBytes {
    /// Whether the bytes are page-locked.
    pub fn is_pinned(&self) -> bool {
        matches!(self, HostBytes::Pinned(_))
    }

    /// Appends `bytes` (page-locked memory: up to its capacity, after any upload of it ends).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            HostBytes::Vec(v) => {
                v.extend_from_slice(bytes);
                Ok(())
            }
            HostBytes::Pinned(p) => p.extend_from_slice(bytes),
        }
    }
}

impl From<Vec<u8>> for HostBytes {
    fn from(v: Vec<u8>) -> Self {
        HostBytes::Vec(v)
    }
}

impl std::ops::Deref for HostBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            HostBytes::Vec(v) => v,
            HostBytes::Pinned(p) => p,
        }
    }
}

/// A clone is an ordinary vector holding the same bytes (page-locked buffers belong to their pool).
impl Clone for HostBytes {
    fn clone(&self) -> Self {
        HostBytes::Vec(self.to_vec())
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_pinned() { "pinned" } else { "pageable" };
        write!(f, "HostBytes({} {kind} bytes)", self.len())
    }
}

/// Equal bytes, wherever they live.
impl PartialEq for HostBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for HostBytes {}
