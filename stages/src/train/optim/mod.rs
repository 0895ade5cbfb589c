//! Optimisers, each config next to its optimiser: [`adam`] (Kingma & Ba 2015, fused through
//! the C++ shim) and [`rmsprop`] (Hinton's lecture 6e, as WGAN uses it).

pub mod adam;
pub mod rmsprop;
