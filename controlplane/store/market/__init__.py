"""The market's record in SQLite: the only market code that touches the database."""
