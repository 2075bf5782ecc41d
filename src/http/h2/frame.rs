//! HTTP/2 frames (RFC 9113 §4 and §6): reading a client's frames into [`Frame`], with every
//! check the RFC makes of a frame on its own, and writing the service's.
//!
//! Nothing here knows of streams' states or of the connection: what a frame means for them is
//! [`super::state`]'s and [`super::connection`]'s, so this layer can be fed any bytes.

/// The frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// The settings the service reads or sends (RFC 9113 §6.5.2); others are ignored, as §6.5.2
/// requires.
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame header's length.
pub const HEAD: usize = 9;
/// The largest frame a client may send: the protocol's default, never raised here.
pub const MAX_FRAME: usize = 16 * 1024;
/// The largest flow-control window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// An error, as RFC 9113 §5.4 has two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The connection ends with GOAWAY and this code.
    Connection(u32),
    /// This stream is reset with RST_STREAM and this code; the connection goes on.
    Stream(u32, u32),
}

/// A stream's dependency (RFC 9113 §5.3.1). The service sends one stream's frames as they come,
/// so it only checks that a stream does not depend on itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub depends_on: u32,
}

/// A client's frame, checked as far as it can be on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        /// What the frame takes of the flow-control windows: its whole payload, padding
        /// included (RFC 9113 §6.9.1).
        flow: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        priority: Option<Priority>,
        fragment: &'a [u8],
    },
    Priority {
        stream: u32,
        priority: Priority,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    /// Values already checked (RFC 9113 §6.5.2); [`settings`] reads them.
    Settings {
        ack: bool,
        values: &'a [u8],
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        fragment: &'a [u8],
    },
    /// A frame type this service does not know: ignored (RFC 9113 §5.5), unless it comes
    /// where a header block must continue.
    Unknown {
        stream: u32,
    },
}

/// The frame at the start of `bytes`, or the error it is, and its length on the wire; `None`
/// until all of it is there. A frame beyond [`MAX_FRAME`] is an error as soon as its header
/// is.
pub fn parse(bytes: &[u8]) -> Option<(Result<Frame<'_>, Error>, usize)> {
    let head = bytes.get(..HEAD)?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    // Every frame that could change the connection's state is a connection error when too
    // large (RFC 9113 §4.2); for the others, ending the connection is allowed too.
    if length > MAX_FRAME {
        return Some((Err(Error::Connection(FRAME_SIZE_ERROR)), HEAD));
    }
    let payload = bytes.get(HEAD..HEAD + length)?;
    Some((frame(head, payload), HEAD + length))
}

/// A frame's meaning, from its header and payload.
fn frame<'a>(head: &[u8], payload: &'a [u8]) -> Result<Frame<'a>, Error> {
    let (kind, flags) = (head[3], head[4]);
    // The reserved bit is ignored (RFC 9113 §4.1).
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let frame = match kind {
        DATA => data(stream, flags, payload)?,
        HEADERS => headers(stream, flags, payload)?,
        PRIORITY => {
            on_stream(stream)?;
            // A stream error (RFC 9113 §6.3): PRIORITY changes nothing but that stream.
            let Ok(fields) = <[u8; 5]>::try_from(payload) else {
                return Err(Error::Stream(stream, FRAME_SIZE_ERROR));
            };
            Frame::Priority {
                stream,
                priority: priority(stream, &fields)?,
            }
        }
        RST_STREAM => {
            on_stream(stream)?;
            Frame::RstStream {
                stream,
                code: u32::from_be_bytes(exactly(payload)?),
            }
        }
        SETTINGS => {
            on_connection(stream)?;
            let ack = flags & ACK != 0;
            if (ack && !payload.is_empty()) || !payload.len().is_multiple_of(6) {
                return Err(Error::Connection(FRAME_SIZE_ERROR));
            }
            for (id, value) in settings(payload) {
                check_setting(id, value)?;
            }
            Frame::Settings {
                ack,
                values: payload,
            }
        }
        PUSH_PROMISE => return Err(Error::Connection(PROTOCOL_ERROR)),
        PING => {
            on_connection(stream)?;
            Frame::Ping {
                ack: flags & ACK != 0,
                payload: exactly(payload)?,
            }
        }
        GOAWAY => {
            on_connection(stream)?;
            let (Some(last), Some(code)) = (payload.get(..4), payload.get(4..8)) else {
                return Err(Error::Connection(FRAME_SIZE_ERROR));
            };
            Frame::GoAway {
                last_stream: u32::from_be_bytes(last.try_into().expect("4 bytes")) & 0x7fff_ffff,
                code: u32::from_be_bytes(code.try_into().expect("4 bytes")),
            }
        }
        WINDOW_UPDATE => {
            let increment = u32::from_be_bytes(exactly(payload)?) & 0x7fff_ffff;
            if increment == 0 {
                return Err(match stream {
                    0 => Error::Connection(PROTOCOL_ERROR),
                    stream => Error::Stream(stream, PROTOCOL_ERROR),
                });
            }
            Frame::WindowUpdate { stream, increment }
        }
        CONTINUATION => {
            on_stream(stream)?;
            Frame::Continuation {
                stream,
                end_headers: flags & END_HEADERS != 0,
                fragment: payload,
            }
        }
        _ => Frame::Unknown { stream },
    };
    Ok(frame)
}

fn data(stream: u32, flags: u8, payload: &[u8]) -> Result<Frame<'_>, Error> {
    on_stream(stream)?;
    Ok(Frame::Data {
        stream,
        end_stream: flags & END_STREAM != 0,
        data: unpadded(flags, payload)?,
        flow: u32::try_from(payload.len()).expect("a frame is at most 16 KiB"),
    })
}

fn headers(stream: u32, flags: u8, payload: &[u8]) -> Result<Frame<'_>, Error> {
    on_stream(stream)?;
    let mut fragment = unpadded(flags, payload)?;
    let mut dependency = None;
    if flags & PRIORITY_FLAG != 0 {
        let Some((fields, rest)) = fragment.split_first_chunk::<5>() else {
            return Err(Error::Connection(FRAME_SIZE_ERROR));
        };
        // Not yet an error: the block must still be decoded, or the client's and the
        // service's HPACK tables part ways. The connection checks it after decoding.
        dependency = Some(Priority {
            depends_on: u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]])
                & 0x7fff_ffff,
        });
        fragment = rest;
    }
    Ok(Frame::Headers {
        stream,
        end_stream: flags & END_STREAM != 0,
        end_headers: flags & END_HEADERS != 0,
        priority: dependency,
        fragment,
    })
}

/// A PRIORITY frame's fields; a stream that depends on itself is a stream error (RFC 9113
/// §5.3.1).
fn priority(stream: u32, fields: &[u8; 5]) -> Result<Priority, Error> {
    let depends_on = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]) & 0x7fff_ffff;
    if depends_on == stream {
        return Err(Error::Stream(stream, PROTOCOL_ERROR));
    }
    Ok(Priority { depends_on })
}

/// A payload without its padding (RFC 9113 §6.1, §6.2): a Pad Length that is not less than
/// the payload is a connection error.
fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], Error> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&padding, rest) = payload
        .split_first()
        .ok_or(Error::Connection(FRAME_SIZE_ERROR))?;
    let kept = rest
        .len()
        .checked_sub(usize::from(padding))
        .ok_or(Error::Connection(PROTOCOL_ERROR))?;
    Ok(&rest[..kept])
}

/// A payload of exactly `N` bytes; any other length is a connection error (RFC 9113 §6.4,
/// §6.7, §6.9).
fn exactly<const N: usize>(payload: &[u8]) -> Result<[u8; N], Error> {
    payload
        .try_into()
        .map_err(|_| Error::Connection(FRAME_SIZE_ERROR))
}

fn on_stream(stream: u32) -> Result<(), Error> {
    if stream == 0 {
        return Err(Error::Connection(PROTOCOL_ERROR));
    }
    Ok(())
}

fn on_connection(stream: u32) -> Result<(), Error> {
    if stream != 0 {
        return Err(Error::Connection(PROTOCOL_ERROR));
    }
    Ok(())
}

/// A SETTINGS payload's identifiers and values; its length is a multiple of 6.
pub fn settings(values: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    values.chunks_exact(6).map(|setting| {
        (
            u16::from_be_bytes([setting[0], setting[1]]),
            u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]),
        )
    })
}

/// RFC 9113 §6.5.2's bounds on the values a client may send.
fn check_setting(id: u16, value: u32) -> Result<(), Error> {
    let valid = match id {
        SETTINGS_ENABLE_PUSH => value <= 1,
        SETTINGS_INITIAL_WINDOW_SIZE => i64::from(value) <= MAX_WINDOW,
        SETTINGS_MAX_FRAME_SIZE => (16_384..=16_777_215).contains(&value),
        _ => true,
    };
    match (valid, id) {
        (true, _) => Ok(()),
        (false, SETTINGS_INITIAL_WINDOW_SIZE) => Err(Error::Connection(FLOW_CONTROL_ERROR)),
        (false, _) => Err(Error::Connection(PROTOCOL_ERROR)),
    }
}

/// Appends one frame.
pub fn put(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = u32::try_from(payload.len()).expect("frames are small");
    debug_assert!(length < 1 << 24, "a frame's length has 24 bits");
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn put_rst_stream(out: &mut Vec<u8>, stream: u32, code: u32) {
    put(out, RST_STREAM, 0, stream, &code.to_be_bytes());
}

pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, code: u32) {
    let mut payload = [0; 8];
    payload[..4].copy_from_slice(&last_stream.to_be_bytes());
    payload[4..].copy_from_slice(&code.to_be_bytes());
    put(out, GOAWAY, 0, 0, &payload);
}

pub fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put(out, WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
}

pub fn put_settings(out: &mut Vec<u8>, values: &[(u16, u32)]) {
    let mut payload = Vec::with_capacity(values.len() * 6);
    for (id, value) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    put(out, SETTINGS, 0, 0, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put(&mut out, kind, flags, stream, payload);
        out
    }

    fn parsed(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<Frame<'static>, Error> {
        let wire = Box::leak(bytes(kind, flags, stream, payload).into_boxed_slice());
        parse(wire).expect("whole").0
    }

    #[test]
    fn a_frame_is_read_only_once_all_of_it_is_there() {
        let wire = bytes(DATA, END_STREAM, 1, b"hello");
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), None, "cut at {cut}");
        }
        let (frame, length) = parse(&wire).unwrap();
        assert_eq!(length, wire.len());
        assert_eq!(
            frame,
            Ok(Frame::Data {
                stream: 1,
                end_stream: true,
                data: b"hello",
                flow: 5
            })
        );
    }

    #[test]
    fn padding_is_removed_and_counted_for_flow_control() {
        assert_eq!(
            parsed(DATA, PADDED, 1, b"\x02ab\0\0"),
            Ok(Frame::Data {
                stream: 1,
                end_stream: false,
                data: b"ab",
                flow: 5
            })
        );
        // Pad Length as long as the payload: RFC 9113 §6.1.
        assert_eq!(
            parsed(DATA, PADDED, 1, b"\x03ab"),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(HEADERS, PADDED | END_HEADERS, 1, b"\x05abc"),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
    }

    #[test]
    fn frames_that_belong_to_a_stream_are_refused_on_stream_zero_and_the_reverse() {
        for kind in [DATA, HEADERS, PRIORITY, RST_STREAM, CONTINUATION] {
            let payload = [0; 5];
            let payload = if kind == RST_STREAM {
                &payload[..4]
            } else {
                &payload[..]
            };
            assert_eq!(
                parsed(kind, 0, 0, payload),
                Err(Error::Connection(PROTOCOL_ERROR)),
                "type {kind}"
            );
        }
        assert_eq!(
            parsed(SETTINGS, 0, 1, &[]),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(PING, 0, 1, &[0; 8]),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(GOAWAY, 0, 1, &[0; 8]),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
    }

    #[test]
    fn lengths_the_rfc_fixes_are_enforced() {
        assert_eq!(
            parsed(PRIORITY, 0, 1, &[0; 4]),
            Err(Error::Stream(1, FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(RST_STREAM, 0, 1, &[0; 3]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(PING, 0, 0, &[0; 7]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(SETTINGS, ACK, 0, &[0; 6]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(SETTINGS, 0, 0, &[0; 5]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(WINDOW_UPDATE, 0, 0, &[0; 3]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        assert_eq!(
            parsed(GOAWAY, 0, 0, &[0; 7]),
            Err(Error::Connection(FRAME_SIZE_ERROR))
        );
        // Known from the header alone.
        let mut too_long = bytes(DATA, 0, 1, &[]);
        too_long[..3].copy_from_slice(&[0, 0x40, 0x01]);
        assert_eq!(
            parse(&too_long),
            Some((Err(Error::Connection(FRAME_SIZE_ERROR)), HEAD))
        );
    }

    #[test]
    fn a_stream_cannot_depend_on_itself() {
        assert_eq!(
            parsed(PRIORITY, 0, 3, &[0, 0, 0, 3, 16]),
            Err(Error::Stream(3, PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(PRIORITY, 0, 3, &[0, 0, 0, 1, 16]),
            Ok(Frame::Priority {
                stream: 3,
                priority: Priority { depends_on: 1 }
            })
        );
        assert_eq!(
            parsed(
                HEADERS,
                PRIORITY_FLAG | END_HEADERS,
                3,
                &[0x80, 0, 0, 3, 16, 0x82]
            ),
            Ok(Frame::Headers {
                stream: 3,
                end_stream: false,
                end_headers: true,
                priority: Some(Priority { depends_on: 3 }),
                fragment: &[0x82],
            })
        );
    }

    #[test]
    fn settings_outside_their_bounds_are_connection_errors() {
        let setting = |id: u16, value: u32| {
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(&value.to_be_bytes());
            parsed(SETTINGS, 0, 0, &payload).map(|_| ())
        };
        assert_eq!(
            setting(SETTINGS_ENABLE_PUSH, 2),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(setting(SETTINGS_ENABLE_PUSH, 1), Ok(()));
        assert_eq!(
            setting(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31),
            Err(Error::Connection(FLOW_CONTROL_ERROR))
        );
        assert_eq!(
            setting(SETTINGS_MAX_FRAME_SIZE, 16_383),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            setting(SETTINGS_MAX_FRAME_SIZE, 1 << 24),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        // Unknown settings are ignored (RFC 9113 §6.5.2).
        assert_eq!(setting(0xff, u32::MAX), Ok(()));
    }

    #[test]
    fn a_window_update_of_zero_is_an_error_of_what_it_updates() {
        assert_eq!(
            parsed(WINDOW_UPDATE, 0, 0, &[0; 4]),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(WINDOW_UPDATE, 0, 5, &[0x80, 0, 0, 0]),
            Err(Error::Stream(5, PROTOCOL_ERROR))
        );
    }

    #[test]
    fn push_promise_from_a_client_ends_the_connection_and_unknown_types_are_kept_apart() {
        assert_eq!(
            parsed(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            Err(Error::Connection(PROTOCOL_ERROR))
        );
        assert_eq!(
            parsed(0x20, 0xff, 7, b"x"),
            Ok(Frame::Unknown { stream: 7 })
        );
    }
}
