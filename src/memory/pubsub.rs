//! [`MemoryPubsub`]: channels of subscribers, in a map.

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::{PublishError, Publisher};

#[derive(Default)]
struct Channels {
    subscribers: HashMap<String, Vec<Sender<Vec<u8>>>>,
    published: u64,
    failing: bool,
}

/// A real in-process [`Publisher`]: each payload goes to every current subscriber of its
/// channel. Clones share the subscribers.
///
/// ```
/// use metadata_batcher::{MemoryPubsub, Publisher};
///
/// let mut pubsub = MemoryPubsub::new();
/// let messages = pubsub.subscribe("news");
/// pubsub.publish("news", b"hello").unwrap();
/// assert_eq!(messages.try_recv().unwrap(), b"hello");
/// ```
#[derive(Clone, Default)]
pub struct MemoryPubsub {
    channels: Arc<Mutex<Channels>>,
}

impl MemoryPubsub {
    /// A pubsub with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes to `channel`: every payload published on it from now on arrives on the
    /// returned receiver. Dropping the receiver unsubscribes.
    pub fn subscribe(&self, channel: &str) -> Receiver<Vec<u8>> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        self.channels
            .lock()
            .subscribers
            .entry(channel.to_owned())
            .or_default()
            .push(sender);
        receiver
    }

    /// How many payloads were published successfully, on any channel.
    pub fn published(&self) -> u64 {
        self.channels.lock().published
    }

    /// Simulates a broken pubsub: while set, every publish fails.
    pub fn set_failing(&self, failing: bool) {
        self.channels.lock().failing = failing;
    }
}

impl Publisher for MemoryPubsub {
    fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        let mut channels = self.channels.lock();
        if channels.failing {
            return Err(PublishError::new("memory pubsub set to fail"));
        }
        channels.published += 1;
        if let Some(subscribers) = channels.subscribers.get_mut(channel) {
            subscribers.retain(|subscriber| subscriber.send(payload.to_vec()).is_ok());
        }
        Ok(())
    }
}
