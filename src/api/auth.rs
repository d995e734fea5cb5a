//! Bearer JWTs (HS256, as the auth-service issues them) with OAuth-style scopes,
//! and the internal token of `/internal/*`, compared in constant time.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::startup::AppState;

pub const SCOPE_READ: &str = "media:read";
pub const SCOPE_WRITE: &str = "media:write";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub scope: String,
}

/// Signs and checks tokens with the configured secret.
#[derive(Clone)]
pub struct Jwt {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Jwt {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Jwt {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn mint(&self, sub: &str, scope: &str, ttl_secs: u64) -> String {
        let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl_secs;
        let claims = Claims {
            sub: sub.into(),
            exp,
            nbf: None,
            scope: scope.into(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| ApiError::Unauthorized(format!("invalid bearer token: {}", reason(&e))))
    }
}

/// Says why a token was refused without echoing it.
fn reason(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "expired",
        ImmatureSignature => "not yet valid",
        InvalidSignature => "bad signature",
        InvalidAlgorithm | InvalidAlgorithmName => "algorithm not accepted",
        MissingRequiredClaim(_) => "missing claim",
        _ => "malformed",
    }
}

fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let h = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    let h = h
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    match h.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthorized(
            "malformed Authorization header".into(),
        )),
    }
}

/// Who a request counts against for rate limiting: the verified `sub`, else the peer
/// address (never the token itself).
pub(super) fn caller_key(req: &HttpRequest, jwt: &Jwt) -> String {
    match bearer(req).and_then(|t| jwt.verify(t)) {
        Ok(claims) => format!("sub:{}", claims.sub),
        Err(_) => format!(
            "peer:{}",
            req.peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default()
        ),
    }
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("application state missing".into()))
}

fn authorize(req: &HttpRequest, scope: &str) -> Result<Claims, ApiError> {
    let claims = state(req)?.jwt.verify(bearer(req)?)?;
    if claims.scope.split_whitespace().any(|s| s == scope) {
        Ok(claims)
    } else {
        Err(ApiError::Forbidden(format!(
            "token lacks the `{scope}` scope"
        )))
    }
}

/// A caller allowed to read (`media:read`).
pub struct ReadAccess(#[allow(dead_code)] pub Claims);
/// A caller allowed to write (`media:write`).
pub struct WriteAccess(#[allow(dead_code)] pub Claims);

impl FromRequest for ReadAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authorize(req, SCOPE_READ).map(ReadAccess))
    }
}

impl FromRequest for WriteAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authorize(req, SCOPE_WRITE).map(WriteAccess))
    }
}

/// A caller holding the internal metrics token.
pub struct InternalAccess;

impl FromRequest for InternalAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let token = bearer(req)?;
            let want = state(req)?.settings.auth.internal_token.expose().as_bytes();
            if bool::from(token.as_bytes().ct_eq(want)) {
                Ok(InternalAccess)
            } else {
                Err(ApiError::Unauthorized("invalid internal token".into()))
            }
        })())
    }
}
