//! The CUDA runtime: device discovery, the embedded kernel modules, typed device buffers, kernel
//! launches, timing events, and the ptxas reports of every kernel.
//!
//! Everything goes through cudarc with dynamic loading: libcuda is opened at run time, so this
//! module compiles and its discovery functions return errors (never panic) on machines with no
//! driver. One [`Gpu`] owns one context and one stream; all work of a `Gpu` is ordered on that
//! stream, so cudarc's cross-stream event tracking is switched off.

pub mod gemm;
pub mod hopper;
#[rustfmt::skip]
pub mod params;
pub mod pinned;
pub mod report;

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use crate::error::{Error, Result};

/// Fatbins and ptxas reports compiled by build.rs.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Why a GPU cannot be used here, or `None` when one can. Never panics: checks that kernels were
/// built, that libcuda can be loaded, and that a device exists.
pub fn unavailable_reason() -> Option<String> {
    if let Some(reason) = kernels::MISSING_REASON {
        return Some(format!("kernels not built: {reason}"));
    }
    // SAFETY: only tries to dlopen libcuda; no driver call is made.
    if !unsafe { sys::is_culib_present() } {
        return Some("libcuda (the CUDA driver library) is not present".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no device".into()),
        Err(e) => Some(format!("the CUDA driver failed to initialise: {e}")),
    }
}

/// The environment variable that turns [`Gpu::next_wave_to_l2`] on (`1`) when a [`Gpu`] is opened.
pub const NEXT_WAVE_TO_L2_VAR: &str = "MAPET_L2_AHEAD";

/// One device: its context, the stream every operation runs on, and the loaded kernel modules.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, &'static str), Kernel>>,
    /// The dynamic shared memory each kernel may take: read from the driver at its first launch
    /// that asks for some, raised when a launch needs more.
    smem_limits: Mutex<HashMap<(&'static str, &'static str), u32>>,
    name: String,
    sm_count: u32,
    max_smem_optin: u32,
    compute_capability: (u32, u32),
    /// Whether [`Gpu::launch_dependent`] launches as programmatic dependent launches.
    dependent_launches: AtomicBool,
    /// Whether kernels that take it send the next wave's operands to L2 ([`Gpu::next_wave_to_l2`]).
    next_wave_to_l2: AtomicBool,
    /// Whether [`Gpu::alloc`] fills what it allocates with `0xFF` bytes ([`Gpu::set_poison_allocations`]).
    poison_allocations: AtomicBool,
}

/// A loaded kernel, and whether its loaded code has the wait of a dependent launch: compiled from
/// PTX of version 9.0 or later (cuda/dependent_launch.cuh compiles the wait out below 9.0). On a
/// device of compute capability 9.0 the driver loads the sm_90a cubin, unless told to compile the
/// PTX instead (`CUDA_FORCE_PTX_JIT=1`): the fatbin's PTX is compute_80's, without the wait, and
/// such a kernel must not start early. Read from the driver once, when the kernel is loaded.
#[derive(Clone)]
struct Kernel {
    f: CudaFunction,
    waits: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("sm_count", &self.sm_count).finish()
    }
}

/// Lets the device's default memory pool (which `cuMemAllocAsync`, hence every [`Gpu::alloc`],
/// draws from) keep the memory of freed buffers across synchronisations. With the pool's default
/// release threshold of 0, every stream synchronisation (a training step reads its loss back)
/// hands freed memory back to the driver, and the next step's scratch buffers (cross-entropy
/// chunks, backward partial sums) are mapped afresh; with no threshold they are reused from the
/// pool, as a caching allocator would.
fn keep_pool_memory(ctx: &CudaContext) -> std::result::Result<(), cudarc::driver::DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a cuuint64_t, which `threshold` is.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
}

/// The variable that puts a [`Gpu`]'s work on a stream of its own (`own`: a non-blocking stream)
/// rather than the context's legacy default stream (`default`, or unset). Whether a
/// programmatic dependent launch starts early on the legacy default stream as on any other is
/// what `tests/hopper.rs`'s `dependent_launches_start_early_and_wait` checks on a card, for
/// both.
pub const STREAM_VAR: &str = "MAPET_STREAM";

/// Whether `value` (the variable's value; `None`: unset) asks for a stream of the `Gpu`'s own:
/// `own` or `default`, else an error naming [`STREAM_VAR`].
pub fn own_stream_named(value: Option<&str>) -> Result<bool> {
    crate::error::switch_named(
        STREAM_VAR,
        value,
        "CUDA stream",
        ("default", "the context's legacy default stream, the default"),
        ("own", "a non-blocking stream of its own"),
    )
}

impl Gpu {
    /// Opens device `ordinal` and loads every embedded kernel module; its work runs on the
    /// stream [`STREAM_VAR`] names (the context's legacy default stream when unset).
    pub fn new(ordinal: usize) -> Result<Self> {
        let own = own_stream_named(std::env::var(STREAM_VAR).ok().as_deref())?;
        Self::open(ordinal, own)
    }

    /// As [`Gpu::new`], with its work on a non-blocking stream of its own, whatever
    /// [`STREAM_VAR`] says.
    pub fn new_on_own_stream(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, true)
    }

    fn open(ordinal: usize, own_stream: bool) -> Result<Self> {
        if let Some(reason) = kernels::MISSING_REASON {
            return Err(Error::KernelsNotBuilt(reason));
        }
        if let Some(reason) = unavailable_reason() {
            return Err(Error::NoDevice(reason));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| ctx_err(e, format!(" opening device {ordinal}")))?;
        // SAFETY: a Gpu runs everything on its one stream, so no cross-stream tracking is needed,
        // and buffers are only freed after the stream's work on them was enqueued (stream order).
        unsafe { ctx.disable_event_tracking() };
        let stream = if own_stream {
            ctx.new_stream().map_err(|e| ctx_err(e, " creating a stream".into()))?
        } else {
            ctx.default_stream()
        };
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx).map_err(|e| ctx_err(e, " configuring the memory pool".into()))?;
        }
        let mut modules = HashMap::new();
        for (name, fatbin) in kernels::FATBINS {
            let module = ctx
                .load_module(Ptx::from_binary(fatbin.to_vec()))
                .map_err(|e| ctx_err(e, format!(" loading module `{name}`")))?;
            modules.insert(*name, module);
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let compute_capability = (
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        Ok(Gpu {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            smem_limits: Mutex::new(HashMap::new()),
            name,
            sm_count,
            max_smem_optin,
            compute_capability,
            dependent_launches: AtomicBool::new(std::env::var("MAPET_DEPENDENT_LAUNCH").as_deref() == Ok("1")),
            next_wave_to_l2: AtomicBool::new(std::env::var(NEXT_WAVE_TO_L2_VAR).as_deref() == Ok("1")),
            poison_allocations: AtomicBool::new(false),
        })
    }

    /// Device 0, or why there is none.
    pub fn first() -> Result<Self> {
        Self::new(0)
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The device's compute capability (major, minor): (9, 0) for an H100/H200, whose kernels are
    /// the sm_90a cubins (wgmma allowed).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// Largest dynamic shared memory one block may opt in to, in bytes.
    pub fn max_shared_memory_per_block(&self) -> u32 {
        self.max_smem_optin
    }

    /// Whether its stream is one of its own ([`STREAM_VAR`]), not the context's legacy default
    /// stream.
    pub fn on_own_stream(&self) -> bool {
        !self.stream.cu_stream().is_null()
    }

    /// The stream all work of this `Gpu` runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A shared view of elements `range` of any device tensor of this `Gpu` (a buffer, a view, or
    /// a tensor known only as [`DeviceRead`]): an op given `&dyn DeviceRead` runs a GEMM or a
    /// kernel on part of it in place. An error when the range is not inside it.
    pub fn view_of<'a, T: DeviceRepr>(
        &'a self,
        whole: &'a dyn DeviceRead<T>,
        range: Range<usize>,
    ) -> Result<DeviceView<'a, T>> {
        check_range(&range, whole.len())?;
        Ok(DeviceView {
            ptr: offset_ptr::<T>(whole.ptr() as sys::CUdeviceptr, range.start),
            len: range.len(),
            stream: &self.stream,
            _borrow: PhantomData,
        })
    }

    /// As [`Gpu::view_of`], exclusive, of a tensor known as [`DeviceWrite`].
    pub fn view_mut_of<'a, T: DeviceRepr>(
        &'a self,
        whole: &'a mut dyn DeviceWrite<T>,
        range: Range<usize>,
    ) -> Result<DeviceViewMut<'a, T>> {
        check_range(&range, whole.len())?;
        Ok(DeviceViewMut {
            ptr: offset_ptr::<T>(whole.ptr_mut() as sys::CUdeviceptr, range.start),
            len: range.len(),
            stream: &self.stream,
            _borrow: PhantomData,
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Waits for all work queued on the stream, but at most `limit`: an [`Error::Hung`] naming
    /// `what` past it. For checks of kernels that synchronise on barriers, where a wrong count or
    /// phase waits forever: the caller learns of it in seconds and can say which launch it was,
    /// instead of blocking until something outside kills the process. The stream is polled (an
    /// event recorded after the work, queried every millisecond), so no CPU core spins.
    pub fn synchronize_within(&self, limit: std::time::Duration, what: &str) -> Result<()> {
        let done = self.ctx.new_event(None)?;
        done.record(&self.stream)?;
        let start = std::time::Instant::now();
        while !done.try_is_complete()? {
            if start.elapsed() > limit {
                return Err(Error::Hung { what: what.to_string(), limit });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Kernel `function` of module `module` (the stem of its `cuda/*.cu` file), cached.
    pub fn function(&self, module: &'static str, function: &'static str) -> Result<CudaFunction> {
        Ok(self.kernel(module, function)?.f)
    }

    /// [`Gpu::function`] with what its loaded code is ([`Kernel`]), cached.
    fn kernel(&self, module: &'static str, function: &'static str) -> Result<Kernel> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(&(module, function)) {
            return Ok(k.clone());
        }
        let m = self.modules.get(module).ok_or_else(|| Error::Unsupported {
            what: "kernel module",
            detail: format!("`{module}` is not among the compiled modules"),
        })?;
        let f = m.load_function(function).map_err(|e| ctx_err(e, format!(" loading kernel `{module}::{function}`")))?;
        // (get_attribute makes the context current on this thread.)
        let ptx = f
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PTX_VERSION)
            .map_err(|e| ctx_err(e, format!(" reading the PTX version of `{module}::{function}`")))?;
        let k = Kernel { f, waits: ptx >= 90 };
        cache.insert((module, function), k.clone());
        Ok(k)
    }

    /// Launches `function` of `module` with one parameter struct passed by value.
    ///
    /// # Safety
    /// Every device pointer in `params` must point to memory of this context that is large enough
    /// for what the kernel reads and writes under `params` and `cfg`; the caller checks the shapes.
    pub unsafe fn launch<P: KernelParams>(
        &self,
        module: &'static str,
        function: &'static str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let k = self.prepare(module, function, &cfg)?;
        // SAFETY: the caller's contract; `k` is `function`, prepared for `cfg`.
        unsafe { self.launch_plain(module, function, &k.f, cfg, params) }
    }

    /// The plain launch of `f` (`function`, prepared for `cfg`).
    ///
    /// # Safety
    /// As for [`Gpu::launch`].
    unsafe fn launch_plain<P: KernelParams>(
        &self,
        module: &'static str,
        function: &'static str,
        f: &CudaFunction,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        b.arg(params);
        // SAFETY: forwarded from the caller's contract above.
        unsafe { b.launch(cfg) }.map_err(|e| ctx_err(e, format!(" launching `{module}::{function}`")))?;
        Ok(())
    }

    /// Whether [`Gpu::launch_dependent`] starts kernels as programmatic dependent launches: asked
    /// for ([`Gpu::set_dependent_launches`], or `MAPET_DEPENDENT_LAUNCH=1` when the `Gpu` was
    /// opened), and a device of compute capability 9.0. Only there do the kernels run the code
    /// that waits (the sm_90a cubins): later devices run the compute_80 PTX, compiled without
    /// the wait, and must not start them early. (Even there, a kernel whose loaded code is not
    /// the sm_90a cubin's, compiled from PTX older than 9.0, is launched plainly.)
    pub fn dependent_launches(&self) -> bool {
        self.dependent_launches.load(Ordering::Relaxed) && self.compute_capability == (9, 0)
    }

    /// Asks for (or stops) programmatic dependent launches in [`Gpu::launch_dependent`].
    pub fn set_dependent_launches(&self, on: bool) {
        self.dependent_launches.store(on, Ordering::Relaxed);
    }

    /// Whether the wgmma attention kernels, whose CTAs each take a (sample, head) pair or a share
    /// of it, send to L2 what the CTA one wave later copies first (`l2_ahead` in
    /// `MapetAttention`, cuda/attention.cu): the forward and dQ kernels, which run two CTAs an SM,
    /// as `_l2` twins of their own (the default kernels' code stays as measured), and the dK/dV
    /// kernels, fused one included, which run one. Asked for ([`Gpu::set_next_wave_to_l2`], or
    /// [`NEXT_WAVE_TO_L2_VAR`]`=1` when the `Gpu` was opened). Prefetches are hints: nothing
    /// computed changes. Experimental, off by default.
    pub fn next_wave_to_l2(&self) -> bool {
        self.next_wave_to_l2.load(Ordering::Relaxed)
    }

    /// Asks for (or stops) [`Gpu::next_wave_to_l2`].
    pub fn set_next_wave_to_l2(&self, on: bool) {
        self.next_wave_to_l2.store(on, Ordering::Relaxed);
    }

    /// Makes [`Gpu::alloc`] fill what it allocates with `0xFF` bytes (NaN in f32 and bf16, -1 in
    /// i32), in stream order, or stops it. For tests: the pool hands a freed block back as it was
    /// left, so an op's scratch (a row table, per-group sums) that a kernel reads before anything
    /// wrote it would otherwise find the values an earlier call of the same size left there, and
    /// pass. Off by default: a memset an allocation.
    pub fn set_poison_allocations(&self, on: bool) {
        self.poison_allocations.store(on, Ordering::Relaxed);
    }

    /// As [`Gpu::launch`], but, where [`Gpu::dependent_launches`] says so, as a programmatic
    /// dependent launch: the kernel may be scheduled before the kernel launched before it on the
    /// stream has finished, once every block of that one has let it (`griddepcontrol
    /// .launch_dependents`), and waits in `griddepcontrol.wait` for it to complete. What that
    /// saves is the gap between two kernels: the launch of the second and its blocks' start
    /// overlap the first one's last blocks.
    ///
    /// # Safety
    /// As for [`Gpu::launch`], and the kernel must call `dependent_launch_start()`
    /// (cuda/dependent_launch.cuh) before it touches global memory: run early, it would race
    /// with the kernel before it (reading what that one has not written yet, or overwriting what
    /// it still reads).
    pub unsafe fn launch_dependent<P: KernelParams>(
        &self,
        module: &'static str,
        function: &'static str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        if !self.dependent_launches() {
            // SAFETY: the caller's contract.
            return unsafe { self.launch(module, function, cfg, params) };
        }
        let k = self.prepare(module, function, &cfg)?;
        // SAFETY: the caller's contract; `k` is `function`, prepared for `cfg`, and launched
        // early only where its loaded code waits.
        unsafe {
            if k.waits {
                self.launch_programmatic(module, function, &k.f, cfg, params)
            } else {
                self.launch_plain(module, function, &k.f, cfg, params)
            }
        }
    }

    /// [`Gpu::launch_dependent`] as a programmatic dependent launch whatever
    /// [`Gpu::dependent_launches`] says, on compute capability 9.0 with the loaded code's wait
    /// (the sm_90a code), else an error: for the check that such launches do start early
    /// (`cuda::hopper::dependent_launch_overlap`).
    ///
    /// # Safety
    /// As for [`Gpu::launch_dependent`].
    pub(crate) unsafe fn launch_dependent_always<P: KernelParams>(
        &self,
        module: &'static str,
        function: &'static str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let k = self.prepare(module, function, &cfg)?;
        if self.compute_capability != (9, 0) || !k.waits {
            return Err(Error::Unsupported {
                what: "programmatic dependent launch",
                detail: format!(
                    "`{module}::{function}` runs here without the wait of a dependent launch (it needs compute \
                     capability 9.0 and the sm_90a code; this device is {}.{})",
                    self.compute_capability.0, self.compute_capability.1
                ),
            });
        }
        // SAFETY: the caller's contract; `k` is `function`, prepared for `cfg`, with the wait.
        unsafe { self.launch_programmatic(module, function, &k.f, cfg, params) }
    }

    /// The raw programmatic dependent launch of `f` (`function`, prepared for `cfg`).
    ///
    /// # Safety
    /// As for [`Gpu::launch_dependent`], and the loaded code has the wait.
    unsafe fn launch_programmatic<P: KernelParams>(
        &self,
        module: &'static str,
        function: &'static str,
        f: &CudaFunction,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // A raw driver call on this thread: make the context current first.
        self.ctx.bind_to_thread()?;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: an all-zero union is a valid value of each of its plain-data members.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // The kernel's one parameter, passed by value: the driver copies it from here at the call.
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: `config` and `args` live through the call; the function belongs to this context;
        // the parameter struct is laid out as the kernel's (KernelParams); the rest is the caller's
        // contract above.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| ctx_err(e, format!(" launching `{module}::{function}` (dependent launch)")))?;
        Ok(())
    }

    /// The kernel, with its dynamic shared memory limit raised to what `cfg` asks for.
    fn prepare(&self, module: &'static str, function: &'static str, cfg: &LaunchConfig) -> Result<Kernel> {
        let k = self.kernel(module, function)?;
        let f = &k.f;
        if cfg.shared_mem_bytes > 0 {
            // Raised once per kernel (and again only for a larger size), not on every launch.
            let mut limits = self.smem_limits.lock().unwrap_or_else(|p| p.into_inner());
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            let allowed = match limits.entry((module, function)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    // What the kernel may take without opting in: 48 KiB less its static shared
                    // memory, so a kernel with both kinds may need the opt-in below 48 KiB of
                    // dynamic memory. (get_attribute makes the context current on this thread.)
                    let now = f.get_attribute(attr).map_err(|e| {
                        ctx_err(e, format!(" reading the shared memory limit of `{module}::{function}`"))
                    })?;
                    e.insert(now.max(0) as u32)
                }
            };
            if cfg.shared_mem_bytes > *allowed {
                // A raw driver call on this thread: make the context current first (a cached
                // function may be launched from a thread that has made no other CUDA call yet).
                self.ctx.bind_to_thread()?;
                f.set_attribute(attr, cfg.shared_mem_bytes as i32)
                    .map_err(|e| ctx_err(e, format!(" raising shared memory of `{module}::{function}`")))?;
                // A kernel that opts in to more shared memory than the default wants the SM's
                // largest shared-memory carveout (L1 takes the rest), so that as many of its CTAs
                // fit an SM as its launch bounds say, rather than whatever carveout the driver picks.
                let carveout = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
                f.set_attribute(carveout, 100)
                    .map_err(|e| ctx_err(e, format!(" preferring shared memory for `{module}::{function}`")))?;
                *allowed = cfg.shared_mem_bytes;
            }
        }
        Ok(k)
    }

    /// A pool of page-locked host buffers of `capacity` bytes each, for uploads that the copy
    /// engine reads directly ([`pinned`]).
    pub fn pinned_pool(&self, capacity: usize) -> pinned::PinnedPool {
        pinned::PinnedPool::new(self.ctx.clone(), capacity)
    }

    /// Allocates `len` elements without initialising them (poison them before a test reads them).
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        // SAFETY: the memory is uninitialised device memory; it is only ever read by kernels after
        // being written, or copied to the host as plain bits of `T` (bf16/f32/i32/u8: any bits valid).
        let slice = unsafe { self.stream.alloc::<T>(len.max(1)) }?;
        let mut buf = DeviceBuffer { slice, len, stream: self.stream.clone() };
        if self.poison_allocations.load(Ordering::Relaxed) {
            buf.poison()?;
        }
        Ok(buf)
    }

    /// Allocates `len` zeroed elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let slice = self.stream.alloc_zeros::<T>(len.max(1))?;
        Ok(DeviceBuffer { slice, len, stream: self.stream.clone() })
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr + Copy>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc::<T>(host.len())?;
        if !host.is_empty() {
            self.stream.memcpy_htod(host, &mut buf.slice.slice_mut(0..host.len()))?;
        }
        Ok(buf)
    }

    /// Uploads f32 values rounded to bf16.
    pub fn upload_bf16(&self, host: &[f32]) -> Result<DeviceBuffer<bf16>> {
        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        self.upload(&v)
    }

    /// A timing event (created with timing enabled; `new_event(None)` cannot be timed).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        Ok(self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Runs `f` `warmup` times, then `reps` times each between two events; returns the sorted
    /// per-run times in milliseconds (take the median).
    pub fn time_ms(&self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f32>> {
        for _ in 0..warmup {
            f()?;
        }
        self.synchronize()?;
        let start = self.timing_event()?;
        let stop = self.timing_event()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            start.record(&self.stream)?;
            f()?;
            stop.record(&self.stream)?;
            times.push(start.elapsed_ms(&stop)?);
        }
        times.sort_by(f32::total_cmp);
        Ok(times)
    }

    /// Bytes of device memory (free, total).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }
}

fn ctx_err(source: cudarc::driver::DriverError, context: String) -> Error {
    Error::Driver { context, source }
}

/// A parameter struct from `cuda/params.h`, passed to a kernel by value.
///
/// # Safety
/// The type must be `#[repr(C)]` and laid out exactly as the kernel's C struct (bindgen makes it so).
pub unsafe trait KernelParams: DeviceRepr {}

// SAFETY: bindgen generates these from cuda/params.h with #[repr(C)] and checks their layout.
macro_rules! kernel_params {
    ($($t:ident),* $(,)?) => {
        $(
            unsafe impl DeviceRepr for params::$t {}
            unsafe impl KernelParams for params::$t {}
        )*
    };
}
kernel_params!(
    MapetLayerNormFwd,
    MapetLayerNormBwd,
    MapetResidualLayerNormFwd,
    MapetGelu,
    MapetAdamW,
    MapetSquareSum,
    MapetAttention,
    MapetAttentionDkdv,
    MapetPatchEmbedFwd,
    MapetPatchEmbedFwdWs,
    MapetPatchEmbedBwd,
    MapetCrossEntropy,
    MapetLayerScale,
    MapetRowCopy,
    MapetF32Vector,
    MapetKMeansRowNorms,
    MapetKMeansAssign,
    MapetKMeansUpdate,
    MapetKMeansGather,
    MapetHopperCheck,
    MapetHopperGemm,
    MapetHopperRs,
    MapetHopperDqReduce,
    MapetHopperPdl,
    MapetHopperTranspose,
);

/// Device memory a kernel reads: a whole [`DeviceBuffer`], or a [`DeviceView`] /
/// [`DeviceViewMut`] of a range of one.
///
/// Launchers take `&dyn DeviceRead<T>` (and `&mut dyn DeviceWrite<T>` for outputs), so callers
/// pass `&buffer` as before or `&view` for a slice of a larger allocation (a parameter inside the
/// flat parameter buffer, the first rows of an activation buffer sized for a larger batch). The
/// launcher checks [`DeviceRead::len`] against the shape, exactly as for a whole buffer, and puts
/// [`DeviceRead::ptr`] in the parameter struct. A view's start is only as aligned as its offset
/// makes it: launchers whose kernels use vector accesses check the alignment of the pointers they
/// get (a whole buffer is always 256-byte aligned).
///
/// Soundness rests on the borrow: a view borrows its buffer (shared or exclusive) for as long as
/// it lives, so the memory stays allocated, and every kernel of a [`Gpu`] runs in order on its
/// one stream.
pub trait DeviceRead<T> {
    /// Raw device address of the first element.
    fn ptr(&self) -> *const c_void;

    /// Number of elements.
    fn len(&self) -> usize;

    /// True when it holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address typed as f32, for the f32 fields of parameter structs.
    fn f32_ptr(&self) -> *mut f32 {
        self.ptr() as *mut f32
    }
}

/// Device memory a kernel writes: a whole [`DeviceBuffer`] or a [`DeviceViewMut`] (see
/// [`DeviceRead`]).
pub trait DeviceWrite<T>: DeviceRead<T> {
    /// Raw device address of the first element, for writing.
    fn ptr_mut(&mut self) -> *mut c_void;
}

/// A shared, non-owning view of `len` elements of a device allocation (from
/// [`DeviceBuffer::view`]). Copy, like `&[T]`.
pub struct DeviceView<'a, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DeviceView<'_, T> {}

/// An exclusive, non-owning view of `len` elements of a device allocation (from
/// [`DeviceBuffer::view_mut`] or [`DeviceBuffer::views_mut`]), like `&mut [T]`.
pub struct DeviceViewMut<'a, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _borrow: PhantomData<&'a mut [T]>,
}

/// Checks that `range` lies inside `len` elements.
fn check_range(range: &Range<usize>, len: usize) -> Result<()> {
    if range.start <= range.end && range.end <= len {
        Ok(())
    } else {
        Err(Error::Shape {
            tensor: "device view",
            expected: format!("a range inside 0..{len}"),
            got: format!("{}..{}", range.start, range.end),
        })
    }
}

/// Checks that every range lies inside `len` elements and no two non-empty ranges overlap.
fn check_disjoint(ranges: &[Range<usize>], len: usize) -> Result<()> {
    for (i, r) in ranges.iter().enumerate() {
        check_range(r, len)?;
        for s in &ranges[..i] {
            if !r.is_empty() && !s.is_empty() && r.start < s.end && s.start < r.end {
                return Err(Error::Shape {
                    tensor: "device views",
                    expected: "pairwise disjoint ranges".into(),
                    got: format!("{}..{} overlaps {}..{}", r.start, r.end, s.start, s.end),
                });
            }
        }
    }
    Ok(())
}

/// Address of element `i` of an allocation of `T` starting at `base`.
fn offset_ptr<T>(base: sys::CUdeviceptr, i: usize) -> sys::CUdeviceptr {
    base + (i * std::mem::size_of::<T>()) as u64
}

/// Copies `len` elements at `ptr` back to the host (waits for the stream).
fn copy_to_host<T: DeviceRepr + Default + Clone>(
    stream: &Arc<CudaStream>,
    ptr: sys::CUdeviceptr,
    len: usize,
) -> Result<Vec<T>> {
    let mut v = vec![T::default(); len];
    if len > 0 {
        // SAFETY: `ptr` addresses `len` live elements of T on this stream's context (the caller
        // holds a borrow of the allocation); `v` has room for exactly `len` elements; the stream
        // is synchronised before `v` is read or dropped.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut v[..], ptr, stream.cu_stream()) }?;
    }
    stream.synchronize()?;
    Ok(v)
}

impl<'a, T: DeviceRepr> DeviceView<'a, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw device address of the first element.
    pub fn ptr(&self) -> *const c_void {
        self.ptr as usize as *const c_void
    }

    /// Elements `range` of this view, with the same lifetime.
    pub fn view(&self, range: Range<usize>) -> Result<DeviceView<'a, T>> {
        check_range(&range, self.len)?;
        Ok(DeviceView {
            ptr: offset_ptr::<T>(self.ptr, range.start),
            len: range.len(),
            stream: self.stream,
            _borrow: PhantomData,
        })
    }

    /// Copies the viewed elements back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        copy_to_host(self.stream, self.ptr, self.len)
    }
}

impl<'a, T: DeviceRepr> DeviceViewMut<'a, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw device address of the first element.
    pub fn ptr(&self) -> *const c_void {
        self.ptr as usize as *const c_void
    }

    /// Raw device address of the first element, for writing.
    pub fn ptr_mut(&mut self) -> *mut c_void {
        self.ptr as usize as *mut c_void
    }

    /// A shared view of the same elements, borrowing this one.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView { ptr: self.ptr, len: self.len, stream: self.stream, _borrow: PhantomData }
    }

    /// A shared view of elements `range`, borrowing this one.
    pub fn view(&self, range: Range<usize>) -> Result<DeviceView<'_, T>> {
        self.as_view().view(range)
    }

    /// An exclusive view of elements `range`, borrowing this one.
    pub fn view_mut(&mut self, range: Range<usize>) -> Result<DeviceViewMut<'_, T>> {
        check_range(&range, self.len)?;
        Ok(DeviceViewMut {
            ptr: offset_ptr::<T>(self.ptr, range.start),
            len: range.len(),
            stream: self.stream,
            _borrow: PhantomData,
        })
    }

    /// Splits this view into `K` exclusive views of pairwise disjoint ranges of it (like
    /// `<[T]>::get_disjoint_mut`), each with this view's lifetime.
    pub fn split<const K: usize>(self, ranges: [Range<usize>; K]) -> Result<[DeviceViewMut<'a, T>; K]> {
        check_disjoint(&ranges, self.len)?;
        Ok(ranges.map(|r| DeviceViewMut {
            ptr: offset_ptr::<T>(self.ptr, r.start),
            len: r.len(),
            stream: self.stream,
            _borrow: PhantomData,
        }))
    }

    /// Copies `host` into the viewed elements (same length), in stream order.
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        crate::error::check_len("host source", host.len(), self.len)?;
        if !host.is_empty() {
            // SAFETY: the view addresses `len` live elements of T, exclusively borrowed; the copy
            // is enqueued on the stream that orders all work on them. For pageable host memory
            // the driver has read `host` into its staging buffer before returning.
            unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr, host, self.stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Sets every viewed byte to `byte`, in stream order.
    fn memset(&mut self, byte: u8) -> Result<()> {
        let bytes = self.len * std::mem::size_of::<T>();
        if bytes > 0 {
            // SAFETY: writes exactly the bytes of this exclusive view, on the stream that owns them.
            unsafe { cudarc::driver::result::memset_d8_async(self.ptr, byte, bytes, self.stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Sets every viewed element to zero bits (0.0 for f32 and bf16), in stream order.
    pub fn fill_zero(&mut self) -> Result<()> {
        self.memset(0)
    }

    /// Fills the viewed elements with `0xFF` bytes (see [`DeviceBuffer::poison`]).
    pub fn poison(&mut self) -> Result<()> {
        self.memset(0xFF)
    }

    /// Copies the viewed elements back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        copy_to_host(self.stream, self.ptr, self.len)
    }
}

impl DeviceViewMut<'_, u8> {
    /// Copies page-locked `host` bytes into the viewed bytes (same length), in stream order. The
    /// copy engine reads `host` after this returns; `host` records the copy's end, and waits for
    /// it before the host writes or frees the bytes.
    pub fn copy_from_pinned(&mut self, host: &pinned::PinnedBytes) -> Result<()> {
        crate::error::check_len("host source", host.len(), self.len)?;
        if host.context() != self.stream.context() {
            return Err(Error::Unsupported {
                what: "pinned host buffer",
                detail: "it belongs to another CUDA context than the device buffer".into(),
            });
        }
        if !host.is_empty() {
            // Surface an error an earlier call left pending in the context now, before the copy
            // is queued, rather than from the event record that must follow it.
            self.stream.context().bind_to_thread()?;
            // SAFETY: the view addresses `len` live bytes, exclusively borrowed; the copy is
            // enqueued on the stream that orders all work on them. The source stays allocated
            // and unwritten until the copy ends: record_upload below makes every host write and
            // the final free of `host` wait for it.
            unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr, &host[..], self.stream.cu_stream()) }?;
            host.record_upload(self.stream)?;
        }
        Ok(())
    }
}

impl<T: DeviceRepr> DeviceRead<T> for DeviceView<'_, T> {
    fn ptr(&self) -> *const c_void {
        DeviceView::ptr(self)
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl<T: DeviceRepr> DeviceRead<T> for DeviceViewMut<'_, T> {
    fn ptr(&self) -> *const c_void {
        DeviceViewMut::ptr(self)
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl<T: DeviceRepr> DeviceWrite<T> for DeviceViewMut<'_, T> {
    fn ptr_mut(&mut self) -> *mut c_void {
        DeviceViewMut::ptr_mut(self)
    }
}

impl<T: DeviceRepr> DeviceRead<T> for DeviceBuffer<T> {
    fn ptr(&self) -> *const c_void {
        DeviceBuffer::ptr(self)
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl<T: DeviceRepr> DeviceWrite<T> for DeviceBuffer<T> {
    fn ptr_mut(&mut self) -> *mut c_void {
        DeviceBuffer::ptr_mut(self)
    }
}

/// A typed device allocation of `len` elements, owned, freed on drop (in stream order).
pub struct DeviceBuffer<T> {
    slice: CudaSlice<T>,
    len: usize,
    stream: Arc<CudaStream>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw device address for a parameter struct (read access).
    pub fn ptr(&self) -> *const c_void {
        let (p, _sync) = self.slice.device_ptr(&self.stream);
        p as usize as *const c_void
    }

    /// Raw device address for a parameter struct (write access).
    pub fn ptr_mut(&mut self) -> *mut c_void {
        self.ptr() as *mut c_void
    }

    /// Raw device address typed as f32, for the f32 fields of parameter structs.
    pub fn f32_ptr(&self) -> *mut f32 {
        self.ptr() as *mut f32
    }

    /// Copies the buffer back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        let mut v = vec![T::default(); self.slice.len()];
        self.stream.memcpy_dtoh(&self.slice, &mut v)?;
        v.truncate(self.len);
        Ok(v)
    }

    /// Fills the buffer with the byte `0xFF` (NaN for f32 and bf16, -1 for integers), so that a
    /// test can tell which elements a kernel wrote.
    pub fn poison(&mut self) -> Result<()> {
        let (p, _sync) = self.slice.device_ptr(&self.stream);
        let bytes = self.slice.len() * std::mem::size_of::<T>();
        // SAFETY: writes exactly the bytes of this allocation, on the stream that owns it.
        unsafe { cudarc::driver::result::memset_d8_async(p, 0xFF, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies `host` into the buffer (same length).
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        crate::error::check_len("host source", host.len(), self.len)?;
        if !host.is_empty() {
            self.stream.memcpy_htod(host, &mut self.slice.slice_mut(0..host.len()))?;
        }
        Ok(())
    }

    /// The underlying cudarc slice.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    fn base(&self) -> sys::CUdeviceptr {
        let (p, _sync) = self.slice.device_ptr(&self.stream);
        p
    }

    /// A shared view of the whole buffer.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView { ptr: self.base(), len: self.len, stream: &self.stream, _borrow: PhantomData }
    }

    /// A shared view of elements `range`; an error when the range is not inside the buffer.
    pub fn view(&self, range: Range<usize>) -> Result<DeviceView<'_, T>> {
        self.as_view().view(range)
    }

    /// An exclusive view of elements `range`; an error when the range is not inside the buffer.
    pub fn view_mut(&mut self, range: Range<usize>) -> Result<DeviceViewMut<'_, T>> {
        check_range(&range, self.len)?;
        Ok(DeviceViewMut {
            ptr: offset_ptr::<T>(self.base(), range.start),
            len: range.len(),
            stream: &self.stream,
            _borrow: PhantomData,
        })
    }

    /// `K` exclusive views of pairwise disjoint ranges at once (like `<[T]>::get_disjoint_mut`):
    /// e.g. the weight and bias gradients of one layer inside the flat gradient buffer. An error
    /// when a range is outside the buffer or two non-empty ranges overlap.
    pub fn views_mut<const K: usize>(&mut self, ranges: [Range<usize>; K]) -> Result<[DeviceViewMut<'_, T>; K]> {
        check_disjoint(&ranges, self.len)?;
        let base = self.base();
        let stream = &self.stream;
        Ok(ranges.map(|r| DeviceViewMut {
            ptr: offset_ptr::<T>(base, r.start),
            len: r.len(),
            stream,
            _borrow: PhantomData,
        }))
    }

    /// Sets every element to zero bits (0.0 for f32 and bf16), in stream order.
    pub fn fill_zero(&mut self) -> Result<()> {
        let len = self.len;
        self.view_mut(0..len)?.fill_zero()
    }
}

impl DeviceBuffer<bf16> {
    /// Copies back and widens to f32.
    pub fn to_host_f32(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.into_iter().map(f32::from).collect())
    }
}

/// Checks that a device address is a multiple of `bytes` (a power of two), as a kernel's vector
/// accesses need; the error names the tensor. Whole buffers are 256-byte aligned, views are as
/// aligned as their offset makes them.
pub fn check_aligned(tensor: &'static str, ptr: *const c_void, bytes: usize) -> Result<()> {
    if (ptr as usize).is_multiple_of(bytes) {
        Ok(())
    } else {
        Err(Error::Alignment { tensor, detail: format!("address {ptr:p} is not {bytes}-byte aligned") })
    }
}

/// Grid size for `n` items, `per_block` at a time, as a launch dimension; refuses sizes a grid
/// cannot hold.
pub fn blocks_for(what: &'static str, n: u64, per_block: u64) -> Result<u32> {
    let blocks = n.div_ceil(per_block).max(1);
    u32::try_from(blocks).ok().filter(|&b| b < (1 << 31)).ok_or_else(|| Error::Unsupported {
        what,
        detail: format!("{n} items need {blocks} blocks, too many for one grid"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_variable_takes_default_or_own_and_names_itself_otherwise() {
        assert!(!own_stream_named(None).unwrap());
        assert!(!own_stream_named(Some("default")).unwrap());
        assert!(own_stream_named(Some(" own ")).unwrap());
        let err = own_stream_named(Some("per-thread")).unwrap_err().to_string();
        assert!(err.contains(STREAM_VAR) && err.contains("per-thread") && err.contains("`own`"), "{err}");
    }
}
