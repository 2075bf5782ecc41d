//! HPACK (RFC 7541), both ways: the client's header blocks are decoded with its dynamic table,
//! bounded by what the service advertises; responses are encoded without one.

use std::time::SystemTime;

use super::frame::{COMPRESSION_ERROR, Error};

/// The dynamic table a client's encoder may use: SETTINGS_HEADER_TABLE_SIZE, which the service
/// leaves at its default (RFC 9113 §6.5.2). A larger size update is a decoding error
/// (RFC 7541 §6.3), so no connection can make the table, which lives as long as it does,
/// hold more.
pub const TABLE_SIZE: usize = 4096;

/// A connection's decoder of the client's header blocks.
pub struct Decoder(loona_hpack::Decoder<'static>);

impl Default for Decoder {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self(decoder)
    }
}

impl Decoder {
    /// Decodes a whole header block, passing each field to `field`. A block that cannot be
    /// decoded leaves the table out of step with the client's: a connection error.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), Error> {
        self.0
            .decode_with_cb(block, |name, value| field(&name, &value))
            .map_err(|_| Error::Connection(COMPRESSION_ERROR))
    }
}

/// An HPACK integer with a `prefix`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
fn integer(first: u8, prefix: u32, value: usize, out: &mut Vec<u8>) {
    let limit = (1_usize << prefix) - 1;
    if value < limit {
        out.push(first | value as u8);
        return;
    }
    out.push(first | limit as u8);
    let mut rest = value - limit;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header field as a literal that is never indexed, with no Huffman coding: responses use
/// no dynamic table, so they need no encoder state.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x10);
    integer(0, 7, name.len(), out);
    out.extend_from_slice(name);
    integer(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// A response head: `:status` (from the static table when 200), then every header, and
/// `date` unless one of them is.
pub fn encode_head<'a>(
    status: http::StatusCode,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<u8> {
    let mut block = Vec::new();
    if status == http::StatusCode::OK {
        block.push(0x88);
    } else {
        // Never indexed, with the static table's name :status (index 8).
        integer(0x10, 4, 8, &mut block);
        integer(0, 7, 3, &mut block);
        block.extend_from_slice(status.as_str().as_bytes());
    }
    let mut dated = false;
    for (name, value) in headers {
        dated |= name == b"date";
        literal(name, value, &mut block);
    }
    if !dated {
        let date = httpdate::fmt_http_date(SystemTime::now());
        literal(b"date", date.as_bytes(), &mut block);
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, Error> {
        let mut fields = Vec::new();
        decoder.decode(block, |name, value| {
            fields.push((name.to_vec(), value.to_vec()))
        })?;
        Ok(fields)
    }

    /// A dynamic table size update to `size` (RFC 7541 §6.3), then `:method: GET` indexed.
    fn size_update(size: usize) -> Vec<u8> {
        let mut block = Vec::new();
        integer(0x20, 5, size, &mut block);
        block.push(0x82);
        block
    }

    #[test]
    fn the_table_cannot_grow_past_what_the_service_advertises() {
        let mut decoder = Decoder::default();
        assert_eq!(
            fields(&mut decoder, &size_update(TABLE_SIZE + 1)),
            Err(Error::Connection(COMPRESSION_ERROR))
        );
        let mut decoder = Decoder::default();
        assert_eq!(
            fields(&mut decoder, &size_update(1 << 27)),
            Err(Error::Connection(COMPRESSION_ERROR))
        );
        let mut decoder = Decoder::default();
        assert_eq!(
            fields(&mut decoder, &size_update(TABLE_SIZE)),
            Ok(vec![(b":method".to_vec(), b"GET".to_vec())])
        );
        assert_eq!(
            fields(&mut decoder, &size_update(0)),
            Ok(vec![(b":method".to_vec(), b"GET".to_vec())])
        );
    }

    #[test]
    fn a_head_is_what_a_decoder_reads_back() {
        let head = encode_head(
            http::StatusCode::NOT_FOUND,
            [(&b"content-type"[..], &b"text/plain"[..])],
        );
        let decoded = fields(&mut Decoder::default(), &head).unwrap();
        assert_eq!(decoded[0], (b":status".to_vec(), b"404".to_vec()));
        assert_eq!(
            decoded[1],
            (b"content-type".to_vec(), b"text/plain".to_vec())
        );
        assert_eq!(decoded[2].0, b"date");
        assert_eq!(decoded.len(), 3);
    }
}
