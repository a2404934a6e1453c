"""A fixed held-out text set that ships with the project: the quantization gate measures perplexity
on it and times generation from its openings. Written for this project, not drawn from the corpus
the demo model trains on, and never changed: figures are comparable across runs."""

from __future__ import annotations

HELDOUT_TEXTS: tuple[str, ...] = (
    "Return the number of items that are waiting in the queue. The value is only a hint, because "
    "another thread may add or remove an item before the caller uses it.",
    "Open the file at the given path and read it line by line. Blank lines are skipped, and a line "
    "that starts with a hash sign is treated as a comment.",
    "This function retries the request when the server answers with a temporary error. It waits a "
    "little longer after each attempt and gives up after the configured number of tries.",
    "Create a new connection to the database. The connection is returned to the pool when the "
    "context manager exits, even if the block raised an exception.",
    "If the timeout argument is None, the call blocks until the result is available. Otherwise it "
    "raises an error when the result has not arrived within that many seconds.",
    "The default encoding is UTF-8. Bytes that cannot be decoded are replaced with a marker, so the "
    "caller always receives text and can decide what to do with the damaged parts.",
    "Split the string at every comma that is not inside quotes, strip the whitespace around each "
    "field, and return the fields as a list in the order in which they appear.",
    "Each worker takes one task at a time from the shared list. When a worker stops without "
    "finishing its task, the task is put back so that another worker can run it.",
    "The cache keeps the most recently used entries. When it is full, the entry that has gone "
    "unused for the longest time is removed to make room for the new one.",
    "Compare two version strings part by part. A missing part counts as zero, so the version one "
    "point two is equal to the version one point two point zero.",
    "Write the records to a temporary file first, then rename it over the old one. A reader never "
    "sees a half written file, because the rename replaces the old file in one step.",
    "The method returns a new list and leaves the original unchanged. Use the sort method of the "
    "list itself when the order of the original should change instead.",
    "A lock protects the counter from two threads that update it at the same moment. Without the "
    "lock one of the two updates could be lost and the total would be wrong.",
    "Parse the date in the format year, month, day. A date without a time zone is taken to be in "
    "universal time, and the result is always an aware datetime object.",
    "The server listens on the given port and accepts one connection at a time. Each request is "
    "read completely before the answer is written back to the client.",
    "Raise a value error if the argument is negative. Zero is allowed and means that the operation "
    "should not wait at all before it returns to the caller.",
)


def prompt_openings(count: int, words: int = 8) -> list[str]:
    """The first ``words`` words of the held-out texts, repeated in order up to ``count`` prompts."""
    return [" ".join(HELDOUT_TEXTS[i % len(HELDOUT_TEXTS)].split()[:words]) for i in range(count)]
