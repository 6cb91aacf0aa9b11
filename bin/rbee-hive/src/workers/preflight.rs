//! Memory preflight: how much a worker will need, from the model's size and
//! shape, against what the host (or GPU) has free minus what loading
//! workers have reserved.
//!
//! Needed = weights on disk x [`weights_factor_tenths`] / 10 + KV cache, where the KV
//! cache is the worker's pool, `kv_tokens x 2 (K and V) x layers x kv_heads
//! x head_dim x element bytes`: 2 on the CPU (the worker's f16 cache), 4 on
//! GPUs (GGUF models cache in f32 there). The pool is shared by all the
//! worker's sequences, whatever its slots. The shape comes from the GGUF
//! metadata or the safetensors `config.json`; when it cannot be read, 64
//! KiB per position is assumed.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use rbee_api::worker::Backend;

/// KV cache assumed per position when the model's shape is unknown.
pub const FALLBACK_KV_PER_POSITION: u64 = 64 * 1024;

/// Multiplier on the weights' size on disk, in tenths: quantized GGUF
/// weights stay quantized (1.2 covers runtime buffers); safetensors in
/// bf16/f16 are widened to f32 on CPU (2.2) and kept as is on a GPU (1.2).
pub fn weights_factor_tenths(format: &str, backend: Backend) -> u64 {
    match (format, backend) {
        ("safetensors", Backend::Cpu) => 22,
        _ => 12,
    }
}

/// The shape that sizes the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Transformer blocks.
    pub layers: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Dimension of one head.
    pub head_dim: u64,
    /// Trained context.
    pub context: u64,
}

/// Bytes a worker needs.
pub fn required_bytes(
    weights_bytes: u64,
    format: &str,
    backend: Backend,
    shape: Option<Shape>,
    kv_tokens: u32,
) -> u64 {
    let weights = weights_bytes
        .saturating_mul(weights_factor_tenths(format, backend))
        .div_ceil(10);
    let element = if backend == Backend::Cpu { 2 } else { 4 };
    // The shape comes from the model file: a header with absurd numbers
    // saturates (and fails the memory check) instead of overflowing.
    let kv_per_position = shape.map_or(FALLBACK_KV_PER_POSITION, |s| {
        [s.layers, s.kv_heads, s.head_dim, element]
            .into_iter()
            .fold(2u64, u64::saturating_mul)
    });
    weights.saturating_add(kv_per_position.saturating_mul(u64::from(kv_tokens)))
}

/// Read the shape of a GGUF file or a safetensors directory.
pub fn shape(local_path: &Path) -> Option<Shape> {
    if local_path.is_dir() {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(local_path.join("config.json")).ok()?).ok()?;
        let get = |k: &str| config.get(k).and_then(serde_json::Value::as_u64);
        let heads = get("num_attention_heads")?;
        return Some(Shape {
            layers: get("num_hidden_layers")?,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(get("hidden_size")? / heads.max(1)),
            context: get("max_position_embeddings")
                .unwrap_or(u64::from(rbee_api::worker::DEFAULT_CONTEXT)),
        });
    }
    gguf_shape(local_path).ok().flatten()
}

/// Walk the GGUF header's key/value pairs (skipping the tokenizer arrays)
/// for the architecture's block count, head counts, width and context.
fn gguf_shape(path: &Path) -> std::io::Result<Option<Shape>> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Ok(None);
    }
    let version = read_u32(&mut r)?;
    if !(2..=3).contains(&version) {
        return Ok(None);
    }
    let _tensors = read_u64(&mut r)?;
    let kv_count = read_u64(&mut r)?;
    let mut arch = String::new();
    let mut numbers: Vec<(String, u64)> = Vec::new();
    for _ in 0..kv_count.min(100_000) {
        let key = read_string(&mut r)?;
        let ty = read_u32(&mut r)?;
        if key == "general.architecture" && ty == 8 {
            arch = read_string(&mut r)?;
            continue;
        }
        match scalar(&mut r, ty)? {
            Some(v) if key.contains('.') => numbers.push((key, v)),
            _ => {}
        }
    }
    let get = |suffix: &str| {
        numbers
            .iter()
            .find(|(k, _)| *k == format!("{arch}.{suffix}"))
            .map(|(_, v)| *v)
    };
    let (Some(layers), Some(heads), Some(width)) = (
        get("block_count"),
        get("attention.head_count"),
        get("embedding_length"),
    ) else {
        return Ok(None);
    };
    Ok(Some(Shape {
        layers,
        kv_heads: get("attention.head_count_kv").unwrap_or(heads),
        head_dim: get("attention.key_length").unwrap_or(width / heads.max(1)),
        context: get("context_length").unwrap_or(u64::from(rbee_api::worker::DEFAULT_CONTEXT)),
    }))
}

/// Read a value of GGUF type `ty`; integers come back, anything else is
/// skipped.
fn scalar<R: Read + Seek>(r: &mut R, ty: u32) -> std::io::Result<Option<u64>> {
    let fixed = |ty: u32| -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    };
    match ty {
        0 | 7 => Ok(Some(u64::from(read_n::<1, _>(r)?[0]))),
        2 => Ok(Some(u64::from(u16::from_le_bytes(read_n(r)?)))),
        4 => Ok(Some(u64::from(read_u32(r)?))),
        5 => Ok(u64::try_from(i32::from_le_bytes(read_n(r)?)).ok()),
        10 => Ok(Some(read_u64(r)?)),
        11 => Ok(u64::try_from(i64::from_le_bytes(read_n(r)?)).ok()),
        8 => {
            let len = read_u64(r)?;
            r.seek(SeekFrom::Current(to_i64(len)?))?;
            Ok(None)
        }
        9 => {
            let inner = read_u32(r)?;
            let n = read_u64(r)?;
            if inner == 8 {
                for _ in 0..n {
                    let len = read_u64(r)?;
                    r.seek(SeekFrom::Current(to_i64(len)?))?;
                }
            } else {
                let size = fixed(inner).ok_or_else(|| bad("nested GGUF array"))?;
                r.seek(SeekFrom::Current(to_i64(n.saturating_mul(size))?))?;
            }
            Ok(None)
        }
        other => {
            let size = fixed(other).ok_or_else(|| bad("unknown GGUF value type"))?;
            r.seek(SeekFrom::Current(to_i64(size)?))?;
            Ok(None)
        }
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

fn to_i64(n: u64) -> std::io::Result<i64> {
    i64::try_from(n).map_err(|_| bad("GGUF length out of range"))
}

fn read_n<const N: usize, R: Read>(r: &mut R) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u32<R: Read>(r: &mut R) -> std::io::Result<u32> {
    Ok(u32::from_le_bytes(read_n(r)?))
}

fn read_u64<R: Read>(r: &mut R) -> std::io::Result<u64> {
    Ok(u64::from_le_bytes(read_n(r)?))
}

fn read_string<R: Read>(r: &mut R) -> std::io::Result<String> {
    let len = read_u64(r)?;
    if len > 1 << 20 {
        return Err(bad("GGUF key too long"));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| bad("GGUF string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_string(out: &mut Vec<u8>, key: &str, value: &str) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((value.len() as u64).to_le_bytes());
        out.extend(value.as_bytes());
    }

    fn kv_u32(out: &mut Vec<u8>, key: &str, value: u32) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(4u32.to_le_bytes());
        out.extend(value.to_le_bytes());
    }

    #[test]
    fn the_gguf_shape_is_read_past_a_string_array() {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        f.extend(7u64.to_le_bytes());
        kv_string(&mut f, "general.architecture", "llama");
        // tokenizer.ggml.tokens: an array of 2 strings.
        let key = "tokenizer.ggml.tokens";
        f.extend((key.len() as u64).to_le_bytes());
        f.extend(key.as_bytes());
        f.extend(9u32.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        for t in ["<s>", "hello"] {
            f.extend((t.len() as u64).to_le_bytes());
            f.extend(t.as_bytes());
        }
        kv_u32(&mut f, "llama.block_count", 30);
        kv_u32(&mut f, "llama.attention.head_count", 9);
        kv_u32(&mut f, "llama.attention.head_count_kv", 3);
        kv_u32(&mut f, "llama.embedding_length", 576);
        kv_u32(&mut f, "llama.context_length", 8192);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, f).unwrap();
        assert_eq!(
            shape(&path),
            Some(Shape {
                layers: 30,
                kv_heads: 3,
                head_dim: 64,
                context: 8192
            })
        );
    }

    #[test]
    fn required_memory_is_weights_times_factor_plus_the_kv_pool() {
        let shape = Shape {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            context: 8192,
        };
        // 2 x 30 x 3 x 64 = 11,520 elements per position: f16 on the CPU,
        // f32 on a GPU.
        assert_eq!(
            required_bytes(100_000_000, "gguf", Backend::Cpu, Some(shape), 16_384),
            120_000_000 + 16_384 * 11_520 * 2
        );
        assert_eq!(
            required_bytes(100_000_000, "gguf", Backend::Cuda, Some(shape), 4096),
            120_000_000 + 4096 * 11_520 * 4
        );
        assert_eq!(
            required_bytes(100_000_000, "safetensors", Backend::Cpu, None, 4096),
            220_000_000 + 4096 * FALLBACK_KV_PER_POSITION
        );
    }

    #[test]
    fn a_header_with_absurd_numbers_saturates_instead_of_overflowing() {
        let absurd = Shape {
            layers: u64::MAX / 3,
            kv_heads: 1 << 40,
            head_dim: 1 << 40,
            context: 4096,
        };
        assert_eq!(
            required_bytes(u64::MAX, "gguf", Backend::Cuda, Some(absurd), u32::MAX),
            u64::MAX
        );
    }

    #[test]
    fn a_safetensors_config_gives_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"hidden_size":64,"max_position_embeddings":512}"#,
        )
        .unwrap();
        assert_eq!(
            shape(dir.path()),
            Some(Shape {
                layers: 2,
                kv_heads: 2,
                head_dim: 16,
                context: 512
            })
        );
    }
}
