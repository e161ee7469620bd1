//! The bytes of a large weight, in memory the kernel is asked to back with 2 MB pages.
//!
//! A forward pass streams every weight from memory, and with 4 KB pages a stream crosses a
//! page, and misses the TLB, every few rows: for Gemma 3's output head in Q8_0, 41,000
//! pages a token. Linux backs anonymous memory with 2 MB pages where the process asks for them
//! (`madvise(MADV_HUGEPAGE)`; transparent huge pages in `madvise` mode, most distributions'
//! default) or everywhere (`always` mode). Measured with Gemma 3 270M Q4_K_M on an Intel Xeon
//! (AVX-512, 2 threads), `always` against `madvise` mode before the weights asked: decode
//! 69-70 -> 74-75 tok/s at 512 tokens, a 16-token turn after 2,048 tokens 37.8-38.4 -> 36.3-36.6
//! ms. SmolLM2-135M, whose weights are smaller, changed by 1-2%.

use std::fmt;
use std::ops::{Deref, DerefMut};

use memmap2::{MmapMut, MmapOptions};

/// A huge page's size on x86-64 (and most 64-bit Linux targets).
const HUGE_PAGE: usize = 2 << 20;

/// Bytes in memory backed by huge pages where the kernel gives them: those of a weight of at
/// least one huge page, mapped (its length rounded up to whole huge pages, which aligns the
/// mapping on one since Linux 6.7; the huge page that holds the weight's end is resident
/// whole, so such a weight takes at most 2 MB more than its bytes, and the huge pages past
/// it are never touched); smaller ones on the heap. Either way a plain `[u8]`: nothing here
/// changes a value.
pub(crate) struct WeightBytes(Storage);

enum Storage {
    Heap(Vec<u8>),
    Mapped { map: MmapMut, len: usize },
}

impl WeightBytes {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> WeightBytes {
        if len >= HUGE_PAGE
            && let Ok(map) = MmapOptions::new()
                .len(len.next_multiple_of(HUGE_PAGE))
                .map_anon()
        {
            // A hint, asked before the first write faults the pages in: a kernel without
            // transparent huge pages refuses it, and the memory is then ordinary pages.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return WeightBytes(Storage::Mapped { map, len });
        }
        WeightBytes(Storage::Heap(vec![0; len]))
    }

    /// A copy of `bytes`.
    pub(crate) fn copy_of(bytes: &[u8]) -> WeightBytes {
        let mut out = WeightBytes::zeroed(bytes.len());
        out.copy_from_slice(bytes);
        out
    }
}

impl Default for WeightBytes {
    fn default() -> WeightBytes {
        WeightBytes(Storage::Heap(Vec::new()))
    }
}

impl Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Storage::Heap(v) => v,
            Storage::Mapped { map, len } => &map[..*len],
        }
    }
}

impl DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Storage::Heap(v) => v,
            Storage::Mapped { map, len } => &mut map[..*len],
        }
    }
}

impl Clone for WeightBytes {
    fn clone(&self) -> WeightBytes {
        WeightBytes::copy_of(self)
    }
}

impl fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = match self.0 {
            Storage::Mapped { .. } => "mapped",
            Storage::Heap(_) => "heap",
        };
        write!(f, "WeightBytes({} bytes, {on})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bytes_hold_what_they_were_given_on_the_heap_and_mapped() {
        for len in [0, 1, 1000, HUGE_PAGE - 1, HUGE_PAGE, HUGE_PAGE + 12_345] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let held = WeightBytes::copy_of(&bytes);
            assert_eq!(&held[..], &bytes[..], "{len} bytes");
            let mapped = matches!(held.0, Storage::Mapped { .. });
            assert_eq!(mapped, len >= HUGE_PAGE, "{len} bytes: {held:?}");
            assert_eq!(&held.clone()[..], &bytes[..], "a clone of {len} bytes");
        }
        assert!(WeightBytes::default().is_empty());
        assert!(WeightBytes::zeroed(HUGE_PAGE + 1).iter().all(|&b| b == 0));
    }
}
