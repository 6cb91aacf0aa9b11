//! A safetensors llama directory served by the real worker binary.
//!
//! The fixture is a small llama of random weights (2 layers, hidden 64),
//! split into two shards, with the default model's tokenizer saved as
//! `tokenizer.json`: the text it generates is noise, but the load path, the
//! shards, the dense forward pass with its cache, greedy determinism and the
//! routes are real. The forward pass (CPU kernels and the candle device
//! path) is compared with candle-transformers' dense `llama`: with f32
//! weights and activations there is no quantization step to round
//! differently, so the logits must agree to float rounding.

#[path = "support/model.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use support::default_model;

const HIDDEN: usize = 64;
const INTERMEDIATE: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

fn fixture(dir: &Path) {
    let gguf = llm_worker_rbee::model::load_gguf(
        &default_model(),
        &Device::Cpu,
        llm_worker_rbee::model::LoadOptions::default(),
    )
    .expect("load the default model for its tokenizer");
    gguf.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    let vocab = gguf.vocab_size;
    std::fs::write(
        dir.join("config.json"),
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "vocab_size": vocab,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": true
        })
        .to_string(),
    )
    .expect("write config.json");
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev).expect("randn");
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev).expect("ones");
    let head_dim = HIDDEN / HEADS;
    let mut first = HashMap::new();
    let mut second = HashMap::new();
    first.insert(
        "model.embed_tokens.weight".to_owned(),
        randn(&[vocab, HIDDEN]),
    );
    second.insert("model.norm.weight".to_owned(), ones(HIDDEN));
    for layer in 0..LAYERS {
        let shard = if layer == 0 { &mut first } else { &mut second };
        let p = |name: &str| format!("model.layers.{layer}.{name}.weight");
        shard.insert(p("self_attn.q_proj"), randn(&[HEADS * head_dim, HIDDEN]));
        shard.insert(p("self_attn.k_proj"), randn(&[KV_HEADS * head_dim, HIDDEN]));
        shard.insert(p("self_attn.v_proj"), randn(&[KV_HEADS * head_dim, HIDDEN]));
        shard.insert(p("self_attn.o_proj"), randn(&[HIDDEN, HEADS * head_dim]));
        shard.insert(p("mlp.gate_proj"), randn(&[INTERMEDIATE, HIDDEN]));
        shard.insert(p("mlp.up_proj"), randn(&[INTERMEDIATE, HIDDEN]));
        shard.insert(p("mlp.down_proj"), randn(&[HIDDEN, INTERMEDIATE]));
        shard.insert(p("input_layernorm"), ones(HIDDEN));
        shard.insert(p("post_attention_layernorm"), ones(HIDDEN));
    }
    candle_core::safetensors::save(&first, dir.join("model-00001-of-00002.safetensors"))
        .expect("save shard 1");
    candle_core::safetensors::save(&second, dir.join("model-00002-of-00002.safetensors"))
        .expect("save shard 2");
}

struct Worker {
    child: Child,
    base: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path) -> Worker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-worker-rbee"))
        .args(["--addr", "127.0.0.1:0", "--log-format", "json", "--model"])
        .arg(model)
        .env_remove("LLORCH_API_TOKEN")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the worker");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("a listening line")
            .expect("read stderr");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with(" listening"))
        {
            break v["fields"]["addr"].as_str().expect("addr").to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Worker {
        child,
        base: format!("http://{addr}"),
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = client.get(format!("{base}/v1/ready")).send().await {
            if r.json::<Value>().await.is_ok_and(|v| v["ready"] == true) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker did not become ready");
}

#[tokio::test]
async fn a_sharded_safetensors_llama_directory_is_served() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let worker = start(dir.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &worker.base).await;

    let request = json!({"prompt": "Hello there", "temperature": 0, "max_tokens": 8, "ignore_eos": true, "stream": false});
    let mut texts = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{}/v1/inference", worker.base))
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["tokens_out"], 8, "{body}");
        assert_eq!(body["tokens_in"], 2, "{body}");
        texts.push(body["text"].clone());
    }
    assert_eq!(
        texts[0], texts[1],
        "greedy decoding is deterministic across requests (the cache is reset)"
    );

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true});
    let r = client
        .post(format!("{}/v1/chat/completions", worker.base))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4);

    // The context is the config's max_position_embeddings.
    let long = json!({"prompt": "word ".repeat(300), "stream": false});
    let r = client
        .post(format!("{}/v1/inference", worker.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "PROMPT_TOO_LONG");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("256"),
        "{body}"
    );
}

#[tokio::test]
async fn a_directory_without_a_llama_config_is_a_one_line_load_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        "{\"hidden_size\": \"wide\"}",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-worker-rbee"))
        .args(["--addr", "127.0.0.1:0", "--model"])
        .arg(dir.path())
        .env_remove("LLORCH_API_TOKEN")
        .output()
        .expect("run the worker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("llm-worker-rbee: error: cannot load model")
            && last.contains("config.json"),
        "{stderr}"
    );
}

/// Every position's logits of `ids`, one forward pass per chunk of 7.
fn logits_of(model: &mut dyn llm_worker_rbee::model::llama::Forward, ids: &[u32]) -> Vec<Vec<f32>> {
    use llm_worker_rbee::model::llama::{BlockTables, Row};
    let tables = BlockTables::contiguous(1, 32);
    let mut out = Vec::new();
    for (c, part) in ids.chunks(7).enumerate() {
        let rows: Vec<Row> = part
            .iter()
            .enumerate()
            .map(|(i, &token)| Row {
                token,
                seq: 0,
                pos: c * 7 + i,
                logits: true,
            })
            .collect();
        let logits = model.forward(&rows, &tables).expect("forward");
        out.extend((0..logits.len()).map(|i| logits.row(i).to_vec()));
    }
    out
}

#[test]
fn the_dense_forward_pass_agrees_with_candle_transformers_llama() {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    use llm_worker_rbee::model::llama::cpu::KvType;
    use llm_worker_rbee::model::{load, LoadOptions};

    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let config: LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    let mut tensors = HashMap::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        tensors
            .extend(candle_core::safetensors::load(dir.path().join(shard), &Device::Cpu).unwrap());
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reference = Llama::load(vb, &config).expect("reference model");
    let mut cache = Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 977 % 40_000) as u32 + 17).collect();
    let want: Vec<Vec<f32>> = ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            let input = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            reference
                .forward(&input, pos, &mut cache)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap()
        })
        .collect();
    for candle_on_cpu in [false, true] {
        let options = LoadOptions {
            kv: KvType::F32,
            candle_on_cpu,
            ..LoadOptions::default()
        };
        let mut ours = load(dir.path(), &Device::Cpu, options).expect("load");
        let got = logits_of(ours.model.as_mut(), &ids);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let spread = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-4 * spread,
                "candle path {candle_on_cpu}, position {pos}: logits differ by {diff} (largest {spread})"
            );
        }
    }
}
