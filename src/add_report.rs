//! What [`Batcher::add`](crate::Batcher::add) answers: [`AddReport`] for a call it
//! accepted, [`AddError`] for one it refused.

use std::fmt;

use crate::InvalidMetadata;

/// What `add` did with a call's keys.
///
/// When the channel has room for only part of a call, the first `accepted` entries of the
/// call's vector are queued and the rest are dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AddReport {
    /// Keys queued for the batch: the call's first `accepted` entries.
    pub accepted: usize,
    /// Keys dropped because the channel was full: the call's last `dropped` entries;
    /// counted in `Stats::dropped`.
    pub dropped: usize,
}

/// Why `add` refused a call; nothing of a refused call is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddError {
    /// The batcher is closed (or closing).
    Closed,
    /// An entry of the call is invalid.
    Invalid {
        /// Its position in the call's vector.
        index: usize,
        /// What is wrong with it.
        problem: InvalidMetadata,
    },
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::Closed => {
                f.write_str("the metadata batcher is closed; updates can no longer be accepted")
            }
            AddError::Invalid { index, problem } => write!(
                f,
                "metadata entry {index} is invalid: {problem}; nothing from this call was queued"
            ),
        }
    }
}

impl std::error::Error for AddError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AddError::Invalid { problem, .. } => Some(problem),
            AddError::Closed => None,
        }
    }
}
