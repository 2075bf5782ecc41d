//! A request's header list, checked as RFC 9113 §8.2 and §8.3 require: a malformed request is
//! refused with a stream error (§8.1.1) and never reaches a route.

use bytes::Bytes;
use http_body_util::Full;

use super::frame::{Error, PROTOCOL_ERROR};
use super::hpack::Decoder;
use crate::domain::EnvironmentKey;
use crate::http::PeerAddr;
use crate::http::stream::key_segment;

/// The largest header list, as RFC 9113 §6.5.2 counts it; a browser's request with cookies
/// is a few KiB. Advertised as SETTINGS_MAX_HEADER_LIST_SIZE.
pub const MAX_HEADER_LIST: usize = 16 * 1024;

/// A request's header list.
#[derive(Debug, Default)]
pub struct Request {
    method: Option<Vec<u8>>,
    scheme: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    headers: http::HeaderMap,
    /// What `content-length` says the body is.
    pub content_length: Option<u64>,
    /// Why the request is malformed, if it is: the first rule it breaks.
    pub malformed: Option<&'static str>,
    /// A regular field came: pseudo-header fields may no longer (RFC 9113 §8.3).
    regular: bool,
    /// The header list's size as RFC 9113 §6.5.2 counts it.
    size: usize,
}

impl Request {
    /// Decodes and checks a request's header block.
    pub fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Self, Error> {
        let mut request = Request::default();
        decoder.decode(block, |name, value| request.field(name, value))?;
        request.finish();
        Ok(request)
    }

    fn refuse(&mut self, why: &'static str) {
        self.malformed.get_or_insert(why);
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST {
            self.refuse("header list too large");
        }
        if self.malformed.is_some() {
            // Decoded to the end for the table's sake, but nothing more is kept.
            return;
        }
        if let Some(why) = invalid_value(value) {
            return self.refuse(why);
        }
        if name.first() == Some(&b':') {
            return self.pseudo(name, value);
        }
        self.regular = true;
        if let Some(why) = invalid_name(name) {
            return self.refuse(why);
        }
        match name {
            // Connection-specific fields (RFC 9113 §8.2.2).
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return self.refuse("connection-specific header field"),
            b"te" if !value.eq_ignore_ascii_case(b"trailers") => {
                return self.refuse("te other than trailers");
            }
            b"content-length" => {
                let length = std::str::from_utf8(value)
                    .ok()
                    .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_digit()))
                    .and_then(|digits| digits.parse().ok());
                match (length, self.content_length) {
                    (None, _) => return self.refuse("invalid content-length"),
                    (Some(length), Some(earlier)) if length != earlier => {
                        return self.refuse("conflicting content-length");
                    }
                    (length, _) => self.content_length = length,
                }
            }
            _ => {}
        }
        match (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            (Ok(name), Ok(value)) => {
                self.headers.append(name, value);
            }
            _ => self.refuse("invalid header field"),
        }
    }

    fn pseudo(&mut self, name: &[u8], value: &[u8]) {
        if self.regular {
            return self.refuse("pseudo-header field after a regular one");
        }
        let slot = match name {
            b":method" => &mut self.method,
            b":scheme" => &mut self.scheme,
            b":path" => &mut self.path,
            b":authority" => &mut self.authority,
            // :status and :protocol (the service does not offer extended CONNECT) included.
            _ => return self.refuse("unknown pseudo-header field"),
        };
        if slot.is_some() {
            return self.refuse("duplicated pseudo-header field");
        }
        *slot = Some(value.to_vec());
    }

    /// The pseudo-header fields a request must have (RFC 9113 §8.3.1).
    fn finish(&mut self) {
        let connect = self.method.as_deref() == Some(b"CONNECT");
        let why = match (&self.method, &self.scheme, &self.path) {
            (None, _, _) => "no :method",
            (Some(_), None, None) if connect && self.authority.is_some() => return,
            _ if connect => "CONNECT with :scheme or :path, or without :authority",
            (_, None, _) => "no :scheme",
            (_, _, None) => "no :path",
            (_, _, Some(path)) if path.is_empty() => "empty :path",
            _ => return,
        };
        self.refuse(why);
    }

    /// The environment of a stream subscription, or `None` for any other request.
    pub fn stream_key(&self) -> Option<EnvironmentKey> {
        if self.method.as_deref() != Some(b"GET") || self.malformed.is_some() {
            return None;
        }
        let path = std::str::from_utf8(self.path.as_deref()?).ok()?;
        EnvironmentKey::from_path_segment(key_segment(path)?).ok()
    }

    /// The request for warp, with `body`; `None` if it is malformed.
    pub fn into_http(self, body: Vec<u8>, peer: PeerAddr) -> Option<http::Request<Full<Bytes>>> {
        if self.malformed.is_some() {
            return None;
        }
        let uri = match (self.scheme, self.authority, self.path) {
            (Some(scheme), Some(authority), Some(path)) => http::Uri::builder()
                .scheme(&scheme[..])
                .authority(authority)
                .path_and_query(path)
                .build(),
            (_, None, Some(path)) => http::Uri::builder().path_and_query(path).build(),
            (None, Some(authority), None) => http::Uri::builder().authority(authority).build(),
            _ => return None,
        };
        let mut request = http::Request::builder()
            .method(&self.method?[..])
            .uri(uri.ok()?)
            .version(http::Version::HTTP_2)
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        *request.headers_mut() = self.headers;
        request.extensions_mut().insert(peer);
        Some(request)
    }
}

/// A trailer section (RFC 9113 §8.1): regular fields only. The service reads no trailers, so
/// they are only checked.
pub fn decode_trailers(decoder: &mut Decoder, block: &[u8]) -> Result<Option<&'static str>, Error> {
    let mut request = Request {
        regular: true,
        ..Request::default()
    };
    decoder.decode(block, |name, value| request.field(name, value))?;
    Ok(request.malformed)
}

/// Why a field name is not one HTTP/2 allows (RFC 9113 §8.2.1), if it is not.
fn invalid_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty field name");
    }
    let forbidden = |byte: &u8| matches!(byte, 0..=0x20 | b'A'..=b'Z' | 0x7f..=0xff);
    name.iter()
        .any(forbidden)
        .then_some("upper case or invalid character in a field name")
}

/// Why a field value is not one HTTP/2 allows (RFC 9113 §8.2.1), if it is not. Control
/// characters other than HTAB, which the RFC leaves to HTTP's field syntax, are refused in
/// every field, pseudo-header fields included, as HTTP/1.1's parser refuses them.
fn invalid_value(value: &[u8]) -> Option<&'static str> {
    let whitespace = |byte: &u8| matches!(byte, b' ' | b'\t');
    let control = |byte: &u8| (*byte < 0x20 && *byte != b'\t') || *byte == 0x7f;
    if value.iter().any(control) {
        Some("control character in a field value")
    } else if value.first().is_some_and(whitespace) || value.last().is_some_and(whitespace) {
        Some("whitespace around a field value")
    } else {
        None
    }
}

/// A stream error for a malformed request.
pub fn malformed(stream: u32) -> Error {
    Error::Stream(stream, PROTOCOL_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block of literal fields without indexing.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    fn why(fields: &[(&str, &str)]) -> Option<&'static str> {
        Request::decode(&mut Decoder::default(), &block(fields))
            .unwrap()
            .malformed
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/sse/environments/key/stream"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        GET.iter().chain(extra).copied().collect()
    }

    #[test]
    fn a_well_formed_request_is_a_stream_subscription() {
        let request =
            Request::decode(&mut Decoder::default(), &block(&with(&[("accept", "*/*")]))).unwrap();
        assert_eq!(request.malformed, None);
        assert_eq!(request.stream_key().unwrap().as_str(), "key");
        let http = request
            .into_http(Vec::new(), PeerAddr(([127, 0, 0, 1], 1).into()))
            .unwrap();
        assert_eq!(
            http.uri(),
            "https://example.com/sse/environments/key/stream"
        );
        assert_eq!(http.headers()["accept"], "*/*");
    }

    #[test]
    fn each_rule_of_rfc_9113_section_8_refuses_a_request() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (with(&[("Accept", "*/*")]), "upper case"),
            (
                with(&[("accept", "*/*"), (":method", "GET")]),
                "after a regular",
            ),
            (with(&[(":method", "GET")]), "duplicated"),
            (with(&[(":path", "/")]), "duplicated"),
            (with(&[(":scheme", "http")]), "duplicated"),
            (with(&[(":status", "200")]), "unknown pseudo"),
            (with(&[("connection", "keep-alive")]), "connection-specific"),
            (
                with(&[("transfer-encoding", "chunked")]),
                "connection-specific",
            ),
            (with(&[("te", "gzip")]), "te other"),
            (with(&[("content-length", "1x")]), "invalid content-length"),
            (
                with(&[("content-length", "1"), ("content-length", "2")]),
                "conflicting",
            ),
            (with(&[("x", " padded")]), "whitespace"),
            (with(&[("x", "a\rb")]), "control character"),
            (
                vec![GET[0], GET[1], GET[2], (":path", "/\x01")],
                "control character",
            ),
            (GET[..3].to_vec(), "no :path"),
            (vec![GET[0], GET[2], GET[3]], "no :scheme"),
            (GET[1..].to_vec(), "no :method"),
            (vec![GET[0], GET[1], GET[2], (":path", "")], "empty :path"),
        ];
        for (fields, expected) in cases {
            let found = why(&fields).unwrap_or_else(|| panic!("{fields:?} was accepted"));
            assert!(found.contains(expected), "{fields:?}: {found}");
        }
        assert_eq!(why(&with(&[("te", "Trailers")])), None);
        assert_eq!(why(&with(&[("content-length", "0")])), None);
    }

    #[test]
    fn a_header_list_beyond_the_limit_is_malformed_and_not_kept() {
        // Values under 127 bytes, whose lengths `block` writes in one byte.
        let long = "a".repeat(100);
        let many: Vec<(&str, &str)> = (0..200).map(|_| ("x-long", long.as_str())).collect();
        let request =
            Request::decode(&mut Decoder::default(), &block(&[&GET[..], &many].concat())).unwrap();
        assert_eq!(request.malformed, Some("header list too large"));
        assert!(request.headers.len() < 200);
    }

    #[test]
    fn trailers_are_regular_fields_only() {
        let mut decoder = Decoder::default();
        assert_eq!(
            decode_trailers(&mut decoder, &block(&[("x-sum", "1")])),
            Ok(None)
        );
        assert!(
            decode_trailers(&mut decoder, &block(&[(":path", "/")]))
                .unwrap()
                .is_some()
        );
    }
}
