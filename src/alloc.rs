//! The global allocator: mimalloc, asked the way the C `malloc` is asked wherever that
//! gives the alignment Rust needs.
//!
//! The `mimalloc` crate passes every allocation to `mi_malloc_aligned`, whatever its
//! alignment. mimalloc's fast path there serves only blocks up to 1 KiB that happen to sit
//! at the alignment asked for; anything else (a 4 KiB read buffer with alignment 1, a boxed
//! future) goes through its generic path, which over-allocates by the alignment unless the
//! block's size class is a power of two. Plain `mi_malloc` always returns blocks aligned
//! to 16 bytes (8 below 16 bytes), so a layout whose alignment is at most that and at most
//! its size needs nothing more (the rule Rust's `System` allocator uses with `malloc`).
//! Measured with `benches/instructions.sh`: a quarter of the allocations a request makes
//! took the generic path, at ~190 instructions each instead of ~20.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment `mi_malloc` guarantees for blocks of at least that size
/// (mimalloc's `MI_MAX_ALIGN_SIZE`).
const MALLOC_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator]` in `main.rs`).
pub struct MiMalloc;

/// Whether `mi_malloc` (and `mi_realloc`) of `size` bytes is aligned enough for `align`.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it: `mi_free` and `mi_realloc*`
// take blocks from any of its allocation functions. A plain function is used only where
// its guaranteed alignment meets the layout's (see `plain`); otherwise the aligned one is.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment Rust may ask for, with sizes around mimalloc's size classes and its
    /// 1 KiB small-block limit: each block is aligned as asked, writable, and keeps its
    /// contents when it grows, shrinks or stays in place. Several blocks of each layout, so
    /// that blocks at odd places in their page (of a 24-, 40- or 56-byte class) are met.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_contents() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [
                1, 3, 8, 15, 16, 24, 40, 56, 100, 1000, 1025, 4000, 13_000, 70_000,
            ] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                for zeroed in [false, true] {
                    // SAFETY: non-zero sizes; each block is freed once, with the layout it
                    // has then, and read only within its size.
                    unsafe {
                        let blocks: Vec<*mut u8> = (0..8)
                            .map(|_| {
                                if zeroed {
                                    a.alloc_zeroed(layout)
                                } else {
                                    a.alloc(layout)
                                }
                            })
                            .collect();
                        for (i, &p) in blocks.iter().enumerate() {
                            assert!(!p.is_null());
                            assert_eq!(p as usize % align, 0, "size {size} align {align}");
                            if zeroed {
                                let block = std::slice::from_raw_parts(p, size);
                                assert!(block.iter().all(|&b| b == 0));
                            }
                            std::ptr::write_bytes(p, i as u8, size);
                        }
                        for (i, &p) in blocks.iter().enumerate() {
                            // Grow past the block, shrink, and stay within it.
                            let new_size = [size * 3 + 7, size.div_ceil(2), size][i % 3];
                            let q = a.realloc(p, layout, new_size);
                            assert!(!q.is_null());
                            assert_eq!(q as usize % align, 0, "{size}→{new_size} align {align}");
                            let kept = std::slice::from_raw_parts(q, size.min(new_size));
                            assert!(kept.iter().all(|&b| b == i as u8), "{size}→{new_size}");
                            a.dealloc(q, Layout::from_size_align(new_size, align).expect("layout"));
                        }
                    }
                }
            }
        }
    }
}
