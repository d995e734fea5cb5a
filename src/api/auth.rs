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
/// A back-office or service token: may act on any pet.
pub const SCOPE_ADMIN: &str = "media:admin";

/// Slack allowed for clocks that disagree, on `exp`, `nbf` and the lifetime.
const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub scope: String,
    /// The household or account the caller acts for (from the auth-service); pets belong to
    /// it. Without it, to the `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

impl Claims {
    /// Whom the caller's pets belong to.
    pub fn owner(&self) -> &str {
        self.owner
            .as_deref()
            .filter(|o| !o.is_empty())
            .unwrap_or(&self.sub)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split_whitespace().any(|s| s == scope)
    }

    pub fn is_admin(&self) -> bool {
        self.has_scope(SCOPE_ADMIN)
    }
}

/// What a token must satisfy beyond its signature.
#[derive(Debug, Clone, Default)]
pub struct TokenPolicy {
    /// `iss` must equal this, when set.
    pub issuer: Option<String>,
    /// `aud` must contain this, when set.
    pub audience: Option<String>,
    /// `exp` may be at most this far in the future (and past `iat`).
    pub max_lifetime_s: u64,
}

/// Signs and checks tokens with the configured secret.
#[derive(Clone)]
pub struct Jwt {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    policy: TokenPolicy,
}

impl Jwt {
    pub fn new(secret: &str, policy: TokenPolicy) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &policy.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &policy.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Jwt {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
            policy,
        }
    }

    /// The policy of the settings' `auth` section.
    pub fn from_settings(auth: &crate::config::AuthSettings) -> Self {
        Jwt::new(
            auth.jwt_secret.expose(),
            TokenPolicy {
                issuer: auth.issuer.clone().filter(|s| !s.is_empty()),
                audience: auth.audience.clone().filter(|s| !s.is_empty()),
                max_lifetime_s: auth.max_token_lifetime_s,
            },
        )
    }

    /// A development token (the `token` subcommand, tests); carries the configured issuer and
    /// audience so that it passes this service's checks.
    pub fn mint(&self, sub: &str, scope: &str, ttl_secs: u64) -> String {
        self.mint_claims(Claims {
            sub: sub.into(),
            exp: now_secs() + ttl_secs,
            nbf: None,
            iat: Some(now_secs()),
            scope: scope.into(),
            owner: None,
            iss: self.policy.issuer.clone(),
        })
    }

    pub fn mint_claims(&self, claims: Claims) -> String {
        #[derive(Serialize)]
        struct WithAud<'a> {
            #[serde(flatten)]
            claims: &'a Claims,
            #[serde(skip_serializing_if = "Option::is_none")]
            aud: Option<&'a str>,
        }
        let body = WithAud {
            claims: &claims,
            aud: self.policy.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let refused = |why: &str| ApiError::Unauthorized(format!("invalid bearer token: {why}"));
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| refused(reason(&e)))?;
        if claims.sub.trim().is_empty() {
            return Err(refused("empty subject"));
        }
        let max = self.policy.max_lifetime_s + LEEWAY_SECS;
        let too_long = claims.exp > now_secs() + max
            || claims
                .iat
                .is_some_and(|iat| claims.exp.saturating_sub(iat) > max);
        if too_long {
            return Err(refused("lifetime longer than auth.max_token_lifetime_s"));
        }
        Ok(claims)
    }
}

fn now_secs() -> u64 {
    chrono::Utc::now().timestamp().max(0) as u64
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
        InvalidIssuer => "issuer not accepted",
        InvalidAudience => "audience not accepted",
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
    // Admins may read and write too.
    if claims.has_scope(scope) || claims.is_admin() {
        Ok(claims)
    } else {
        Err(ApiError::Forbidden(format!(
            "token lacks the `{scope}` scope"
        )))
    }
}

/// A caller allowed to read (`media:read`).
pub struct ReadAccess(pub Claims);
/// A caller allowed to write (`media:write`).
pub struct WriteAccess(pub Claims);

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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-that-is-long-enough-0123456789";

    fn jwt(policy: TokenPolicy) -> Jwt {
        Jwt::new(SECRET, policy)
    }

    fn day() -> TokenPolicy {
        TokenPolicy {
            max_lifetime_s: 86_400,
            ..TokenPolicy::default()
        }
    }

    fn claims(sub: &str, exp_in: u64) -> Claims {
        Claims {
            sub: sub.into(),
            exp: now_secs() + exp_in,
            nbf: None,
            iat: None,
            scope: "media:read".into(),
            owner: None,
            iss: None,
        }
    }

    #[test]
    fn mints_and_verifies_with_the_rust_crypto_backend() {
        let j = jwt(day());
        let c = j
            .verify(&j.mint("alice", "media:read media:write", 3600))
            .unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.owner(), "alice");
        assert!(c.has_scope(SCOPE_WRITE) && !c.is_admin());
        // Another secret's signature is refused.
        let other = Jwt::new("another-secret-that-is-long-enough-0123", day());
        let e = j
            .verify(&other.mint("alice", "media:read", 60))
            .unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
    }

    #[test]
    fn refuses_empty_subjects_and_long_lifetimes() {
        let j = jwt(day());
        let e = j.verify(&j.mint_claims(claims("", 60))).unwrap_err();
        assert!(e.to_string().contains("empty subject"), "{e}");
        let e = j
            .verify(&j.mint_claims(claims("alice", 100 * 365 * 86_400)))
            .unwrap_err();
        assert!(e.to_string().contains("lifetime"), "{e}");
        // Issued long ago with a long lifetime: refused even if it expires soon.
        let mut old = claims("alice", 60);
        old.iat = Some(now_secs() - 3 * 86_400);
        assert!(j.verify(&j.mint_claims(old)).is_err());
        assert!(j.verify(&j.mint_claims(claims("alice", 86_000))).is_ok());
        let expired = Claims {
            exp: now_secs() - 120,
            ..claims("alice", 0)
        };
        let e = j.verify(&j.mint_claims(expired)).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let policy = TokenPolicy {
            issuer: Some("https://auth.example".into()),
            audience: Some("media-clustering".into()),
            ..day()
        };
        let strict = jwt(policy);
        // Minted by this service: right iss and aud.
        assert!(
            strict
                .verify(&strict.mint("alice", "media:read", 60))
                .is_ok()
        );
        // Without them, or with others: refused.
        let loose = jwt(day());
        let e = strict
            .verify(&loose.mint("alice", "media:read", 60))
            .unwrap_err();
        assert!(e.to_string().contains("missing claim"), "{e}");
        let mut wrong = claims("alice", 60);
        wrong.iss = Some("https://evil.example".into());
        let other_aud = jwt(TokenPolicy {
            audience: Some("media-clustering".into()),
            ..day()
        });
        let e = strict.verify(&other_aud.mint_claims(wrong)).unwrap_err();
        assert!(e.to_string().contains("issuer"), "{e}");
        // Unconfigured: any iss passes.
        let mut any = claims("alice", 60);
        any.iss = Some("whoever".into());
        assert!(loose.verify(&loose.mint_claims(any)).is_ok());
    }

    #[test]
    fn the_owner_claim_names_whom_pets_belong_to() {
        let j = jwt(day());
        let mut c = claims("alice", 60);
        c.owner = Some("household-7".into());
        c.scope = "media:admin".into();
        let v = j.verify(&j.mint_claims(c)).unwrap();
        assert_eq!(v.owner(), "household-7");
        assert!(v.is_admin());
    }
}
