//! Antialiased bilinear resampling of 8-bit RGB images, in Pillow's arithmetic
//! (`libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc` / `Vertical`).
//!
//! transformers resizes `uint8` tiles with torchvision's antialiased bilinear filter, whose
//! CPU `uint8` path ports Pillow's separable convolution: a triangle filter widened by the
//! scale when shrinking, weights normalised per output pixel and turned into 22-bit fixed
//! point, a horizontal pass into an 8-bit intermediate and then a vertical pass, each
//! rounded half up and clipped. The fixture's global tile equals this bit for bit.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's source window and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The taps of every output pixel when `in_size` pixels become `out_size`.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    // The bilinear (triangle) filter has support 1.
    let support = filter_scale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's `(int)` truncation, then clamped to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (lo..hi)
                .map(|x| {
                    let d = ((x as f64 - center + 0.5) / filter_scale).abs();
                    if d < 1.0 {
                        1.0 - d
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps { first: lo, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass over interleaved RGB rows: `pixel(line, i, channel)` reads the source along
/// the resized axis; the result is `[lines][out][3]`.
fn pass(lines: usize, taps: &[Taps], pixel: impl Fn(usize, usize, usize) -> u8) -> Vec<[u8; 3]> {
    let mut out = Vec::with_capacity(lines * taps.len());
    for line in 0..lines {
        for t in taps {
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in t.weights.iter().enumerate() {
                    acc += i64::from(pixel(line, t.first + k, c)) * i64::from(w);
                }
                *v = clip8(acc);
            }
            out.push(px);
        }
    }
    out
}

/// `image` resized to `width × height` (PIL `Image.resize(size, BILINEAR)`): the
/// horizontal pass first, over only the source rows the vertical pass reads, as Pillow
/// does; an axis whose size does not change is not resampled.
pub fn resize_rgb(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    if (w0, h0) == (width, height) {
        return image.clone();
    }
    let vertical = taps(h0, height);
    let (row_lo, row_hi) = if h0 != height {
        let lo = vertical[0].first;
        let last = &vertical[height - 1];
        (lo, last.first + last.weights.len())
    } else {
        (0, h0)
    };
    let src = |x: usize, y: usize, c: usize| image.get_pixel(x as u32, y as u32).0[c];
    // After the horizontal pass: rows row_lo..row_hi, `cur_w` wide.
    let (mut buf, cur_w): (Vec<[u8; 3]>, usize) = if w0 != width {
        let horizontal = taps(w0, width);
        (
            pass(row_hi - row_lo, &horizontal, |line, i, c| {
                src(i, row_lo + line, c)
            }),
            width,
        )
    } else {
        let mut rows = Vec::with_capacity((row_hi - row_lo) * w0);
        for y in row_lo..row_hi {
            for x in 0..w0 {
                rows.push(image.get_pixel(x as u32, y as u32).0);
            }
        }
        (rows, w0)
    };
    if h0 != height {
        let shifted: Vec<Taps> = vertical
            .into_iter()
            .map(|t| Taps {
                first: t.first - row_lo,
                weights: t.weights,
            })
            .collect();
        // The vertical pass reads columns as lines; it yields [x][y], transposed back.
        let cols = pass(cur_w, &shifted, |x, y, c| buf[y * cur_w + x][c]);
        buf = (0..height)
            .flat_map(|y| (0..cur_w).map(move |x| (x, y)))
            .map(|(x, y)| cols[x * height + y])
            .collect();
    }
    let mut out = RgbImage::new(cur_w as u32, height as u32);
    for (p, v) in out.pixels_mut().zip(buf) {
        p.0 = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_averages_with_pillows_weights() {
        // 4 → 2 pixels: support 2, weights 1/8, 3/8, 3/8, 1/8 (clipped at the edges and
        // renormalised).
        let mut img = RgbImage::new(4, 1);
        for (x, v) in [0u8, 80, 160, 240].into_iter().enumerate() {
            img.put_pixel(x as u32, 0, image::Rgb([v, v, v]));
        }
        let out = resize_rgb(&img, 2, 1);
        // (0·3 + 80·3 + 160·1) / 7 = 57.1 → 57; (80·1 + 160·3 + 240·3) / 7 = 182.9 → 183.
        assert_eq!(out.get_pixel(0, 0).0[0], 57);
        assert_eq!(out.get_pixel(1, 0).0[0], 183);
    }

    #[test]
    fn same_size_is_the_identity() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_rgb(&img, 3, 2), img);
    }
}
