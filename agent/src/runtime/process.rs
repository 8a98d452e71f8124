//! Services as child processes of the agent (the `process` runtime).
