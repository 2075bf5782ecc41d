//! The checks serde cannot express, run after extraction.

use std::time::Duration;

use figment::{Figment, Source};

use super::{BackendKind, Config, ConfigError, ENV_PREFIX};

impl Config {
    /// Checks what types alone cannot; errors name the key and the layer it came from.
    pub fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
            key,
            source_name: origin(figment, key),
            message: message.to_owned(),
        };
        match (&self.authentication_token, &self.authentication_token_file) {
            (None, None) => {
                return Err(invalid(
                    "authentication_token_file",
                    "an authentication token is required: set authentication_token_file \
                     (or FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE), or SSE_AUTHENTICATION_TOKEN",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "authentication_token_file",
                    &format!(
                        "set either it or authentication_token (set by {}), not both",
                        origin(figment, "authentication_token")
                    ),
                ));
            }
            (Some(token), None) if token.expose().trim().is_empty() => {
                return Err(invalid("authentication_token", "must not be empty"));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.max_stream_age_jitter) {
            return Err(invalid(
                "max_stream_age_jitter",
                "must be a fraction from 0 up to (not including) 1",
            ));
        }
        if self.keepalive_interval.is_zero() {
            return Err(invalid("keepalive_interval", "must be more than 0 seconds"));
        }
        if self.write_timeout.is_zero() {
            return Err(invalid("write_timeout", "must be more than 0 seconds"));
        }
        if self.retention.is_zero() {
            return Err(invalid("retention", "must be more than 0 seconds"));
        }
        if self.publish_timeout.is_zero()
            || self.publish_timeout.duration() >= Duration::from_secs(2)
        {
            return Err(invalid(
                "publish_timeout",
                "must be more than 0 and less than 2 seconds, Flagsmith's request timeout",
            ));
        }
        if self.max_streams == 0 {
            return Err(invalid("max_streams", "must be at least 1"));
        }
        match &self.publish_listen {
            Some(publish) if publish.0 == self.listen.0 => {
                return Err(invalid(
                    "publish_listen",
                    &format!(
                        "{} is also `listen` (from {}); use another address, or unset \
                         publish_listen to publish on the public listener",
                        publish.0,
                        origin(figment, "listen")
                    ),
                ));
            }
            None if self.publish_tls.is_some() => {
                return Err(invalid(
                    "publish_tls",
                    "is set but publish_listen is not; set publish_listen, or use `tls` for \
                     the public listener",
                ));
            }
            _ => {}
        }
        if self.http2.max_concurrent_streams == 0 {
            return Err(invalid(
                "http2.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.http2.keepalive_interval.is_zero() {
            return Err(invalid(
                "http2.keepalive_interval",
                "must be more than 0 seconds",
            ));
        }
        if self.http2.keepalive_timeout.is_zero() {
            return Err(invalid(
                "http2.keepalive_timeout",
                "must be more than 0 seconds",
            ));
        }
        if self.shutdown.timeout < self.shutdown.drain_period {
            return Err(invalid(
                "shutdown.timeout",
                &format!(
                    "{} s must be at least shutdown.drain_period, {} s from {}",
                    self.shutdown.timeout.0,
                    self.shutdown.drain_period.0,
                    origin(figment, "shutdown.drain_period")
                ),
            ));
        }
        if self.backend == BackendKind::Nats {
            if self.nats.url.trim().is_empty() {
                return Err(invalid("nats.url", "must not be empty"));
            }
            if self.nats.stream.is_empty()
                || self
                    .nats
                    .stream
                    .chars()
                    .any(|c| !c.is_ascii_graphic() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    "nats.stream",
                    "must be a JetStream stream name (no spaces, '.', '*', '>', '/')",
                ));
            }
            if !(1..=5).contains(&self.nats.replicas) {
                return Err(invalid("nats.replicas", "must be from 1 to 5"));
            }
        }
        if self.backend == BackendKind::Redis {
            self.validate_redis(figment)?;
        }
        Ok(())
    }

    fn validate_redis(&self, figment: &Figment) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
            key,
            source_name: origin(figment, key),
            message: message.to_owned(),
        };
        let redis = &self.redis;
        if redis.host.trim().is_empty() {
            return Err(invalid("redis.host", "must not be empty"));
        }
        if redis.port == 0 {
            return Err(invalid("redis.port", "must be from 1 to 65535"));
        }
        if redis.password.is_some() && redis.password_file.is_some() {
            return Err(invalid(
                "redis.password_file",
                &format!(
                    "set either it or redis.password (set by {}), not both",
                    origin(figment, "redis.password")
                ),
            ));
        }
        if redis.tls_ca_file.is_some() && !redis.tls {
            return Err(invalid(
                "redis.tls_ca_file",
                "is set but redis.tls is not; set redis.tls (REDIS_USE_SSL) to connect with TLS",
            ));
        }
        if redis.scan_count == 0 {
            return Err(invalid("redis.scan_count", "must be at least 1"));
        }
        if redis.resync_interval.is_zero() {
            return Err(invalid(
                "redis.resync_interval",
                "must be more than 0 seconds",
            ));
        }
        if redis.namespace.is_empty()
            || redis
                .namespace
                .chars()
                .any(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}'))
        {
            return Err(invalid(
                "redis.namespace",
                "must be printable ASCII without spaces, '{' or '}'",
            ));
        }
        Ok(())
    }
}

/// Where `key`'s value came from, for error messages: the file, the exact environment
/// variable, or the built-in defaults.
fn origin(figment: &Figment, key: &str) -> String {
    let Some(metadata) = figment.find_metadata(key) else {
        return "built-in defaults".to_owned();
    };
    match &metadata.source {
        Some(Source::File(path)) => format!("{} {}", metadata.name, path.display()),
        Some(Source::Code(_)) => "built-in defaults".to_owned(),
        _ if metadata.name.contains(ENV_PREFIX) => format!(
            "environment variable `{ENV_PREFIX}{}`",
            key.replace('.', "__").to_ascii_uppercase()
        ),
        _ => metadata.name.to_string(),
    }
}
