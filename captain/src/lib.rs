//! captain
