//! The NOTIFY payload format under arbitrary input: decoding never panics, and what it
//! accepts is exactly what the encoder produces.

use metadata_batcher::agent_ids::{
    decode_chunk, encode_chunks, DecodeError, MAX_IDS_PER_CHUNK, UUID_BASE64_LEN,
};
use proptest::prelude::*;
use uuid::Uuid;

const BASE64_AND_PAD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_payloads_are_canonical(
        payload in prop::collection::vec(any::<u8>(), 0..200)
    ) {
        match decode_chunk(&payload) {
            Ok(ids) => {
                prop_assert_eq!(ids.len() * UUID_BASE64_LEN, payload.len());
                // Anything accepted re-encodes to the very same bytes.
                prop_assert_eq!(encode_chunks(&ids).concat(), payload);
            }
            Err(DecodeError::Empty) => prop_assert!(payload.is_empty()),
            Err(DecodeError::Length { len }) => {
                prop_assert_eq!(len, payload.len());
                prop_assert!(len % UUID_BASE64_LEN != 0);
            }
            Err(DecodeError::InvalidId { index, .. }) => {
                prop_assert!(index < payload.len() / UUID_BASE64_LEN);
            }
            Err(other) => prop_assert!(false, "an error this test does not know: {other:?}"),
        }
    }

    /// Random bytes rarely look like base64; these do, so the decoder's own checks (the
    /// alphabet, padding, non-zero trailing bits) are what is exercised.
    #[test]
    fn base64_looking_payloads_are_canonical_or_refused(
        payload in prop::collection::vec(prop::sample::select(BASE64_AND_PAD.to_vec()), UUID_BASE64_LEN * 3)
    ) {
        if let Ok(ids) = decode_chunk(&payload) {
            prop_assert_eq!(encode_chunks(&ids).concat(), payload);
        }
    }

    #[test]
    fn any_ids_round_trip_in_chunks_within_the_notify_limit(
        raw in prop::collection::vec(any::<u128>(), 0..1200)
    ) {
        let ids: Vec<Uuid> = raw.into_iter().map(Uuid::from_u128).collect();
        let chunks = encode_chunks(&ids);
        prop_assert_eq!(chunks.len(), ids.len().div_ceil(MAX_IDS_PER_CHUNK));
        let mut decoded = Vec::new();
        for chunk in &chunks {
            prop_assert!(chunk.len() < 8000);
            decoded.extend(decode_chunk(chunk).unwrap());
        }
        prop_assert_eq!(decoded, ids);
    }
}
