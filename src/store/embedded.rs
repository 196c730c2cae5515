//! The embedded durable store (redb). Placeholder until implemented.
