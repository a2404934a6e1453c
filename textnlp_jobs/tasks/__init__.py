"""Celery tasks: thin shells that validate the message and call the domain code."""
