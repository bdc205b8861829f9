//! [`SimPublisher`]: records every agent it announces, and fails or panics at the case's
//! rates while its faults are on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use metadata_batcher::{agent_ids, PublishError, Publisher};
use parking_lot::Mutex;
use uuid::Uuid;

use super::faults::{seen, PublishRates};
use super::rng::Rng;

pub struct SimPublisher {
    pub announced: Arc<Mutex<HashSet<Uuid>>>,
    pub faulty: Arc<AtomicBool>,
    rates: PublishRates,
    rng: Rng,
}

impl SimPublisher {
    pub fn new(seed: u64, rates: PublishRates, faulty: Arc<AtomicBool>) -> Self {
        SimPublisher {
            announced: Arc::default(),
            faulty,
            rates,
            rng: Rng::new(seed),
        }
    }
}

impl Publisher for SimPublisher {
    fn publish(&mut self, _channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        if self.faulty.load(Relaxed) {
            if self.rng.chance(self.rates.panic) {
                seen::count("publisher panic");
                panic!("sim: publisher panicked");
            }
            if self.rng.chance(self.rates.fail) {
                seen::count("publish failed");
                return Err(PublishError::new("sim: NOTIFY failed"));
            }
        }
        let agents = agent_ids::decode_chunk(payload)
            .map_err(|error| PublishError::new(format!("sim: bad payload: {error}")))?;
        self.announced.lock().extend(agents);
        Ok(())
    }
}
