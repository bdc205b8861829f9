//! The NOTIFY payload format: which agents a flush changed.
//!
//! Every successful flush announces the distinct agent IDs it wrote, so that each replica's
//! watchers can re-read those agents' rows. The format is the one Coder's Go batcher uses, so
//! Rust and Go replicas can share a database: each ID is its 16 bytes in standard base64
//! without padding (exactly [`UUID_BASE64_LEN`] bytes), IDs are concatenated with no
//! separator, and one payload carries at most [`MAX_IDS_PER_CHUNK`] IDs so that it stays
//! within PostgreSQL's NOTIFY payload limit.
//!
//! ```
//! use metadata_batcher::agent_ids;
//! use uuid::Uuid;
//!
//! let ids: Vec<Uuid> = (0..400u128).map(Uuid::from_u128).collect();
//! let chunks = agent_ids::encode_chunks(&ids);
//! assert_eq!(chunks.len(), 2); // 363 + 37
//! let mut decoded = agent_ids::decode_chunk(&chunks[0]).unwrap();
//! decoded.extend(agent_ids::decode_chunk(&chunks[1]).unwrap());
//! assert_eq!(decoded, ids);
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use uuid::Uuid;

/// Bytes one agent ID takes in a payload: 16 bytes in base64 without padding.
pub const UUID_BASE64_LEN: usize = 22;

/// The most IDs one payload carries: 363 × 22 = 7,986 bytes, the largest multiple of 22
/// within the 7,999 bytes PostgreSQL accepts as a NOTIFY payload (it must stay below 8,000).
pub const MAX_IDS_PER_CHUNK: usize = 363;

/// Encodes `ids` into payloads of at most [`MAX_IDS_PER_CHUNK`] IDs each, in order.
///
/// An empty slice gives no payloads. IDs are not deduplicated here; the batcher passes each
/// agent once.
pub fn encode_chunks(ids: &[Uuid]) -> Vec<Vec<u8>> {
    ids.chunks(MAX_IDS_PER_CHUNK)
        .map(|chunk| {
            let mut payload = vec![0u8; chunk.len() * UUID_BASE64_LEN];
            for (id, out) in chunk.iter().zip(payload.chunks_exact_mut(UUID_BASE64_LEN)) {
                let written = STANDARD_NO_PAD
                    .encode_slice(id.as_bytes(), out)
                    .expect("16 bytes always encode to exactly 22 base64 bytes");
                debug_assert_eq!(written, UUID_BASE64_LEN);
            }
            payload
        })
        .collect()
}

/// Decodes one payload back into agent IDs.
///
/// Never panics: a payload from a foreign or broken publisher gives a [`DecodeError`].
pub fn decode_chunk(payload: &[u8]) -> Result<Vec<Uuid>, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    if !payload.len().is_multiple_of(UUID_BASE64_LEN) {
        return Err(DecodeError::Length { len: payload.len() });
    }
    payload
        .chunks_exact(UUID_BASE64_LEN)
        .enumerate()
        .map(|(index, encoded)| {
            let mut bytes = [0u8; 16];
            match STANDARD_NO_PAD.decode_slice(encoded, &mut bytes) {
                Ok(16) => Ok(Uuid::from_bytes(bytes)),
                Ok(_) => Err(DecodeError::InvalidId {
                    index,
                    reason: "did not decode to 16 bytes".to_owned(),
                }),
                Err(err) => Err(DecodeError::InvalidId {
                    index,
                    reason: err.to_string(),
                }),
            }
        })
        .collect()
}

/// Why a NOTIFY payload is not a valid list of agent IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload was empty; the batcher never publishes an empty payload.
    Empty,
    /// The payload's length is not a multiple of [`UUID_BASE64_LEN`].
    Length {
        /// The payload's length in bytes.
        len: usize,
    },
    /// One ID in the payload is not valid unpadded standard base64 of 16 bytes.
    InvalidId {
        /// The position of the ID in the payload, counted in IDs from 0.
        index: usize,
        /// What the base64 decoder said.
        reason: String,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => f.write_str(
                "empty agent ID payload: a metadata batch payload holds at least one 22-byte ID",
            ),
            DecodeError::Length { len } => write!(
                f,
                "agent ID payload of {len} bytes is not a multiple of {UUID_BASE64_LEN}: \
                 it was not written by a metadata batcher, or was cut"
            ),
            DecodeError::InvalidId { index, reason } => write!(
                f,
                "agent ID {index} of the payload is not unpadded standard base64 of a UUID: {reason}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_exact_chunk_boundaries() {
        for n in [1usize, 362, 363, 364, 726, 727, 1000] {
            let ids: Vec<Uuid> = (0..n as u128).map(|i| Uuid::from_u128(i * 7919)).collect();
            let chunks = encode_chunks(&ids);
            assert_eq!(chunks.len(), n.div_ceil(MAX_IDS_PER_CHUNK));
            let mut decoded = Vec::new();
            for chunk in &chunks {
                assert!(chunk.len() <= MAX_IDS_PER_CHUNK * UUID_BASE64_LEN);
                assert!(chunk.len() < 8000);
                decoded.extend(decode_chunk(chunk).unwrap());
            }
            assert_eq!(decoded, ids);
        }
        assert!(encode_chunks(&[]).is_empty());
    }

    #[test]
    fn encoding_matches_go_format() {
        // Go: base64.RawStdEncoding.EncodeToString(id[:])
        let id = Uuid::parse_str("ffffffff-ffff-ffff-ffff-ffffffffffff").unwrap();
        assert_eq!(encode_chunks(&[id])[0], b"/////////////////////w".to_vec());
        let id = Uuid::nil();
        assert_eq!(encode_chunks(&[id])[0], b"AAAAAAAAAAAAAAAAAAAAAA".to_vec());
    }

    #[test]
    fn rejects_malformed_payloads() {
        assert_eq!(decode_chunk(b""), Err(DecodeError::Empty));
        assert_eq!(decode_chunk(b"AAAA"), Err(DecodeError::Length { len: 4 }));
        let mut payload = encode_chunks(&[Uuid::nil(), Uuid::max()]).remove(0);
        payload[30] = b'*';
        assert!(matches!(
            decode_chunk(&payload),
            Err(DecodeError::InvalidId { index: 1, .. })
        ));
        // Non-canonical trailing bits ("x" instead of "w") are rejected, not silently accepted.
        assert!(matches!(
            decode_chunk(b"/////////////////////x"),
            Err(DecodeError::InvalidId { index: 0, .. })
        ));
        assert!(decode_chunk(&[0xff; 44]).is_err());
        assert!(DecodeError::Length { len: 4 }.to_string().contains("22"));
    }
}
