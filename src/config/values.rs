//! The value types of the configuration: seconds, listen addresses, secrets.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative, finite number of seconds; integers and fractions are both accepted.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Seconds(pub(super) f64);

impl Seconds {
    pub fn new(seconds: f64) -> Option<Self> {
        (seconds.is_finite() && seconds >= 0.0).then_some(Self(seconds))
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;

        impl serde::de::Visitor<'_> for SecondsVisitor {
            type Value = Seconds;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative number of seconds")
            }

            fn visit_f64<E: serde::de::Error>(self, seconds: f64) -> Result<Seconds, E> {
                Seconds::new(seconds)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(seconds), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<Seconds, E> {
                self.visit_f64(seconds as f64)
            }

            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<Seconds, E> {
                self.visit_f64(seconds as f64)
            }
        }

        deserializer.deserialize_any(SecondsVisitor)
    }
}

/// A listen address: `host:port`, `[v6]:port`, or `:port` for all IPv4 interfaces (the form
/// the replaced image's `LISTEN_ADDR` used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl std::str::FromStr for ListenAddr {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}").parse().map(ListenAddr),
            None => text.parse().map(ListenAddr),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"an address like 0.0.0.0:8088, [::]:8088 or :8088",
            )
        })
    }
}

/// A secret string: never printed, serialized as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Environment values that look like numbers arrive as numbers; a token is still text.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Unsigned(u64),
            Signed(i64),
        }
        Ok(Secret(match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text,
            Raw::Unsigned(number) => number.to_string(),
            Raw::Signed(number) => number.to_string(),
        }))
    }
}
