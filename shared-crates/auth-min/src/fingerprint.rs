//! Token fingerprints: the only form of a token that may reach a log line,
//! a metric or an audit record.

use sha2::{Digest, Sha256};

/// The first 6 hex digits of the token's SHA-256.
///
/// Six hex digits (24 bits) tell tokens apart in an operator's logs while
/// revealing nothing useful about the secret.
pub fn token_fp6(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..3])
}

/// A token's fingerprint, displayed (and serialized) as `token:<fp6>`.
///
/// The only form of a token that can be put into a log, a metric or an audit
/// record: it can be made from a token ([`Fingerprint::of`]) or parsed from
/// its own display form, never from anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    /// Parse `token:<6 lowercase hex>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("token:") {
            Some(fp)
                if fp.len() == 6 && fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Self(fp.to_owned()))
            }
            _ => Err(format!(
                "`{s}` is not a token fingerprint (token:<6 hex digits>)"
            )),
        }
    }
}

impl Fingerprint {
    /// The fingerprint of `token`.
    pub fn of(token: &str) -> Self {
        Self(token_fp6(token))
    }

    /// Fingerprint from an already computed SHA-256 digest.
    pub(crate) fn from_digest(digest: &[u8; 32]) -> Self {
        Self(hex::encode(&digest[..3]))
    }

    /// The 6 hex digits alone.
    pub fn fp6(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp6_is_six_lowercase_hex_digits_of_sha256() {
        // sha256("test") = 9f86d081...
        assert_eq!(token_fp6("test"), "9f86d0");
        assert_eq!(Fingerprint::of("test").to_string(), "token:9f86d0");
    }

    #[test]
    fn parses_only_its_own_display_form() {
        let fp = Fingerprint::of("test");
        assert_eq!(fp.to_string().parse::<Fingerprint>(), Ok(fp));
        assert!("token:9F86D0".parse::<Fingerprint>().is_err());
        assert!("9f86d0".parse::<Fingerprint>().is_err());
        assert!("token:9f86d0aa".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn digest_and_string_forms_agree() {
        let digest: [u8; 32] = Sha256::digest(b"another-token-value").into();
        assert_eq!(
            Fingerprint::from_digest(&digest),
            Fingerprint::of("another-token-value")
        );
    }
}
