//! PostgreSQL: the blocking store, the NOTIFY publisher, the LISTEN subscriber and the schema.
