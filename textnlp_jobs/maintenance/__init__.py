"""Scheduled maintenance: each task's domain code, runnable by hand and from beat."""
