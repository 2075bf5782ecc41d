//! The service's HTTP/2 connection (`src/http/h2/`), whole, fed a client's frames: the
//! service's own routes answer what it forwards, on the in-process backend, in virtual time.
//!
//! Checked, beyond "no panic" and the memory bound libFuzzer's `-rss_limit_mb` holds:
//! - every byte written is whole frames, of the types a server sends, each well-formed for its
//!   type (stream identifiers, lengths, a header block that decodes to a `:status`), and the
//!   first is the server's SETTINGS (or, after a broken preface, the only one a GOAWAY);
//! - a stream's response starts with HEADERS, and nothing is sent on a stream after its
//!   END_STREAM or after the service reset it but RST_STREAM;
//! - nothing follows a GOAWAY that carries an error, and GOAWAY's last stream never rises;
//! - no stream, and not the connection, is sent more DATA than the client's windows allow.
//!
//! An input that starts with HTTP/2's preface is what a client sends, byte for byte (the seeds
//! in fuzz/seeds/h2_connection are such openings, as curl, browsers and proxies send them);
//! any other is a list of frames, most of them of the kinds and on the streams a client uses
//! (requests for a stream, `/livez` and publishes among them), some raw, cut into reads at
//! arbitrary points.
#![no_main]

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use flagsmith_sse::fuzzing::{H2_TOKEN, h2_serve};
use flagsmith_sse_fuzz::hpack_literal;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Arbitrary)]
struct Input {
    /// Leave the preface out: the service must answer with GOAWAY only.
    broken_preface: bool,
    frames: Vec<ClientFrame>,
    cuts: Vec<u16>,
}

#[derive(Debug, Arbitrary)]
enum Stream {
    /// Mostly the first few client streams, so frames meet streams that exist.
    Near(u8),
    Any(u32),
}

impl Stream {
    fn id(&self) -> u32 {
        match self {
            Stream::Near(near) => u32::from(near % 12),
            Stream::Any(any) => any & 0x7fff_ffff,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Request {
    Subscribe(u8),
    Livez,
    Publish(u8),
    Fields(Vec<(u8, u8)>),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum ClientFrame {
    Headers {
        stream: Stream,
        flags: u8,
        request: Request,
    },
    Continuation {
        stream: Stream,
        flags: u8,
        request: Request,
    },
    Data {
        stream: Stream,
        flags: u8,
        body: Vec<u8>,
    },
    Priority {
        stream: Stream,
        payload: Vec<u8>,
    },
    RstStream {
        stream: Stream,
        code: u32,
    },
    Settings {
        ack: bool,
        values: Vec<(u8, u32)>,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last: u32,
        code: u32,
    },
    WindowUpdate {
        stream: Stream,
        increment: u32,
    },
    Raw {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

const NAMES: &[&str] = &[
    ":method",
    ":scheme",
    ":path",
    ":authority",
    "content-length",
    "te",
    "x-a",
    "Host",
    "connection",
    "authorization",
];
const VALUES: &[&str] = &[
    "GET",
    "POST",
    "http",
    "/livez",
    "/sse/environments/k/stream",
    "localhost",
    "0",
    "5",
    "trailers",
    "",
    "/metricsz",
];

/// A field as a literal without indexing: these inputs leave the dynamic table empty.
fn field(name: &str, value: &str, out: &mut Vec<u8>) {
    hpack_literal(name.as_bytes(), value.as_bytes(), false, out);
}

fn block(request: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    let pseudo = |method: &str, path: &str, out: &mut Vec<u8>| {
        field(":method", method, out);
        field(":scheme", "http", out);
        field(":authority", "localhost", out);
        field(":path", path, out);
    };
    match request {
        Request::Subscribe(key) => {
            pseudo(
                "GET",
                &format!("/sse/environments/k{}/stream", key % 4),
                &mut out,
            );
        }
        Request::Livez => pseudo("GET", "/livez", &mut out),
        Request::Publish(key) => {
            pseudo(
                "POST",
                &format!("/sse/environments/k{}/queue-change", key % 4),
                &mut out,
            );
            field("authorization", &format!("Token {H2_TOKEN}"), &mut out);
        }
        Request::Fields(fields) => {
            for (name, value) in fields {
                let name = NAMES[usize::from(*name) % NAMES.len()];
                field(name, VALUES[usize::from(*value) % VALUES.len()], &mut out);
            }
        }
        Request::Raw(raw) => out.extend_from_slice(raw),
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    let payload = &payload[..payload.len().min(16 * 1024)];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// What the client's frames allow the service to send: upper bounds, whatever order the
/// service read them in.
#[derive(Default)]
struct Windows {
    /// The largest SETTINGS_INITIAL_WINDOW_SIZE the client sent (65,535 until it sends one).
    initial: u64,
    streams: HashMap<u32, u64>,
    connection: u64,
    max_frame: u64,
}

fn encode(input: &Input) -> (Vec<u8>, Windows) {
    let mut out = Vec::new();
    if !input.broken_preface {
        out.extend_from_slice(PREFACE);
    }
    let mut windows = Windows {
        initial: 65_535,
        connection: 65_535,
        max_frame: 16_384,
        ..Windows::default()
    };
    for client in &input.frames {
        match client {
            ClientFrame::Headers {
                stream,
                flags,
                request,
            } => {
                frame(0x1, *flags, stream.id(), &block(request), &mut out);
            }
            ClientFrame::Continuation {
                stream,
                flags,
                request,
            } => {
                frame(0x9, *flags, stream.id(), &block(request), &mut out);
            }
            ClientFrame::Data {
                stream,
                flags,
                body,
            } => {
                frame(0x0, *flags, stream.id(), body, &mut out);
            }
            ClientFrame::Priority { stream, payload } => {
                frame(0x2, 0, stream.id(), payload, &mut out);
            }
            ClientFrame::RstStream { stream, code } => {
                frame(0x3, 0, stream.id(), &code.to_be_bytes(), &mut out);
            }
            ClientFrame::Settings { ack, values } => {
                let mut payload = Vec::new();
                for (id, value) in values {
                    let id = u16::from(id % 8);
                    match id {
                        0x4 => windows.initial = windows.initial.max(u64::from(*value)),
                        0x5 => windows.max_frame = windows.max_frame.max(u64::from(*value)),
                        _ => {}
                    }
                    payload.extend_from_slice(&id.to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                frame(0x4, u8::from(*ack), 0, &payload, &mut out);
            }
            ClientFrame::Ping { ack, payload } => frame(0x6, u8::from(*ack), 0, payload, &mut out),
            ClientFrame::GoAway { last, code } => {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                frame(0x7, 0, 0, &payload, &mut out);
            }
            ClientFrame::WindowUpdate { stream, increment } => {
                let increment = u64::from(increment & 0x7fff_ffff);
                match stream.id() {
                    0 => windows.connection += increment,
                    id => *windows.streams.entry(id).or_default() += increment,
                }
                frame(
                    0x8,
                    0,
                    stream.id(),
                    &(increment as u32).to_be_bytes(),
                    &mut out,
                );
            }
            ClientFrame::Raw {
                kind,
                flags,
                stream,
                payload,
            } => {
                frame(*kind, *flags, *stream, payload, &mut out);
            }
        }
    }
    (out, windows)
}

/// What a stream has been sent so far.
#[derive(Default)]
struct Sent {
    head: bool,
    ended: bool,
    reset: bool,
    data: u64,
}

fn check(written: &[u8], windows: &Windows, broken_preface: bool) {
    let mut decoder = loona_hpack::Decoder::new();
    let mut streams: HashMap<u32, Sent> = HashMap::new();
    let mut connection_data = 0_u64;
    let mut last_goaway = u32::MAX;
    let mut failed = false;
    let mut at = 0;
    let mut first = true;
    while at < written.len() {
        assert!(!failed, "a frame after a GOAWAY with an error");
        let head = written.get(at..at + 9).expect("a whole frame header");
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        assert_eq!(stream & 0x8000_0000, 0, "the reserved bit is set");
        let payload = written.get(at + 9..at + 9 + length).expect("a whole frame");
        at += 9 + length;
        if first {
            first = false;
            if broken_preface {
                assert_eq!(kind, 0x7, "a broken preface gets GOAWAY");
            } else {
                assert!(
                    kind == 0x4 && flags & 0x1 == 0,
                    "the first frame is SETTINGS"
                );
            }
        }
        let on_stream = || {
            assert!(
                !stream.is_multiple_of(2),
                "frame type {kind} on stream {stream}"
            );
        };
        match kind {
            0x0 | 0x1 => {
                on_stream();
                let sent = streams.entry(stream).or_default();
                assert!(
                    !sent.ended && !sent.reset,
                    "frame type {kind} on stream {stream} after its end"
                );
                if kind == 0x1 {
                    assert!(!sent.head, "a second header block on {stream}");
                    assert_eq!(flags & 0x4, 0x4, "a header block without END_HEADERS");
                    assert_eq!(flags & !0x5, 0, "HEADERS flags {flags:#x}");
                    let mut fields = Vec::new();
                    decoder
                        .decode_with_cb(payload, |name, value| {
                            fields.push((name.into_owned(), value.into_owned()))
                        })
                        .expect("a response head decodes");
                    let (name, value) = &fields[0];
                    assert_eq!(&name[..], b":status");
                    assert!(value.len() == 3 && value.iter().all(u8::is_ascii_digit));
                    assert!(fields[1..].iter().all(|(name, _)| !name.starts_with(b":")));
                    sent.head = true;
                } else {
                    assert!(sent.head, "DATA before HEADERS on {stream}");
                    assert_eq!(flags & !0x1, 0, "DATA flags {flags:#x}");
                    assert!(
                        length as u64 <= windows.max_frame,
                        "DATA beyond the frame size"
                    );
                    sent.data += length as u64;
                    connection_data += length as u64;
                    let granted =
                        windows.initial + windows.streams.get(&stream).copied().unwrap_or(0);
                    assert!(
                        sent.data <= granted,
                        "stream {stream}: {} bytes, {granted} granted",
                        sent.data
                    );
                    assert!(
                        connection_data <= windows.connection,
                        "the connection's window is exceeded"
                    );
                }
                sent.ended |= flags & 0x1 != 0;
            }
            0x3 => {
                on_stream();
                assert_eq!(length, 4);
                streams.entry(stream).or_default().reset = true;
            }
            0x4 => {
                assert_eq!(stream, 0);
                assert!(if flags & 0x1 != 0 {
                    length == 0
                } else {
                    length.is_multiple_of(6)
                });
            }
            0x6 => assert!(stream == 0 && length == 8),
            0x7 => {
                assert!(stream == 0 && length >= 8);
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                assert!(last <= last_goaway, "GOAWAY's last stream rose");
                last_goaway = last;
                failed = u32::from_be_bytes(payload[4..8].try_into().unwrap()) != 0;
            }
            0x8 => {
                assert!(stream == 0 && length == 4);
                assert_ne!(
                    u32::from_be_bytes(payload.try_into().unwrap()) & 0x7fff_ffff,
                    0
                );
            }
            other => panic!("a server never sends frame type {other}"),
        }
    }
}

/// The windows a client's raw bytes grant, read from its SETTINGS and WINDOW_UPDATE frames.
fn raw_windows(bytes: &[u8]) -> Windows {
    let mut windows = Windows {
        initial: 65_535,
        connection: 65_535,
        max_frame: 16_384,
        ..Windows::default()
    };
    let mut at = PREFACE.len();
    while let Some(head) = bytes.get(at..at + 9) {
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let payload = &bytes[(at + 9).min(bytes.len())..(at + 9 + length).min(bytes.len())];
        match head[3] {
            0x4 => {
                for setting in payload.chunks_exact(6) {
                    let value = u64::from(u32::from_be_bytes(setting[2..6].try_into().unwrap()));
                    match u16::from_be_bytes([setting[0], setting[1]]) {
                        0x4 => windows.initial = windows.initial.max(value),
                        0x5 => windows.max_frame = windows.max_frame.max(value),
                        _ => {}
                    }
                }
            }
            0x8 if payload.len() == 4 => {
                let increment =
                    u64::from(u32::from_be_bytes(payload.try_into().unwrap()) & 0x7fff_ffff);
                match stream {
                    0 => windows.connection += increment,
                    id => *windows.streams.entry(id).or_default() += increment,
                }
            }
            _ => {}
        }
        at += 9 + length;
    }
    windows
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(PREFACE) {
        let written = h2_serve(data, &[]);
        check(&written, &raw_windows(data), false);
        return;
    }
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let (bytes, windows) = encode(&input);
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&cut| usize::from(cut)).collect();
    cuts.sort_unstable();
    let written = h2_serve(&bytes, &cuts);
    check(&written, &windows, input.broken_preface);
});
