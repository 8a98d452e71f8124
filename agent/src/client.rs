//! The REST API's client, used by the `basalt` CLI and the tests.
