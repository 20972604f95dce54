//! The training log's output: lines on stdout that never end the process. `println!` panics when
//! stdout is gone (a pipe whose reader quit, `mapet pretrain | head`); a run must instead stop
//! cleanly, with a checkpoint. [`say!`](crate::say!) writes a line and, where the pipe is
//! broken, raises [`stdout_gone`], which the training loop takes as an interrupt.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Whether a write to stdout has failed (its reader is gone): nothing more is printed there.
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::SeqCst)
}

/// Writes `text` (and a newline when `line`) to stdout and flushes it. A broken pipe (the reader
/// quit) records that stdout is gone, and nothing more is printed there; another failure (a full
/// disk under a redirection) loses the line and nothing else.
pub fn write(text: std::fmt::Arguments<'_>, line: bool) {
    if stdout_gone() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = if line { writeln!(out, "{text}") } else { write!(out, "{text}") };
    if let Err(e) = written.and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_GONE.store(true, Ordering::SeqCst);
        }
    }
}

/// `n` and the noun that goes with it: "1 step", "4 steps".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `println!` for the training log: see the module notes.
#[macro_export]
macro_rules! say {
    () => { $crate::say::write(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::say::write(format_args!($($arg)*), true) };
}

/// `print!` (no newline) for the training log's progress line: see the module notes.
#[macro_export]
macro_rules! say_part {
    ($($arg:tt)*) => { $crate::say::write(format_args!($($arg)*), false) };
}
