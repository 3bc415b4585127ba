//! The vision path (LLAMA4.md §4): images become tiles of pixels ([`preprocess`]), the
//! prompt gets one `<|patch|>` slot per row the tower yields ([`prompt`]), and the tower
//! ([`encoder`]) turns the tiles into those rows, which replace the slots' embeddings in the
//! one forward pass (`Sequence::patches`).
//!
//! Where each part runs in a cluster: the gateway decodes images (to refuse bad ones with a
//! 400 and to count the prompt's tokens) and expands the prompt; the attention worker
//! preprocesses the same bytes and runs the tower once per request, at admission, keeping
//! the rows for chunked prefill and recompute.

pub mod config;
pub mod encoder;
pub mod preprocess;
pub mod prompt;
mod resample;

pub use config::{ProcessorConfig, VisionConfig};
pub use encoder::VisionModel;
pub use preprocess::{check, preprocess, ImageError, ImageLimits, Pixels};
pub use prompt::ImageTokens;
pub use resample::resize_rgb;
