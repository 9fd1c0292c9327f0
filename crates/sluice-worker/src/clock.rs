//! The process clock shared between threads as plain integers.

/// Milliseconds on a monotonic process clock (for "how long since" checks shared between
/// threads as plain integers).
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}
