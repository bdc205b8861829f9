//! What a caught panic said, for the one log line that reports it.

use std::any::Any;

/// The message of a caught panic: its `&str` or `String` payload, or a placeholder.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
