//! A connection's request header blocks through the service's HPACK decoder and request checks
//! (`src/http/h2/hpack.rs`, `src/http/h2/request.rs`), differentially: the same blocks go
//! through a second decoder, and an oracle written from RFC 9113 §8.2 and §8.3 alone judges
//! each decoded header list.
//!
//! Checked, beyond "no panic":
//! - the service refuses a block exactly when the decoder cannot decode it, and a dynamic
//!   table size update beyond 4,096 bytes is never accepted (RFC 7541 §6.3);
//! - the service calls a request malformed exactly when the oracle does.
//!
//! An input that starts with 0 is raw blocks, each after its length in two bytes (the seeds in
//! fuzz/seeds/hpack are such, as clients encode requests); any other is raw blocks or header
//! lists built from fields
//! requests carry (pseudo-headers, the connection-specific ones, `te`, `content-length`,
//! upper case, whitespace) and encoded as literals, indexed or not, so that the checks, not
//! only the decoder, are reached.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use flagsmith_sse::fuzzing::{H2Block, h2_requests};
use flagsmith_sse_fuzz::{hpack_integer, hpack_literal};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    ":method",
    ":scheme",
    ":path",
    ":authority",
    ":status",
    ":protocol",
    "host",
    "accept",
    "Accept",
    "te",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "cookie",
    "x(y)",
    "",
    "x y",
];
const VALUES: &[&str] = &[
    "GET",
    "POST",
    "CONNECT",
    "OPTIONS",
    "http",
    "https",
    "/",
    "",
    "*",
    "/sse/environments/key/stream",
    "localhost",
    "trailers",
    "gzip",
    "0",
    "12",
    "1x",
    " a",
    "a ",
    "a\tb",
    "a\rb",
    "a\0b",
    "text/event-stream",
    "\x7f",
];

/// A field: a name and a value from the lists above (or the value given), as a literal with
/// incremental indexing or without.
type Field = (u8, u8, bool, Option<Vec<u8>>);

#[derive(Debug, Arbitrary)]
enum Input {
    Raw(Vec<Vec<u8>>),
    Lists(Vec<Vec<Field>>),
    /// A size update, then a list.
    Resized(u32, Vec<Field>),
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for (name, value, indexed, raw) in fields {
        let name = NAMES[usize::from(*name) % NAMES.len()].as_bytes();
        let value = match raw {
            Some(raw) => &raw[..],
            None => VALUES[usize::from(*value) % VALUES.len()].as_bytes(),
        };
        hpack_literal(name, value, *indexed, out);
    }
}

/// RFC 9113 §8.2 and §8.3 on a decoded header list, as the service applies them (it also
/// refuses what the `http` crate cannot represent: control characters other than HTAB in a
/// value, names that are not tokens), with the list bounded at 16 KiB.
fn malformed(fields: &[(Vec<u8>, Vec<u8>)]) -> bool {
    let size: usize = fields
        .iter()
        .map(|(name, value)| name.len() + value.len() + 32)
        .sum();
    if size > 16 * 1024 {
        return true;
    }
    let mut pseudo: Vec<&[u8]> = Vec::new();
    let mut values: Vec<(&[u8], &[u8])> = Vec::new();
    let mut regular = false;
    let mut length: Option<&[u8]> = None;
    for (name, value) in fields {
        let whitespace = |byte: Option<&u8>| matches!(byte, Some(b' ' | b'\t'));
        if value
            .iter()
            .any(|&byte| (byte < 0x20 && byte != b'\t') || byte == 0x7f)
            || whitespace(value.first())
            || whitespace(value.last())
        {
            return true;
        }
        if let Some(rest) = name.strip_prefix(b":") {
            if regular || pseudo.contains(&&name[..]) {
                return true;
            }
            if !matches!(rest, b"method" | b"scheme" | b"path" | b"authority") {
                return true;
            }
            pseudo.push(name);
            values.push((name, value));
            continue;
        }
        regular = true;
        let token = |byte: &u8| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(byte)
        };
        if name.is_empty() || !name.iter().all(token) {
            return true;
        }
        match &name[..] {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return true,
            b"te" if !value.eq_ignore_ascii_case(b"trailers") => return true,
            b"content-length" => {
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    return true;
                }
                // A value too large for u64 is no length.
                if std::str::from_utf8(value).unwrap().parse::<u64>().is_err() {
                    return true;
                }
                let as_number =
                    |text: &[u8]| std::str::from_utf8(text).unwrap().parse::<u64>().ok();
                if length.is_some_and(|earlier| as_number(earlier) != as_number(value)) {
                    return true;
                }
                length = Some(value);
            }
            _ => {}
        }
    }
    let get = |name: &[u8]| {
        values
            .iter()
            .find(|(found, _)| *found == name)
            .map(|(_, value)| *value)
    };
    match (
        get(b":method"),
        get(b":scheme"),
        get(b":path"),
        get(b":authority"),
    ) {
        (None, ..) => true,
        (Some(b"CONNECT"), None, None, Some(_)) => false,
        (Some(b"CONNECT"), ..) => true,
        (_, None, _, _) | (_, _, None, _) => true,
        (_, _, Some(path), _) => path.is_empty(),
    }
}

/// Blocks, each after its length in two bytes.
fn raw_blocks(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut blocks = Vec::new();
    while let Some((length, rest)) = data.split_first_chunk::<2>() {
        let length = usize::from(u16::from_be_bytes(*length)).min(rest.len());
        blocks.push(rest[..length].to_vec());
        data = &rest[length..];
    }
    blocks
}

fuzz_target!(|data: &[u8]| {
    let mut blocks = Vec::new();
    let input = match data.split_first() {
        Some((0, rest)) => Input::Raw(raw_blocks(rest)),
        _ => match Input::arbitrary(&mut Unstructured::new(data)) {
            Ok(input) => input,
            Err(_) => return,
        },
    };
    match input {
        Input::Raw(raw) => blocks = raw,
        Input::Lists(lists) => {
            for list in lists {
                let mut block = Vec::new();
                encode(&list, &mut block);
                blocks.push(block);
            }
        }
        Input::Resized(size, list) => {
            let mut block = Vec::new();
            hpack_integer(0x20, 5, size as usize, &mut block);
            encode(&list, &mut block);
            blocks.push(block);
        }
    }
    let borrowed: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let found = h2_requests(&borrowed);
    // The oracle's decoder, told of the same table bound.
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(4096);
    for (block, verdict) in blocks.iter().zip(&found) {
        let mut fields = Vec::new();
        let decoded = decoder.decode_with_cb(block, |name, value| {
            fields.push((name.into_owned(), value.into_owned()))
        });
        match (decoded, verdict) {
            (Err(_), H2Block::Undecodable) => return,
            (Ok(()), H2Block::Request { malformed: why }) => {
                assert_eq!(
                    why.is_some(),
                    malformed(&fields),
                    "the service says {why:?} of {fields:?}"
                );
            }
            (decoded, verdict) => panic!("decoder {decoded:?}, service {verdict:?} for {block:?}"),
        }
    }
    assert!(found.len() == blocks.len() || found.last() == Some(&H2Block::Undecodable));
});
