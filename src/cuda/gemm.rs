//! cuBLASLt GEMMs: row-major, bf16 in, f32 accumulate, with bias / GELU epilogues.
//! (Filled in with the GEMM wrapper.)
