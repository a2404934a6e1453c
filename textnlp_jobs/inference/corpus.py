"""Training text that ships with Python itself: the docstrings of standard-library modules.

The demo model needs a tokenizer and a little training so that its output looks like text, and
no download is possible, so it learns from what every Python install carries.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# A fixed list keeps the corpus (and so the model) the same on every run of one Python version.
CORPUS_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes",
    "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def python_docstrings(max_chars: int = 600_000) -> list[str]:
    """Paragraphs of English prose from the standard library's docstrings."""
    with warnings.catch_warnings():  # some members are deprecated aliases; reading them warns
        warnings.simplefilter("ignore")
        return _collect(max_chars)


def _collect(max_chars: int) -> list[str]:
    paragraphs: list[str] = []
    total = 0
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__ or ""]
        for _, member in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            if getattr(member, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) >= 40:
                    paragraphs.append(text)
                    total += len(text)
                    if total >= max_chars:
                        return paragraphs
    return paragraphs
