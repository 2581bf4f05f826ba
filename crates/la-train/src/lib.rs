//! la-train
