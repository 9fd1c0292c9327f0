//! Freed memory back to the system. After thousands of pipelines are deleted the
//! allocator (glibc's malloc) keeps what they used in its arenas, so the process's RSS stays
//! at its peak; `malloc_trim` hands every free page back.
//!
//! The only `unsafe` of the controller besides `kafka/group_offsets.rs` (the workspace denies
//! `unsafe_code`; this module allows it for the one call below).
#![allow(unsafe_code)]

/// Give the allocator's free pages back to the system (glibc only; elsewhere nothing).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and touches no live allocation: it only returns
    // pages no allocation holds, under the allocator's own arena locks, so it is sound from
    // any thread at any time. Its result (whether memory was released) needs no handling.
    unsafe {
        libc::malloc_trim(0);
    }
}
