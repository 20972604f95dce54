// Programmatic dependent launch (compute capability 9.0; host side: Gpu::launch_dependent in
// src/cuda/mod.rs). A kernel launched that way may be scheduled while the kernel before it on the
// stream is still running, so it must not touch global memory until that one has completed.
#pragma once

// The first statement of every kernel that may be launched as a dependent launch:
// - griddepcontrol.wait: wait until the kernel launched before this one on the stream has
//   completed and its writes are visible here (at once when this launch was an ordinary one, or
//   when that kernel was done before this one started);
// - griddepcontrol.launch_dependents: let the kernel launched after this one be scheduled once
//   every block of this one has got this far (it then waits here in turn).
// Nothing elsewhere: the wait must come before the kernel's first global access, and the trigger
// after its wait, so that a chain of dependent launches never has more than two kernels in flight.
// On earlier devices (the sm_80 cubin) both are left out: there is no dependent launch there.
__device__ __forceinline__ void dependent_launch_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
