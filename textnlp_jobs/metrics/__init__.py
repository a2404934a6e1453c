"""Prometheus metrics: names follow the operations guide; no job id or prompt in any label."""
