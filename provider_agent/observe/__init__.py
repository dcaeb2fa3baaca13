"""What the operator and the coordinator see: heartbeat figures, /metrics, /status, logs,
systemd."""
