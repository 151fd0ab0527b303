"""The only code that touches SQLite (via sqlite-utils). One module per group of tables."""
