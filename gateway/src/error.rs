//! API errors in OpenAI's JSON shape, mapped to HTTP in this one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request got no completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0} s")]
    SlowBody(u64),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: &str) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::BadRequest { .. } | Self::TooLarge(_) | Self::SlowBody(_) => {
                ("invalid_request_error", None)
            }
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            Self::NotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::Overloaded(_) => ("rate_limit_error", Some("rate_limit_exceeded")),
            Self::Unavailable(_) => ("server_error", Some("service_unavailable")),
            Self::Internal(_) => ("server_error", None),
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        let param = match self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

/// A worker's gRPC status, as the API reports it.
impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument => Self::BadRequest {
                message: s.message().into(),
                param: None,
            },
            tonic::Code::ResourceExhausted => Self::Overloaded(s.message().into()),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                Self::Unavailable(s.message().into())
            }
            _ => Self::Internal(s.message().into()),
        }
    }
}
