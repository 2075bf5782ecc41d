//! The publish token: loaded from the configuration or a file, re-read on SIGHUP, and compared
//! in constant time.

use std::path::PathBuf;
use std::sync::RwLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read authentication token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("authentication token file {0} is empty")]
    Empty(PathBuf),
}

/// Checks `Authorization: Token <token>` headers against the current token.
#[derive(Debug)]
pub struct Authenticator {
    /// Only the digest is kept: comparing fixed-size digests takes the same time whatever the
    /// candidate's length or content, and the token itself never sits in memory we may log.
    digest: RwLock<[u8; 32]>,
    file: Option<PathBuf>,
}

impl Authenticator {
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let (token, file) = match &config.authentication_token_file {
            Some(path) => (read_token(path)?, Some(path.clone())),
            // Config validation guarantees one of the two is set.
            None => (
                config
                    .authentication_token
                    .as_ref()
                    .map(|secret| secret.expose().trim().to_owned())
                    .unwrap_or_default(),
                None,
            ),
        };
        Ok(Self {
            digest: RwLock::new(digest(&token)),
            file,
        })
    }

    /// Re-reads the token file, if the token came from one. On error the old token stays.
    /// Returns whether the token changed.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let fresh = digest(&read_token(path)?);
        let mut current = self.digest.write().unwrap_or_else(|p| p.into_inner());
        let changed = *current != fresh;
        *current = fresh;
        Ok(changed)
    }

    /// Whether `header` (the `Authorization` value) is `Token <the token>`.
    pub fn verify(&self, header: Option<&[u8]>) -> bool {
        let candidate = header
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| value.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("token"))
            .map(|(_, token)| token.trim())
            .unwrap_or("");
        let candidate = digest(candidate);
        let current = *self.digest.read().unwrap_or_else(|p| p.into_inner());
        // An empty token is never configured, so an empty candidate can never match.
        bool::from(candidate.ct_eq(&current))
    }
}

fn read_token(path: &PathBuf) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AuthError::Empty(path.clone()));
    }
    Ok(token.to_owned())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn with_token(token: &str) -> Authenticator {
        let config = Config {
            authentication_token: Some(Secret::new(token.to_owned())),
            ..Config::default()
        };
        Authenticator::from_config(&config).unwrap()
    }

    #[test]
    fn accepts_only_the_token_scheme_and_value() {
        let auth = with_token("s3cret");
        assert!(auth.verify(Some(b"Token s3cret")));
        assert!(auth.verify(Some(b"token  s3cret ")));
        assert!(!auth.verify(Some(b"Bearer s3cret")));
        assert!(!auth.verify(Some(b"Token s3cre")));
        assert!(!auth.verify(Some(b"Token s3cret2")));
        assert!(!auth.verify(Some(b"s3cret")));
        assert!(!auth.verify(Some(b"Token ")));
        assert!(!auth.verify(Some(b"Token \xff")));
        assert!(!auth.verify(None));
    }

    #[test]
    fn reload_rotates_and_keeps_the_old_token_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let config = Config {
            authentication_token_file: Some(path.clone()),
            ..Config::default()
        };
        let auth = Authenticator::from_config(&config).unwrap();
        assert!(auth.verify(Some(b"Token first")));
        std::fs::write(&path, "second").unwrap();
        assert!(auth.reload().unwrap());
        assert!(!auth.verify(Some(b"Token first")));
        assert!(auth.verify(Some(b"Token second")));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(auth.reload(), Err(AuthError::Empty(_))));
        assert!(auth.verify(Some(b"Token second")));
    }
}
