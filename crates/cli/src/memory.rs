//! Giving freed memory back to the system: the one place the CLI calls C.
//!
//! glibc's allocator keeps memory a program frees in its arenas for reuse, returning only what
//! lies at the top of a heap. In `agentkv serve`, KV caches of a few MB per layer are freed
//! and allocated again at other sizes as agents come and go, and the holes stay. On the workload
//! of `cargo xtask bench --only serve` (4 agents of about 3,200 tokens, 2 hot, f32 KV), after
//! 8 turns about 80 MB of a 550 MB process was free memory the allocator held; `malloc_trim(0)`
//! (which also releases whole free pages inside the heaps) gave it back. The server calls
//! [`release_freed`] after every turn.

/// Returns the allocator's free memory to the system (glibc's `malloc_trim(0)`); elsewhere
/// nothing.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim has no preconditions: it takes each arena's lock and releases free
    // pages, touching no memory that is allocated.
    unsafe {
        libc::malloc_trim(0);
    }
}
