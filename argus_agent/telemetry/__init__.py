"""Telemetry for supervised jobs: resource snapshots, log lines and lifecycle events."""
