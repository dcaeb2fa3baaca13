"""The operator's commands beside `run`: doctor, selftest, service, init, pause, the tables."""
