//! Errors as OpenAI sends them: a status and `{"error": {"message", "type", "param", "code"}}`.

use agent_pool::PoolError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::EngineError;

/// An error reply. Its message says what was wrong and what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or asks for something this server cannot do.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_owned()),
            ..Self::invalid(message)
        }
    }

    /// 400 for a bad agent name.
    pub fn invalid_agent(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_agent"),
            ..Self::invalid_param(param, message)
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key: send `Authorization: Bearer <key>` with the key the \
                 server was started with (--api-key or AGENTKV_API_KEY)",
            )
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body larger than {limit} bytes: send a shorter conversation"),
        )
    }

    /// 429 with `Retry-After`.
    pub fn busy(queue: usize) -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{queue} requests are already queued: retry after a second"),
            )
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The status this error is sent with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body, for a stream that has already started (sent as an event).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> ApiError {
        // The pool's messages say what to do next.
        let message = e.with_causes();
        match &e {
            PoolError::InvalidId { .. } => ApiError {
                code: Some("invalid_agent"),
                ..ApiError::invalid(message)
            },
            PoolError::UnknownAgent { .. } | PoolError::UnknownTurn { .. } => {
                ApiError::not_found(message)
            }
            PoolError::NoInput { .. } => ApiError::invalid_param("messages", message),
            PoolError::Engine { source, .. } => match source.as_ref() {
                EngineError::ContextOverflow { .. } => ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid_param("messages", message)
                },
                EngineError::InvalidSampling { .. } => ApiError::invalid(message),
                _ => ApiError::internal(message),
            },
            PoolError::DiskFull { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "server_error", message)
            }
            // Another host advanced the conversation first: the client rereads and retries.
            PoolError::Conflict { .. } => ApiError {
                code: Some("conflict"),
                ..ApiError::new(StatusCode::CONFLICT, "invalid_request_error", message)
            },
            // The shared store is down: nothing was committed, and a retry may succeed.
            PoolError::Shared { .. } => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            _ => ApiError::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
