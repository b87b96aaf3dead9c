//! Access: tokens with roles and device scopes, checked on every API, SSE and WebSocket
//! request. API clients send `Authorization: Bearer`; browsers exchange the token once for
//! an HttpOnly session cookie (signed, so it survives daemon restarts) that EventSource
//! and WebSocket then carry, so no long-lived token ever sits in a URL.

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::config::{Role, TokenConfig};

/// Name of the session cookie.
pub const COOKIE: &str = "tb_session";
/// How long a browser session lasts.
pub const SESSION_MS: i64 = 12 * 3600 * 1000;

/// Who is asking, and what they may see and do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name (`anonymous` when auth is off).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Device globs; `None` is every device.
    pub devices: Option<Arc<Vec<String>>>,
}

impl Principal {
    /// The principal when no tokens are configured: full access (loopback only by default).
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            role: Role::Operator,
            devices: None,
        }
    }

    /// Whether this principal may see `device`.
    pub fn sees(&self, device: &str) -> bool {
        self.devices
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| glob_match(g, device)))
    }

    /// Whether this principal may send commands.
    pub fn may_command(&self) -> bool {
        self.role == Role::Operator
    }
}

/// SHA-256 of a token, hex: what `[[auth.tokens]] hash` holds.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token and its hash.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("tb_{}", hex::encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

/// The configured tokens, ready for lookups.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Arc<Vec<TokenConfig>>,
    key: Arc<[u8]>,
}

type HmacSha256 = Hmac<Sha256>;

impl Auth {
    /// Tokens from the config; `key` signs session cookies.
    pub fn new(tokens: Vec<TokenConfig>, key: Vec<u8>) -> Auth {
        Auth {
            tokens: Arc::new(tokens),
            key: Arc::from(key),
        }
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn principal_of(t: &TokenConfig) -> Principal {
        let all = t.devices.iter().any(|g| g == "*");
        Principal {
            name: t.name.clone(),
            role: t.role,
            devices: (!all).then(|| Arc::new(t.devices.clone())),
        }
    }

    /// The principal of a bearer token.
    pub fn by_token(&self, token: &str) -> Option<Principal> {
        let hash = hash_token(token);
        self.tokens
            .iter()
            .find(|t| {
                constant_time_eq(
                    t.hash.expose().to_ascii_lowercase().as_bytes(),
                    hash.as_bytes(),
                )
            })
            .map(Self::principal_of)
    }

    /// A signed session cookie value for `p`, valid until `expires` (Unix ms).
    pub fn session_for(&self, p: &Principal, expires: i64) -> String {
        let body = format!("{}.{}", hex::encode(p.name.as_bytes()), expires);
        format!("{body}.{}", hex::encode(self.sign(&body)))
    }

    /// The principal of a session cookie, if it is genuine, unexpired and its token still exists.
    pub fn by_session(&self, value: &str, now: i64) -> Option<Principal> {
        let (body, sig) = value.rsplit_once('.')?;
        let sig = hex::decode(sig).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).ok()?;
        let (name_hex, expires) = body.split_once('.')?;
        if expires.parse::<i64>().ok()? < now {
            return None;
        }
        let name = String::from_utf8(hex::decode(name_hex).ok()?).ok()?;
        self.tokens
            .iter()
            .find(|t| t.name == name)
            .map(Self::principal_of)
    }

    fn sign(&self, body: &str) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `*` matches any run of characters, `?` one character; everything else literally.
pub fn glob_match(glob: &str, s: &str) -> bool {
    let (g, s): (Vec<char>, Vec<char>) = (glob.chars().collect(), s.chars().collect());
    let (mut gi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == s[si]) {
            gi += 1;
            si += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = si;
            gi += 1;
        } else if let Some(st) = star {
            gi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == '*' {
        gi += 1;
    }
    gi == g.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn auth() -> (Auth, String) {
        let (token, hash) = new_token();
        let t: TokenConfig = toml::from_str(&format!(
            "name = \"ops\"\nrole = \"viewer\"\nhash = \"{hash}\"\ndevices = [\"sensor-*\"]"
        ))
        .unwrap();
        let _ = Secret::default();
        (Auth::new(vec![t], vec![7; 32]), token)
    }

    #[test]
    fn globs_match() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("sensor-*", "sensor-1"));
        assert!(!glob_match("sensor-*", "pump-1"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*-1*", "x-12"));
        assert!(!glob_match("a", "ab"));
    }

    #[test]
    fn tokens_and_sessions_identify_their_holder() {
        let (auth, token) = auth();
        let p = auth.by_token(&token).unwrap();
        assert_eq!(p.name, "ops");
        assert!(p.sees("sensor-9") && !p.sees("pump-1") && !p.may_command());
        assert!(auth.by_token("tb_wrong").is_none());
        let cookie = auth.session_for(&p, 1_000);
        assert_eq!(auth.by_session(&cookie, 999), Some(p));
        assert!(auth.by_session(&cookie, 1_001).is_none(), "expired");
        let forged = cookie.replacen("1000", "9999", 1);
        assert!(auth.by_session(&forged, 999).is_none(), "tampered");
    }
}
