//! The API's errors: one enum, one mapping to status codes, always the JSON shape
//! `{"error": {"code": "...", "message": "..."}}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_pet_id", "message": "pet_id must be 1-64 characters of [A-Za-z0-9_-]"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_pet_id`, `invalid_id`, `empty_file`, `no_files`,
    /// `too_many_files`, `bad_multipart`, `bad_body`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `request_timeout`, `payload_too_large`, `unsupported_media_type`,
    /// `unprocessable_image`, `rate_limited`, `unavailable`, `not_ready`, `internal`.
    pub code: String,
    /// For people; never echoes a credential.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (bad `pet_id`, bad id, empty file...).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No valid bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the needed scope.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not; `allow` lists the methods it takes.
    #[error("method not allowed; this route takes {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// The client stopped sending the body for longer than `server.request_timeout_ms`.
    #[error("the request body stalled for more than {0} ms")]
    RequestTimeout(u64),
    /// The whole upload took longer than `server.upload_timeout_ms`.
    #[error("the upload took longer than {0} ms")]
    UploadTimeout(u64),
    /// The body is over `server.max_upload_bytes`.
    #[error("upload exceeds the limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// Not JPEG, PNG or WebP.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// An image that cannot be decoded or is over the pixel limit.
    #[error("{0}")]
    Unprocessable(String),
    /// A well-formed request that conflicts with the resource's state (e.g. a hero that is
    /// not a member of the cluster).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The caller is over its `rate_limit`; it may retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// A dependency is down; nothing was stored.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RequestTimeout(_) | ApiError::UploadTimeout(_) => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable(_) => "unprocessable_image",
            ApiError::Conflict { code, .. } => code,
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) | ApiError::UploadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Internal(detail) => tracing::error!(error = %detail, "Request failed."),
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "Request failed: dependency unavailable.")
            }
            _ => {}
        }
        let mut res = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized(_) => {
                res.insert_header((WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                res.insert_header((ALLOW, *allow));
            }
            ApiError::RateLimited(secs) => {
                res.insert_header((RETRY_AFTER, secs.to_string()));
            }
            // The body was abandoned part-way: close rather than drain the rest of it.
            ApiError::RequestTimeout(_)
            | ApiError::UploadTimeout(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::BadRequest {
                code: "bad_multipart" | "bad_body",
                ..
            } => {
                res.force_close();
            }
            _ => {}
        }
        res.json(ErrorBody::new(self.code(), self.to_string()))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::from_db(&e)
    }
}

impl ApiError {
    /// A database error as the API's answer: 503 when the database cannot be reached.
    pub fn from_db(e: &sqlx::Error) -> Self {
        if crate::adapters::postgres::is_unreachable(e) {
            ApiError::Unavailable("database unavailable".into())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}
