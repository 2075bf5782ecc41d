//! A stream's states (RFC 9113 §5.1) and what each frame a client sends does to them, as the
//! RFC's figure 2 and the text under it say, for a server that never pushes (so the reserved
//! states never occur).
//!
//! A connection holds the state of its open and half-closed streams, and of the last
//! [`REMEMBERED`] closed ones: frames may still be on their way when a stream closes, and what
//! the RFC requires of them depends on how it closed. A stream below the highest one opened
//! that is remembered by neither is [`Closed::Forgotten`].

use std::collections::VecDeque;

use super::frame::{Error, PROTOCOL_ERROR, STREAM_CLOSED};

/// Closed streams whose way of closing a connection remembers.
pub const REMEMBERED: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Open,
    /// The client sent END_STREAM: the request is whole, the response goes on.
    HalfClosedRemote,
    /// The service sent END_STREAM: the response is whole, the request goes on.
    HalfClosedLocal,
    Closed(Closed),
}

/// How a stream closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides sent END_STREAM.
    Ended,
    /// The client sent RST_STREAM.
    ResetByPeer,
    /// The service sent RST_STREAM: the client may not know yet, so whatever it sends on the
    /// stream is ignored (RFC 9113 §5.4.2).
    ResetHere,
    /// Not remembered: closed long ago, or never opened and closed by a later stream's
    /// opening (RFC 9113 §5.1.1).
    Forgotten,
}

/// A frame received on a stream, as far as its state is concerned. A header block counts
/// once it is whole, with the END_STREAM of its HEADERS frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Headers { end_stream: bool },
    Data { end_stream: bool },
    WindowUpdate,
    RstStream,
    Priority,
}

/// What a received frame does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The frame is allowed; the stream is now in this state.
    To(State),
    /// The frame is allowed and means nothing any more.
    Ignore,
    /// The frame is not allowed.
    Error(Error),
}

impl State {
    /// Receiving `frame` on `stream` in this state.
    pub fn receive(self, stream: u32, frame: Received) -> Transition {
        use Received::{Data, Headers, Priority, RstStream, WindowUpdate};
        use Transition::{Error as Refuse, Ignore, To};
        let connection_error = |code| Refuse(Error::Connection(code));
        let stream_error = |code| Refuse(Error::Stream(stream, code));
        let ended = |end_stream, open, closed| To(if end_stream { closed } else { open });
        match (self, frame) {
            (_, Priority) => To(self),
            (State::Idle, Headers { end_stream }) => {
                ended(end_stream, State::Open, State::HalfClosedRemote)
            }
            (State::Idle, Data { .. } | WindowUpdate | RstStream) => {
                connection_error(PROTOCOL_ERROR)
            }
            // A second header block is a trailer section, which ends the request (RFC 9113
            // §8.1).
            (State::Open, Headers { end_stream: false })
            | (State::HalfClosedLocal, Headers { end_stream: false }) => {
                stream_error(PROTOCOL_ERROR)
            }
            (State::Open, Headers { end_stream } | Data { end_stream }) => {
                ended(end_stream, State::Open, State::HalfClosedRemote)
            }
            (State::HalfClosedLocal, Headers { end_stream } | Data { end_stream }) => ended(
                end_stream,
                State::HalfClosedLocal,
                State::Closed(Closed::Ended),
            ),
            (State::HalfClosedRemote, Headers { .. } | Data { .. }) => stream_error(STREAM_CLOSED),
            (State::Open | State::HalfClosedRemote | State::HalfClosedLocal, WindowUpdate) => {
                To(self)
            }
            (State::Open | State::HalfClosedRemote | State::HalfClosedLocal, RstStream) => {
                To(State::Closed(Closed::ResetByPeer))
            }
            (State::Closed(Closed::ResetHere), _) => Ignore,
            // Never a RST_STREAM for a RST_STREAM (RFC 9113 §5.4.2).
            (State::Closed(Closed::ResetByPeer), RstStream) => Ignore,
            (State::Closed(Closed::ResetByPeer), _) => stream_error(STREAM_CLOSED),
            // The client may have sent these before it saw the stream end.
            (State::Closed(Closed::Ended | Closed::Forgotten), WindowUpdate | RstStream) => Ignore,
            (State::Closed(Closed::Ended | Closed::Forgotten), Data { .. }) => {
                stream_error(STREAM_CLOSED)
            }
            (State::Closed(Closed::Ended), Headers { .. }) => connection_error(STREAM_CLOSED),
            // A stream identifier that goes back (RFC 9113 §5.1.1).
            (State::Closed(Closed::Forgotten), Headers { .. }) => connection_error(PROTOCOL_ERROR),
        }
    }

    /// The state after the service sends END_STREAM. (After it sends RST_STREAM, a stream is
    /// always [`Closed::ResetHere`].)
    pub fn end_stream_sent(self) -> State {
        match self {
            State::Open => State::HalfClosedLocal,
            State::HalfClosedRemote => State::Closed(Closed::Ended),
            state => state,
        }
    }
}

/// How the last [`REMEMBERED`] closed streams closed.
#[derive(Debug, Default)]
pub struct Recent {
    closed: VecDeque<(u32, Closed)>,
}

impl Recent {
    pub fn remember(&mut self, stream: u32, closed: Closed) {
        if self.closed.len() == REMEMBERED {
            self.closed.pop_front();
        }
        self.closed.push_back((stream, closed));
    }

    /// The state of a stream that is neither open nor half-closed: idle above `last_stream`,
    /// the highest the client opened so far, and idle if even: those are the service's to
    /// open (RFC 9113 §5.1.1), and it opens none.
    pub fn state_of(&self, stream: u32, last_stream: u32) -> State {
        if stream > last_stream || stream.is_multiple_of(2) {
            return State::Idle;
        }
        let remembered = self.closed.iter().rev().find(|(id, _)| *id == stream);
        State::Closed(remembered.map_or(Closed::Forgotten, |(_, closed)| *closed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Received::{Data, Headers, Priority, RstStream, WindowUpdate};

    const ALL: [Received; 7] = [
        Headers { end_stream: false },
        Headers { end_stream: true },
        Data { end_stream: false },
        Data { end_stream: true },
        WindowUpdate,
        RstStream,
        Priority,
    ];

    fn connection(code: u32) -> Transition {
        Transition::Error(Error::Connection(code))
    }

    fn stream(code: u32) -> Transition {
        Transition::Error(Error::Stream(1, code))
    }

    #[test]
    fn an_idle_stream_opens_with_headers_and_nothing_else() {
        let idle = State::Idle;
        assert_eq!(
            idle.receive(1, Headers { end_stream: false }),
            Transition::To(State::Open)
        );
        assert_eq!(
            idle.receive(1, Headers { end_stream: true }),
            Transition::To(State::HalfClosedRemote)
        );
        assert_eq!(idle.receive(1, Priority), Transition::To(State::Idle));
        for frame in [Data { end_stream: true }, WindowUpdate, RstStream] {
            assert_eq!(
                idle.receive(1, frame),
                connection(PROTOCOL_ERROR),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn an_open_stream_takes_a_body_and_trailers_that_end_it() {
        let open = State::Open;
        assert_eq!(
            open.receive(1, Data { end_stream: false }),
            Transition::To(State::Open)
        );
        assert_eq!(
            open.receive(1, Data { end_stream: true }),
            Transition::To(State::HalfClosedRemote)
        );
        assert_eq!(
            open.receive(1, Headers { end_stream: true }),
            Transition::To(State::HalfClosedRemote)
        );
        assert_eq!(
            open.receive(1, Headers { end_stream: false }),
            stream(PROTOCOL_ERROR)
        );
        assert_eq!(
            open.receive(1, RstStream),
            Transition::To(State::Closed(Closed::ResetByPeer))
        );
    }

    #[test]
    fn half_closed_remote_refuses_more_of_the_request() {
        let state = State::HalfClosedRemote;
        for frame in [Headers { end_stream: true }, Data { end_stream: false }] {
            assert_eq!(state.receive(1, frame), stream(STREAM_CLOSED), "{frame:?}");
        }
        for frame in [WindowUpdate, Priority] {
            assert_eq!(state.receive(1, frame), Transition::To(state), "{frame:?}");
        }
    }

    #[test]
    fn half_closed_local_waits_for_the_end_of_the_request() {
        let state = State::HalfClosedLocal;
        assert_eq!(
            state.receive(1, Data { end_stream: false }),
            Transition::To(state)
        );
        assert_eq!(
            state.receive(1, Data { end_stream: true }),
            Transition::To(State::Closed(Closed::Ended))
        );
    }

    #[test]
    fn closed_streams_answer_by_how_they_closed() {
        let ended = State::Closed(Closed::Ended);
        assert_eq!(
            ended.receive(1, Headers { end_stream: true }),
            connection(STREAM_CLOSED)
        );
        assert_eq!(
            ended.receive(1, Data { end_stream: true }),
            stream(STREAM_CLOSED)
        );
        assert_eq!(ended.receive(1, WindowUpdate), Transition::Ignore);
        let reset_by_peer = State::Closed(Closed::ResetByPeer);
        for frame in [
            Headers { end_stream: true },
            Data { end_stream: true },
            WindowUpdate,
        ] {
            assert_eq!(reset_by_peer.receive(1, frame), stream(STREAM_CLOSED));
        }
        assert_eq!(reset_by_peer.receive(1, RstStream), Transition::Ignore);
        let forgotten = State::Closed(Closed::Forgotten);
        assert_eq!(
            forgotten.receive(1, Headers { end_stream: true }),
            connection(PROTOCOL_ERROR)
        );
        for frame in ALL {
            let expected = if frame == Priority {
                Transition::To(State::Closed(Closed::ResetHere))
            } else {
                Transition::Ignore
            };
            assert_eq!(State::Closed(Closed::ResetHere).receive(1, frame), expected);
        }
    }

    #[test]
    fn priority_is_allowed_in_every_state() {
        for state in [
            State::Idle,
            State::Open,
            State::HalfClosedRemote,
            State::HalfClosedLocal,
            State::Closed(Closed::Ended),
            State::Closed(Closed::ResetByPeer),
            State::Closed(Closed::Forgotten),
        ] {
            assert_eq!(state.receive(1, Priority), Transition::To(state));
        }
    }

    #[test]
    fn sending_end_stream_closes_the_service_side() {
        assert_eq!(State::Open.end_stream_sent(), State::HalfClosedLocal);
        assert_eq!(
            State::HalfClosedRemote.end_stream_sent(),
            State::Closed(Closed::Ended)
        );
    }

    #[test]
    fn the_last_closed_streams_are_remembered_and_older_ones_forgotten() {
        let mut recent = Recent::default();
        for stream in (1..=2 * REMEMBERED as u32).step_by(2) {
            recent.remember(stream, Closed::Ended);
        }
        recent.remember(99, Closed::ResetHere);
        assert_eq!(recent.state_of(101, 99), State::Idle);
        assert_eq!(recent.state_of(99, 99), State::Closed(Closed::ResetHere));
        assert_eq!(recent.state_of(31, 99), State::Closed(Closed::Ended));
        assert_eq!(recent.state_of(1, 99), State::Closed(Closed::Forgotten));
        assert_eq!(recent.state_of(2, 99), State::Idle);
    }
}
