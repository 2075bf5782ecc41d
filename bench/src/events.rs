//! Numbered updates: update `n` of a run is published as `updated_at = base + n / 1000`, so
//! that every subscriber can tell from the event alone which update it received. And the
//! reading side: SSE events split out of whatever chunks the transport delivers.

/// Maps update numbers to `updated_at` values and back.
#[derive(Debug, Clone, Copy)]
pub struct Numbering {
    /// Whole Unix seconds when the run started: its updates are newer than anything before.
    base: u64,
}

impl Numbering {
    pub fn starting_now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970");
        Self {
            base: now.as_secs(),
        }
    }

    /// The `queue-change` body of update `n`.
    pub fn body(&self, n: u64) -> String {
        // Milliseconds as an exact decimal fraction: the service echoes the shortest form of
        // the same f64, which maps back to `n` exactly.
        format!(
            "{{\"updated_at\": {}.{:03}}}",
            self.base + n / 1000,
            n % 1000
        )
    }

    /// The update number an `updated_at` value stands for, if it belongs to this run.
    pub fn number(&self, updated_at: f64) -> Option<u64> {
        let milliseconds = ((updated_at - self.base as f64) * 1000.0).round();
        (milliseconds >= 0.0).then_some(milliseconds as u64)
    }
}

/// What one SSE block held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Block {
    /// An `environment_updated` event with its `updated_at`.
    Update(f64),
    /// A comment (`: ping`) or a bare `retry:`: nothing to deliver.
    Control,
    /// Anything else, which no Flagsmith SDK would accept.
    Malformed,
}

/// Splits a stream body into SSE blocks.
#[derive(Debug, Default)]
pub struct SseReader {
    pending: Vec<u8>,
}

impl SseReader {
    pub fn push(&mut self, chunk: &[u8], mut each: impl FnMut(Block)) {
        // The service writes each event as one chunk: parse it where it lies, and keep only
        // an unfinished tail.
        if self.pending.is_empty() {
            let rest = split_blocks(chunk, &mut each);
            self.pending.extend_from_slice(rest);
        } else {
            self.pending.extend_from_slice(chunk);
            let consumed = self.pending.len() - split_blocks(&self.pending, &mut each).len();
            self.pending.drain(..consumed);
        }
    }
}

/// Hands every complete block in `bytes` to `each`; returns the unfinished rest.
fn split_blocks<'a>(mut bytes: &'a [u8], each: &mut impl FnMut(Block)) -> &'a [u8] {
    while let Some(end) = block_end(bytes) {
        each(parse(&bytes[..end]));
        bytes = &bytes[end + 2..];
    }
    bytes
}

/// Where the first blank line (`\n\n`) starts.
fn block_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(newline) = bytes[from..].iter().position(|&byte| byte == b'\n') {
        let at = from + newline;
        if bytes.get(at + 1) == Some(&b'\n') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[derive(serde::Deserialize)]
struct Data {
    updated_at: f64,
}

fn parse(block: &[u8]) -> Block {
    let mut event = None;
    let mut data = None;
    for line in block.split(|&byte| byte == b'\n') {
        if let Some(name) = line.strip_prefix(b"event: ") {
            event = Some(name);
        } else if let Some(value) = line.strip_prefix(b"data: ") {
            data = Some(value);
        } else if !(line.starts_with(b":") || line.starts_with(b"retry: ")) {
            return Block::Malformed;
        }
    }
    match (event, data) {
        (None, None) => Block::Control,
        (Some(b"environment_updated"), Some(data)) => serde_json::from_slice::<Data>(data)
            .map_or(Block::Malformed, |data| Block::Update(data.updated_at)),
        _ => Block::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_the_round_trip_through_the_service() {
        let numbering = Numbering {
            base: 1_763_700_000,
        };
        for n in [0, 1, 999, 1000, 1001, 123_456] {
            let body = numbering.body(n);
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            let echoed: f64 = value["updated_at"]
                .as_f64()
                .unwrap()
                .to_string()
                .parse()
                .unwrap();
            assert_eq!(numbering.number(echoed), Some(n), "{body}");
        }
        assert_eq!(numbering.number(1_763_699_999.5), None);
    }

    #[test]
    fn a_stream_may_open_with_a_comment_alone() {
        // What the service writes first when no update is known.
        let mut reader = SseReader::default();
        let mut blocks = Vec::new();
        reader.push(b": ping\n\n", |block| blocks.push(block));
        assert_eq!(blocks, [Block::Control]);
        let event = b"event: environment_updated\ndata: {\"updated_at\": 1.5}\nretry: 15000\n\n";
        reader.push(event, |block| blocks.push(block));
        assert_eq!(blocks, [Block::Control, Block::Update(1.5)]);
    }

    #[test]
    fn events_are_split_across_and_within_chunks() {
        let mut reader = SseReader::default();
        let mut blocks = Vec::new();
        let wire = b"event: environment_updated\ndata: {\"updated_at\": 12.5}\nretry: 15000\n\n\
                     : ping\n\nretry: 1000\n\ndata: x\n\n";
        for chunk in wire.chunks(7) {
            reader.push(chunk, |block| blocks.push(block));
        }
        assert_eq!(
            blocks,
            [
                Block::Update(12.5),
                Block::Control,
                Block::Control,
                Block::Malformed
            ]
        );
    }
}
