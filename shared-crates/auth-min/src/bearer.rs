//! Strict parsing of the `Authorization: Bearer <token>` header.

use http::HeaderValue;

/// Longest `Authorization` header value accepted (8 KiB).
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// Why a credential could not be read from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    /// No `Authorization` header.
    #[error("no Authorization header; send `Authorization: Bearer <token>`")]
    Missing,
    /// The header is longer than [`MAX_AUTHORIZATION_BYTES`].
    #[error("the Authorization header is longer than 8 KiB")]
    TooLong,
    /// The scheme is not exactly `Bearer`.
    #[error("the Authorization scheme must be `Bearer`")]
    WrongScheme,
    /// `Bearer` with nothing after it.
    #[error("the bearer token is empty")]
    Empty,
    /// Control characters, inner whitespace or non-ASCII bytes in the token.
    #[error("the bearer token contains characters that are not allowed")]
    BadCharacters,
}

/// Read the token out of an `Authorization` header value.
///
/// The scheme must be exactly `Bearer` followed by at least one space; the
/// token is trimmed of surrounding spaces and tabs, must not be empty, and
/// may only hold visible ASCII (no control characters, no inner whitespace).
pub fn parse_bearer(value: Option<&HeaderValue>) -> Result<&str, BearerError> {
    let value = value.ok_or(BearerError::Missing)?;
    let bytes = value.as_bytes();
    if bytes.len() > MAX_AUTHORIZATION_BYTES {
        return Err(BearerError::TooLong);
    }
    let rest = bytes
        .strip_prefix(b"Bearer")
        .ok_or(BearerError::WrongScheme)?;
    // `Bearer` must be followed by whitespace, or be the whole value
    // (`BearerX` is another scheme; bare `Bearer` carries an empty token).
    match rest.first() {
        None => return Err(BearerError::Empty),
        Some(b' ' | b'\t') => {}
        Some(_) => return Err(BearerError::WrongScheme),
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(BearerError::Empty);
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(BearerError::BadCharacters);
    }
    // Every byte is visible ASCII, so this cannot fail.
    std::str::from_utf8(token).map_err(|_| BearerError::BadCharacters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &[u8]) -> Result<String, BearerError> {
        let value = HeaderValue::from_bytes(s).unwrap();
        parse_bearer(Some(&value)).map(str::to_owned)
    }

    #[test]
    fn accepts_the_plain_form() {
        assert_eq!(parse(b"Bearer abc.def-123").unwrap(), "abc.def-123");
    }

    #[test]
    fn trims_surrounding_whitespace() {
        assert_eq!(parse(b"Bearer   tok\t ").unwrap(), "tok");
    }

    #[test]
    fn rejects_other_schemes_and_spellings() {
        assert_eq!(parse(b"Basic dXNlcjpw"), Err(BearerError::WrongScheme));
        assert_eq!(parse(b"bearer tok"), Err(BearerError::WrongScheme));
        assert_eq!(parse(b"BearerToken"), Err(BearerError::WrongScheme));
        assert_eq!(parse(b"Token tok"), Err(BearerError::WrongScheme));
    }

    #[test]
    fn rejects_empty_tokens() {
        assert_eq!(parse(b"Bearer"), Err(BearerError::Empty));
        assert_eq!(parse(b"Bearer    "), Err(BearerError::Empty));
    }

    #[test]
    fn rejects_inner_whitespace_and_non_ascii() {
        assert_eq!(parse(b"Bearer two words"), Err(BearerError::BadCharacters));
        assert_eq!(parse(b"Bearer tok\xff"), Err(BearerError::BadCharacters));
        assert_eq!(
            parse("Bearer caf\u{e9}".as_bytes()),
            Err(BearerError::BadCharacters)
        );
    }

    #[test]
    fn rejects_oversized_headers() {
        let mut long = b"Bearer ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_AUTHORIZATION_BYTES));
        assert_eq!(parse(&long), Err(BearerError::TooLong));
    }

    #[test]
    fn missing_header_is_its_own_error() {
        assert_eq!(parse_bearer(None), Err(BearerError::Missing));
    }

    proptest! {
        #[test]
        fn any_visible_ascii_token_round_trips(token in "[!-~]{1,512}", pad in "[ \t]{0,4}") {
            let header = format!("Bearer {pad}{token}{pad}");
            prop_assert_eq!(parse(header.as_bytes()).unwrap(), token);
        }

        #[test]
        fn parser_never_panics_and_never_returns_whitespace(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                if let Ok(token) = parse_bearer(Some(&value)) {
                    prop_assert!(!token.is_empty());
                    prop_assert!(token.bytes().all(|b| b.is_ascii_graphic()));
                    prop_assert!(raw.starts_with(b"Bearer"));
                }
            }
        }

        #[test]
        fn any_token_with_a_control_character_is_rejected(
            head in "[!-~]{0,20}", tail in "[!-~]{1,20}", ctl in 0u8..0x20u8
        ) {
            prop_assume!(ctl != b'\t');
            let mut raw = b"Bearer ".to_vec();
            raw.extend_from_slice(head.as_bytes());
            raw.push(ctl);
            raw.extend_from_slice(tail.as_bytes());
            // HeaderValue itself refuses most control bytes; where it accepts
            // one, the parser must refuse it.
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                prop_assert!(parse_bearer(Some(&value)).is_err());
            }
        }
    }
}
