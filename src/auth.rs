//! The publish token: loaded from the configuration or a file, re-read on SIGHUP, and compared
//! in constant time; and the throttle that keeps a peer from guessing it at line rate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use slog::Logger;
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::secret;

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
    /// For warnings about the token file's permissions, each time it is read.
    log: Logger,
}

impl Authenticator {
    pub fn from_config(config: &Config, log: &Logger) -> Result<Self, AuthError> {
        let (token, file) = match &config.authentication_token_file {
            Some(path) => (read_token(path, log)?, Some(path.clone())),
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
            log: log.clone(),
        })
    }

    /// Re-reads the token file, if the token came from one. On error the old token stays.
    /// Returns whether the token changed.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let fresh = digest(&read_token(path, &self.log)?);
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

/// Failed authentications a peer may have within [`THROTTLE_WINDOW`].
pub const MAX_FAILURES: u32 = 20;
/// How long failures count against a peer, from its first.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked at once, so memory stays bounded whatever the number of addresses an attacker
/// has. Beyond, new peers are not tracked: sharing one allowance instead would let such an
/// attacker lock out the legitimate publisher, which never fails and so is never tracked.
const MAX_PEERS: usize = 65_536;

/// Failed authentications per peer. A peer that failed [`MAX_FAILURES`] times within
/// [`THROTTLE_WINDOW`] is refused without a check until the window ends: refusing only wrong
/// tokens would still let it guess at line rate, and learn the answer from the status.
#[derive(Debug, Default)]
pub struct Throttle {
    peers: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

impl Throttle {
    /// `Err(wait)` while `peer` may not try: `wait` is how long until it may.
    pub fn check(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(&Self::key(peer)) {
            Some(failures)
                if failures.count >= MAX_FAILURES && now < failures.since + THROTTLE_WINDOW =>
            {
                Err(failures.since + THROTTLE_WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication of `peer`.
    pub fn failed(&self, peer: IpAddr, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let key = Self::key(peer);
        if peers.len() >= MAX_PEERS && !peers.contains_key(&key) {
            peers.retain(|_, failures| now < failures.since + THROTTLE_WINDOW);
            if peers.len() >= MAX_PEERS {
                return;
            }
        }
        let failures = peers.entry(key).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now >= failures.since + THROTTLE_WINDOW {
            *failures = Failures {
                count: 0,
                since: now,
            };
        }
        failures.count = failures.count.saturating_add(1);
    }

    /// The entry `peer` counts in: its address, or an IPv6 peer's /64, which one host can fill
    /// with addresses.
    fn key(peer: IpAddr) -> IpAddr {
        match peer {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut segments = v6.segments();
                    segments[4..].fill(0);
                    IpAddr::V6(Ipv6Addr::from(segments))
                }
            },
            v4 => v4,
        }
    }
}

fn read_token(path: &Path, log: &Logger) -> Result<String, AuthError> {
    let text = secret::read(path, "token", log).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Spaces around the token are never part of it: `verify` trims them from the header.
    let token = text.trim();
    if token.is_empty() {
        return Err(AuthError::Empty(path.to_path_buf()));
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
        Authenticator::from_config(&config, &slog::Logger::root(slog::Discard, slog::o!())).unwrap()
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
    fn a_peer_is_refused_after_its_failures_until_the_window_ends() {
        let throttle = Throttle::default();
        let start = Instant::now();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert_eq!(throttle.check(peer, start), Ok(()));
            throttle.failed(peer, start);
        }
        let later = start + Duration::from_secs(10);
        assert_eq!(
            throttle.check(peer, later),
            Err(THROTTLE_WINDOW - Duration::from_secs(10))
        );
        // Others are not held up, the same address mapped into IPv6 is.
        assert_eq!(throttle.check("192.0.2.2".parse().unwrap(), later), Ok(()));
        assert!(
            throttle
                .check("::ffff:192.0.2.1".parse().unwrap(), later)
                .is_err()
        );
        assert_eq!(throttle.check(peer, start + THROTTLE_WINDOW), Ok(()));
        // A new window starts with the next failure.
        throttle.failed(peer, start + THROTTLE_WINDOW);
        assert_eq!(throttle.check(peer, start + THROTTLE_WINDOW), Ok(()));
    }

    #[test]
    fn a_full_table_tracks_no_new_peers_and_keeps_its_own() {
        let throttle = Throttle::default();
        let now = Instant::now();
        let tracked: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            throttle.failed(tracked, now);
        }
        for n in 0..MAX_PEERS - 1 {
            let octets = (n as u32 + 1).to_be_bytes();
            throttle.failed(IpAddr::from([10, octets[1], octets[2], octets[3]]), now);
        }
        let newcomer: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            throttle.failed(newcomer, now);
        }
        assert_eq!(throttle.check(newcomer, now), Ok(()));
        throttle.failed(tracked, now);
        assert!(throttle.check(tracked, now).is_err());
        // Once the window is over, expired entries make room again.
        let later = now + THROTTLE_WINDOW;
        for _ in 0..MAX_FAILURES {
            throttle.failed(newcomer, later);
        }
        assert!(throttle.check(newcomer, later).is_err());
    }

    #[test]
    fn an_ipv6_peer_counts_as_its_slash_64() {
        let throttle = Throttle::default();
        let now = Instant::now();
        for n in 0..MAX_FAILURES {
            throttle.failed(format!("2001:db8::{n:x}").parse().unwrap(), now);
        }
        assert!(
            throttle
                .check("2001:db8::ffff:1".parse().unwrap(), now)
                .is_err()
        );
        assert_eq!(
            throttle.check("2001:db8:0:1::1".parse().unwrap(), now),
            Ok(())
        );
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
        let auth =
            Authenticator::from_config(&config, &slog::Logger::root(slog::Discard, slog::o!()))
                .unwrap();
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
