//! Pets belong to their owner (DESIGN.md "Tenancy"): the JWT's `owner` claim, else its
//! `sub`. The first write to a pet records its owner; every `/v1` route answers 404 to anyone
//! else, exactly as for a pet that does not exist; a `media:admin` token may act on any pet.

use sqlx::{PgPool, Postgres, Transaction};

use super::auth::Claims;
use super::error::ApiError;
use crate::adapters::postgres;

/// May `caller` read the pet? `missing` is the answer for a pet that does not exist.
pub async fn may_read(
    db: &PgPool,
    caller: &Claims,
    pet_id: &str,
    missing: impl FnOnce() -> ApiError,
) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    match postgres::pet_owner(db, pet_id).await? {
        Some(owner) if owner == caller.owner() => Ok(()),
        // Another owner's pet, or one nobody has written to since owners were recorded.
        _ => Err(missing()),
    }
}

/// May `caller` write to the pet? A pet with no owner yet is the caller's to take, in the
/// write's transaction ([`claim`]).
pub async fn may_write(db: &PgPool, caller: &Claims, pet_id: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    match postgres::pet_owner(db, pet_id).await? {
        Some(owner) if owner != caller.owner() => Err(no_such_pet(pet_id)),
        _ => Ok(()),
    }
}

/// Who a write by `caller` claims a pet for: its owner; nobody for an admin, who writes
/// without claiming.
pub fn claimant(caller: &Claims) -> Option<&str> {
    (!caller.is_admin()).then(|| caller.owner())
}

/// Records the caller as the pet's owner if it has none, inside the write's transaction, and
/// refuses a pet another caller claimed meanwhile. (Uploads claim in their batch's
/// transaction: [`postgres::commit_uploads`].)
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    caller: &Claims,
    pet_id: &str,
) -> Result<(), ApiError> {
    let Some(owner) = claimant(caller) else {
        return Ok(());
    };
    if postgres::claim_pet(tx, pet_id, owner).await? == owner {
        Ok(())
    } else {
        Err(no_such_pet(pet_id))
    }
}

pub fn no_such_pet(pet_id: &str) -> ApiError {
    ApiError::NotFound(format!("no pet {pet_id}"))
}
