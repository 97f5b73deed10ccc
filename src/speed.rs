//! The fast CPU configuration, in your own program.
//!
//! Two settings made the crate's runs several times faster on small CPU machines
//! (`docs/benchmarks.md`), and this repository sets them in its `.cargo/config.toml`,
//! which a downstream project never reads:
//!
//! * `CANDLE_NUM_THREADS=1`: candle's element-wise thread pool spin-waits against the
//!   matmul threads (measured: a DSM step ~9× slower on 2 busy cores). Matrix products
//!   still use every core (`RAYON_NUM_THREADS`). candle reads the variable **once, at its
//!   first tensor operation**; setting it later has no effect.
//! * glibc's malloc thresholds: glibc serves multi-megabyte activations from fresh `mmap`s
//!   and returns them on free, so every op page-faults them back in, zeroed (on the
//!   `ode_sde_gap` sampling run, system time fell from 128 s to 2 s). The environment
//!   variable `GLIBC_TUNABLES` is read **when the process starts**, so setting it from
//!   inside the program does nothing; `mallopt` does the same at run time.
//!
//! [`apply_cpu_settings`] does both, as the first line of `main`. Alternatively set them
//! outside the program: `CANDLE_NUM_THREADS` under `[env]` in your `.cargo/config.toml`
//! (for `cargo run`) or in the shell, and
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296`
//! in the shell that starts the program.

/// What [`apply_cpu_settings`] did.
///
/// ```
/// let applied = scoresde::speed::apply_cpu_settings();
/// if !applied.malloc_tuned {
///     eprintln!("not glibc: set nothing for malloc");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSettings {
    /// `CANDLE_NUM_THREADS` was unset and this call set it to `1` (`false`: it was
    /// already set, and was left as it was).
    pub candle_threads_set: bool,
    /// glibc's `mmap` threshold (32 MiB) and trim threshold (2 GiB) were set with
    /// `mallopt` (`false` off glibc, or if glibc refused).
    pub malloc_tuned: bool,
}

/// Applies the fast CPU configuration (see the [module docs](self)) to this process:
/// sets `CANDLE_NUM_THREADS=1` unless it is already set, and on glibc raises malloc's
/// `mmap` and trim thresholds with `mallopt`.
///
/// Call it first thing in `main`, before any candle operation (candle reads
/// `CANDLE_NUM_THREADS` once, at its first op) and before starting threads (changing the
/// environment while another thread reads it is undefined behaviour on some platforms).
/// It helps on small CPU machines; on GPUs it does nothing useful, and on a machine with
/// many idle cores candle's element-wise pool may be worth keeping (measure).
///
/// ```
/// fn main() -> scoresde::Result<()> {
///     let applied = scoresde::speed::apply_cpu_settings();
///     println!("{applied:?}");
///     // … build models and sample as usual.
///     Ok(())
/// }
/// ```
pub fn apply_cpu_settings() -> CpuSettings {
    let candle_threads_set = std::env::var_os("CANDLE_NUM_THREADS").is_none();
    if candle_threads_set {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    CpuSettings {
        candle_threads_set,
        malloc_tuned: tune_malloc(),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() -> bool {
    // glibc's <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3.
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only changes malloc's thresholds, is thread-safe in glibc, and the
    // values are in the documented ranges (the mmap threshold's maximum is 32 MiB on
    // 64-bit; the trim threshold takes any int, so 2 GiB stands in for the tunable's 4).
    unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() -> bool {
    false
}
