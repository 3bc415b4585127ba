//! Streamed text with stop strings: token ids come in, text goes out as soon as it can no
//! longer be the start of a stop string, and the text ends just before the first stop
//! string that appears.

use expertmesh_model::{DetokenizeStream, TextTokenizer};

pub struct StopText<'t> {
    /// None: tokens have no text (a model without a tokenizer).
    tokenizer: Option<&'t TextTokenizer>,
    detok: DetokenizeStream,
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
}

/// What one more token gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text safe to send (possibly empty).
    Text(String),
    /// A stop string appeared: the last text before it; generation should end.
    Stopped(String),
}

impl<'t> StopText<'t> {
    pub fn new(tokenizer: Option<&'t TextTokenizer>, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            detok: DetokenizeStream::default(),
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    pub fn push(&mut self, id: u32) -> Piece {
        let Some(tokenizer) = self.tokenizer else {
            return Piece::Text(String::new());
        };
        if let Ok(Some(piece)) = self.detok.push(tokenizer, id) {
            self.text.push_str(&piece);
        }
        let search_from = self.emitted.saturating_sub(self.longest_stop());
        let search_from = floor_boundary(&self.text, search_from);
        let found = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = found {
            let out = self.text[self.emitted.min(at)..at].to_owned();
            self.emitted = at;
            self.text.truncate(at);
            return Piece::Stopped(out);
        }
        // Hold back what could still grow into a stop string.
        let hold = self.longest_stop().saturating_sub(1);
        let safe =
            floor_boundary(&self.text, self.text.len().saturating_sub(hold)).max(self.emitted);
        let out = self.text[self.emitted..safe].to_owned();
        self.emitted = safe;
        Piece::Text(out)
    }

    /// The text held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        if let Some(Ok(rest)) = self.tokenizer.map(|t| self.detok.finish(t)) {
            self.text.push_str(&rest);
        }
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    /// Everything produced so far (up to a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn longest_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
