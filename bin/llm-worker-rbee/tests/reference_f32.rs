//! The worker's forward pass against the reference (candle-transformers'
//! `quantized_llama`) with the 8-bit rounding of activations taken out of
//! both: the default model's weights dequantized to f32 at load on each
//! side, so every product is f32 by f32 and a last-bit difference stays a
//! last-bit difference. What remains is the forward pass itself (rope,
//! grouped-query attention over the cache, norms, the gated FFN, the tied
//! output head), held to the reference over the fixed text.
//!
//! This binary holds one test: candle reads `CANDLE_DEQUANTIZE_ALL` once
//! per thread when it builds its first quantized product, and the variable
//! is set before anything in the process touches candle.

#[path = "support/agreement.rs"]
mod agreement;
#[path = "support/model.rs"]
mod support;

use agreement::{all_logits, compare, load, reference_logits, text_ids};
use llm_worker_rbee::model::llama::cpu::KvType;
use llm_worker_rbee::model::LoadOptions;
use support::default_model;

/// The largest logit difference allowed at any position, relative to the
/// reference's largest logit there: f32 arithmetic summed in another order
/// over 30 layers (measured: worst 8.6e-6), where the 8-bit rounding of
/// activations moves logits by a median 2.6e-2.
const TOLERANCE: f32 = 1e-4;

/// The same with the default f16 cache.
const F16_TOLERANCE: f32 = 2e-3;

#[test]
fn with_f32_weights_the_forward_pass_computes_the_references_logits_at_every_position() {
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = default_model();
    let mut ours = load(
        &path,
        LoadOptions {
            dequantize: true,
            kv: KvType::F32,
            ..LoadOptions::default()
        },
    );
    let ids = text_ids(&ours);
    let want = reference_logits(&path, &ids);
    let got = all_logits(ours.model.as_mut(), &ids, 0, 64);
    let cmp = compare(&got, &want);
    eprintln!(
        "{} positions, f32 weights on both sides: top-1 agreement {:.4}; logit difference / \
         largest logit: median {:.2e}, worst {:.2e}",
        ids.len(),
        cmp.agreement,
        cmp.median,
        cmp.worst
    );
    assert!(cmp.agreement >= 0.99, "top-1 agreement {}", cmp.agreement);
    assert!(
        cmp.worst <= TOLERANCE,
        "worst logit difference {}",
        cmp.worst
    );
    // The default cache rounds keys and values to f16 (11 significant
    // bits): without the activations' rounding to amplify it, that moves
    // logits by hundredths of a percent (measured: median 2.5e-4, worst
    // 8.8e-4) and flips no top token.
    let mut f16 = load(
        &path,
        LoadOptions {
            dequantize: true,
            ..LoadOptions::default()
        },
    );
    let cmp = compare(&all_logits(f16.model.as_mut(), &ids, 0, 64), &want);
    eprintln!(
        "f32 weights, f16 cache: top-1 agreement {:.4}; median {:.2e}, worst {:.2e}",
        cmp.agreement, cmp.median, cmp.worst
    );
    assert!(cmp.agreement >= 0.99, "top-1 agreement {}", cmp.agreement);
    assert!(
        cmp.worst <= F16_TOLERANCE,
        "worst logit difference {}",
        cmp.worst
    );
}
