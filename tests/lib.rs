//! Shared helpers for the end-to-end tests (finding the `basalt` binary, free ports, child processes).
