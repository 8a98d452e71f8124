//! Making this host's services match the store.
