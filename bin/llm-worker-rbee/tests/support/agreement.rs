//! What the comparisons with the reference share: the fixed text, the
//! logits at every position through the worker's forward pass and through
//! the reference (candle-transformers' `quantized_llama`, token by token),
//! and how two sets of logits are compared.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use llm_worker_rbee::model::llama::{BlockTables, Forward, Row};
use llm_worker_rbee::model::{load_gguf, LoadOptions, LoadedModel};

pub const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
movable type changed how books were made, sold and read across Europe. Before it, books were \
copied by hand, mostly in monasteries, and a single volume could take a scribe many months. \
Johannes Gutenberg, a goldsmith from Mainz, combined a screw press of the kind used for wine \
and olive oil with metal type cast in a hand mould and an oil-based ink that stuck to metal. \
His Bible, printed around 1455, showed that a press could make hundreds of identical copies. \
Within fifty years presses were working in more than two hundred cities, and the number of \
books in Europe grew from tens of thousands to millions. Prices fell, literacy rose, and ideas \
moved faster than any authority could follow: scientists shared their results, reformers \
spread their pamphlets, and merchants printed tables of weights, measures and exchange rates. \
The press also fixed languages in print, as spelling and grammar settled into the forms that \
printers used, and it made the author a public figure whose name sold books. In the centuries \
that followed, the machine itself changed slowly: iron frames replaced wooden ones around 1800, \
steam drove cylinder presses by the 1810s, and rotary presses fed by continuous rolls of paper \
printed newspapers by the hundred thousand each night. Typesetting by hand remained the slowest \
step until the Linotype and Monotype machines of the 1880s cast whole lines or single letters \
from molten metal as an operator typed. Photocomposition and offset lithography took over in the \
twentieth century, and today most printing starts from a digital file sent straight to a plate \
or to the press itself.";

pub fn load(path: &Path, options: LoadOptions) -> LoadedModel {
    load_gguf(path, &Device::Cpu, options).expect("load the model")
}

pub fn text_ids(model: &LoadedModel) -> Vec<u32> {
    let ids = model
        .tokenizer
        .encode(TEXT, false)
        .expect("tokenize")
        .get_ids()
        .to_vec();
    assert!(ids.len() >= 256, "{} tokens", ids.len());
    ids
}

/// Logits at every position of `ids` in sequence `seq`, fed in chunks of `chunk`.
pub fn all_logits(model: &mut dyn Forward, ids: &[u32], seq: usize, chunk: usize) -> Vec<Vec<f32>> {
    let tables = BlockTables::contiguous(1, 32);
    logits_with(model, ids, seq, chunk, &tables)
}

/// [`all_logits`] with the given block tables.
pub fn logits_with(
    model: &mut dyn Forward,
    ids: &[u32],
    seq: usize,
    chunk: usize,
    tables: &BlockTables,
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for (c, part) in ids.chunks(chunk).enumerate() {
        let rows: Vec<Row> = part
            .iter()
            .enumerate()
            .map(|(i, &token)| Row {
                token,
                seq,
                pos: c * chunk + i,
                logits: true,
            })
            .collect();
        let logits = model.forward(&rows, tables).expect("forward");
        out.extend((0..logits.len()).map(|i| logits.row(i).to_vec()));
    }
    out
}

/// The reference's logits at every position, one token at a time.
pub fn reference_logits(path: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut file = std::fs::File::open(path).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let mut reference =
        ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("reference");
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            let input = Tensor::new(&[id], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("input");
            reference
                .forward(&input, pos)
                .and_then(|t| t.squeeze(0))
                .and_then(|t| t.to_vec1())
                .expect("reference forward")
        })
        .collect()
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Top-1 agreement, and the median and largest per-position logit
/// difference relative to the reference's largest logit there.
pub struct Comparison {
    pub agreement: f64,
    pub median: f32,
    pub worst: f32,
}

pub fn compare(got: &[Vec<f32>], want: &[Vec<f32>]) -> Comparison {
    let agree = got
        .iter()
        .zip(want)
        .filter(|(g, w)| argmax(g) == argmax(w))
        .count();
    let mut diffs: Vec<f32> = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            let spread = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            diff / spread
        })
        .collect();
    diffs.sort_by(f32::total_cmp);
    Comparison {
        agreement: agree as f64 / want.len() as f64,
        median: diffs[diffs.len() / 2],
        worst: diffs[diffs.len() - 1],
    }
}
