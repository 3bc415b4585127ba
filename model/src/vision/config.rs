//! The vision half of `config.json` (`vision_config`, HF `Llama4VisionConfig`) and the image
//! processor's settings (`processor_config.json` or `preprocessor_config.json`, HF
//! `Llama4ImageProcessor`; LLAMA4.md §4.1).

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::Fields;
use crate::error::{ModelError, Result};

/// The validated vision-tower configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    /// Width of the encoder MLP, and the adapter's input after pixel shuffle.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of one tile in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub norm_eps: f32,
    /// The adapter's width (`projector_input_dim`, which `projector_output_dim` equals).
    pub projector_dim: usize,
    /// The projector's input (`vision_output_dim`).
    pub vision_output_dim: usize,
    pub rope_theta: f64,
    /// The text model's hidden size: the projector's output.
    pub text_hidden_size: usize,
    /// `<|patch|>`: the prompt ids whose embeddings the image rows replace.
    pub image_token_id: u32,
}

impl VisionConfig {
    /// Patches along one side of a tile.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per tile (the CLS token not counted).
    pub fn patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Rows one tile contributes to the prompt: the patches after a 2×2 pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        self.patches() / 4
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Values of one tile's pixels, `[channels, size, size]`.
    pub fn tile_values(&self) -> usize {
        self.num_channels * self.image_size * self.image_size
    }

    /// Reads `config.json` of a model directory: `None` for a text-only model.
    pub fn from_dir(dir: &Path, text_hidden_size: usize) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
        Self::from_json(&value, text_hidden_size)
    }

    /// Reads the vision config of a `config.json` root, or `None` for a text-only model.
    pub fn from_json(root: &Value, text_hidden_size: usize) -> Result<Option<Self>> {
        let Some(root) = root.as_object() else {
            return Ok(None);
        };
        let v = match root.get("vision_config") {
            Some(Value::Object(v)) => v,
            Some(Value::Null) | None => return Ok(None),
            Some(_) => return Err(invalid("vision_config", "not an object")),
        };
        let f = Fields { obj: v };
        let ratio = f.opt_f64("pixel_shuffle_ratio")?.unwrap_or(0.5);
        if ratio != 0.5 {
            return Err(invalid(
                "vision_config.pixel_shuffle_ratio",
                &format!("{ratio} is not supported (Llama 4 uses 0.5)"),
            ));
        }
        let projector_dim = f.usize("projector_input_dim")?;
        if f.opt_usize("projector_output_dim")?
            .unwrap_or(projector_dim)
            != projector_dim
        {
            return Err(invalid(
                "vision_config.projector_output_dim",
                "must equal projector_input_dim (the adapter's fc2 is square)",
            ));
        }
        let image_token_id = Fields { obj: root }.opt_id("image_token_index")?;
        Self {
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            image_size: f.usize("image_size")?,
            patch_size: f.usize("patch_size")?,
            num_channels: f.opt_usize("num_channels")?.unwrap_or(3),
            norm_eps: f.opt_f64("norm_eps")?.unwrap_or(1e-5) as f32,
            projector_dim,
            vision_output_dim: f.usize("vision_output_dim")?,
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            text_hidden_size,
            image_token_id: image_token_id.unwrap_or(200092),
        }
        .validate()
        .map(Some)
    }

    fn validate(self) -> Result<Self> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ] {
            if v == 0 {
                return Err(invalid(
                    &format!("vision_config.{field}"),
                    "must be greater than 0",
                ));
            }
        }
        let side = self.image_size / self.patch_size;
        if !self.image_size.is_multiple_of(self.patch_size) || side == 0 || !side.is_multiple_of(2)
        {
            return Err(invalid(
                "vision_config.image_size",
                "must be an even number of patches per side",
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || !(self.hidden_size / self.num_attention_heads).is_multiple_of(4)
        {
            return Err(invalid(
                "vision_config.num_attention_heads",
                "must split hidden_size into heads of a multiple of 4 (two RoPE axes of pairs)",
            ));
        }
        if self.intermediate_size != 4 * self.hidden_size {
            return Err(invalid(
                "vision_config.intermediate_size",
                "must be 4 × hidden_size (the adapter reads the 2×2 pixel shuffle)",
            ));
        }
        if self.vision_output_dim != self.projector_dim {
            return Err(invalid(
                "vision_config.vision_output_dim",
                "must equal projector_output_dim",
            ));
        }
        Ok(self)
    }
}

/// How images become tiles (HF `Llama4ImageProcessor`; LLAMA4.md §4.1).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Side of one tile in pixels (`size.height`).
    pub tile_size: usize,
    /// Tiles per image at most (`max_patches`), the global tile not counted.
    pub max_tiles: usize,
    pub resize_to_max_canvas: bool,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ProcessorConfig {
    /// The class defaults of `Llama4ImageProcessor`.
    fn default() -> Self {
        Self {
            tile_size: 336,
            max_tiles: 16,
            resize_to_max_canvas: false,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl ProcessorConfig {
    /// Reads `processor_config.json` (transformers 5: the settings under `image_processor`)
    /// or `preprocessor_config.json` (4.x: flat); the class defaults when neither exists.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        for name in ["processor_config.json", "preprocessor_config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
            let value: Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
            let obj = match value.get("image_processor") {
                Some(Value::Object(o)) => o,
                _ => value
                    .as_object()
                    .ok_or_else(|| bad(name, "(root)", "not an object"))?,
            };
            return Self::from_json(obj).map_err(|e| match e {
                ModelError::InvalidField { field, reason, .. } => bad(name, &field, &reason),
                other => other,
            });
        }
        Ok(Self::default())
    }

    fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        let f = Fields { obj };
        let d = Self::default();
        let flag = |name: &str| -> Result<bool> { Ok(f.opt_flag(name)?.unwrap_or(true)) };
        for name in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
            if !flag(name)? {
                return Err(invalid(name, "only true is supported"));
            }
        }
        let tile_size = match obj.get("size") {
            Some(Value::Object(s)) => {
                let sf = Fields { obj: s };
                let (h, w) = (sf.usize("height")?, sf.usize("width")?);
                if h != w {
                    return Err(invalid("size", "tiles must be square"));
                }
                h
            }
            None | Some(Value::Null) => d.tile_size,
            Some(_) => return Err(invalid("size", "not an object")),
        };
        // PIL's numbering, which transformers keeps: 2 is bilinear.
        if let Some(r) = f.opt_usize("resample")? {
            if r != 2 {
                return Err(invalid(
                    "resample",
                    &format!("{r} is not supported (2, bilinear)"),
                ));
            }
        }
        let triple = |name: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match f.get(name) {
                None => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0f32; 3];
                    for (o, v) in out.iter_mut().zip(a) {
                        *o = v.as_f64().ok_or_else(|| invalid(name, "not a number"))? as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(invalid(name, "not a number or a list of 3")),
            }
        };
        let config = Self {
            tile_size,
            max_tiles: f.opt_usize("max_patches")?.unwrap_or(d.max_tiles),
            resize_to_max_canvas: f.opt_flag("resize_to_max_canvas")?.unwrap_or(false),
            rescale_factor: f.opt_f64("rescale_factor")?.unwrap_or(1.0 / 255.0) as f32,
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
        };
        if config.tile_size == 0 || config.max_tiles == 0 {
            return Err(invalid("size", "tiles and max_patches must be at least 1"));
        }
        if config.image_std.contains(&0.0) {
            return Err(invalid("image_std", "must not be 0"));
        }
        Ok(config)
    }
}

fn invalid(field: &str, reason: &str) -> ModelError {
    bad("config.json", field, reason)
}

fn bad(file: &str, field: &str, reason: &str) -> ModelError {
    ModelError::InvalidField {
        file: file.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_tiny_maverick_vision_config() {
        let root = json!({
            "image_token_index": 713,
            "vision_config": {
                "hidden_size": 64, "image_size": 56, "intermediate_size": 256,
                "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14,
                "pixel_shuffle_ratio": 0.5, "projector_input_dim": 96,
                "projector_output_dim": 96, "vision_output_dim": 96, "norm_eps": 1e-5
            }
        });
        let c = VisionConfig::from_json(&root, 128).unwrap().unwrap();
        assert_eq!(c.patches(), 16);
        assert_eq!(c.tokens_per_tile(), 4);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.image_token_id, 713);
        assert!(VisionConfig::from_json(&json!({"text_config": {}}), 128)
            .unwrap()
            .is_none());
        let mut odd = root.clone();
        odd["vision_config"]["pixel_shuffle_ratio"] = json!(0.25);
        assert!(VisionConfig::from_json(&odd, 128).is_err());
    }

    #[test]
    fn reads_both_processor_spellings() {
        let nested = json!({"image_processor": {"size": {"height": 56, "width": 56},
            "max_patches": 4, "resample": 2, "image_mean": [0.5, 0.5, 0.5]}});
        let obj = nested["image_processor"].as_object().unwrap();
        let c = ProcessorConfig::from_json(obj).unwrap();
        assert_eq!((c.tile_size, c.max_tiles), (56, 4));
        let bicubic = json!({"resample": 3});
        assert!(ProcessorConfig::from_json(bicubic.as_object().unwrap()).is_err());
        let wide = json!({"size": {"height": 56, "width": 112}});
        assert!(ProcessorConfig::from_json(wide.as_object().unwrap()).is_err());
    }
}
