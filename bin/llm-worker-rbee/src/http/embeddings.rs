//! `POST /v1/embeddings`, served by a worker whose model is a sentence
//! encoder ([`crate::model::embed`]). A request's inputs run as one batch
//! on a blocking thread, holding one of the worker's slots.

use axum::extract::State;
use axum::Json;
use rbee_api::openai::embeddings::{EmbeddingList, EmbeddingsRequest};
use rbee_api::{ApiError, FieldError, Outcome};
use rbee_http::ApiJson;
use serde_json::Value;

use super::error::AdmitError;
use crate::AppState;

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<EmbeddingList>, ApiError> {
    let request = EmbeddingsRequest::parse(&body).map_err(AdmitError::Invalid)?;
    if state.core.is_draining() {
        return Err(AdmitError::ShuttingDown.into());
    }
    let Some(model) = state.embedder.get().cloned() else {
        return Err(match state.model.get() {
            Some(_) => AdmitError::NotEmbedding.into(),
            None => AdmitError::Loading.into(),
        });
    };
    if let Some(asked) = request.dimensions {
        if asked as usize != model.embedder.dimensions {
            let field = FieldError::new(
                "dimensions",
                "range",
                format!(
                    "this model's embeddings have {} dimensions and cannot be shortened",
                    model.embedder.dimensions
                ),
            );
            model.metrics.request_finished(Outcome::ClientError, 0.0);
            return Err(AdmitError::Invalid(vec![field]).into());
        }
    }
    let Ok(permit) = model.slots.clone().try_acquire_owned() else {
        model.metrics.request_finished(Outcome::Busy, 0.0);
        return Err(AdmitError::AllSlotsBusy {
            slots: model.slots_total,
        }
        .into());
    };
    let started = std::time::Instant::now();
    let worker = std::sync::Arc::clone(&model);
    let inputs = request.input;
    let done = rbee_http::task::spawn_blocking(move || {
        let _permit = permit;
        worker.embedder.embed(&inputs)
    })
    .await
    .map_err(|_| AdmitError::EmbedderLost)?;
    let seconds = started.elapsed().as_secs_f64();
    let (vectors, tokens) = match done {
        Ok(done) => done,
        Err(e) => {
            model.metrics.request_finished(Outcome::Error, seconds);
            tracing::error!(error = %e, "embedding failed");
            return Err(AdmitError::Embed(e.to_string()).into());
        }
    };
    model.metrics.request_finished(Outcome::Ok, seconds);
    model.metrics.prompt_tokens.inc_by(tokens as u64);
    Ok(Json(EmbeddingList::new(
        state.model_ref.clone(),
        vectors,
        request.encoding_format,
        u32::try_from(tokens).unwrap_or(u32::MAX),
    )))
}
