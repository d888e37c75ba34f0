//! zeitwork's node agent.
pub mod image;
pub mod net;
pub mod runtime;
