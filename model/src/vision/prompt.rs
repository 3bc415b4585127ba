//! Prompt expansion (HF `Llama4Processor._prompt_split_image`; LLAMA4.md §4.2): each
//! `<|image|>` the chat template wrote becomes the image's marker tokens and one
//! `<|patch|>` per vision row, so the prompt has a slot for every row the encoder yields.

use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// The ids of the image marker tokens, read from the tokenizer by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokens {
    pub image_start: u32,
    pub image_end: u32,
    /// `<|image|>`: the template's placeholder, and the marker before the global tile.
    pub image: u32,
    pub patch: u32,
    pub tile_x_separator: u32,
    pub tile_y_separator: u32,
}

impl ImageTokens {
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<Self> {
        let id = |name: &str| {
            tok.token_to_id(name).ok_or_else(|| ModelError::Template {
                reason: format!("the tokenizer has no `{name}` token, needed for images"),
            })
        };
        Ok(Self {
            image_start: id("<|image_start|>")?,
            image_end: id("<|image_end|>")?,
            image: id("<|image|>")?,
            patch: id("<|patch|>")?,
            tile_x_separator: id("<|tile_x_separator|>")?,
            tile_y_separator: id("<|tile_y_separator|>")?,
        })
    }

    /// The tokens one image of tile grid `(rows, cols)` takes.
    pub fn image_ids(&self, (rows, cols): (usize, usize), per_tile: usize) -> Vec<u32> {
        let mut out = vec![self.image_start];
        if rows * cols > 1 {
            for _ in 0..rows {
                for x in 0..cols {
                    out.extend(std::iter::repeat_n(self.patch, per_tile));
                    if x + 1 < cols {
                        out.push(self.tile_x_separator);
                    }
                }
                out.push(self.tile_y_separator);
            }
        }
        out.push(self.image);
        out.extend(std::iter::repeat_n(self.patch, per_tile));
        out.push(self.image_end);
        out
    }

    /// `ids` with the i-th `<|image|>` replaced by the tokens of `grids[i]`. The prompt
    /// must hold exactly one placeholder per image.
    pub fn expand(
        &self,
        ids: &[u32],
        grids: &[(usize, usize)],
        per_tile: usize,
    ) -> Result<Vec<u32>> {
        let placeholders = ids.iter().filter(|&&id| id == self.image).count();
        if placeholders != grids.len() {
            return Err(ModelError::ImageCount {
                placeholders,
                images: grids.len(),
            });
        }
        let mut grids = grids.iter();
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match id == self.image {
                true => {
                    let &g = grids
                        .next()
                        .expect("one grid per placeholder, counted above");
                    out.extend(self.image_ids(g, per_tile));
                }
                false => out.push(id),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: ImageTokens = ImageTokens {
        image_start: 710,
        image_end: 711,
        image: 712,
        patch: 713,
        tile_x_separator: 714,
        tile_y_separator: 715,
    };

    #[test]
    fn one_tile_has_no_separators_and_no_global_tile() {
        assert_eq!(TOKENS.image_ids((1, 1), 2), vec![710, 712, 713, 713, 711]);
    }

    #[test]
    fn counts_follow_the_formula() {
        // 2 + per·(R·C + 1) + R·(C − 1) + R + 1 (LLAMA4.md §4.2).
        for (r, c) in [(1, 2), (2, 1), (2, 2), (3, 4), (4, 4)] {
            let n = TOKENS.image_ids((r, c), 144).len();
            assert_eq!(n, 2 + 144 * (r * c + 1) + r * (c - 1) + r + 1, "{r}×{c}");
        }
        let two_by_two = TOKENS.image_ids((2, 2), 1);
        assert_eq!(
            two_by_two,
            vec![710, 713, 714, 713, 715, 713, 714, 713, 715, 712, 713, 711]
        );
    }

    #[test]
    fn placeholders_must_match_the_images() {
        let ids = [1, 712, 2, 712, 3];
        let out = TOKENS.expand(&ids, &[(1, 1), (1, 1)], 1).unwrap();
        assert_eq!(out, vec![1, 710, 712, 713, 711, 2, 710, 712, 713, 711, 3]);
        assert!(TOKENS.expand(&ids, &[(1, 1)], 1).is_err());
        assert_eq!(TOKENS.expand(&[1, 2], &[], 1).unwrap(), vec![1, 2]);
    }
}
