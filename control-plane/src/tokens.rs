//! Join tokens: how a workload proves who it is in local mode.
//!
//! A token names one workload and an expiry, and is signed with HMAC-SHA-256 under the
//! CA directory's `token.key`:
//!
//! ```text
//! wary1.<namespace>.<workload>.<expiry, unix seconds>.<hmac, hex>
//! ```
//!
//! It is stateless (every replica with the same CA directory verifies it the same way)
//! and only bootstraps: renewals authenticate with the mesh certificate itself.

use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The default validity of a minted token: 24 h.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const PREFIX: &str = "wary1";

/// Who a valid token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's name.
    pub workload: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a `wary1.` token at all.
    #[error("not a join token: expected wary1.<namespace>.<workload>.<expiry>.<signature>")]
    Malformed,
    /// Signed with another key, or altered.
    #[error("join token signature does not verify: it was minted for another CA directory, or altered")]
    BadSignature,
    /// Past its expiry.
    #[error("join token expired at {0} (unix seconds): mint a new one with `wary-control-plane token`")]
    Expired(u64),
}

type HmacSha256 = Hmac<Sha256>;

/// Mints a token for `namespace/workload`, valid for `ttl`.
pub fn mint(key: &[u8], namespace: &str, workload: &str, ttl: Duration) -> String {
    let expiry = unix(SystemTime::now() + ttl);
    let body = format!("{PREFIX}.{namespace}.{workload}.{expiry}");
    let sig = mac(key, &body).finalize().into_bytes();
    format!("{body}.{}", hex::encode(sig))
}

/// Verifies a token's signature and expiry.
///
/// # Errors
/// [`TokenError`] saying what is wrong with it.
pub fn verify(key: &[u8], token: &str) -> Result<TokenSubject, TokenError> {
    let (body, sig) = token.trim().rsplit_once('.').ok_or(TokenError::Malformed)?;
    let parts: Vec<&str> = body.split('.').collect();
    let [PREFIX, namespace, workload, expiry] = parts.as_slice() else {
        return Err(TokenError::Malformed);
    };
    let sig = hex::decode(sig).map_err(|_| TokenError::Malformed)?;
    // Constant-time comparison (hmac's verify_slice).
    mac(key, body)
        .verify_slice(&sig)
        .map_err(|_| TokenError::BadSignature)?;
    let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
    if unix(SystemTime::now()) >= expiry {
        return Err(TokenError::Expired(expiry));
    }
    Ok(TokenSubject {
        namespace: (*namespace).to_string(),
        workload: (*workload).to_string(),
    })
}

fn mac(key: &[u8], body: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body.as_bytes());
    mac
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_one_workload_and_resists_tampering() {
        let key = b"0123456789abcdef0123456789abcdef";
        let token = mint(key, "default", "web-1", Duration::from_secs(60));
        assert_eq!(
            verify(key, &token),
            Ok(TokenSubject {
                namespace: "default".into(),
                workload: "web-1".into()
            })
        );
        let forged = token.replace(".web-1.", ".db-1.");
        assert_eq!(verify(key, &forged), Err(TokenError::BadSignature));
        assert_eq!(verify(b"another key 0123456789", &token), Err(TokenError::BadSignature));
        assert_eq!(verify(key, "hello"), Err(TokenError::Malformed));
        let expired = mint(key, "default", "web-1", Duration::ZERO);
        assert!(matches!(verify(key, &expired), Err(TokenError::Expired(_))));
    }
}
