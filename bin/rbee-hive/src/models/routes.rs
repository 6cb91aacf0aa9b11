//! The `/v1/models/*` routes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use rbee_api::models::{EvictRequest, ProvisionRequest};
use rbee_api::{ApiError, ErrorCode, FieldError};
use rbee_http::{ApiJson, RequestContext, Routes};
use serde::Deserialize;

use super::downloads::Phase;
use super::error::ModelError;
use super::Models;

/// The model routes, for a state that yields [`Models`].
pub fn router<S>() -> Routes<S>
where
    S: Clone + Send + Sync + 'static,
    Models: axum::extract::FromRef<S>,
{
    Routes::new()
        .post("/v1/models/provision", provision)
        .post("/v1/models/download", provision)
        .get("/v1/models/download/progress", progress)
        .get("/v1/models/list", list)
        .get("/v1/models/catalog", catalog)
        .delete("/v1/models/evict", evict)
}

async fn provision(
    State(models): State<Models>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<ProvisionRequest>,
) -> Result<Response, ApiError> {
    let accepted = models
        .provision(&body.model_ref, Some(ctx.request_id.as_str()))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

#[derive(Debug, Deserialize)]
struct ProgressQuery {
    id: Option<String>,
}

async fn progress(
    State(models): State<Models>,
    query: Result<Query<ProgressQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = query.ok().and_then(|Query(q)| q.id).unwrap_or_default();
    if id.is_empty() {
        return Err(ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new(
                "id",
                "required",
                "query parameter id (the download_id of a provision) is required",
            )],
        ));
    }
    let Some(download) = models.download(&id) else {
        return Err(ModelError::NoDownload { id }.into());
    };
    let receiver = download.subscribe();
    // The first item is the current phase, so late subscribers see where
    // the download stands; then one item per change; the terminal phase is
    // followed by [DONE] and the end of the stream.
    let stream = futures_util::stream::unfold(
        (receiver, Step::Current),
        |(mut receiver, step)| async move {
            match step {
                Step::Done => None,
                Step::Finished => {
                    Some((Ok(Event::default().data("[DONE]")), (receiver, Step::Done)))
                }
                Step::Current | Step::Next => {
                    if matches!(step, Step::Next) && receiver.changed().await.is_err() {
                        return Some((Ok(Event::default().data("[DONE]")), (receiver, Step::Done)));
                    }
                    let phase: Phase = receiver.borrow_and_update().clone();
                    let event = phase.event();
                    let next = if phase.is_terminal() {
                        Step::Finished
                    } else {
                        Step::Next
                    };
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    Some((Ok(Event::default().data(data)), (receiver, next)))
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

enum Step {
    Current,
    Next,
    Finished,
    Done,
}

async fn list(State(models): State<Models>) -> Result<Response, ApiError> {
    Ok(Json(models.list().await?).into_response())
}

async fn catalog(State(models): State<Models>) -> Result<Response, ApiError> {
    Ok(Json(models.catalog().await?).into_response())
}

async fn evict(
    State(models): State<Models>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<EvictRequest>,
) -> Result<Response, ApiError> {
    Ok(Json(
        models
            .evict(&body.model_ref, Some(ctx.request_id.as_str()))
            .await?,
    )
    .into_response())
}
