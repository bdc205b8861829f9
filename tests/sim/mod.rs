//! The simulation's parts: a seeded generator, the faulty store and publisher, the
//! reference model, the cases and the driver that runs them. tests/simulation.rs runs
//! the cases, shrinks a failing one, and prints how to replay it.

pub mod case;
pub mod faults;
pub mod model;
pub mod publisher;
pub mod rng;
pub mod run;
pub mod store;
