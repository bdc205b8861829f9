//! The reference model: for every (agent, key), the newest value any batcher accepted,
//! which the table must hold at the end unless a counted loss explains it.

use std::collections::HashMap;

use super::store::POISON;

#[derive(Default)]
struct Row {
    /// Every value accepted for the row, with its `collected_at` seconds.
    accepted: HashMap<String, u64>,
    newest: Option<u64>,
    /// Per batcher, the value it accepted last at `newest`: on equal timestamps the later
    /// arrival wins within a batcher, and across replicas the later write.
    candidates: HashMap<usize, String>,
}

#[derive(Default)]
pub struct Model {
    rows: HashMap<(u8, u8), Row>,
}

/// How the table compares with the model.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Rows not at their newest accepted value: each must be paid for by a counted loss.
    pub behind: usize,
    /// What can never happen, whatever was lost: a value never accepted, a refused value,
    /// or a value with another value's timestamp.
    pub violations: Vec<String>,
}

impl Model {
    pub fn accept(&mut self, batcher: usize, agent: u8, key: u8, secs: u64, value: String) {
        let row = self.rows.entry((agent, key)).or_default();
        row.accepted.insert(value.clone(), secs);
        if row.newest.is_none_or(|newest| secs > newest) {
            row.newest = Some(secs);
            row.candidates.clear();
        }
        if row.newest == Some(secs) {
            row.candidates.insert(batcher, value);
        }
    }

    /// Compares the stored (value, seconds) of every row the case uses.
    pub fn judge(&self, stored: impl Fn(u8, u8) -> (String, Option<u64>)) -> Verdict {
        let mut verdict = Verdict::default();
        for agent in 0..super::case::AGENTS {
            for key in 0..super::case::KEYS {
                let (value, secs) = stored(agent, key);
                let row = self.rows.get(&(agent, key));
                let Some(row) = row else {
                    if !value.is_empty() {
                        verdict
                            .violations
                            .push(format!("agent{agent} k{key}: {value:?} was never accepted"));
                    }
                    continue;
                };
                if value.is_empty() {
                    verdict.behind += 1;
                    continue;
                }
                if value.starts_with(POISON) {
                    verdict.violations.push(format!(
                        "agent{agent} k{key}: a refused value {value:?} was stored"
                    ));
                    continue;
                }
                match row.accepted.get(&value) {
                    None => verdict
                        .violations
                        .push(format!("agent{agent} k{key}: {value:?} was never accepted")),
                    Some(&at) if Some(at) != secs => verdict.violations.push(format!(
                        "agent{agent} k{key}: {value:?} stored at {secs:?}, accepted at {at}"
                    )),
                    Some(_) => {
                        let newest = row.newest == secs
                            && row.candidates.values().any(|candidate| *candidate == value);
                        if !newest {
                            verdict.behind += 1;
                        }
                    }
                }
            }
        }
        verdict
    }
}
