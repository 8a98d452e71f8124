//! Who takes over a volume's controller, and when a lost replica is replaced: pure decisions.
