//! One metadata update as a caller hands it in, and the checks it must pass.
//!
//! `add` validates a whole call before it queues anything: a key must be non-empty and at
//! most [`MAX_KEY_CHARS`] characters (PostgreSQL's `varchar(127)` counts characters), and no
//! field may hold a NUL byte (PostgreSQL `text` cannot store one). Over-long values and
//! errors are not rejected but cut, exactly as Coder's agent API does before its batcher,
//! so a chatty agent still gets its latest state recorded with an explanation.

use std::fmt;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

/// The longest key, in characters, that the `varchar(127)` column accepts.
pub const MAX_KEY_CHARS: usize = 127;

/// The most bytes a valid key can take: 127 characters of up to 4 bytes.
const MAX_KEY_BYTES: usize = MAX_KEY_CHARS * 4;

/// PostgreSQL's `timestamptz` range, in seconds from the Unix epoch: from 4714-11-24 BC
/// (inclusive) to 294277-01-01 (exclusive). Outside it the server refuses the value, or the
/// client's conversion overflows, so `add` refuses it first.
const EARLIEST_COLLECTED_AT_SECS_BEFORE_EPOCH: u64 = 210_866_803_200;
const END_OF_COLLECTED_AT_SECS_AFTER_EPOCH: u64 = 9_224_318_016_000;

/// The range as instants, made once: comparing two `SystemTime`s is a few instructions,
/// computing a `duration_since` per key was a quarter of `add`'s cost.
///
/// `None` where the platform's `SystemTime` cannot hold the bound, so no time it can hold
/// is past it: Windows counts 100 ns intervals from 1601 in an `i64`, which ends in the
/// year 30828, long before the end of PostgreSQL's range (so `UNIX_EPOCH + 294,277 years`
/// panicked there). Checked arithmetic keeps the same bounds everywhere they exist.
static COLLECTED_AT_RANGE: LazyLock<CollectedAtRange> = LazyLock::new(|| {
    CollectedAtRange::new(
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(EARLIEST_COLLECTED_AT_SECS_BEFORE_EPOCH)),
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(END_OF_COLLECTED_AT_SECS_AFTER_EPOCH)),
    )
});

/// The `collected_at` values PostgreSQL can store: from `earliest` (inclusive) to `end`
/// (exclusive). A bound the platform cannot represent is open, and never reached.
#[derive(Debug, Clone, Copy)]
struct CollectedAtRange {
    earliest: SystemTime,
    end: SystemTime,
    /// An open side holds the epoch as a placeholder: its flag is read only when the
    /// comparison fails, so where both bounds exist (every Unix) a key costs two
    /// comparisons, as before the bounds could be open.
    earliest_open: bool,
    end_open: bool,
}

impl CollectedAtRange {
    fn new(earliest: Option<SystemTime>, end: Option<SystemTime>) -> Self {
        CollectedAtRange {
            earliest: earliest.unwrap_or(SystemTime::UNIX_EPOCH),
            end: end.unwrap_or(SystemTime::UNIX_EPOCH),
            earliest_open: earliest.is_none(),
            end_open: end.is_none(),
        }
    }

    #[inline]
    fn contains(&self, at: SystemTime) -> bool {
        (at >= self.earliest || self.earliest_open) && (at < self.end || self.end_open)
    }
}

/// Values longer than this many bytes are cut to it and the error explains why.
pub const MAX_VALUE_BYTES: usize = 2048;

/// Errors longer than this many bytes are replaced by a message that gives their length.
pub const MAX_ERROR_BYTES: usize = 2048;

/// One metadata update of one agent: the newest result of one of its metadata scripts.
///
/// ```
/// use std::time::SystemTime;
/// use metadata_batcher::Metadata;
///
/// let m = Metadata::new("cpu", "42%", "", SystemTime::now());
/// assert_eq!(m.key, "cpu");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// The metadata key, as registered for the agent.
    pub key: String,
    /// The value the agent collected.
    pub value: String,
    /// The error the agent's script reported, empty when it succeeded.
    pub error: String,
    /// When the agent collected the value; per (agent, key) only the newest is kept.
    pub collected_at: SystemTime,
}

impl Metadata {
    /// Makes an update.
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        error: impl Into<String>,
        collected_at: SystemTime,
    ) -> Self {
        Metadata {
            key: key.into(),
            value: value.into(),
            error: error.into(),
            collected_at,
        }
    }

    /// Checks what the database would refuse. Cheap on the common path: a key of at most
    /// 127 bytes cannot have more than 127 characters, so characters are only counted for
    /// longer keys.
    pub(crate) fn validate(&self) -> Result<(), InvalidMetadata> {
        if self.key.is_empty() {
            return Err(InvalidMetadata::EmptyKey);
        }
        if self.key.len() > MAX_KEY_CHARS {
            let chars = self.key.chars().count();
            if chars > MAX_KEY_CHARS {
                return Err(InvalidMetadata::KeyTooLong { chars });
            }
        }
        if !COLLECTED_AT_RANGE.contains(self.collected_at) {
            return Err(InvalidMetadata::CollectedAtOutOfRange);
        }
        for (field, text) in [
            (MetadataField::Key, &self.key),
            (MetadataField::Value, &self.value),
            (MetadataField::Error, &self.error),
        ] {
            if has_nul(text.as_bytes()) {
                return Err(InvalidMetadata::NulByte { field });
            }
        }
        Ok(())
    }

    /// Whether [`enforce_size_limits`](Self::enforce_size_limits) would leave this entry as
    /// it is: the common case, checked without touching the strings' bytes.
    #[inline]
    pub(crate) fn within_size_limits(&self) -> bool {
        self.key.capacity() <= MAX_KEY_BYTES
            && self.value.capacity() <= MAX_VALUE_BYTES
            && self.error.capacity() <= MAX_ERROR_BYTES
    }

    /// Cuts an over-long value or error the way Coder's agent API does.
    ///
    /// Go checks the value first and then the caller's original error, so when both are too
    /// long the error's message wins. Both lengths are taken before anything changes, so
    /// the error check can never look at the value's replacement text. Unlike Go's byte
    /// slice, the cut stays on a character boundary: PostgreSQL refuses invalid UTF-8.
    pub(crate) fn enforce_size_limits(&mut self) {
        let (value_len, error_len) = (self.value.len(), self.error.len());
        if error_len > MAX_ERROR_BYTES {
            self.error = format!("error of {error_len} bytes exceeded {MAX_ERROR_BYTES} bytes");
        } else if value_len > MAX_VALUE_BYTES {
            self.error = format!("value of {value_len} bytes exceeded {MAX_VALUE_BYTES} bytes");
        }
        if value_len > MAX_VALUE_BYTES {
            truncate_at_char_boundary(&mut self.value, MAX_VALUE_BYTES);
        }
        // The memory bound (docs/operations.md) counts each field at its longest valid
        // size, so spare capacity a caller left in a string must not be kept.
        for (text, max) in [
            (&mut self.key, MAX_KEY_BYTES),
            (&mut self.value, MAX_VALUE_BYTES),
            (&mut self.error, MAX_ERROR_BYTES),
        ] {
            if text.capacity() > max {
                text.shrink_to_fit();
            }
        }
    }
}

fn truncate_at_char_boundary(text: &mut String, max_bytes: usize) {
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

/// Which field of a [`Metadata`] a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetadataField {
    /// [`Metadata::key`].
    Key,
    /// [`Metadata::value`].
    Value,
    /// [`Metadata::error`].
    Error,
}

impl MetadataField {
    /// The field's name: `"key"`, `"value"` or `"error"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetadataField::Key => "key",
            MetadataField::Value => "value",
            MetadataField::Error => "error",
        }
    }
}

/// What is wrong with one [`Metadata`] that `add` refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidMetadata {
    /// The key is the empty string.
    EmptyKey,
    /// The key has more than [`MAX_KEY_CHARS`] characters.
    KeyTooLong {
        /// How many characters it has.
        chars: usize,
    },
    /// A field holds a NUL byte, which PostgreSQL text cannot store.
    NulByte {
        /// The field that holds it.
        field: MetadataField,
    },
    /// `collected_at` is outside the range PostgreSQL's `timestamptz` can store
    /// (4714-11-24 BC to 294276-12-31 AD).
    CollectedAtOutOfRange,
}

impl fmt::Display for InvalidMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidMetadata::EmptyKey => f.write_str("the key is empty; every metadata entry needs the key it was registered under"),
            InvalidMetadata::KeyTooLong { chars } => write!(
                f,
                "the key has {chars} characters, more than the {MAX_KEY_CHARS} a key may have"
            ),
            InvalidMetadata::NulByte { field } => write!(
                f,
                "the {} contains a NUL byte, which PostgreSQL text cannot store; strip or escape it",
                field.as_str()
            ),
            InvalidMetadata::CollectedAtOutOfRange => f.write_str(
                "collected_at is outside 4714 BC..294276 AD, the range PostgreSQL timestamps can hold; \
                 the agent's clock or the conversion of its timestamp is wrong",
            ),
        }
    }
}

impl std::error::Error for InvalidMetadata {}

/// Whether `bytes` holds a NUL byte, which PostgreSQL's `text` cannot store.
///
/// Nearly every key and value is short, and a call to the general scan costs more than
/// the scan itself there: up to 16 bytes are checked as two overlapping words (4 to 7 bytes
/// as two overlapping 4-byte halves of one word), with the classic test for a zero byte in
/// a word. Longer strings take the standard library's scan.
#[inline]
fn has_nul(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero exactly when some byte of `word` is zero.
    let zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS != 0;
    if let (Some(first), Some(last)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
        if bytes.len() > 16 {
            return bytes.contains(&0);
        }
        return zero_byte(u64::from_ne_bytes(*first)) || zero_byte(u64::from_ne_bytes(*last));
    }
    if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        let halves =
            u64::from(u32::from_ne_bytes(*first)) | u64::from(u32::from_ne_bytes(*last)) << 32;
        return zero_byte(halves);
    }
    // 0 to 3 bytes: the first, middle and last are all of them.
    match bytes.len() {
        0 => false,
        len => bytes[0] == 0 || bytes[len / 2] == 0 || bytes[len - 1] == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(key: &str, value: &str, error: &str) -> Metadata {
        Metadata::new(key, value, error, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn has_nul_agrees_with_a_byte_scan() {
        // Every length the word checks cover and beyond, with a NUL at every position (and
        // none), over bytes that make the zero-byte test's borrows and high bits matter.
        for len in 0..=40 {
            for fill in [0x01u8, 0x80, 0xFF, b'a'] {
                let clean = vec![fill; len];
                assert!(!has_nul(&clean), "len {len} fill {fill:#x}");
                for at in 0..len {
                    let mut bytes = clean.clone();
                    bytes[at] = 0;
                    assert!(has_nul(&bytes), "len {len} fill {fill:#x} NUL at {at}");
                }
            }
        }
    }

    #[test]
    fn validation() {
        assert_eq!(md("", "", "").validate(), Err(InvalidMetadata::EmptyKey));
        assert_eq!(md(&"k".repeat(127), "", "").validate(), Ok(()));
        // 127 characters of 2 bytes each: 254 bytes, still valid.
        assert_eq!(md(&"é".repeat(127), "", "").validate(), Ok(()));
        assert_eq!(
            md(&"é".repeat(128), "", "").validate(),
            Err(InvalidMetadata::KeyTooLong { chars: 128 })
        );
        // Each bound and its neighbour, where the platform can hold them (checked, as
        // `validate` is: Windows cannot hold the end of the range).
        let secs = Duration::from_secs;
        let before = |s| SystemTime::UNIX_EPOCH.checked_sub(secs(s));
        let after = |s| SystemTime::UNIX_EPOCH.checked_add(secs(s));
        for (collected_at, valid) in [
            (before(EARLIEST_COLLECTED_AT_SECS_BEFORE_EPOCH), true),
            (before(EARLIEST_COLLECTED_AT_SECS_BEFORE_EPOCH + 1), false),
            (after(END_OF_COLLECTED_AT_SECS_AFTER_EPOCH - 1), true),
            (after(END_OF_COLLECTED_AT_SECS_AFTER_EPOCH), false),
            (Some(SystemTime::UNIX_EPOCH), true),
        ] {
            let Some(collected_at) = collected_at else {
                continue;
            };
            let result = Metadata::new("k", "", "", collected_at).validate();
            assert_eq!(result.is_ok(), valid, "{collected_at:?}");
        }
        for (m, field) in [
            (md("a\0", "", ""), MetadataField::Key),
            (md("a", "b\0", ""), MetadataField::Value),
            (md("a", "b", "\0c"), MetadataField::Error),
        ] {
            assert_eq!(m.validate(), Err(InvalidMetadata::NulByte { field }));
        }
    }

    /// The behaviour on a platform whose `SystemTime` cannot hold a bound (Windows, for
    /// the end): that side is open, and the bounds it can hold still apply.
    #[test]
    fn a_bound_the_platform_cannot_hold_is_never_reached() {
        let epoch = SystemTime::UNIX_EPOCH;
        let year = Duration::from_secs(365 * 24 * 3600);
        let open_ended = CollectedAtRange::new(Some(epoch), None);
        assert!(open_ended.contains(epoch));
        assert!(open_ended.contains(epoch + 1000 * year));
        assert!(!open_ended.contains(epoch - year));
        let open_start = CollectedAtRange::new(None, Some(epoch));
        assert!(open_start.contains(epoch - 1000 * year));
        assert!(!open_start.contains(epoch));
        // Building the range never panics, and on this platform both bounds exist where
        // `SystemTime` is 64-bit seconds (Linux and macOS).
        let range = *COLLECTED_AT_RANGE;
        if cfg!(unix) {
            assert!(!range.earliest_open && !range.end_open, "{range:?}");
        }
    }

    #[test]
    fn long_value_is_cut_at_a_char_boundary_and_explained() {
        // 1 byte then 'é' (2 bytes) repeated: byte 2048 falls inside a character.
        let mut m = md("k", &format!("a{}", "é".repeat(1200)), "old error");
        m.enforce_size_limits();
        assert_eq!(m.value.len(), 2047);
        assert!(m.value.is_char_boundary(m.value.len()));
        assert_eq!(m.error, "value of 2401 bytes exceeded 2048 bytes");

        let mut m = md("k", "v", &"e".repeat(3000));
        m.enforce_size_limits();
        assert_eq!(m.value, "v");
        assert_eq!(m.error, "error of 3000 bytes exceeded 2048 bytes");

        // Both too long: Go's message about the error, and the value still cut.
        let mut m = md("k", &"v".repeat(3000), &"e".repeat(4000));
        m.enforce_size_limits();
        assert_eq!(m.value, "v".repeat(2048));
        assert_eq!(m.error, "error of 4000 bytes exceeded 2048 bytes");

        // A multi-byte value with an over-long error: the cut still lands on a boundary.
        let mut m = md("k", &format!("a{}", "é".repeat(1200)), &"e".repeat(2049));
        m.enforce_size_limits();
        assert_eq!(m.value.len(), 2047);
        assert_eq!(m.error, "error of 2049 bytes exceeded 2048 bytes");

        let mut m = md("k", &"v".repeat(2048), &"e".repeat(2048));
        m.enforce_size_limits();
        assert_eq!((m.value.len(), m.error.len()), (2048, 2048));

        let mut m = md("k", "v", "");
        m.key.reserve(10_000);
        m.value.reserve(10_000);
        m.enforce_size_limits();
        assert!(m.key.capacity() <= MAX_KEY_BYTES && m.value.capacity() <= MAX_VALUE_BYTES);
    }
}
