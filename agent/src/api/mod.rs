//! The agent's REST/JSON API under `/v1`.
