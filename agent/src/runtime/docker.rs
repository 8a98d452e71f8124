//! Services as Docker containers through the Engine API (the `docker` runtime).
