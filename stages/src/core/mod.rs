//! The engine's contract, shared by every stage: how a stage runs and reports
//! ([`stage`]), what flows between stages ([`item`]), the shapes and types of the data a port
//! carries ([`caps`]), the ports and outputs a stage kind declares ([`ports`]), and problems with a
//! configuration ([`problem`]).

pub mod caps;
pub mod item;
pub mod ports;
pub mod problem;
pub mod stage;
