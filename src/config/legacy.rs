//! The variables of the `flagsmith/sse` images this service replaces, each read verbatim
//! into one key.

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::LEGACY_REDIS_LISTEN;

/// The variables of the replaced `flagsmith/sse` images that the service reads, besides its
/// own `FLAGSMITH_SSE_*`.
pub fn legacy_variables() -> impl Iterator<Item = &'static str> {
    VerbatimVariable::LEGACY
        .into_iter()
        .map(VerbatimVariable::name)
}

/// An environment variable read verbatim into one key: the variables of the replaced
/// `flagsmith/sse` images, and our own token variable. Each is its own provider so that
/// errors name the exact variable.
#[derive(Debug, Clone, Copy)]
pub(super) enum VerbatimVariable {
    AuthenticationToken,
    OwnRedisPassword,
    NatsUrl,
    ListenAddr,
    LegacyAuthenticationToken,
    MaxStreamAge,
    StreamDelay,
    RedisHost,
    RedisPort,
    RedisUsername,
    RedisPassword,
    RedisUseSsl,
    UseClusterMode,
    RedisScanCount,
    CacheUpdateIntervalSeconds,
}

impl VerbatimVariable {
    /// The replaced images' variables; they override everything else.
    pub(super) const LEGACY: [VerbatimVariable; 13] = [
        Self::NatsUrl,
        Self::ListenAddr,
        Self::LegacyAuthenticationToken,
        Self::MaxStreamAge,
        Self::StreamDelay,
        Self::RedisHost,
        Self::RedisPort,
        Self::RedisUsername,
        Self::RedisPassword,
        Self::RedisUseSsl,
        Self::UseClusterMode,
        Self::RedisScanCount,
        Self::CacheUpdateIntervalSeconds,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::AuthenticationToken => "FLAGSMITH_SSE_AUTHENTICATION_TOKEN",
            Self::OwnRedisPassword => "FLAGSMITH_SSE_REDIS__PASSWORD",
            Self::NatsUrl => "NATS_URL",
            Self::ListenAddr => "LISTEN_ADDR",
            Self::LegacyAuthenticationToken => "SSE_AUTHENTICATION_TOKEN",
            Self::MaxStreamAge => "MAX_STREAM_AGE",
            Self::StreamDelay => "STREAM_DELAY",
            Self::RedisHost => "REDIS_HOST",
            Self::RedisPort => "REDIS_PORT",
            Self::RedisUsername => "REDIS_USERNAME",
            Self::RedisPassword => "REDIS_PASSWORD",
            Self::RedisUseSsl => "REDIS_USE_SSL",
            Self::UseClusterMode => "USE_CLUSTER_MODE",
            Self::RedisScanCount => "REDIS_SCAN_COUNT",
            Self::CacheUpdateIntervalSeconds => "CACHE_UPDATE_INTERVAL_SECONDS",
        }
    }
}

impl Provider for VerbatimVariable {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable `{}`", self.name()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let Ok(value) = std::env::var(self.name()) else {
            return Ok(Map::new());
        };
        let mut dict = Dict::new();
        let redis = |key: &str, value: Value| {
            let mut redis = Dict::new();
            redis.insert(key.into(), value);
            ("redis".to_owned(), Value::from(redis))
        };
        match self {
            Self::NatsUrl => {
                // As in the replaced image, naming a NATS server is what selects NATS.
                dict.insert("backend".into(), Value::from("nats"));
                let mut nats = Dict::new();
                nats.insert("url".into(), Value::from(value));
                dict.insert("nats".into(), Value::from(nats));
            }
            Self::ListenAddr => {
                dict.insert("listen".into(), Value::from(value));
            }
            Self::AuthenticationToken | Self::LegacyAuthenticationToken => {
                dict.insert("authentication_token".into(), Value::from(value));
            }
            Self::MaxStreamAge => {
                let age = match value.trim().parse::<f64>() {
                    Ok(age) if age < 0.0 => Value::from(0.0),
                    Ok(age) => Value::from(age),
                    // Left as text, the type check reports it with this variable's name.
                    Err(_) => Value::from(value),
                };
                dict.insert("max_stream_age".into(), age);
            }
            // Pushing needs no polling delay; accepted so existing deployments start unchanged.
            Self::StreamDelay => {}
            Self::RedisHost => {
                if std::env::var_os(Self::NatsUrl.name()).is_some() {
                    return Err(figment::Error::from(
                        "NATS_URL and REDIS_HOST are both set, and each selects its backend; \
                         unset one of them"
                            .to_owned(),
                    ));
                }
                // As in the Redis-based image, naming a Redis server is what selects Redis.
                dict.insert("backend".into(), Value::from("redis"));
                dict.extend([redis("host", Value::from(value))]);
            }
            Self::RedisUsername => dict.extend([redis("username", Value::from(value))]),
            Self::RedisPassword | Self::OwnRedisPassword => {
                dict.extend([redis("password", Value::from(value))]);
            }
            Self::RedisPort => dict.extend([redis("port", number(value))]),
            Self::RedisScanCount => dict.extend([redis("scan_count", number(value))]),
            Self::CacheUpdateIntervalSeconds => {
                dict.extend([redis("resync_interval", number(value))]);
            }
            Self::RedisUseSsl => dict.extend([redis("tls", boolean(value))]),
            Self::UseClusterMode => dict.extend([redis("cluster", boolean(value))]),
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// A number as the variable holds it; anything else stays text, which the type check reports
/// with the variable's name.
fn number(text: String) -> Value {
    let trimmed = text.trim();
    if let Ok(integer) = trimmed.parse::<u64>() {
        Value::from(integer)
    } else if let Ok(float) = trimmed.parse::<f64>() {
        Value::from(float)
    } else {
        Value::from(text)
    }
}

/// A boolean the way the Python images read theirs (`True`, `false`, `1`, ...); anything else
/// stays text, which the type check reports with the variable's name.
fn boolean(text: String) -> Value {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Value::from(true),
        "false" | "0" | "no" | "off" | "" => Value::from(false),
        _ => Value::from(text),
    }
}

/// The Redis-based image listened on port 8000, and the Flagsmith API and SDKs of its
/// deployments point there: when `REDIS_HOST` stands in for that image, 8000 is the default
/// listen port. Merged just above the built-in defaults, so any configured `listen` wins.
pub(super) struct RedisImageDefaults;

impl Provider for RedisImageDefaults {
    fn metadata(&self) -> Metadata {
        Metadata::named("the Redis-based image's defaults (REDIS_HOST is set)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        if std::env::var_os(VerbatimVariable::RedisHost.name()).is_none() {
            return Ok(Map::new());
        }
        let mut dict = Dict::new();
        dict.insert("listen".into(), Value::from(LEGACY_REDIS_LISTEN));
        Ok(Profile::Default.collect(dict))
    }
}
