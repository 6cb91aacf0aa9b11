//! Constrained decoding with llguidance: a request's [`Constraint`] (a JSON
//! Schema, any JSON object, a Lark grammar) compiled for this model's
//! tokenizer into a [`Grammar`], which gives the engine the set of tokens
//! that keep the answer valid at each step.
//!
//! llguidance works on bytes: it needs each token's bytes, which a
//! byte-level BPE vocabulary spells in GPT-2's byte-to-character map and a
//! SentencePiece one with `▁` for a space and `<0xNN>` for raw bytes.
//! Special tokens (`<|im_end|>`) are marked so no grammar can produce them
//! as text. The tokenizer's own encoder is the fallback llguidance uses to
//! tokenize the strings a grammar forces.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use rbee_api::inference::Constraint;
use tokenizers::{DecoderWrapper, Tokenizer};
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// How JSON is laid out: one space after `,` and `:`, no other whitespace.
/// A small model offered free whitespace can spend its whole budget on
/// newlines; fixed separators keep the output compact and readable.
fn json_options() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
        "lenient": false,
        "coerce_one_of": false,
    })
}

/// Why a constraint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The model's tokenizer could not be read into llguidance's form.
    #[error("this model's tokenizer does not support constrained output: {0}")]
    Unavailable(String),
    /// The schema or grammar asks for something llguidance does not do, or
    /// is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// The compiler of constraints for one model: its tokenizer's bytes, built
/// once at load.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl Grammars {
    /// Build the token table of `tokenizer` for a model whose logits have
    /// `vocab` entries and that ends with `eos`.
    pub fn new(tokenizer: &Tokenizer, eos: &[u32], vocab: usize) -> Result<Self, GrammarError> {
        let env = TokenBytes::new(tokenizer, eos, vocab)?;
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| GrammarError::Unavailable(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compile `constraint` into a fresh grammar for one sequence.
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar, GrammarError> {
        let grammar = match constraint {
            Constraint::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
            Constraint::JsonSchema { schema } => json_grammar(schema.clone()),
            Constraint::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Invalid(first_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(first_line(&e)));
        }
        Ok(Grammar(matcher))
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// A JSON Schema grammar with this server's layout ([`json_options`]). A
/// boolean schema (`true`: anything) is wrapped as llguidance expects.
fn json_grammar(schema: serde_json::Value) -> TopLevelGrammar {
    let mut schema = match schema {
        serde_json::Value::Bool(true) => serde_json::json!({}),
        other => other,
    };
    if let Some(map) = schema.as_object_mut() {
        map.insert("x-guidance".to_owned(), json_options());
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// One sequence's constraint state.
pub struct Grammar(Matcher);

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.0.is_stopped())
            .finish()
    }
}

impl Grammar {
    /// The tokens allowed next.
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        self.0.compute_mask_or_eos().map_err(|e| e.to_string())
    }

    /// Advance past `token`, which the last mask allowed.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.0.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete: nothing but the end may follow.
    pub fn is_finished(&self) -> bool {
        self.0.is_stopped()
    }
}

/// Set every logit `mask` does not allow to minus infinity.
pub fn apply(mask: &SimpleVob, logits: &mut [f32]) {
    mask.iter_unset_entries(|i| {
        if let Some(l) = logits.get_mut(i) {
            *l = f32::NEG_INFINITY;
        }
    });
    for l in logits.iter_mut().skip(mask.len()) {
        *l = f32::NEG_INFINITY;
    }
}

/// The tokenizer as llguidance sees it: each token's bytes in a trie.
struct TokenBytes {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenBytes {
    fn new(tokenizer: &Tokenizer, eos: &[u32], vocab: usize) -> Result<Self, GrammarError> {
        let byte_level = matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let chars = byte_level_chars();
        let specials: HashMap<u32, String> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let size = vocab.max(tokenizer.get_vocab_size(true));
        let mut words = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let word = if let Some(name) = specials.get(&id) {
                special_word(name)
            } else if let Some(piece) = tokenizer.id_to_token(id) {
                if byte_level {
                    piece
                        .chars()
                        .map(|c| chars.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| {
                            GrammarError::Unavailable(format!(
                                "token {id} ({piece:?}) is not byte-level"
                            ))
                        })?
                } else {
                    sentencepiece_bytes(&piece)
                }
            } else {
                // Rows of the model beyond the tokenizer's vocabulary.
                special_word(&format!("<[{id}]>"))
            };
            words.push(word);
        }
        let eos_first = *eos
            .first()
            .ok_or_else(|| GrammarError::Unavailable("the model names no end token".to_owned()))?;
        let info = TokRxInfo::new(size as u32, eos_first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        Ok(Self {
            trie,
            tokenizer: tokenizer.clone(),
        })
    }
}

fn special_word(name: &str) -> Vec<u8> {
    let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    word.extend_from_slice(name.as_bytes());
    word
}

/// A SentencePiece piece's bytes: `<0xNN>` is that byte, `▁` a space.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|p| p.strip_suffix('>'))
        .filter(|h| h.len() == 2)
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's map from the characters of byte-level tokens back to bytes:
/// printable bytes stand for themselves, the others are shifted past 255.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 256u32;
    for b in 0..=255u8 {
        let c = char::from(b);
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            map.insert(c, b);
        } else if let Some(c) = char::from_u32(shifted) {
            map.insert(c, b);
            shifted += 1;
        }
    }
    map
}

impl TokenizerEnv for TokenBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_chars_cover_every_byte_once() {
        let map = byte_level_chars();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // GPT-2's spelling of a space and a newline.
        assert_eq!(map[&'\u{120}'], b' ');
        assert_eq!(map[&'\u{10A}'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn sentencepiece_pieces_become_bytes() {
        assert_eq!(sentencepiece_bytes("\u{2581}Paris"), b" Paris");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>");
    }
}
