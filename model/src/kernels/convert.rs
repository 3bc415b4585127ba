//! The data path's activation conversions (f32 ⇄ bf16 on the wire), built per instruction
//! set like the products. The arithmetic is element-wise and the same in every build, so
//! the bits never depend on the build; only the width of the loop does.

use std::mem::MaybeUninit;

use super::*;

kernel! {
    /// `out[i]` = the bf16 bits of `values[i]`, rounded to nearest even (a NaN stays a quiet
    /// NaN), as `half::bf16::from_f32` gives them. `out` may be uninitialised (a vector's
    /// spare capacity: no zeroing first); every element is written.
    pub fn to_bf16 / to_bf16_on(values: &[f32], out: &mut [MaybeUninit<u16>]) => to_bf16_portable
}

kernel! {
    /// `out[i]` = the bf16 bits `halves[i]` widened to f32 (exact); every element of `out`
    /// is written.
    pub fn from_bf16 / from_bf16_on(halves: &[u16], out: &mut [MaybeUninit<f32>]) => from_bf16_portable
}

kernel! {
    /// Each value rounded to bf16 in place (`from_bf16(to_bf16(v))`): what a trip as bf16
    /// does to it.
    pub fn round_bf16 / round_bf16_on(values: &mut [f32]) => round_bf16_portable
}

/// The bf16 bits of `values` in a new vector (see [`to_bf16`]).
pub fn to_bf16_vec(values: &[f32]) -> Vec<u16> {
    let mut out = Vec::with_capacity(values.len());
    to_bf16(values, &mut out.spare_capacity_mut()[..values.len()]);
    // SAFETY: `to_bf16` wrote all `values.len()` elements (it asserts the lengths agree).
    unsafe { out.set_len(values.len()) };
    out
}

/// `halves` widened to f32 in a new vector (see [`from_bf16`]).
pub fn from_bf16_vec(halves: &[u16]) -> Vec<f32> {
    let mut out = Vec::with_capacity(halves.len());
    from_bf16(halves, &mut out.spare_capacity_mut()[..halves.len()]);
    // SAFETY: `from_bf16` wrote all `halves.len()` elements (it asserts the lengths agree).
    unsafe { out.set_len(halves.len()) };
    out
}

#[inline(always)]
fn round_bf16_portable(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = f32::from_bits(u32::from(bf16_bits(*v)) << 16);
    }
}

#[inline(always)]
fn to_bf16_portable(values: &[f32], out: &mut [MaybeUninit<u16>]) {
    assert_eq!(values.len(), out.len(), "one bf16 per value");
    for (o, v) in out.iter_mut().zip(values) {
        o.write(bf16_bits(*v));
    }
}

#[inline(always)]
fn from_bf16_portable(halves: &[u16], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(halves.len(), out.len(), "one value per bf16");
    for (o, h) in out.iter_mut().zip(halves) {
        o.write(f32::from_bits(u32::from(*h) << 16));
    }
}

/// f32 → bf16 bits, rounding to nearest even; a select rather than a branch for NaN, so
/// that the loops over it vectorise.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) as u16) | 0x0040;
    if v.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every build rounds as `half` does, on edge cases and on a sweep of bit patterns.
    #[test]
    fn every_build_rounds_as_half_does() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.3e38,
            3.39e38,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.1,
            -7.77,
        ];
        values.extend((0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for isa in super::builds() {
            let mut bits = Vec::with_capacity(values.len());
            to_bf16_on(isa, &values, &mut bits.spare_capacity_mut()[..values.len()]);
            // SAFETY: every element was written (the kernel asserts the lengths).
            unsafe { bits.set_len(values.len()) };
            for (v, b) in values.iter().zip(&bits) {
                let theirs = half::bf16::from_f32(*v);
                if v.is_nan() {
                    assert!(half::bf16::from_bits(*b).is_nan(), "{isa:?}");
                } else {
                    assert_eq!(*b, theirs.to_bits(), "{isa:?} {v}");
                }
            }
            let mut back = Vec::with_capacity(bits.len());
            from_bf16_on(isa, &bits, &mut back.spare_capacity_mut()[..bits.len()]);
            // SAFETY: every element was written (the kernel asserts the lengths).
            unsafe { back.set_len(bits.len()) };
            for (b, w) in bits.iter().zip(&back) {
                assert_eq!(w.to_bits(), half::bf16::from_bits(*b).to_f32().to_bits());
            }
            let mut rounded = values.clone();
            round_bf16_on(isa, &mut rounded);
            for (r, w) in rounded.iter().zip(&back) {
                assert!(r.to_bits() == w.to_bits() || (r.is_nan() && w.is_nan()));
            }
        }
        assert_eq!(
            to_bf16_vec(&values[..5]),
            vec![0, 0x8000, 0x3f80, 0x3f80, 0x3f82]
        );
        assert_eq!(from_bf16_vec(&[0x3f80, 0xc000]), vec![1.0, -2.0]);
    }
}
