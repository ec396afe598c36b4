//! The chunked transfer coding (RFC 9112 §7.1): an incremental decoder over a read buffer,
//! and the pieces an encoder writes.
//!
//! The decoder is strict where leniency lets two parsers disagree about where a body ends
//! (request smuggling): a chunk size is 1 to 16 hex digits, followed only by extensions
//! (`;name=value`, ignored) and CRLF; chunk data must be followed by CRLF; lines end in
//! CRLF; trailer lines must be well-formed fields.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::MAX_HEADERS;

/// The longest chunk-size line (with its extensions) or trailer line accepted.
pub const MAX_LINE: usize = 8 << 10;

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (this many read so far).
    Trailers(usize),
    Done,
}

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The trailer fields, when the body had any; `End` follows.
    Trailers(HeaderMap),
    /// The buffer holds no complete piece: read more.
    NeedMore,
    End,
}

/// Why a chunked body cannot be decoded; the connection cannot be used after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidChunk(pub &'static str);

impl std::fmt::Display for InvalidChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidChunk {}

impl Chunked {
    /// Takes the next piece from the front of `buf`. Trailer fields are collected into
    /// `trailers` until the body ends.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        trailers: &mut Option<HeaderMap>,
    ) -> Result<Decoded, InvalidChunk> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = left.min(buf.len() as u64);
                    *self = if take == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - take)
                    };
                    return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(InvalidChunk("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(count) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Chunked::Done;
                        if let Some(fields) = trailers.take() {
                            return Ok(Decoded::Trailers(fields));
                        }
                        continue;
                    }
                    if count == MAX_HEADERS {
                        return Err(InvalidChunk("too many trailer fields"));
                    }
                    let (name, value) = trailer_field(line.freeze())?;
                    trailers
                        .get_or_insert_with(HeaderMap::new)
                        .append(name, value);
                    *self = Chunked::Trailers(count + 1);
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The size of a chunk-size line: `1*16HEXDIG *( BWS ";" chunk-ext )`.
fn chunk_size(line: &[u8]) -> Result<u64, InvalidChunk> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(InvalidChunk("invalid chunk size"));
    }
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    if !rest.is_empty() && !ext.starts_with(b";") {
        return Err(InvalidChunk("invalid chunk size"));
    }
    if ext
        .iter()
        .any(|&b| b != b'\t' && !(b' '..0x7f).contains(&b))
    {
        return Err(InvalidChunk("invalid chunk extension"));
    }
    let hex = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(hex, 16).map_err(|_| InvalidChunk("invalid chunk size"))
}

/// One trailer line as a field; its value shares the line's bytes.
fn trailer_field(line: Bytes) -> Result<(HeaderName, HeaderValue), InvalidChunk> {
    let invalid = InvalidChunk("invalid trailer field");
    let colon = line.iter().position(|&b| b == b':').ok_or(invalid)?;
    // A name is a token: no whitespace, so no obs-fold continuation either.
    let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| invalid)?;
    let value = line.slice(colon + 1..);
    let start = value.len() - value.trim_ascii_start().len();
    let end = value.trim_ascii_end().len();
    let value = if start >= end {
        HeaderValue::from_static("")
    } else {
        HeaderValue::from_maybe_shared(value.slice(start..end)).map_err(|_| invalid)?
    };
    Ok((name, value))
}

/// Removes and returns one CRLF-terminated line (without the CRLF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, InvalidChunk> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end > MAX_LINE => Err(InvalidChunk("chunk line too long")),
        Some(end) => {
            let mut line = buf.split_to(end + 2);
            line.truncate(end);
            if line.contains(&b'\n') || line.contains(&b'\r') {
                return Err(InvalidChunk("bare CR or LF in a chunk line"));
            }
            Ok(Some(line))
        }
        // A line within the limit may still be waiting for its LF after its last CR.
        None if buf.len() > MAX_LINE + 1 => Err(InvalidChunk("chunk line too long")),
        None => Ok(None),
    }
}

/// The size line that opens a chunk of `len` bytes; the chunk ends with a CRLF after its
/// data, which the writer sends itself.
pub fn encode_size(mut len: usize, out: &mut Vec<u8>) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[len % 16];
        len /= 16;
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
}

/// One whole chunk. Empty data writes nothing: a chunk of size 0 is the last chunk, and
/// would end the body early (an HTTP/2 client's last DATA frame is often empty).
pub fn encode(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    encode_size(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The end of a chunked body with trailer fields.
pub fn encode_last(trailers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        super::header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed `step` bytes at a time.
    fn decode_in_steps(
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), InvalidChunk> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = None;
        let mut seen_trailers = None;
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match state.decode(&mut buf, &mut trailers)? {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Trailers(t) => seen_trailers = Some(t),
                    Decoded::NeedMore | Decoded::End => break,
                }
            }
        }
        assert_eq!(state, Chunked::Done, "the body ended");
        Ok((body, seen_trailers))
    }

    #[test]
    fn every_split_point_decodes_the_same() {
        let wire = b"5;ext=1\r\nhello\r\n6 ; e\r\n world\r\n0\r\nx-trailer: 1 \r\n\r\n";
        for step in 1..wire.len() {
            let (body, trailers) = decode_in_steps(wire, step).unwrap();
            assert_eq!(body, b"hello world");
            assert_eq!(trailers.unwrap()["x-trailer"], "1");
        }
        let (body, trailers) = decode_in_steps(b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty() && trailers.is_none());
    }

    #[test]
    fn loose_framing_is_refused() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5;a\x00\r\nhello\r\n",
            b"0\r\n bad: fold\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            let mut state = Chunked::Size;
            let mut buf = BytesMut::from(wire);
            let mut trailers = None;
            let result = loop {
                match state.decode(&mut buf, &mut trailers) {
                    Ok(Decoded::Data(_) | Decoded::Trailers(_)) => continue,
                    other => break other,
                }
            };
            assert!(
                result.is_err(),
                "{:?}: {result:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn a_line_at_the_limit_is_accepted_however_it_arrives() {
        let wire = format!("1;{}\r\na\r\n0\r\n\r\n", "v".repeat(MAX_LINE - 2));
        // A read of MAX_LINE + 1 bytes ends between the size line's CR and its LF.
        for step in [wire.len(), MAX_LINE + 1, MAX_LINE] {
            assert_eq!(decode_in_steps(wire.as_bytes(), step).unwrap().0, b"a");
        }
        let longer = format!("1;{}\r\na\r\n0\r\n\r\n", "v".repeat(MAX_LINE - 1));
        for step in [longer.len(), MAX_LINE + 1, MAX_LINE + 2] {
            assert!(decode_in_steps(longer.as_bytes(), step).is_err());
        }
    }

    #[test]
    fn empty_data_is_no_chunk() {
        let mut out = Vec::new();
        encode(b"ab", &mut out);
        encode(b"", &mut out);
        encode(b"c", &mut out);
        out.extend_from_slice(LAST_CHUNK);
        assert_eq!(out, b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n");
        assert_eq!(decode_in_steps(&out, 3).unwrap().0, b"abc");
    }

    #[test]
    fn encoding_round_trips() {
        let mut out = Vec::new();
        encode(&[b'a'; 300], &mut out);
        assert!(out.starts_with(b"12c\r\naaa") && out.ends_with(b"a\r\n"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        encode_last(&trailers, &mut out);
        let (body, seen) = decode_in_steps(&out, 7).unwrap();
        assert_eq!(body, [b'a'; 300]);
        assert_eq!(seen.unwrap()["grpc-status"], "0");
    }
}
