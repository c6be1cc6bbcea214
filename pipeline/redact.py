"""Credentials never leave the process: one redaction applied wherever a value is written
out (MLflow params, tags and artifacts, the JSONL, the run folder, printed lines, sweep
records, eval results), while the run itself keeps using the real values in memory.

A signed shard URL (`...tar?X-Amz-Signature=...`) and a tracking URL with a password
(`http://alice:pw@host`) were copied into a shared tracking server's params, tags and
artifacts, into the run folder and into stdout (issue 33); users also write credentials
into `pipe:` shard specs and command lines (issue 44). What is redacted:

* the userinfo of any URL, up to the last `@` of its authority (`https://u:p@ss@h` ->
  `https://***@h`), and a secret that runs past a `/` (`s3://KEY:abc/def@bucket`);
* the value of every query parameter whose name says it carries a credential (signature,
  sig, token, key, password, secret, credential, auth, and every `X-Amz-*` / `X-Goog-*`),
  case-insensitive, also at the start of a string (`sig=abc&se=...`, a bare SAS token);
* HTTP header values of credential headers (`-H 'Authorization: Bearer abc'`,
  `X-Api-Key: abc`, any `...-Token:` / `...-Secret:`);
* `curl -u user:pass` / `--user` / `--proxy-user` values;
* `NAME=value` where NAME is an upper-case variable naming a secret
  (`AWS_SECRET_ACCESS_KEY=...`, `HF_TOKEN=...`, `..._PASSWORD=...`);
* the value of a key named password, secret, token, api key, credentials (in dicts, and
  as `name: value` / `name=value` / `"name": "value"` in text);
* bare provider tokens by their shape (Hugging Face `hf_...`, AWS key ids `AKIA...` /
  `ASIA...`, GitHub `ghp_...` / `github_pat_...`, GitLab `glpat-...`, `sk-...`, Slack `xox.-...`).

`***` stays in place so that a reader knows something was there; a `${env:NAME}`
reference stays as it is (it is what a config holds instead of a secret). Names that merely contain
such a word are left alone where they are not credentials (`model.token_drop`,
`tokens_kept`, `init_from_keys`).
"""
from __future__ import annotations

import io
import re
import sys
import threading

MASK = "***"

_URL = re.compile(r"\b(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>`]+)")
_CREDENTIAL_NAMES = r"(?:[\w.-]*(?:signature|sig|token|key|password|passwd|pwd|secret|credential|auth)[\w.-]*" \
                    r"|x-amz-[\w.-]+|x-goog-[\w.-]+)"
# name=value inside a URL's query (after ? or &), the value up to the next separator
_QUERY = re.compile(rf"(?P<lead>[?&;](?i:{_CREDENTIAL_NAMES})=)(?P<value>[^&#\s'\"]+)")
# a query string on its own (a SAS token given alone: `sig=...&se=...`): no space, two or more pairs
_BARE_QUERY = re.compile(r"^[\w.%-]+=[^\s&]*(?:&[\w.%-]+=[^\s&]*)+$")
_HEADER = re.compile(r"(?i)(?P<lead>\b(?:(?:proxy-)?authorization|x-api-key|api-key|cookie|set-cookie|"
                     r"[\w-]*-token|[\w-]*-secret|private-token)\s*:\s*(?:(?:bearer|basic|token|digest)\s+)?)"
                     r"(?P<value>[^\s'\"]+)")
_USER_FLAG = re.compile(r"(?P<lead>(?:^|\s)(?:-u|--user|--proxy-user|-U)(?:\s+|=))(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)")
_SECRET_VARIABLE = re.compile(r"\b(?P<lead>[A-Z][A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|"
                              r"PRIVATE_KEY|CREDENTIALS?)[A-Z0-9_]*=)(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)")
# keys whose values are credentials, whatever their value looks like (a strict list: a key
# that merely contains "token" or "key", model.token_drop or init_from_keys, is not one)
_SECRET_KEY = re.compile(r"(?i)^(?:[\w.-]*[_.-])?(?:password|passwd|secret|secret[_-]?key|token|access[_-]?token|"
                         r"auth[_-]?token|refresh[_-]?token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)$")
_SECRET_FIELD = re.compile(r"(?i)(?P<lead>(?P<q>[\"']?)\b(?:[\w.-]*[_.-])?(?:password|passwd|secret|secret[_-]?key|"
                           r"token|access[_-]?token|auth[_-]?token|refresh[_-]?token|api[_-]?key|access[_-]?key|"
                           r"private[_-]?key|credentials?)(?P=q)\s*[:=]\s*)"
                           r"(?P<value>\"[^\"]*\"|'[^']*'|\$\{env:\w+\}|[^\s,;}'\"&#]+)")
_TOKEN_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|"
                           r"github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20,}|sk-[A-Za-z0-9_-]{20,}|"
                           r"xox[abprs]-[A-Za-z0-9-]{10,})\b")
# cheap first look: a string with none of these cannot hold a credential of the forms above
_MAYBE = re.compile(r"://|=|:|-u\b|--user|--proxy-user|-U\b|hf_|AKIA|ASIA|gh[pousr]_|github_pat_|glpat-|sk-|xox")


# a reference to an environment variable (pipeline/data/remote.py resolve_env) is no secret:
# it is what a config holds instead of one, and stays readable
_REFERENCE = re.compile(r"\$\{env:[A-Za-z_][A-Za-z0-9_]*\}")


def _quoted_mask(value: str) -> str:
    return f"{value[0]}{MASK}{value[0]}" if value[:1] in ("'", '"') else MASK


def _masked(m: re.Match) -> str:
    if _REFERENCE.fullmatch(m.group("value").strip("'\"")):
        return m.group(0)
    return f"{m.group('lead')}{_quoted_mask(m.group('value'))}"


def _url(m: re.Match) -> str:
    """A URL with its userinfo masked: up to the last `@` of the authority; or, where the
    authority has no `@` but `user:secret` and an `@` follows a `/`, a secret that ran past
    the slash (`s3://KEY:abc/def@bucket`; a port, `host:8080/a@b`, is not one)."""
    scheme, rest = m.group("scheme"), m.group("rest")
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    slash = rest.find("/", 0, end)
    authority = rest[:slash if slash >= 0 else end]
    if "@" in authority:
        return f"{scheme}{MASK}{rest[authority.rfind('@'):]}"
    if ":" in authority and not authority.split(":", 1)[1].isdigit() and "@" in rest[slash + 1:end] and slash >= 0:
        first = rest.find("@", slash, end)
        segment_end = rest.find("/", first)
        last = rest.rfind("@", first, segment_end if segment_end >= 0 else end)
        return f"{scheme}{MASK}{rest[last:]}"
    return m.group(0)


def redact(value):
    """`value` with every credential replaced by ***: strings, and the strings inside dicts,
    lists and tuples (keys included; the value of a key that names a secret whole);
    anything else as it is."""
    if isinstance(value, str):
        if not _MAYBE.search(value):
            return value
        value = _URL.sub(_url, value)
        if _BARE_QUERY.match(value):
            value = _QUERY.sub(lambda m: f"{m.group('lead')}{MASK}", f"?{value}")[1:]
        value = _QUERY.sub(lambda m: f"{m.group('lead')}{MASK}", value)
        for pattern in (_HEADER, _USER_FLAG, _SECRET_VARIABLE, _SECRET_FIELD):
            value = pattern.sub(_masked, value)
        return _TOKEN_SHAPES.sub(MASK, value)
    if isinstance(value, dict):
        return {redact(k): (MASK if isinstance(k, str) and _SECRET_KEY.match(k) and v not in (None, "")
                            and not (isinstance(v, str) and _REFERENCE.fullmatch(v)) else redact(v))
                for k, v in value.items()}
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
