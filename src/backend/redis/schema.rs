//! What this deployment keeps in Redis and sends on its channel: the keys, the script that
//! writes them, and the announcements.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::{EnvironmentKey, Update, UpdatedAt};

/// Stores an update if it is newer than the stored one, and announces it.
///
/// KEYS: the hash of `updated_at`s, the sorted set of stored-at times.
/// ARGV: environment key, `updated_at`, retention in ms, channel, `PUBLISH` or `SPUBLISH`.
/// Returns 1 if stored, 0 if the stored update is as new or newer.
///
/// Redis's clock stamps the update, so every instance ages it alike. Before Redis 7 a script
/// that reads the clock may only write if it replicates its effects, hence
/// `replicate_commands` (a no-op since 7). Timestamps are compared as numbers: each is the
/// shortest decimal that round-trips its f64, and Lua's numbers are the same doubles.
pub const STORE_SCRIPT: &str = r"
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[3])), 'LIMIT', 0, 1000)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[1], unpack(expired))
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[5], ARGV[4], 'u ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.format('%d', now))
return 1
";

/// The names this deployment uses in Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    /// Hash: environment key → newest `updated_at`.
    pub updated_at: String,
    /// Sorted set: environment key → when it was stored (ms since the epoch).
    pub stored_at: String,
    /// Where stored updates are announced.
    pub channel: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        // The hash tag puts all three in one slot: one node of a cluster owns them, and the
        // store script may touch both keys and publish on the shard channel.
        Self {
            updated_at: format!("{{{namespace}}}:updated-at"),
            stored_at: format!("{{{namespace}}}:stored-at"),
            channel: format!("{{{namespace}}}:updates"),
        }
    }
}

/// What the channel carries.
#[derive(Debug, PartialEq)]
pub(super) enum Announcement {
    /// `u <key> <updated_at> <stored-at ms>`, from [`STORE_SCRIPT`].
    Update(Update, SystemTime),
    /// `p <instance, hex> <nonce>`, an instance checking its subscription.
    Probe { instance: u64, nonce: u64 },
}

impl Announcement {
    pub(super) fn parse(payload: &[u8]) -> Result<Self, &'static str> {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8")?;
        let mut fields = text.split(' ');
        match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some("u"), Some(key), Some(updated_at), Some(stored_ms)) => {
                let stored_ms = stored_ms.parse::<f64>().map_err(|_| "bad stored-at time")?;
                stored_update(key, updated_at, stored_ms)
                    .map(|(update, stored_at)| Self::Update(update, stored_at))
            }
            (Some("p"), Some(instance), Some(nonce), None) => Ok(Self::Probe {
                instance: u64::from_str_radix(instance, 16).map_err(|_| "bad probe")?,
                nonce: nonce.parse().map_err(|_| "bad probe")?,
            }),
            _ => Err("neither an update nor a probe"),
        }
    }
}

pub(super) fn stored_update(
    key: &str,
    updated_at: &str,
    stored_ms: f64,
) -> Result<(Update, SystemTime), &'static str> {
    let key = EnvironmentKey::parse(key).map_err(|_| "bad environment key")?;
    let updated_at = updated_at
        .parse::<f64>()
        .ok()
        .and_then(|seconds| UpdatedAt::from_unix_seconds(seconds).ok())
        .ok_or("bad updated_at")?;
    if !(stored_ms.is_finite() && stored_ms >= 0.0) {
        return Err("bad stored-at time");
    }
    let stored_at = UNIX_EPOCH + Duration::from_millis(stored_ms as u64);
    Ok((Update { key, updated_at }, stored_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_parsed_strictly() {
        let Ok(Announcement::Update(update, stored_at)) =
            Announcement::parse(b"u abc 1735229888.76 1735229889000")
        else {
            panic!("an update")
        };
        assert_eq!(update.key.as_str(), "abc");
        assert_eq!(update.updated_at.to_string(), "1735229888.76");
        assert_eq!(stored_at, UNIX_EPOCH + Duration::from_millis(1735229889000));
        assert_eq!(
            Announcement::parse(b"p ff 7"),
            Ok(Announcement::Probe {
                instance: 255,
                nonce: 7
            })
        );
        for bad in [
            &b"u abc 1.5"[..],
            b"u a.b 1.5 1",
            b"u abc x 1",
            b"u abc 1.5 -1",
            b"p zz 1",
            b"p ff 1 extra",
            b"",
            b"\xff",
        ] {
            assert!(Announcement::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_key_shares_one_hash_tag() {
        let keys = Keys::new("flagsmith-sse");
        assert_eq!(keys.updated_at, "{flagsmith-sse}:updated-at");
        assert_eq!(keys.stored_at, "{flagsmith-sse}:stored-at");
        assert_eq!(keys.channel, "{flagsmith-sse}:updates");
    }
}
