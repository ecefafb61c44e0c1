"""ferry agent: daemon, migration engine, CLI."""
