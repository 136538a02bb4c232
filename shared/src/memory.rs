//! How the daemons' heap gives memory back (glibc's allocator; elsewhere these do nothing).
//! Both binaries call [`limit_arenas`] first thing in `main`.
//!
//! confd's working set is bursty: a pass at 10,000 instances allocates tens of MiB (the
//! template document's changed parts, three rendered configs, the files they replace) and
//! frees most of it when the pass ends. glibc keeps freed memory resident, and by default in
//! one arena per thread that ever allocated (up to 8 per core), so each runtime thread's
//! bursts stay resident separately. The bench measured 92 MiB peak RSS at 10,000 etcd
//! instances with the defaults and 77 MiB with one arena; churn also grew the idle resident
//! set round after round. confd allocates from a few tasks at a time, so one arena costs no
//! measurable contention, and returning freed pages after each pass keeps the idle size the
//! idle size.
//!
//! registrator (meant to stay under 8 MiB idle, with no growth under churn) allocates little, but from
//! every runtime thread (inspections, store requests): with glibc's defaults each thread that
//! allocated keeps an arena of its own resident, which is most of the difference between its
//! heap in use and its resident set. It calls [`release_freed`] once a burst of work is done.

/// Limits the heap to one arena. Call before any thread starts (first thing in `main`).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns freed heap memory to the system (after a pass: its buffers are gone).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The heap as the allocator accounts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes in blocks handed out (what is live, with the allocator's per-block overhead).
    pub in_use: usize,
    /// Bytes the heap holds free: not returned to the system, so still resident where
    /// touched (fragmentation: free space between live blocks cannot be given back).
    pub free: usize,
    /// Bytes in blocks too large for the heap, mapped on their own (returned when freed).
    pub mapped: usize,
}

/// The heap's account ([`Heap`]); `None` where the allocator is not glibc's.
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: m.uordblks,
            free: m.fordblks,
            mapped: m.hblkhd,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// After a pass: returns freed memory ([`release_freed`]) and, at debug level, logs the heap
/// (`heap after pass`, in KiB): how the bench tells live data from memory the heap holds.
pub fn after_pass() {
    release_freed();
    if tracing::enabled!(tracing::Level::DEBUG) {
        if let Some(h) = heap() {
            tracing::debug!(
                in_use_kib = h.in_use / 1024,
                free_kib = h.free / 1024,
                mapped_kib = h.mapped / 1024,
                "heap after pass"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn heap_counts_a_live_block() {
        // 64 MiB is above glibc's largest mmap threshold (32 MiB on 64-bit), so the block is
        // a mapping of its own and counts in `mapped` whatever other tests allocate or free
        // meanwhile (a before/after difference would race them).
        let block = vec![0u8; 64 << 20];
        let during = super::heap().unwrap();
        assert!(during.mapped >= 64 << 20, "{during:?}");
        drop(block);
    }
}
