//! The embedding model against the reference implementation:
//! sentence-transformers' vectors for a few sentences (one longer than the
//! model's window), computed once by `scripts/embedding-reference.py` and
//! committed as test data, so this test needs no PyTorch.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use llm_worker_rbee::model::embed::{is_embedding_model, Embedder, BATCH};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    sentences: Vec<String>,
    tokens: Vec<usize>,
    embeddings: Vec<Vec<f32>>,
}

fn embedding_model() -> PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-embedding-model.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run fetch-embedding-model.sh");
    assert!(out.status.success(), "fetching the embedding model failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn embeddings_match_sentence_transformers_to_1e_3() {
    let reference: Reference =
        serde_json::from_str(include_str!("data/minilm-reference.json")).expect("reference data");
    let dir = embedding_model();
    assert!(is_embedding_model(&dir));
    let embedder = Embedder::load(&dir, &Device::Cpu).expect("load");
    assert_eq!(embedder.dimensions, 384);
    assert_eq!(embedder.max_tokens, reference.max_seq_length);
    // One batch, padded to the longest, as a request runs.
    let (vectors, tokens) = embedder.embed(&reference.sentences).expect("embed");
    assert_eq!(tokens, reference.tokens.iter().sum::<usize>());
    let mut worst = 0.0f32;
    for (got, want) in vectors.iter().zip(&reference.embeddings) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs());
        }
        let norm: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
    }
    eprintln!("largest difference from sentence-transformers: {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
    // Alone, each sentence gets the same vector as in the batch.
    for (i, sentence) in reference.sentences.iter().enumerate().take(2) {
        let (alone, _) = embedder
            .embed(std::slice::from_ref(sentence))
            .expect("embed");
        let diff = alone[0]
            .iter()
            .zip(&vectors[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "{diff}");
    }
    // More inputs than a batch: each still gets its own vector, in order.
    let many: Vec<String> = reference
        .sentences
        .iter()
        .take(2)
        .cycle()
        .take(BATCH + 3)
        .cloned()
        .collect();
    let (all, _) = embedder.embed(&many).expect("embed");
    assert_eq!(all.len(), BATCH + 3);
    for (i, v) in all.iter().enumerate() {
        let diff = v
            .iter()
            .zip(&vectors[i % 2])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "input {i}: {diff}");
    }
    // And the default generation model is not one.
    assert!(!is_embedding_model(Path::new(env!("CARGO_MANIFEST_DIR"))));
}
