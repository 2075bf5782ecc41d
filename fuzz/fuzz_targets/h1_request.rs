//! The HTTP/1.1 stream reader (`read_request` and `parse` in src/http/h1.rs) on any bytes,
//! arriving in any pieces (the input's format: `h1_input` in src/lib.rs).
//!
//! Checked, beyond "no panic":
//! - how the bytes are split into reads changes nothing where the whole is decided: a whole
//!   that is a stream request is read as that request, never handed to hyper or closed on the
//!   way; a whole that is not is never read as one, unless a stream request's head came first
//!   and the rest is pipelined behind it;
//! - a stream request is only taken from a complete head (no prefix that lacks its blank line
//!   is ever one), and an independent parse agrees that it is one: `GET`, HTTP/1.1, exactly
//!   one `Host`, no body, no upgrade, the key a valid environment key in the path's
//!   `…/{key}/stream`, `Connection: close` as sent;
//! - what is handed to hyper is exactly what was read, a prefix of what was sent;
//! - a connection is closed without an answer only if what it sent is no whole head.
#![no_main]

use flagsmith_sse::domain::EnvironmentKey;
use flagsmith_sse::fuzzing::{H1_MAX_HEAD, H1Parsed, H1Read, h1_parse, h1_read_request};
use flagsmith_sse_fuzz::{Pieces, h1_input};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// The reader's header timeout needs Tokio's timer; it never fires, as every read is ready.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a Tokio runtime");
}

fuzz_target!(|data: &[u8]| {
    let pieces = h1_input(data);
    let whole = pieces.concat();
    let decided = h1_parse(&whole);
    if let H1Parsed::Stream { key, close } = &decided {
        check_stream_head(&whole, key, *close);
    }
    let read = RUNTIME.with(|runtime| runtime.block_on(h1_read_request(&mut Pieces::new(&pieces))));
    match read {
        H1Read::Stream { key, close, head } => {
            assert!(whole.starts_with(&head), "read bytes that were not sent");
            check_stream_head(&head, &key, close);
            let request = H1Parsed::Stream { key, close };
            if head.len() == whole.len() {
                assert_eq!(decided, request, "split reads decided otherwise");
            } else {
                assert_eq!(
                    decided,
                    H1Parsed::Other,
                    "a head with more behind it: pipelined"
                );
            }
        }
        H1Read::Handoff(handed) => {
            assert!(
                whole.starts_with(&handed),
                "handed hyper bytes that were not sent"
            );
            let full = handed.len() >= H1_MAX_HEAD;
            assert!(
                full || h1_parse(&handed) == H1Parsed::Other,
                "handed over before it was decided"
            );
            assert!(
                full || !matches!(decided, H1Parsed::Stream { .. }),
                "a stream request that arrived in pieces went to hyper"
            );
        }
        H1Read::Closed if decided == H1Parsed::Neither => {
            // An independent parse agrees: the request line's version is no HTTP/1.x, and it
            // is not HTTP/2's preface (method PRI).
            let mut headers = vec![httparse::EMPTY_HEADER; 1024];
            let mut request = httparse::Request::new(&mut headers);
            assert_eq!(request.parse(&whole), Err(httparse::Error::Version));
            assert_ne!(request.method, Some("PRI"), "HTTP/2's preface was closed");
        }
        H1Read::Closed => {
            assert_eq!(decided, H1Parsed::Partial, "closed on a decided request");
            assert!(whole.len() < H1_MAX_HEAD, "closed on a full head");
        }
    }
});

/// What an independent parse (httparse with room for every header) says of `head`, which the
/// reader took for a stream of `key`.
fn check_stream_head(head: &[u8], key: &EnvironmentKey, close: bool) {
    assert!(
        head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
        "a stream head without its blank line"
    );
    let mut headers = vec![httparse::EMPTY_HEADER; 1024];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(head).expect("a stream head parses");
    assert_eq!(
        status,
        httparse::Status::Complete(head.len()),
        "more than one head"
    );
    assert_eq!(request.method, Some("GET"));
    assert_eq!(request.version, Some(1), "only HTTP/1.1 is served here");
    let headers = &*request.headers;
    let named = |name: &str| -> Vec<&httparse::Header> {
        headers
            .iter()
            .filter(|header| header.name.eq_ignore_ascii_case(name))
            .collect()
    };
    assert_eq!(named("host").len(), 1, "RFC 9112 §3.2: exactly one Host");
    for framing in ["transfer-encoding", "upgrade", "expect"] {
        assert!(named(framing).is_empty(), "{framing} is hyper's");
    }
    assert!(
        named("content-length")
            .iter()
            .all(|header| header.value == b"0"),
        "a body is hyper's"
    );
    let asked_close = named("connection").iter().any(|header| {
        header
            .value
            .split(|&byte| byte == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    assert_eq!(close, asked_close, "Connection: close");

    assert_eq!(EnvironmentKey::parse(key.as_str()).as_ref(), Ok(key));
    let target = request.path.expect("a request target");
    let path = target.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .collect();
    let [.., environments, segment, stream] = segments[..] else {
        panic!("{target:?} is no stream path");
    };
    assert_eq!(
        (environments, stream),
        ("environments", "stream"),
        "{target:?}"
    );
    assert_eq!(
        EnvironmentKey::from_path_segment(segment).as_ref(),
        Ok(key),
        "the key is not the path's"
    );
}
