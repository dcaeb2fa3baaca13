"""What must survive the process: the outbox (terminal frames, the ledger), the in-flight
journal, the state dir."""
