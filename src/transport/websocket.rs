//! The few pieces of the WebSocket wire format (RFC 6455) the proxy needs to read a socket it
//! splices: the opening handshake's accept key (§4.2.2), a frame's head (§5.2), unmasking, and
//! writing a frame. No reassembly, no extensions, no state: whoever reads a frame decides what
//! to do with bytes it cannot read (pass them on).

/// A frame's opcode (§5.2).
pub const TEXT: u8 = 0x1;
pub const CLOSE: u8 = 0x8;

/// A frame's head, read from the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// RSV1..3 (an extension's bits, e.g. permessage-deflate's RSV1).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// The head's own length (2 to 14 bytes).
    pub head_len: usize,
    pub payload_len: u64,
}

impl Head {
    /// Reads the head at the front of `buf`: `None` until it is all there.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let (&b0, rest) = buf.split_first()?;
        let (&b1, rest) = rest.split_first()?;
        let (payload_len, rest, ext) = match b1 & 0x7f {
            126 => {
                let b: [u8; 2] = rest.get(..2)?.try_into().ok()?;
                (u64::from(u16::from_be_bytes(b)), &rest[2..], 2)
            }
            127 => {
                let b: [u8; 8] = rest.get(..8)?.try_into().ok()?;
                (u64::from_be_bytes(b), &rest[8..], 8)
            }
            n => (u64::from(n), rest, 0),
        };
        let mask = if b1 & 0x80 != 0 {
            Some(rest.get(..4)?.try_into().ok()?)
        } else {
            None
        };
        Some(Head {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0f,
            mask,
            head_len: 2 + ext + if mask.is_some() { 4 } else { 0 },
            payload_len,
        })
    }

    /// The whole frame's length, head and payload.
    pub fn frame_len(&self) -> u64 {
        self.head_len as u64 + self.payload_len
    }
}

/// Unmasks (or masks: the same XOR) `payload`, whose first byte is at `offset` in the frame's
/// payload.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// One whole frame (FIN set) of `opcode` carrying `payload`, masked with `mask` when given
/// (a client's frames must be, a server's must not be).
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0f));
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[start..], k, 0);
    }
    out
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (§4.2.2: base64 of the SHA-1 of
/// the key and the protocol's GUID).
pub fn accept_key(key: &[u8]) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64(&h.finalize())
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_of_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_masked_and_not_at_every_length_form() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let frame = encode(TEXT, &payload, mask);
                let head = Head::parse(&frame).expect("a whole head");
                assert!(head.fin);
                assert_eq!(head.opcode, TEXT);
                assert_eq!(head.mask, mask);
                assert_eq!(head.payload_len, len as u64);
                assert_eq!(head.frame_len(), frame.len() as u64);
                let mut body = frame[head.head_len..].to_vec();
                if let Some(k) = mask {
                    apply_mask(&mut body, k, 0);
                }
                assert_eq!(body, payload);
                // A head cut short is not read.
                assert_eq!(Head::parse(&frame[..head.head_len - 1]), None);
            }
        }
    }

    #[test]
    fn the_rfc_examples_parse() {
        // §5.7: a single-frame unmasked "Hello", and the masked one.
        let h = Head::parse(&[0x81, 0x05, 0x48, 0x65]).expect("head");
        assert_eq!(
            (h.opcode, h.payload_len, h.mask, h.head_len),
            (1, 5, None, 2)
        );
        let mut f = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = Head::parse(&f).expect("head");
        let k = h.mask.expect("masked");
        apply_mask(&mut f[6..], k, 0);
        assert_eq!(&f[6..], b"Hello");
    }
}
