//! `POST /v1/embeddings`: the request, its checks (the queen's and the
//! worker's, from this one code), and the answer.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::FieldError;

/// Most inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// How vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// A JSON list of numbers.
    #[default]
    Float,
    /// The little-endian f32 bytes, base64.
    Base64,
}

/// A checked embeddings request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingsRequest {
    /// The model ref; may be left out when the queen knows one model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The texts, one vector each.
    pub input: Vec<String>,
    /// How vectors are written.
    pub encoding_format: EncodingFormat,
    /// The vectors' length; the worker accepts its model's own only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

impl EmbeddingsRequest {
    /// Read and check `body`, naming every bad field.
    pub fn parse(body: &Value) -> Result<Self, Vec<FieldError>> {
        let Value::Object(map) = body else {
            return Err(vec![FieldError::new(
                "body",
                "type",
                "the body must be a JSON object",
            )]);
        };
        let mut bad = Vec::new();
        let present = |name: &str| map.get(name).filter(|v| !v.is_null());
        let model = match present("model") {
            None => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(_) => {
                bad.push(FieldError::new("model", "type", "model must be a string"));
                None
            }
        };
        let mut input = Vec::new();
        match present("input") {
            Some(Value::String(s)) => input.push(s.clone()),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                input.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
                if input.is_empty() {
                    bad.push(FieldError::new(
                        "input",
                        "required",
                        "input must not be an empty list",
                    ));
                }
                if input.len() > MAX_INPUTS {
                    bad.push(FieldError::new(
                        "input",
                        "max_items",
                        format!("at most {MAX_INPUTS} inputs per request"),
                    ));
                }
            }
            Some(Value::Array(items)) if items.iter().all(|v| v.is_number() || v.is_array()) => {
                bad.push(FieldError::new(
                    "input",
                    "unsupported",
                    "token arrays are not supported: send text",
                ));
            }
            None => bad.push(FieldError::new(
                "input",
                "required",
                "input is required: a string or a list of strings",
            )),
            Some(_) => bad.push(FieldError::new(
                "input",
                "type",
                "input must be a string or a list of strings",
            )),
        }
        for (i, text) in input.iter().enumerate() {
            if text.is_empty() {
                bad.push(FieldError::new(
                    format!("input[{i}]"),
                    "length",
                    "an input must not be empty",
                ));
            }
        }
        let encoding_format = match present("encoding_format") {
            None => EncodingFormat::Float,
            Some(v) => EncodingFormat::deserialize(v).unwrap_or_else(|_| {
                bad.push(FieldError::new(
                    "encoding_format",
                    "enum",
                    "encoding_format must be float or base64",
                ));
                EncodingFormat::Float
            }),
        };
        let dimensions = match present("dimensions") {
            None => None,
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => Some(n),
                _ => {
                    bad.push(FieldError::new(
                        "dimensions",
                        "range",
                        "dimensions must be a positive integer",
                    ));
                    None
                }
            },
        };
        if bad.is_empty() {
            Ok(Self {
                model,
                input,
                encoding_format,
                dimensions,
            })
        } else {
            Err(bad)
        }
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingList {
    /// Always `list`.
    pub object: String,
    /// One per input, in order.
    pub data: Vec<Embedding>,
    /// The model ref.
    pub model: String,
    /// Tokens read.
    pub usage: EmbeddingUsage,
}

/// One input's vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// The input's position.
    pub index: u32,
    /// The vector.
    pub embedding: Vector,
}

/// A vector as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Vector {
    /// Numbers.
    Float(Vec<f32>),
    /// Little-endian f32 bytes, base64.
    Base64(String),
}

impl Vector {
    /// `values` written as `format` asks.
    pub fn new(values: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => Self::Float(values),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Self::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// Tokens an embeddings request read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Input tokens, after truncation.
    pub prompt_tokens: u32,
    /// The same.
    pub total_tokens: u32,
}

impl EmbeddingList {
    /// The answer for `vectors` of `model`, having read `tokens`.
    pub fn new(model: String, vectors: Vec<Vec<f32>>, format: EncodingFormat, tokens: u32) -> Self {
        Self {
            object: "list".to_owned(),
            data: vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| Embedding {
                    object: "embedding".to_owned(),
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    embedding: Vector::new(v, format),
                })
                .collect(),
            model,
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_are_a_string_or_a_list_of_strings() {
        let r = EmbeddingsRequest::parse(&json!({"input": "hi"})).expect("valid");
        assert_eq!(r.input, ["hi"]);
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        let r = EmbeddingsRequest::parse(
            &json!({"input": ["a", "b"], "encoding_format": "base64", "dimensions": 384, "model": "m"}),
        )
        .expect("valid");
        assert_eq!(r.input, ["a", "b"]);
        assert_eq!(r.dimensions, Some(384));
        let fields = |body: Value| {
            EmbeddingsRequest::parse(&body)
                .expect_err("refused")
                .into_iter()
                .map(|e| (e.field, e.constraint))
                .collect::<Vec<_>>()
        };
        let f = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(fields(json!({})), [f("input", "required")]);
        assert_eq!(fields(json!({"input": []})), [f("input", "required")]);
        assert_eq!(
            fields(json!({"input": [[1, 2]]})),
            [f("input", "unsupported")]
        );
        assert_eq!(
            fields(json!({"input": ["a", ""]})),
            [f("input[1]", "length")]
        );
        assert_eq!(
            fields(json!({"input": "a", "encoding_format": "hex", "dimensions": 0})),
            [f("encoding_format", "enum"), f("dimensions", "range")]
        );
        let many = vec!["x"; MAX_INPUTS + 1];
        assert_eq!(fields(json!({"input": many})), [f("input", "max_items")]);
    }

    #[test]
    fn base64_vectors_are_little_endian_f32() {
        let Vector::Base64(text) = Vector::new(vec![1.0, -2.5], EncodingFormat::Base64) else {
            panic!("base64");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64");
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
        let list = EmbeddingList::new("m".into(), vec![vec![0.5]], EncodingFormat::Float, 3);
        assert_eq!(
            serde_json::to_value(&list).expect("json"),
            json!({"object": "list", "model": "m", "usage": {"prompt_tokens": 3, "total_tokens": 3},
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]})
        );
    }
}
