//! Models the tests write: the default model's tensors and tokenizer with
//! other metadata, as a GGUF file of their own.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

/// The default model with `template` as its chat template, written to
/// `dir/name`.
pub fn default_model_with_chat_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let source = crate::default_model();
    let mut file = std::fs::File::open(&source).expect("open the default model");
    let content = gguf_file::Content::read(&mut file).expect("read the default model");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, QTensor)> = names
        .into_iter()
        .map(|name| {
            let t = content
                .tensor(&mut file, name, &Device::Cpu)
                .expect("read a tensor");
            (name.as_str(), t)
        })
        .collect();
    let template = Value::String(template.to_owned());
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "tokenizer.chat_template")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push(("tokenizer.chat_template", &template));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let out = dir.join(name);
    let mut w = std::fs::File::create(&out).expect("create the model file");
    gguf_file::write(&mut w, &metadata, &refs).expect("write the model");
    out
}
