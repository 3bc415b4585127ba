//! Images to tiles of pixel values (HF `Llama4ImageProcessor`; LLAMA4.md §4.1).
//!
//! 1. Check the encoded size, read the header (format and dimensions) and check the
//!    dimensions against the pixel cap **before** decoding, so a small file that claims a
//!    huge image (a decompression bomb) is refused without allocating it; then decode
//!    (PNG, JPEG, WebP, GIF's first frame) under the same limits.
//! 2. Convert to RGB: an alpha channel is composited over white, as transformers'
//!    `convert_to_rgb` does (PIL's `alpha_composite`, in PIL's integer arithmetic).
//! 3. Pick the tile grid ([`best_canvas`]) and the size to resize to without distortion.
//! 4. Resize with PIL's antialiased bilinear filter ([`resample`]), pad right and bottom
//!    with 0, rescale and normalise in bfloat16 as the reference does (pad pixels become −1).
//! 5. Split into tiles in row-major order and, for more than one tile, append the global
//!    tile: the whole image resized straight to one tile.

use std::io::Cursor;

use half::bf16;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

use crate::vision::config::ProcessorConfig;
use crate::vision::resample::resize_rgb;

/// Bounds on one image, checked before anything of its size is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// Images per request at most.
    pub images_max: usize,
    /// Bytes of one encoded image at most.
    pub image_bytes_max: usize,
    /// Decoded pixels (width × height) of one image at most.
    pub image_pixels_max: u64,
    /// Pixels of an image's shorter side at least: smaller images carry nothing a tile can
    /// show and are refused rather than blown up.
    pub image_side_min: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            images_max: 8,
            image_bytes_max: 20 << 20,
            image_pixels_max: 40_000_000,
            image_side_min: 2,
        }
    }
}

/// Why an image was refused: always the request's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("{count} images in one request, more than the limit of {max}")]
    TooMany { count: usize, max: usize },
    #[error("an image of {bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("an image of {width}×{height} pixels exceeds the limit of {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("an image of {width}×{height} pixels is smaller than {min} pixels on a side")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error("unsupported image format{0} (supported: PNG, JPEG, WebP, GIF)")]
    Unsupported(String),
    #[error("the image cannot be decoded: {0}")]
    Decode(String),
    #[error("this model has no vision encoder: it takes text only")]
    NoVision,
}

/// One image's tiles: `[tiles, 3, size, size]` row-major, the local tiles in row-major
/// order and then, when there are several, the global tile.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// Tile rows × tile columns of the canvas (`aspect_ratio` in transformers).
    pub grid: (usize, usize),
    pub tile_size: usize,
    pub values: Vec<f32>,
}

impl Pixels {
    /// Tiles, the global one included.
    pub fn tiles(&self) -> usize {
        let (r, c) = self.grid;
        r * c + usize::from(r * c > 1)
    }
}

/// Reads an image's format and size from its header alone, after the byte cap; the
/// pixel and side bounds are checked here too.
pub fn probe(bytes: &[u8], limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    reader(bytes, limits)?
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))
        .and_then(|(w, h)| check_size(w, h, limits))
}

/// Decodes an image under the bounds (step 1) and returns the tile grid it gets, without
/// resizing or normalising: what the gateway needs to refuse a bad image and expand the
/// prompt, leaving the tiles to the attention worker.
pub fn check(
    bytes: &[u8],
    config: &ProcessorConfig,
    limits: &ImageLimits,
) -> Result<(usize, usize), ImageError> {
    let image = decode(bytes, limits)?;
    let (ch, cw) = best_canvas((image.height() as usize, image.width() as usize), config);
    Ok((ch / config.tile_size, cw / config.tile_size))
}

/// Decodes and preprocesses one encoded image (steps 1–5 of the module doc).
pub fn preprocess(
    bytes: &[u8],
    config: &ProcessorConfig,
    limits: &ImageLimits,
) -> Result<Pixels, ImageError> {
    Ok(preprocess_rgb(&to_rgb(decode(bytes, limits)?), config))
}

/// Step 1: the bounds from the header, then the decode under the same limits.
fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, ImageError> {
    probe(bytes, limits)?;
    let mut reader = reader(bytes, limits)?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.image_pixels_max.saturating_mul(16));
    reader.limits(decoder_limits);
    reader
        .decode()
        .map_err(|e| ImageError::Decode(e.to_string()))
}

/// Steps 3–5 on a decoded RGB image.
pub fn preprocess_rgb(image: &RgbImage, config: &ProcessorConfig) -> Pixels {
    let t = config.tile_size;
    let (h, w) = (image.height() as usize, image.width() as usize);
    let (ch, cw) = best_canvas((h, w), config);
    let target = if config.resize_to_max_canvas {
        (ch, cw)
    } else {
        (h.max(t).min(ch), w.max(t).min(cw))
    };
    let (nh, nw) = size_without_distortion((h, w), target);
    let resized = resize_rgb(image, nw.max(1), nh.max(1));
    let (rows, cols) = (ch / t, cw / t);
    let canvas = normalize(&resized, (ch, cw), config);
    let global = rows * cols > 1;
    let mut values = Vec::with_capacity((rows * cols + usize::from(global)) * 3 * t * t);
    for ty in 0..rows {
        for tx in 0..cols {
            for c in 0..3 {
                for y in 0..t {
                    let row = (c * ch + ty * t + y) * cw + tx * t;
                    values.extend_from_slice(&canvas[row..row + t]);
                }
            }
        }
    }
    if global {
        values.extend(normalize(&resize_rgb(image, t, t), (t, t), config));
    }
    Pixels {
        grid: (rows, cols),
        tile_size: t,
        values,
    }
}

fn reader<'a>(
    bytes: &'a [u8],
    limits: &ImageLimits,
) -> Result<ImageReader<Cursor<&'a [u8]>>, ImageError> {
    if bytes.len() > limits.image_bytes_max {
        return Err(ImageError::TooLarge {
            bytes: bytes.len(),
            max: limits.image_bytes_max,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif) => {
            Ok(reader)
        }
        Some(other) => Err(ImageError::Unsupported(format!(" {other:?}"))),
        None => Err(ImageError::Unsupported(String::new())),
    }
}

fn check_size(width: u32, height: u32, limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    if u64::from(width) * u64::from(height) > limits.image_pixels_max {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            max: limits.image_pixels_max,
        });
    }
    if width.min(height) < limits.image_side_min {
        return Err(ImageError::TooSmall {
            width,
            height,
            min: limits.image_side_min,
        });
    }
    Ok((width, height))
}

/// RGB, with any alpha composited over white (PIL `Image.alpha_composite` onto an opaque
/// white background, in its 7-bit fixed point, then `convert("RGB")`).
fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = if a == 0 {
            [255; 3]
        } else {
            const BITS: u32 = 7;
            let a = u32::from(a);
            let out_a255 = a * 255 + 255 * (255 - a);
            let coef1 = a * 255 * 255 * (1 << BITS) / out_a255;
            let coef2 = 255 * (1 << BITS) - coef1;
            let blend = |s: u8| {
                let v = u32::from(s) * coef1 + 255 * coef2 + (0x80 << BITS);
                ((((v >> 8) + v) >> 8) >> BITS) as u8
            };
            [blend(r), blend(g), blend(b)]
        };
    }
    out
}

/// `[3, canvas_h, canvas_w]` of `image` placed top-left on a zero canvas, rescaled and
/// normalised in bfloat16 the way transformers' Llama 4 processor does it:
/// `bf16(bf16(bf16(x) · rescale) − mean) / std`, each step rounded to bf16.
fn normalize(image: &RgbImage, (ch, cw): (usize, usize), config: &ProcessorConfig) -> Vec<f32> {
    let round = |v: f32| bf16::from_f32(v).to_f32();
    let mut out = vec![0.0f32; 3 * ch * cw];
    for c in 0..3 {
        let mean = round(config.image_mean[c]);
        let std = round(config.image_std[c]);
        let level = |x: u8| round(round(round(f32::from(x)) * config.rescale_factor) - mean) / std;
        let (lut, pad) = {
            let lut: Vec<f32> = (0..=255u8).map(|x| round(level(x))).collect();
            let pad = lut[0];
            (lut, pad)
        };
        let plane = &mut out[c * ch * cw..(c + 1) * ch * cw];
        plane.fill(pad);
        for (y, row) in image.rows().enumerate() {
            for (x, p) in row.enumerate() {
                plane[y * cw + x] = lut[p.0[c] as usize];
            }
        }
    }
    out
}

/// The canvas `(height, width)` in pixels for an image of `(height, width)` (transformers
/// `get_best_fit` over `find_supported_resolutions`): every grid of at most `max_tiles`
/// tiles is a candidate; the scale of each is the limiting side's; the smallest scale that
/// does not shrink the image wins (the largest with `resize_to_max_canvas`), or, when every
/// candidate shrinks it, the largest; ties go to the smallest area, then to the first
/// candidate in transformers' order. Scales are compared in f32, as there.
pub fn best_canvas((h, w): (usize, usize), config: &ProcessorConfig) -> (usize, usize) {
    let t = config.tile_size;
    let candidates = supported_grids(config.max_tiles);
    let scale = |&(r, c): &(usize, usize)| {
        let sh = (r * t) as f32 / h as f32;
        let sw = (c * t) as f32 / w as f32;
        if sh > sw {
            sw
        } else {
            sh
        }
    };
    let scales: Vec<f32> = candidates.iter().map(scale).collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0);
    let chosen = if scales.iter().any(|&s| s >= 1.0) {
        if config.resize_to_max_canvas {
            up.fold(f32::MIN, f32::max)
        } else {
            up.fold(f32::MAX, f32::min)
        }
    } else {
        scales.iter().copied().fold(f32::MIN, f32::max)
    };
    let (r, c) = candidates
        .iter()
        .zip(&scales)
        .filter(|(_, &s)| s == chosen)
        .map(|(g, _)| *g)
        .min_by_key(|&(r, c)| r * c)
        .expect("the chosen scale is one of the candidates'");
    (r * t, c * t)
}

/// Every (rows, cols) grid of at most `max_tiles` tiles, in transformers' order
/// (`find_supported_resolutions`: tile counts from the most down, grouped by aspect ratio
/// in the order each ratio first appears).
fn supported_grids(max_tiles: usize) -> Vec<(usize, usize)> {
    let mut groups: Vec<(f64, Vec<(usize, usize)>)> = Vec::new();
    for n in (1..=max_tiles).rev() {
        for f in (1..=n).filter(|f| n.is_multiple_of(*f)) {
            let grid = (f, n / f);
            let ratio = f as f64 / (n / f) as f64;
            match groups.iter_mut().find(|(r, _)| *r == ratio) {
                Some((_, list)) => list.push(grid),
                None => groups.push((ratio, vec![grid])),
            }
        }
    }
    groups.into_iter().flat_map(|(_, list)| list).collect()
}

/// The largest size inside `target` with the image's aspect ratio (transformers
/// `get_max_res_without_distortion`, in f64 with floor).
fn size_without_distortion((h, w): (usize, usize), (th, tw): (usize, usize)) -> (usize, usize) {
    let sw = tw as f64 / w as f64;
    let sh = th as f64 / h as f64;
    if sw < sh {
        (((h as f64 * sw).floor() as usize).min(th), tw)
    } else {
        (th, ((w as f64 * sh).floor() as usize).min(tw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_tiles: usize) -> ProcessorConfig {
        ProcessorConfig {
            tile_size: 336,
            max_tiles,
            ..ProcessorConfig::default()
        }
    }

    #[test]
    fn grids_come_in_transformers_order() {
        // max 4: n=4 → (1,4) (2,2) (4,1); n=3 → (1,3) (3,1); n=2 → (1,2) (2,1); n=1 → (1,1)
        // grouped by ratio as first seen: 0.25, 1, 4, 1/3, 3, 0.5, 2.
        assert_eq!(
            supported_grids(4),
            vec![
                (1, 4),
                (2, 2),
                (1, 1),
                (4, 1),
                (1, 3),
                (3, 1),
                (1, 2),
                (2, 1)
            ]
        );
    }

    #[test]
    fn canvas_table() {
        // (image h, w), max tiles, expected canvas in tiles; worked by hand from
        // `get_best_fit` (scale = the limiting side's; smallest upscale, else largest
        // downscale; then smallest area).
        let cases = [
            ((56, 112), 4, 56, (1, 2)),
            ((336, 336), 16, 336, (1, 1)),
            // 500×400 (h×w): upscales exist (2×2 at min(672/500, 672/400) = 1.344, 1×1
            // shrinks); the smallest scale ≥ 1 is 1×2 → min(336/500, ...) < 1, no;
            // 2×1: min(672/500, 336/400) < 1; 2×2: 1.344; 3×1: < 1; 2×3 / 3×2: 1.344 too
            // (height-limited) — smallest area 2×2.
            ((500, 400), 16, 336, (2, 2)),
            // Portrait 1000×300: 3×1 gives min(1008/1000, 336/300) = 1.008.
            ((1000, 300), 16, 336, (3, 1)),
            // Larger than every canvas: 4000×3000 → the largest downscale, 4×3 or 4×4;
            // 4×3: min(1344/4000, 1008/3000) = 0.336; 4×4: min(0.336, 0.448) = 0.336 →
            // same scale, smaller area 4×3.
            ((4000, 3000), 16, 336, (4, 3)),
            ((1, 1), 4, 56, (1, 1)),
        ];
        for ((h, w), max, t, (r, c)) in cases {
            let cfg = ProcessorConfig {
                tile_size: t,
                ..config(max)
            };
            assert_eq!(best_canvas((h, w), &cfg), (r * t, c * t), "{h}×{w}");
        }
    }

    #[test]
    fn distortion_free_size() {
        assert_eq!(size_without_distortion((500, 400), (500, 400)), (500, 400));
        assert_eq!(
            size_without_distortion((1000, 300), (1000, 336)),
            (1000, 300)
        );
        assert_eq!(
            size_without_distortion((4000, 3000), (1344, 1008)),
            (1344, 1008)
        );
        assert_eq!(size_without_distortion((100, 50), (672, 336)), (672, 336));
        assert_eq!(size_without_distortion((100, 60), (336, 336)), (336, 201));
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut img = image::RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 0, image::Rgba([0, 100, 200, 255]));
        let rgb = to_rgb(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 100, 200]);
    }

    #[test]
    fn bounds_are_checked_before_decoding() {
        let limits = ImageLimits::default();
        assert!(matches!(
            probe(b"not an image", &limits),
            Err(ImageError::Unsupported(_))
        ));
        let big = vec![0u8; limits.image_bytes_max + 1];
        assert!(matches!(
            probe(&big, &limits),
            Err(ImageError::TooLarge { .. })
        ));
    }
}
