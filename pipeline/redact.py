"""Credentials never leave the process: one redaction applied wherever a value is written
out (MLflow params, tags and artifacts, the JSONL, the run folder, printed lines, sweep
records, eval results), while the run itself keeps using the real values in memory.

A signed shard URL (`...tar?X-Amz-Signature=...`) and a tracking URL with a password
(`http://alice:pw@host`) were copied into a shared tracking server's params, tags and
artifacts, into the run folder and into stdout (issue 33). What is redacted:

* the userinfo of any URL (`scheme://user:password@host` -> `scheme://***@host`);
* the value of every query parameter whose name says it carries a credential (signature,
  sig, token, key, password, secret, credential, auth, and every `X-Amz-*` / `X-Goog-*`),
  case-insensitive (`?X-Amz-Signature=abc` -> `?X-Amz-Signature=***`).

`***` stays in place so that a reader knows something was there.
"""
from __future__ import annotations

import io
import re
import sys
import threading

MASK = "***"

# scheme://userinfo@ : userinfo is everything up to the last "@" before the host's path
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]+)@")
_CREDENTIAL_NAMES = r"(?:[\w.-]*(?:signature|sig|token|key|password|passwd|pwd|secret|credential|auth)[\w.-]*" \
                    r"|x-amz-[\w.-]+|x-goog-[\w.-]+)"
# name=value inside a URL's query (after ? or &), the value up to the next separator
_QUERY = re.compile(rf"(?P<lead>[?&;](?i:{_CREDENTIAL_NAMES})=)(?P<value>[^&#\s'\"]+)")


def redact(value):
    """`value` with every credential replaced by ***: strings, and the strings inside dicts,
    lists and tuples (keys included); anything else as it is."""
    if isinstance(value, str):
        if "://" not in value and "=" not in value:
            return value
        value = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
        return _QUERY.sub(lambda m: f"{m.group('lead')}{MASK}", value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class RedactingStream(io.TextIOBase):
    """A text stream that redacts each line before passing it on (a URL is never split
    across lines, so a line at a time sees it whole). One lock around the pending line:
    threads printing at once (MLflow's replay, the loader, the loop) do not interleave
    inside a line; re-entrant, as a signal handler may print while the main thread writes."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.pending = stream, ""
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            self.pending += text
            if "\n" in self.pending:
                lines, self.pending = self.pending.rsplit("\n", 1)
                self.stream.write(redact(lines) + "\n")
        return len(text)

    def flush(self):
        with self._lock:
            if self.pending:
                self.stream.write(redact(self.pending))
                self.pending = ""
            self.stream.flush()

    def fileno(self):
        return self.stream.fileno()

    def isatty(self):
        return self.stream.isatty()

    @property
    def encoding(self):
        return self.stream.encoding


def redact_output():
    """Route this process's stdout and stderr through `redact`: what the run prints, what
    its libraries print and log (MLflow prints run URLs on the tracking URI), and the
    tracebacks. Entry points call it first; calling it twice is harmless."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
