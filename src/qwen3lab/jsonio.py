"""Reading a user's JSON file with one clear error per failure, in the caller's error type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], what: str = "JSON") -> Any:
    """Parsed JSON of `path`; malformed JSON, non-UTF-8 text or an unreadable file raise `error` naming
    the file (and line/column for syntax errors)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
