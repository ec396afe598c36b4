//! HTTP/2 (RFC 9113): hyper's codec and drivers, and what gatehouse decides about them: the
//! connection preface, which a plaintext HTTP/1 connection may open with (h2c), the server
//! settings of the client's connection ([`downstream`]) and the handshake of the app's
//! ([`upstream`]).

pub mod downstream;
pub mod upstream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 server's answer to an invalid connection preface (RFC 9113 §3.4: a connection
/// error of type PROTOCOL_ERROR): its own preface, an empty SETTINGS frame, then GOAWAY
/// with last stream 0 and PROTOCOL_ERROR.
pub const PREFACE_REFUSED: &[u8] = &[
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, empty
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes of payload, stream 0
    0, 0, 0, 0, // last stream id
    0, 0, 0, 0x1, // PROTOCOL_ERROR
];
