//! Shared helpers for Basalt benchmarks.
