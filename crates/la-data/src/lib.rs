//! la-data
