//! The [`Deadline`] type and header parsing.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue};
use rbee_api::{ApiError, ErrorCode, FieldError};
use tokio::time::Instant;

/// `X-Deadline`: absolute deadline, unix epoch milliseconds.
pub const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline");
/// `X-Timeout-Ms`: relative timeout in milliseconds, converted on arrival.
pub const X_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-timeout-ms");

/// Longest relative timeout accepted: one year.
pub const MAX_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;
/// Epoch-ms values below this (2001-09-09) are almost surely seconds sent by mistake.
const MIN_PLAUSIBLE_EPOCH_MS: u64 = 1_000_000_000_000;
/// 9999-12-31T23:59:59.999Z: later values are not dates.
const MAX_EPOCH_MS: u64 = 253_402_300_799_999;

/// The absolute time by which a request must be answered.
///
/// Holds the wall-clock value to forward unchanged and the matching point on
/// tokio's monotonic clock, which every remaining-time computation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    epoch_ms: u64,
    at: Instant,
}

/// A header could not be read as a deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {reason}")]
pub struct DeadlineError {
    /// `X-Deadline` or `X-Timeout-Ms`.
    pub header: &'static str,
    /// Why.
    pub reason: String,
}

impl DeadlineError {
    fn new(header: &'static str, reason: impl Into<String>) -> Self {
        Self {
            header,
            reason: reason.into(),
        }
    }

    /// 400 `INVALID_DEADLINE` with the header in `details.fields`.
    pub fn to_api_error(&self) -> ApiError {
        ApiError::invalid_fields(
            ErrorCode::InvalidDeadline,
            vec![FieldError::new(
                self.header,
                "format",
                format!("{}: {}", self.header, self.reason),
            )],
        )
    }
}

impl IntoResponse for DeadlineError {
    fn into_response(self) -> Response {
        self.to_api_error().into_response()
    }
}

/// The deadline passed before the work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request deadline has passed")]
pub struct DeadlineExceeded;

impl DeadlineExceeded {
    /// 504 `DEADLINE_EXCEEDED`.
    pub fn to_api_error(self) -> ApiError {
        ApiError::new(
            ErrorCode::DeadlineExceeded,
            "the request deadline has passed",
        )
    }
}

impl IntoResponse for DeadlineExceeded {
    fn into_response(self) -> Response {
        self.to_api_error().into_response()
    }
}

fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(MAX_TIMEOUT_MS);
        Self::after_ms_at(ms.min(MAX_TIMEOUT_MS), now_epoch_ms(), Instant::now())
    }

    /// Read `X-Deadline` and `X-Timeout-Ms` now. `Ok(None)` when neither is
    /// present; when both are, the earlier deadline wins.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, DeadlineError> {
        Self::from_headers_at(headers, now_epoch_ms(), Instant::now())
    }

    /// [`from_headers`](Self::from_headers) against an explicit clock reading:
    /// `now_epoch_ms` (wall clock) and `now` (tokio's clock) taken together.
    pub fn from_headers_at(
        headers: &HeaderMap,
        now_epoch_ms: u64,
        now: Instant,
    ) -> Result<Option<Self>, DeadlineError> {
        let absolute = single_number(headers, &X_DEADLINE, "X-Deadline")?
            .map(|ms| {
                if ms < MIN_PLAUSIBLE_EPOCH_MS {
                    Err(DeadlineError::new(
                        "X-Deadline",
                        format!("{ms} is not unix epoch milliseconds (seconds sent by mistake?)"),
                    ))
                } else if ms > MAX_EPOCH_MS {
                    Err(DeadlineError::new(
                        "X-Deadline",
                        format!("{ms} is past the year 9999"),
                    ))
                } else {
                    Ok(Self::at_epoch_ms(ms, now_epoch_ms, now))
                }
            })
            .transpose()?;
        let relative = single_number(headers, &X_TIMEOUT_MS, "X-Timeout-Ms")?
            .map(|ms| {
                if ms > MAX_TIMEOUT_MS {
                    Err(DeadlineError::new(
                        "X-Timeout-Ms",
                        format!("{ms} is longer than the maximum of {MAX_TIMEOUT_MS} ms"),
                    ))
                } else {
                    Ok(Self::after_ms_at(ms, now_epoch_ms, now))
                }
            })
            .transpose()?;
        Ok(match (absolute, relative) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        })
    }

    fn at_epoch_ms(epoch_ms: u64, now_epoch_ms: u64, now: Instant) -> Self {
        let ahead =
            Duration::from_millis(epoch_ms.saturating_sub(now_epoch_ms).min(MAX_TIMEOUT_MS));
        Self {
            epoch_ms,
            at: now + ahead,
        }
    }

    fn after_ms_at(ms: u64, now_epoch_ms: u64, now: Instant) -> Self {
        Self {
            epoch_ms: now_epoch_ms.saturating_add(ms),
            at: now + Duration::from_millis(ms),
        }
    }

    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The absolute deadline in unix epoch milliseconds.
    pub fn epoch_ms(&self) -> u64 {
        self.epoch_ms
    }

    /// The point on tokio's clock at which the deadline passes.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// The `X-Deadline` value to forward downstream (unchanged epoch ms).
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from(self.epoch_ms)
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Self) -> Self {
        if other.at < self.at {
            other
        } else {
            self
        }
    }

    /// Run `work`, giving up with [`DeadlineExceeded`] when the deadline passes.
    pub async fn timeout<F: Future>(&self, work: F) -> Result<F::Output, DeadlineExceeded> {
        tokio::time::timeout_at(self.at, work)
            .await
            .map_err(|_| DeadlineExceeded)
    }
}

fn single_number(
    headers: &HeaderMap,
    name: &HeaderName,
    display: &'static str,
) -> Result<Option<u64>, DeadlineError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(DeadlineError::new(display, "sent more than once"));
    }
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DeadlineError::new(
            display,
            "must be a non-negative integer number of milliseconds",
        ));
    }
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| DeadlineError::new(display, "is too large"))
}

/// The deadline the [`crate::DeadlineLayer`] put in the request, or the one
/// its headers carry. Required: a request without one is 400.
impl<S: Send + Sync> FromRequestParts<S> for Deadline {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match <Self as OptionalFromRequestParts<S>>::from_request_parts(parts, _state).await? {
            Some(deadline) => Ok(deadline),
            None => Err(ApiError::invalid_fields(
                ErrorCode::InvalidDeadline,
                vec![FieldError::new(
                    "X-Deadline",
                    "required",
                    "this route requires X-Deadline or X-Timeout-Ms",
                )],
            )),
        }
    }
}

/// `Option<Deadline>` in a handler: the deadline if the request has one.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Deadline {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        if let Some(deadline) = parts.extensions.get::<Deadline>() {
            return Ok(Some(*deadline));
        }
        match Deadline::from_headers(&parts.headers) {
            Ok(Some(deadline)) if deadline.is_expired() => Err(DeadlineExceeded.to_api_error()),
            Ok(found) => Ok(found),
            Err(e) => Err(e.to_api_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append((*name).clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[tokio::test(start_paused = true)]
    async fn absolute_deadline_counts_down_on_the_paused_clock() {
        let now = Instant::now();
        let h = headers(&[(&X_DEADLINE, &(NOW_MS + 5_000).to_string())]);
        let d = Deadline::from_headers_at(&h, NOW_MS, now).unwrap().unwrap();
        assert_eq!(d.remaining(), Duration::from_secs(5));
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(!d.is_expired());
        assert_eq!(d.remaining(), Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(d.is_expired());
        assert_eq!(d.remaining(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn relative_timeout_becomes_an_absolute_header() {
        let now = Instant::now();
        let h = headers(&[(&X_TIMEOUT_MS, "250")]);
        let d = Deadline::from_headers_at(&h, NOW_MS, now).unwrap().unwrap();
        assert_eq!(d.epoch_ms(), NOW_MS + 250);
        assert_eq!(d.header_value(), (NOW_MS + 250).to_string());
        assert_eq!(d.remaining(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_earlier_of_both_headers_wins() {
        let now = Instant::now();
        let h = headers(&[
            (&X_DEADLINE, &(NOW_MS + 10_000).to_string()),
            (&X_TIMEOUT_MS, "2000"),
        ]);
        let d = Deadline::from_headers_at(&h, NOW_MS, now).unwrap().unwrap();
        assert_eq!(d.epoch_ms(), NOW_MS + 2_000);
    }

    #[tokio::test(start_paused = true)]
    async fn past_deadline_is_expired_at_once() {
        let h = headers(&[(&X_DEADLINE, &(NOW_MS - 1).to_string())]);
        let d = Deadline::from_headers_at(&h, NOW_MS, Instant::now())
            .unwrap()
            .unwrap();
        assert!(d.is_expired());
        let zero = headers(&[(&X_TIMEOUT_MS, "0")]);
        let d = Deadline::from_headers_at(&zero, NOW_MS, Instant::now())
            .unwrap()
            .unwrap();
        assert!(d.is_expired());
    }

    #[test]
    fn bad_values_are_errors_naming_the_header() {
        let cases: &[(&HeaderName, &str, &str)] = &[
            (&X_DEADLINE, "soon", "X-Deadline"),
            (&X_DEADLINE, "-5", "X-Deadline"),
            (&X_DEADLINE, "1.5", "X-Deadline"),
            (&X_DEADLINE, "", "X-Deadline"),
            (&X_DEADLINE, "1700000000", "X-Deadline"),
            (&X_DEADLINE, "99999999999999999999", "X-Deadline"),
            (&X_DEADLINE, "999999999999999", "X-Deadline"),
            (&X_TIMEOUT_MS, "1e3", "X-Timeout-Ms"),
            (&X_TIMEOUT_MS, "100000000000000", "X-Timeout-Ms"),
        ];
        for (name, value, display) in cases {
            let err = Deadline::from_headers_at(&headers(&[(name, value)]), NOW_MS, Instant::now())
                .unwrap_err();
            assert_eq!(err.header, *display, "{value}");
            let api = err.to_api_error();
            assert_eq!(api.code(), ErrorCode::InvalidDeadline);
            assert_eq!(api.status(), http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn duplicate_headers_are_refused() {
        let h = headers(&[(&X_TIMEOUT_MS, "5"), (&X_TIMEOUT_MS, "6")]);
        assert!(Deadline::from_headers_at(&h, NOW_MS, Instant::now()).is_err());
    }

    #[test]
    fn no_headers_is_no_deadline() {
        assert_eq!(Deadline::from_headers(&HeaderMap::new()), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_helper_stops_work_at_the_deadline() {
        let d = Deadline::after(Duration::from_millis(100));
        let slow = d.timeout(tokio::time::sleep(Duration::from_secs(10))).await;
        assert_eq!(slow, Err(DeadlineExceeded));
        assert!(d.is_expired());
        let d = Deadline::after(Duration::from_millis(100));
        let fast = d.timeout(async { 7 }).await;
        assert_eq!(fast, Ok(7));
    }

    proptest! {
        #[test]
        fn header_value_round_trips(ahead in 0u64..MAX_TIMEOUT_MS, now_ms in MIN_PLAUSIBLE_EPOCH_MS..4_000_000_000_000u64) {
            let now = Instant::now();
            let epoch = now_ms + ahead;
            let d = Deadline::from_headers_at(&headers(&[(&X_DEADLINE, &epoch.to_string())]), now_ms, now).unwrap().unwrap();
            prop_assert_eq!(d.epoch_ms(), epoch);
            let mut forwarded = HeaderMap::new();
            forwarded.insert(X_DEADLINE, d.header_value());
            let again = Deadline::from_headers_at(&forwarded, now_ms, now).unwrap().unwrap();
            prop_assert_eq!(again, d);
        }

        #[test]
        fn parser_never_panics(raw in "[ -~]{0,40}") {
            if let Ok(value) = HeaderValue::from_str(&raw) {
                let mut h = HeaderMap::new();
                h.insert(X_DEADLINE, value.clone());
                h.insert(X_TIMEOUT_MS, value);
                let _ = Deadline::from_headers_at(&h, NOW_MS, Instant::now());
            }
        }
    }
}
