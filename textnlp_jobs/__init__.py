"""textnlp-jobs: a Celery-based distributed job system for text generation.

PostgreSQL is the ledger, Redis the transport. See README.md for the picture.
"""

__version__ = "0.1.0"
