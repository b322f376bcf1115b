//! The process's allocator: mimalloc, tuned before it serves its first allocation. Every
//! binary that links the crate (the daemon, tests, benchmarks) uses it, so what benchmarks
//! measure is what the daemon runs with.

/// Decoding and merging allocate many small, short-lived strings per event; mimalloc's
/// thread-local free lists handle that pattern markedly faster than the system allocator
/// (measured with `cargo bench --bench decode`). Every binary linking the crate uses it.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, told before its first allocation to hand freed memory back to the OS at once.
///
/// A catch-up allocates and frees a batch's worth of plan and statement buffers every few
/// milliseconds. With mimalloc's defaults (arenas committed eagerly, purges delayed) those
/// pages stay resident: the daemon's peak RSS on a 1,000,000-event backlog was about 100 MB
/// instead of about 55 MB, at no measurable throughput gain (`cargo bench --bench catchup --
/// 1000000 external`). The arena setting only counts before the first arena is reserved, that
/// is before the first allocation, hence the hook here rather than a call in `main`. A
/// `MIMALLOC_ARENA_EAGER_COMMIT` or `MIMALLOC_PURGE_DELAY` in the environment wins.
struct Allocator;

static ALLOCATOR_TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn tune_allocator_once() {
    use std::sync::atomic::Ordering::Relaxed;
    if !ALLOCATOR_TUNED.load(Relaxed) && !ALLOCATOR_TUNED.swap(true, Relaxed) {
        tune_allocator();
    }
}

/// The options set to 0, with the variables that override them. The numbers are those of
/// `mimalloc.h` (equal in the v2 and v3 sources the sys crate builds), which the sys crate
/// does not name.
const ALLOCATOR_OPTIONS: [(libmimalloc_sys::mi_option_t, &str); 2] = [
    (4, "MIMALLOC_ARENA_EAGER_COMMIT"),
    (15, "MIMALLOC_PURGE_DELAY"),
];

fn tune_allocator() {
    for (option, env) in ALLOCATOR_OPTIONS {
        // Reading the environment allocates: the flag is already set, so that allocation
        // goes straight to mimalloc.
        if std::env::var_os(env).is_none() {
            // SAFETY: `mi_option_set` stores an integer in mimalloc's option table.
            unsafe { libmimalloc_sys::mi_option_set(option, 0) };
        }
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc's `GlobalAlloc`; the only addition is
// setting two of its options once, before the first allocation is served.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        tune_allocator_once();
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as for `alloc`.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        tune_allocator_once();
        // SAFETY: as for `alloc`.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        tune_allocator_once();
        // SAFETY: as for `alloc`.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allocator_is_tuned_before_it_serves() {
        let _ = Box::new(1u64);
        for (option, env) in super::ALLOCATOR_OPTIONS {
            if std::env::var_os(env).is_none() {
                // SAFETY: reads an integer from mimalloc's option table.
                assert_eq!(
                    unsafe { libmimalloc_sys::mi_option_get(option) },
                    0,
                    "{env}"
                );
            }
        }
    }
}
