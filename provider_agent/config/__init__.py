"""agent.toml: the schema (pydantic models, written once), reading the file, and the one-line
messages an operator sees when it is wrong (config.md)."""
