//! Incremental decoding: the text each new token adds, never a broken
//! UTF-8 sequence.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte character; the
//! decoder then yields U+FFFD. Text is only released once the pending tokens
//! decode cleanly, by decoding a small window of recent tokens and emitting
//! what it adds beyond the already released part.

use tokenizers::Tokenizer;

/// Turns a growing list of token ids into text deltas.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Start empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; return the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or_default().to_owned()
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    tokenizer.decode(ids, true).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    /// A byte-level tokenizer with one token per byte, so that multi-byte
    /// characters are split across tokens.
    fn byte_tokenizer() -> Tokenizer {
        let vocab: tokenizers::models::bpe::Vocab = ByteLevel::alphabet()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut t = Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t
    }

    #[test]
    fn multi_byte_characters_are_released_whole() {
        let t = byte_tokenizer();
        let text = "a€😀b";
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 1 + 3 + 4 + 1, "one token per byte");
        let mut d = Detokenizer::new();
        let deltas: Vec<String> = ids.iter().map(|&id| d.push(&t, id)).collect();
        for delta in &deltas {
            assert!(!delta.contains('\u{FFFD}'), "{deltas:?}");
        }
        assert_eq!(deltas.concat(), text);
        // The euro sign appears exactly when its third byte arrives.
        assert_eq!(deltas[1..4], ["".to_owned(), "".to_owned(), "€".to_owned()]);
        assert_eq!(d.finish(&t), "");
    }

    #[test]
    fn an_incomplete_tail_is_released_at_finish() {
        let t = byte_tokenizer();
        let ids = t.encode("x€", false).unwrap().get_ids().to_vec();
        let mut d = Detokenizer::new();
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&d.push(&t, id));
        }
        assert_eq!(out, "x");
        assert_eq!(
            d.finish(&t),
            "\u{FFFD}",
            "a cut character becomes one replacement mark"
        );
    }
}
