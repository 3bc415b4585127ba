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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    /// Feeds `text`'s tokens one by one: the pieces sent, whether a stop string ended it,
    /// and what `finish` adds.
    fn run(t: &TextTokenizer, text: &str, stops: &[&str]) -> (Vec<String>, bool, String) {
        let ids = t.encode(text, false).unwrap();
        let mut s = StopText::new(Some(t), stops.iter().map(|s| s.to_string()).collect());
        let mut pieces = Vec::new();
        for id in ids {
            match s.push(id) {
                Piece::Text(p) => pieces.push(p),
                Piece::Stopped(p) => {
                    pieces.push(p);
                    return (pieces, true, String::new());
                }
            }
        }
        let rest = s.finish();
        (pieces, false, rest)
    }

    #[test]
    fn stop_strings_cut_the_text_and_end_it() {
        let t = tokenizer();
        let cases: [(&str, &str, &[&str], &str, bool); 7] = [
            (
                "no stops",
                "Hello world, and more",
                &[],
                "Hello world, and more",
                false,
            ),
            ("no match", "Hello world", &["xyz"], "Hello world", false),
            (
                "cut before the stop",
                "Hello world. Stop here",
                &["Stop"],
                "Hello world. ",
                true,
            ),
            (
                "the first of several",
                "one two three",
                &["three", "two"],
                "one ",
                true,
            ),
            ("inside a word", "abcdefgh", &["def"], "abc", true),
            ("at the start", "STOP now", &["STOP"], "", true),
            (
                "not past the end",
                "Hello wor",
                &["world"],
                "Hello wor",
                false,
            ),
        ];
        for (name, text, stops, want, stopped) in cases {
            let (pieces, did_stop, rest) = run(&t, text, stops);
            assert_eq!(pieces.concat() + &rest, want, "{name}");
            assert_eq!(did_stop, stopped, "{name}");
        }
    }

    #[test]
    fn text_that_could_begin_a_stop_is_held_back() {
        let t = tokenizer();
        // Without stops every piece goes out as soon as it decodes.
        let (pieces, _, rest) = run(&t, "Hello world", &[]);
        assert_eq!(rest, "");
        assert_eq!(pieces.concat(), "Hello world");
        // With a long stop string, the tail that could still grow into it waits for
        // `finish` (or for the text to move past it).
        let (pieces, stopped, rest) = run(&t, "Hello world", &["world peace"]);
        assert!(!stopped);
        assert!(!rest.is_empty(), "the last characters were held back");
        assert_eq!(pieces.concat() + &rest, "Hello world");
    }

    #[test]
    fn held_back_text_splits_on_character_boundaries() {
        let t = tokenizer();
        let text = "naïve café – 東京";
        let (pieces, stopped, rest) = run(&t, text, &["東京タワー"]);
        assert!(!stopped);
        assert_eq!(pieces.concat() + &rest, text);
        let (pieces, stopped, _) = run(&t, text, &["– 東"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "naïve café ");
    }

    #[test]
    fn a_model_without_a_tokenizer_has_no_text() {
        let mut s = StopText::new(None, vec!["x".into()]);
        assert_eq!(s.push(5), Piece::Text(String::new()));
        assert_eq!(s.finish(), "");
    }
}
