//! The access tokens the org has issued: issue, register, check, count, expire. It knows
//! nothing of how a client logged in (OAuth is the REST side's) and nothing of records.

use super::Org;

/// An issued access token.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub expires_ms: Option<i64>,
}

impl Org {
    pub fn issue_token(&self, ttl_ms: Option<i64>) -> String {
        let token = format!("{}!{}", &self.org_id[..15], uuid::Uuid::new_v4().simple());
        self.register_token(&token, ttl_ms);
        token
    }

    pub fn register_token(&self, token: &str, ttl_ms: Option<i64>) {
        let expires_ms = ttl_ms.map(|t| self.now_ms() + t);
        if let Ok(mut t) = self.tokens.write() {
            t.insert(token.to_string(), TokenInfo { expires_ms });
        }
    }

    pub fn token_valid(&self, token: &str) -> bool {
        let now = self.now_ms();
        self.tokens
            .read()
            .ok()
            .and_then(|t| t.get(token).cloned())
            .is_some_and(|info| info.expires_ms.is_none_or(|e| e > now))
    }

    /// Tokens issued (or registered) since the last expiry: logins, for tests to count.
    pub fn token_count(&self) -> usize {
        self.tokens.read().map(|t| t.len()).unwrap_or(0)
    }

    /// Makes one token invalid (OAuth revoke); whether it was a token the org knew.
    pub fn revoke_token(&self, token: &str) -> bool {
        self.tokens
            .write()
            .map(|mut t| t.remove(token).is_some())
            .unwrap_or(false)
    }

    /// Makes every issued token invalid (the control API's "expire tokens").
    pub fn expire_tokens(&self) {
        if let Ok(mut t) = self.tokens.write() {
            t.clear();
        }
    }
}
