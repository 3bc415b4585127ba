//! Anonymous memory that weights arriving from peers land in: a safetensors image (its
//! header, then its data) laid out before the bytes come, which tensors read as they read a
//! mapped checkpoint file (`SafetensorsCheckpoint::landed`), so what arrives is computed
//! exactly as what is read from a model directory.
//!
//! Why not a file: on disk, a file's writes go through the page cache and then to the disk;
//! in a memory file (`memfd`), through the page cache's bookkeeping. `expertmesh bench
//! transfer` (framed, loopback, 2 cores) measured ~1.0–1.2 GB/s into a file on disk against
//! ~1.5–2.0 GB/s into anonymous memory on huge pages; a memory file was no better (~1.6 GB/s,
//! one measurement).
//!
//! The contract that makes the shared writes sound is the receivers' protocol: a region is
//! written ([`Landing::write`]) only while no tensor over it is read — an expert's bytes
//! before it is held, the dense weights before the model is built — and by one writer at a
//! time.
#![allow(unsafe_code)]

use crate::error::{ModelError, Result};

/// The memory and its length.
#[derive(Debug)]
pub struct Landing {
    map: memmap2::MmapRaw,
    len: usize,
}

impl Landing {
    /// `len` bytes of zeroed anonymous memory, reserved only: pages are made as they are
    /// written (huge ones where transparent huge pages are on). The image holds every expert
    /// at its place, and a worker writes only its own: the address space is not counted
    /// against the system's memory (`MAP_NORESERVE`), or a worker with less memory than the
    /// whole checkpoint could not lay it out (under strict overcommit, mode 2, it still is).
    pub fn new(len: usize) -> Result<Self> {
        let map = memmap2::MmapOptions::new()
            .len(len.max(1))
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| ModelError::Memory { bytes: len, source })?;
        // Without transparent huge pages the memory works the same, on 4 KB pages.
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self {
            map: map.into(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `bytes` to `at`; false (nothing written) when they do not fit.
    ///
    /// # Safety
    /// No reference to `[at, at + bytes.len())` may be alive or made until this returns:
    /// no tensor over the region is read and no other writer writes it meanwhile (the
    /// receivers' protocol, in the module's doc).
    pub unsafe fn write(&self, at: usize, bytes: &[u8]) -> bool {
        if at.checked_add(bytes.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above), and the caller promises
        // that nothing else reads or writes it meanwhile, so `bytes` (borrowed) is not in it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(at),
                bytes.len(),
            )
        };
        true
    }

    /// Bytes `[start, start + len)`, for the tensors over them. Panics outside the memory.
    pub(crate) fn bytes(&self, start: usize, len: usize) -> &[u8] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "a landed tensor inside its memory"
        );
        // SAFETY: the range is inside the mapping, which lives as long as `self`; writers
        // keep off regions that are read (`write`'s contract).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_where_asked_and_never_outside() {
        let landing = Landing::new(10_000).unwrap();
        assert_eq!(landing.bytes(0, 10_000), &[0u8; 10_000][..], "zeroed");
        // SAFETY: nothing reads the landing in this test while it is written.
        unsafe {
            assert!(landing.write(4096 - 3, &[1, 2, 3, 4, 5, 6]));
            assert!(!landing.write(9_999, &[1, 2]), "past the end");
            assert!(!landing.write(usize::MAX, &[1]), "overflowing");
        }
        assert_eq!(landing.bytes(4092, 8), &[0, 1, 2, 3, 4, 5, 6, 0]);
        assert_eq!(landing.bytes(9_990, 10), &[0u8; 10][..]);
    }

    #[test]
    fn an_image_larger_than_memory_is_laid_out_as_address_space_only() {
        // 1 TiB: Maverick's experts in bf16 are ~0.8 TB, which a worker lays out whole and
        // fills in part. Only strict overcommit (mode 2) refuses it, as a typed error.
        let strict = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .is_ok_and(|mode| mode.trim() == "2");
        match Landing::new(1 << 40) {
            Ok(landing) => {
                // SAFETY: nothing reads the landing in this test while it is written.
                assert!(unsafe { landing.write((1 << 40) - 3, &[7, 8, 9]) });
                assert_eq!(landing.bytes((1 << 40) - 4, 4), &[0, 7, 8, 9]);
            }
            Err(e) => assert!(
                strict && matches!(e, ModelError::Memory { .. }),
                "refused without strict overcommit: {e}"
            ),
        }
    }
}
