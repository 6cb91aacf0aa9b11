//! Canonical JSON (RFC 8785 for documents without floats) and the chain hash.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first record of a new trail.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A value that has no canonical form here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// Records never hold floats (durations are integer milliseconds).
    #[error("audit records must not contain floating-point numbers")]
    Float,
}

/// Serialize `value` canonically: object keys sorted by UTF-16 code units,
/// no insignificant whitespace, strings escaped as JSON requires (and no
/// more), integers in plain decimal. Floats are refused.
///
/// Keys are sorted here rather than by relying on `serde_json`'s map order,
/// which a dependency enabling `preserve_order` would change.
pub fn canonical_json(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(256);
    write(&mut out, value)?;
    Ok(out)
}

fn write(out: &mut String, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                return Err(CanonicalError::Float);
            }
            out.push_str(&n.to_string());
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write(out, item)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// RFC 8785 string form: `\"` `\\` `\b` `\f` `\n` `\r` `\t`, other control
/// characters as lowercase `\u00xx`, everything else as raw UTF-8.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `hex(sha256(prev_hash + canonical_without_hash))`.
pub fn chain_hash(prev_hash: &str, canonical_without_hash: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical_without_hash.as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_and_whitespace_removed() {
        let v = json!({"b": 1, "a": {"d": [1, 2, {"z": null, "y": true}], "c": "x"}});
        assert_eq!(
            canonical_json(&v).unwrap(),
            r#"{"a":{"c":"x","d":[1,2,{"y":true,"z":null}]},"b":1}"#
        );
    }

    #[test]
    fn strings_are_escaped_as_rfc_8785_says() {
        let v = json!("q\"b\\\u{8}\u{c}\n\r\t\u{1}\u{1f}/é€😀");
        assert_eq!(
            canonical_json(&v).unwrap(),
            "\"q\\\"b\\\\\\b\\f\\n\\r\\t\\u0001\\u001f/é€😀\""
        );
    }

    #[test]
    fn floats_are_refused() {
        assert_eq!(
            canonical_json(&json!({"x": 1.5})),
            Err(CanonicalError::Float)
        );
        assert!(canonical_json(&json!({"x": u64::MAX, "y": -3})).is_ok());
    }

    #[test]
    fn keys_sort_by_utf16_code_units() {
        // U+FF61 sorts after U+1F600 in UTF-8 byte order but before it in UTF-16.
        let v = json!({"\u{1F600}": 1, "\u{FF61}": 2});
        assert_eq!(
            canonical_json(&v).unwrap(),
            "{\"\u{1F600}\":1,\"\u{FF61}\":2}"
        );
    }

    proptest! {
        #[test]
        fn canonical_form_parses_back_to_the_same_value(keys in proptest::collection::vec("[a-zA-Z_é\\x00-\\x1f\"\\\\]{0,8}", 0..6), n in any::<i64>()) {
            let mut map = serde_json::Map::new();
            for (i, k) in keys.into_iter().enumerate() {
                map.insert(k, json!([n, i, "s\n"]));
            }
            let v = Value::Object(map);
            let text = canonical_json(&v).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(canonical_json(&back).unwrap(), text);
        }
    }
}
