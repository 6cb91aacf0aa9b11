//! The tokenizer of a GGUF file, built from its own metadata.
//!
//! candle's built-in GGUF tokenizer does not know every `tokenizer.ggml.pre`
//! variant (SmolLM2's `smollm` among them) and falls back to settings that
//! change prompt ids. Building the byte-level BPE here matches llama.cpp:
//! vocabulary from `tokenizer.ggml.tokens`, merges split at the first space,
//! digits split one by one, then byte-level pre-tokenization without a prefix
//! space, and every control token (`token_type == 3`) added as special so
//! `<|im_start|>` stays one id.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::error::BuildError;

const CONTROL_TOKEN_TYPE: i32 = 3;

fn strings<'a>(content: &'a Content, key: &str) -> Result<Vec<&'a str>, BuildError> {
    let bad = |e: candle_core::Error| BuildError::BadMetadata {
        key: key.to_owned(),
        source: e.into(),
    };
    let values = content
        .metadata
        .get(key)
        .ok_or_else(|| BuildError::MissingMetadata(key.to_owned()))?
        .to_vec()
        .map_err(bad)?;
    values
        .iter()
        .map(|v| v.to_string().map(String::as_str).map_err(bad))
        .collect()
}

/// The longest prompt, in bytes, that could tokenize to fewer than
/// `context_length` tokens: the longest token's spelling in the vocabulary
/// (which is never shorter than the text it stands for: byte-level BPE
/// spells a byte in one or two, SentencePiece a space in three), twice that
/// when a normalizer may shorten the text first, times the context.
pub fn max_prompt_bytes(tokenizer: &Tokenizer, context_length: usize) -> usize {
    let longest = tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(4);
    let margin = if tokenizer.get_normalizer().is_some() {
        2
    } else {
        1
    };
    longest
        .saturating_mul(margin)
        .saturating_mul(context_length)
}

/// Build the tokenizer. Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported.
pub fn from_gguf(content: &Content) -> Result<Tokenizer, BuildError> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map_or("", String::as_str);
    if model != "gpt2" {
        return Err(BuildError::TokenizerModel(model.to_owned()));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(BuildError::Bpe)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let types: Vec<i32> = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().filter_map(|t| t.to_i32().ok()).collect())
        .unwrap_or_default();
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, ty)| **ty == CONTROL_TOKEN_TYPE)
        .map(|(t, _)| AddedToken::from((*t).to_owned(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// End-of-sequence ids: `tokenizer.ggml.eos_token_id`, plus `<|im_end|>` and
/// `<|eot_id|>` when the vocabulary has them (chat models end turns with those).
pub fn eos_ids(content: &Content, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v: &Value| v.to_u32().ok())
        .into_iter()
        .collect();
    for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}
