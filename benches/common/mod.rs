//! What the memory-bound benches share: criterion settings for kernels of tens of microseconds,
//! where 10 samples over 2 seconds are plenty and keep a whole GPU bench run short.

use std::time::Duration;

use criterion::Criterion;

pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}
