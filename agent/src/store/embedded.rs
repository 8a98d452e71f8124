//! The embedded store of a one-host cluster: a crash-safe local file.
