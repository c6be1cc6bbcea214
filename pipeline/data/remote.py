"""Opening shards wherever they live, with reads that can never block forever.

One opener for every reader (training, evaluation, data_prep.verify, manifests): local
paths and file://, http(s)://, s3:// and any other fsspec URL (gs://, hdfs://, ...), and
webdataset's `pipe:` commands. webdataset's own opener runs `curl` with no timeout: one
object-store read that stopped answering after 20 KB hung a 2-process job with no
message (issue 32), because the loader's stall check runs between samples and a worker
blocked inside a read never gets back to it.

Every remote stream here obeys one `ReadPolicy`:

* **No progress for `timeout` seconds is a failed try**: no byte at all (a socket timeout,
  also for the connect), or fewer than `min_bytes_per_second` on average over a window
  of `timeout` seconds (a store trickling at 1 KB/s would take a day per shard). curl's
  --speed-limit/--speed-time, or Mosaic streaming's download timeout, are the same idea.
* **A failed try is retried** up to `retries` times, after 1, 2, 4, ... seconds, and
  resumes where it stopped (an HTTP Range request, a seek, or a re-run pipe whose bytes
  already read are skipped), so the bytes the tar parser sees are the same. Answers that
  cannot change on a retry (404, 401/403, a malformed URL) are not retried.
* **Then the read raises `ShardReadError`** (an OSError naming the reason and the tries):
  the loader counts the shard as `unreadable_shard` with the samples it loses and moves on.
* **Progress resets the tries**: a read that has moved 8 rate windows of bytes (8 x
  timeout x min_bytes_per_second, ~8 MB by default) since its last failure starts its
  tries over, so a long shard on a store that drops a connection now and then is read
  whole, while one that stalls every few KB still fails within its budget.
* **A resumed read reads the same object**: its ETag (else its total length) must be the
  first try's; an object replaced mid-read is a ShardReadError, not two objects spliced.
* **A `pipe:` command** runs in a process group of its own (the shell and what it runs
  end together) and its stderr's last line is in the error.

A dead shard is therefore given up after about timeout x (retries + 1) + 2^retries s
(`ReadPolicy.budget`; preflight refuses a data.stall_seconds under it).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.redact import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPolicy:
    timeout: float = 60.0  # seconds without progress (and for a connect) before a try fails
    retries: int = 3  # tries after the first
    min_bytes_per_second: float = 16384.0  # a slower average over `timeout` seconds is no progress
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    # http(s): headers sent with every request, their values as written (`${env:NAME}`
    # references resolved at each request), and the CA bundle that verifies TLS ("": the
    # system's)
    headers: tuple[tuple[str, str], ...] = ()
    ca_bundle: str = ""

    @property
    def budget(self) -> float:
        """The longest one shard's read may wait before the loader gives it up: every try's
        timeout and the backoffs between them (a read that keeps making progress resets
        its tries, so this bounds a dead shard, not a long one)."""
        return self.timeout * (self.retries + 1) + self.backoff * (2 ** self.retries - 1)


def read_policy(data_cfg) -> ReadPolicy:
    """The policy of a `DataConfig` (data.read_timeout_seconds, read_retries,
    read_min_bytes_per_second, http_headers, http_ca_bundle)."""
    return ReadPolicy(timeout=data_cfg.read_timeout_seconds, retries=data_cfg.read_retries,
                      min_bytes_per_second=data_cfg.read_min_bytes_per_second,
                      headers=tuple(sorted(getattr(data_cfg, "http_headers", {}).items())),
                      ca_bundle=getattr(data_cfg, "http_ca_bundle", ""))


class ShardReadError(OSError):
    """A remote read that failed every try, or failed in a way a retry cannot change."""


_ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def env_references(value: str) -> list[str]:
    """The variables `${env:NAME}` references in a value names."""
    return _ENV_REFERENCE.findall(value)


def resolve_env(value: str) -> str:
    """A value with its `${env:NAME}` references replaced by the environment's values: a
    secret (a token in a header, a signature in a URL) is written in the config as a
    reference, so the run folder, MLflow and the logs hold the reference, and only the
    request holds the value. A variable that is not set is a KeyError naming it (preflight
    checks them before launch: pipeline/train/preflight.py)."""
    def value_of(m: re.Match) -> str:
        if m.group(1) not in os.environ:  # the same answer on every try
            raise ShardReadError(f"${{env:{m.group(1)}}} is not set in the environment")
        return os.environ[m.group(1)]
    return _ENV_REFERENCE.sub(value_of, value)


class _Retry(Exception):
    """One try failed in a way another try may not (a timeout, a reset, a 5xx)."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") or url.startswith("pipe:")


def open_url(url: str, policy: ReadPolicy = ReadPolicy(), buffer_size: int = 1 << 20) -> io.BufferedReader:
    """A binary reader for `url`: a buffered file for a local path, a `_Resumable` stream
    (the policy above) for anything remote."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if not is_remote(url):
        return open(url, "rb")  # noqa: SIM115 (the caller closes it)
    if url.startswith("pipe:"):
        raw = _PipeStream(url, policy)
    elif urlsplit(url).scheme in ("http", "https"):
        raw = _HTTPStream(url, policy)
    else:
        raw = _FsspecStream(url, policy)
    return io.BufferedReader(raw, buffer_size)


def opened(sources, policy: ReadPolicy, handler, ahead: int = 0, ahead_bytes: int = 4 << 20):
    """webdataset's url_opener with this module's streams: dict(url=...) -> dict(url=...,
    stream=...); an open that fails goes to `handler` with the url last in the exception's
    args (webdataset's convention); False stops.

    ahead > 0 (the training loader: data.prefetch_shards): remote shards are read ahead,
    see `_read_ahead`."""
    if ahead > 0:
        yield from _read_ahead(sources, policy, handler, ahead, ahead_bytes)
        return
    for source in sources:
        try:
            yield {**source, "stream": open_url(source["url"], policy)}
        except Exception as exn:  # noqa: BLE001 (the handler decides)
            exn.args = (*exn.args, source["url"])
            if not handler(exn):
                break


class _AheadReader(io.RawIOBase):
    """One remote shard read on a thread of its own, at most `limit` bytes ahead of its
    consumer (the tar parser), through the same `_Resumable` stream and policy as a direct
    read: its connect, its first bytes and its retries happen while the consumer is still
    on an earlier shard. The consumer sees the stream's bytes in order and, after them,
    the error that ended it, as a direct read would raise it."""

    CHUNK = 256 << 10

    def __init__(self, url: str, policy: ReadPolicy, limit: int, changed: threading.Condition):
        super().__init__()
        self.url, self.policy, self.limit = url, policy, max(limit, self.CHUNK)
        self.changed = changed  # shared by every shard of one reader: its consumer waits on any
        self.chunks: deque = deque()
        self.buffered = self.received = 0
        self.last_byte = time.monotonic()  # the start counts as the last progress
        self.error: BaseException | None = None
        self.eof = self.stopping = False
        threading.Thread(target=self._fill, daemon=True, name="read-ahead").start()

    def _fill(self):
        stream = None
        try:
            stream = open_url(self.url, self.policy, self.CHUNK)
            while True:
                with self.changed:
                    while self.buffered >= self.limit and not self.stopping:
                        self.changed.wait()
                    if self.stopping:
                        return
                data = stream.read1(self.CHUNK)
                with self.changed:
                    if data:
                        self.chunks.append(memoryview(data))
                        self.buffered += len(data)
                        self.received += len(data)
                        self.last_byte = time.monotonic()
                    else:
                        self.eof = True
                    self.changed.notify_all()
                if not data:
                    return
        except BaseException as error:  # noqa: BLE001 (handed to the consumer, in order)
            with self.changed:
                self.error = error
                self.changed.notify_all()
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    def ready(self) -> bool:
        """Worth starting: read whole, failed for good, or a full buffer ahead."""
        return self.eof or self.error is not None or self.buffered >= self.limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with self.changed:
            while not self.chunks and not self.eof and self.error is None:
                self.changed.wait()
            if self.chunks:
                chunk = self.chunks[0]
                n = min(len(buffer), len(chunk))
                buffer[:n] = chunk[:n]
                if n == len(chunk):
                    self.chunks.popleft()
                else:
                    self.chunks[0] = chunk[n:]
                self.buffered -= n
                self.changed.notify_all()
                return n
            if self.error is not None:
                raise self.error
            return 0

    def close(self):
        with self.changed:
            self.stopping = True  # the thread ends after its current read (bounded by the policy)
            self.chunks.clear()
            self.buffered = 0
            self.changed.notify_all()
        super().close()


@dataclass
class _Pending:
    source: dict
    reader: _AheadReader | None  # None: a local shard, opened when its turn comes
    deferred: bool = False

    def ready(self) -> bool:
        return self.reader is None or self.reader.ready()


def _read_ahead(sources, policy: ReadPolicy, handler, ahead: int, ahead_bytes: int):
    """`opened` with each remote shard read ahead (Mosaic streaming's and DALI's prefetch):
    the next `ahead` shards are opened while the consumer reads the current one, each up
    to `ahead_bytes` ahead. The shards come in their order, unless one has given no byte
    for a whole read timeout when its turn comes (a hung store, a stuck object): then it
    is deferred, at most MAX_DEFERRED at a time, and its retries go on behind the next
    shards; it comes back once read, failed or a buffer ahead. So a hung shard costs the
    job at most about one data.read_timeout_seconds, not timeout x tries (issue 44). A
    shard that stalls deeper than its buffer ahead is retried as a direct read is, the
    consumer waiting. Deferring changes the order of a reader's shards only when a shard
    failed to answer: a healthy store gives the order of `sources`, read for read."""
    changed = threading.Condition()
    sources = iter(sources)
    waiting: list[_Pending] = []
    more = True
    try:
        while True:
            while more and sum(not p.deferred for p in waiting) <= ahead:
                source = next(sources, None)
                if source is None:
                    more = False
                    break
                remote = is_remote(source["url"])
                waiting.append(_Pending(source, _AheadReader(source["url"], policy, ahead_bytes, changed)
                                        if remote else None))
            if not waiting:
                return
            pending = _next_turn(waiting, policy, changed)
            if pending is None:  # the head was deferred: open the next one in its place
                continue
            waiting.remove(pending)
            url, reader = pending.source["url"], pending.reader
            try:
                if reader is None:
                    stream = open_url(url, policy)
                elif reader.error is not None and not reader.received:  # failed before its first byte
                    raise reader.error
                else:
                    stream = io.BufferedReader(reader, _AheadReader.CHUNK)
            except Exception as exn:  # noqa: BLE001 (the handler decides)
                exn.args = (*exn.args, url)
                if not handler(exn):
                    return
                continue
            yield {**pending.source, "stream": stream}
    finally:
        for pending in waiting:
            if pending.reader is not None:
                pending.reader.close()


MAX_DEFERRED = 2  # shards per reader whose retries go on behind the next ones


def _next_turn(waiting: list[_Pending], policy: ReadPolicy, changed: threading.Condition) -> _Pending | None:
    """The shard to read next: a deferred one that has come back, else the head of the
    order once it is ready; None when the head was just deferred."""
    with changed:
        while True:
            back = next((p for p in waiting if p.deferred and p.ready()), None)
            if back is not None:
                return back
            head = next((p for p in waiting if not p.deferred), None)
            if head is not None and head.ready():
                return head
            deferrable = head is not None and sum(p.deferred for p in waiting) < MAX_DEFERRED
            quiet = time.monotonic() - head.reader.last_byte if head is not None else 0.0
            if deferrable and quiet >= policy.timeout:
                head.deferred = True
                log.warning("shard %s: no byte in %.0f s; reading on with the next shard while it is retried",
                            redact(head.source["url"]), quiet)
                return None
            changed.wait(policy.timeout - quiet if deferrable else None)


def read_bytes(url: str, policy: ReadPolicy = ReadPolicy()) -> bytes:
    """A whole (small) object: a manifest, a class list, an eval set's shard count."""
    with open_url(url, policy) as f:
        return f.read()


_live: "weakref.WeakSet[_Resumable]" = weakref.WeakSet()


def open_streams() -> int:
    """Remote streams open in this process now (each virtual reader holds its current shard
    open: bench.bench_loader --remote reports the most)."""
    return sum(1 for stream in list(_live) if not stream.closed)


class _Resumable(io.RawIOBase):
    """The retry loop, the progress clock and the resume offset; a subclass opens a try at
    an offset (`_open`), reads from it (`_read`) and closes it (`_close`)."""

    PROGRESS_WINDOWS = 8  # ~8 MB at the default 60 s x 16 KB/s

    def __init__(self, url: str, policy: ReadPolicy):
        super().__init__()
        _live.add(self)
        self.url, self.policy = url, policy
        self.offset = 0  # bytes handed to the caller
        self.failures = 0  # failed tries since the read last made progress
        self.since_failure = 0  # bytes read since the last failed try
        self.identity = None  # the object's identity at the first try (http: its ETag or length)
        self.source = None
        # the progress clock counts time spent waiting in reads only: a consumer that pauses
        # (a long evaluation, a full prefetch queue) is not a slow store
        self.window_time, self.window_bytes = 0.0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.source is None:
                    self.source = self._open(self.offset)
                    self.window_time, self.window_bytes = 0.0, 0
                start = time.monotonic()
                n = self._read(buffer)
                self._check_rate(n, time.monotonic() - start)
                self.offset += n
                self.since_failure += n
                # PROGRESS_WINDOWS rate windows of progress since the last failure: the tries
                # start over (a long shard on a store that drops a connection now and then is
                # read whole; one that stalls every few KB still fails within its budget)
                if self.failures and self.since_failure >= self.PROGRESS_WINDOWS * self.policy.timeout * \
                        self.policy.min_bytes_per_second:
                    self.failures = 0
                return n
            except (FileNotFoundError, ShardReadError):  # another try gets the same answer
                raise
            except Exception as e:  # noqa: BLE001 (a timeout, a reset, a 5xx, a library's own error)
                self._failed(e)

    def _check_rate(self, n: int, waited: float):
        """Fewer than min_bytes_per_second over a whole `timeout` of waiting: no progress."""
        self.window_bytes += n
        self.window_time += waited
        if self.window_time >= self.policy.timeout:
            rate = self.window_bytes / self.window_time
            if n and rate < self.policy.min_bytes_per_second:
                raise _Retry(f"{rate:.0f} bytes/s over {self.window_time:.0f} s, under "
                             f"data.read_min_bytes_per_second={self.policy.min_bytes_per_second:g}")
            self.window_time, self.window_bytes = 0.0, 0

    def _failed(self, error: Exception):
        self._drop()
        self.failures += 1
        self.since_failure = 0
        reason = _describe(error, self.policy)
        if self.failures > self.policy.retries:
            raise ShardReadError(f"{reason} (after {self.failures} tries, at byte {self.offset})") from None
        time.sleep(self.policy.backoff * 2 ** (self.failures - 1))

    def _drop(self):
        source, self.source = self.source, None
        if source is not None:
            try:
                self._close(source)
            except Exception:  # noqa: BLE001 (a broken connection may fail to close too)
                pass

    def close(self):
        self._drop()
        super().close()

    def _open(self, offset: int):
        raise NotImplementedError

    def _read(self, buffer) -> int:
        raise NotImplementedError

    def _close(self, source):
        source.close()


def _describe(error: Exception, policy: ReadPolicy) -> str:
    import urllib3
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason  # urllib3 wraps the cause (a refused connect, a timeout)
    if isinstance(error, (socket.timeout, TimeoutError, urllib3.exceptions.TimeoutError)):
        return f"no byte in {policy.timeout:g} s (data.read_timeout_seconds)"
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return f"cannot connect: {str(error).rsplit(': ', 1)[-1]}"
    if isinstance(error, urllib3.exceptions.ProtocolError):  # mid-body: a reset, or a close short of the length
        cause = error.args[-1] if isinstance(error.args[-1], Exception) else error
        if isinstance(cause, urllib3.exceptions.IncompleteRead):
            return f"the connection closed early ({cause})"
        return f"the connection broke ({type(cause).__name__}: {cause})"
    text = str(error) or type(error).__name__
    return text if isinstance(error, _Retry) else f"{type(error).__name__}: {text}"


_pools: dict = {}  # (pid, proxy, CA bundle) -> urllib3 pool manager: connections are reused across shards


def _pool_for(url: str, ca_bundle: str):
    """A urllib3 pool manager for `url`, through the proxy the environment names for it
    (HTTP_PROXY / HTTPS_PROXY / NO_PROXY, read as urllib and curl read them) or direct;
    one per process (a forked loader worker makes its own connections)."""
    import urllib3
    parts = urlsplit(url)
    proxy = None
    if not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = urllib.request.getproxies().get(parts.scheme)
    key = (os.getpid(), proxy, ca_bundle)
    if key not in _pools:
        tls = {"ca_certs": ca_bundle} if ca_bundle else {}
        # up to 64 idle connections kept per host: every reader of a worker holds one open,
        # and one more per shard it reads ahead (urllib3's default keeps 1 and warns per extra)
        _pools[key] = (urllib3.ProxyManager(proxy, num_pools=32, maxsize=64, **tls) if proxy
                       else urllib3.PoolManager(num_pools=32, maxsize=64, **tls))
    return _pools[key]


class _HTTPStream(_Resumable):
    """http(s) through urllib3 (a maintained client: proxies, TLS verification, pooled
    keep-alive connections), its connect and read timeouts bounding every wait. A URL's
    userinfo is sent as basic auth, never in the request line; data.http_headers go with
    every request (a Hugging Face dataset: `Authorization: Bearer ${env:HF_TOKEN}`); a
    redirect to another host drops Authorization (urllib3's rule, as curl's)."""

    MAX_REDIRECTS = 5

    def _request(self, method: str, offset: int = 0):
        import urllib3
        parts = urlsplit(resolve_env(self.url))
        headers = {name: resolve_env(value) for name, value in self.policy.headers}
        if parts.username is not None:  # basic auth from the userinfo, which leaves the URL
            headers.update(urllib3.make_headers(basic_auth=f"{unquote(parts.username)}:"
                                                          f"{unquote(parts.password or '')}"))
            parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = urlunsplit(parts)
        return _pool_for(url, self.policy.ca_bundle).request(
            method, url, headers=headers, preload_content=False, decode_content=False,
            timeout=urllib3.Timeout(connect=self.policy.timeout, read=self.policy.timeout),
            # redirects followed here; every other retry is ours (it resumes where the read stopped)
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=self.MAX_REDIRECTS))

    def _open(self, offset: int):
        response = self._request("GET", offset)
        status = response.status
        if status in (200, 206):
            self._check_identity(response, offset)
            if offset and status == 200:  # no range support: skip what was already read
                _skip(response, offset)
            return response
        response.release_conn()
        message = f"HTTP {status} {response.reason}"
        if status == 404:
            raise FileNotFoundError(message)
        if status in (408, 429) or status >= 500:
            raise _Retry(message)
        raise ShardReadError(message)  # 401/403 and the like: a retry gets the same answer

    def _check_identity(self, response, offset: int):
        """A try that resumes must read the same object: one replaced mid-read (a shard
        rewritten in place) would splice two objects' bytes into one tar. Its ETag, else its
        total length, is what the first try saw."""
        etag = response.headers.get("ETag")
        total = response.headers.get("Content-Length")
        if response.status == 206 and response.headers.get("Content-Range", "").rpartition("/")[2].isdigit():
            total = response.headers["Content-Range"].rpartition("/")[2]
        elif total is not None and offset and response.status == 206:
            total = str(int(total) + offset)
        identity = etag or (f"length {total}" if total is not None else None)
        if self.identity is None:
            self.identity = identity
        elif identity is not None and identity != self.identity:
            response.release_conn()
            raise ShardReadError(f"the object changed while it was read (was {self.identity}, now {identity}); "
                                 f"the bytes after {offset} would belong to another object")

    def _read(self, buffer) -> int:
        data = self.source.read1(len(buffer))
        if not data and self.source.length_remaining:  # the server closed early: a retry resumes
            raise _Retry(f"the connection closed with {self.source.length_remaining} bytes to come")
        buffer[:len(data)] = data
        return len(data)

    def _close(self, source):
        if source.length_remaining == 0:
            source.release_conn()  # read whole: the connection serves the next shard
        else:
            source.close()  # abandoned midway: its connection cannot be reused
            source.release_conn()


def object_identity(url: str, policy: ReadPolicy = ReadPolicy()) -> str | None:
    """What a cached copy of `url` is checked against (eval/data.py): over http(s) its ETag,
    else its length and Last-Modified (a HEAD request); on an fsspec store its ETag (or
    checksum), else its size and modification time; a local file's size and mtime. None
    for a `pipe:` command, which cannot be asked. One try, no retries: an OSError says the
    store cannot be asked now."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if url.startswith("pipe:"):
        return None
    if not is_remote(url):
        stat = os.stat(url)
        return f"size {stat.st_size} mtime {stat.st_mtime_ns}"
    if urlsplit(url).scheme in ("http", "https"):
        try:
            response = _HTTPStream(url, policy)._request("HEAD")
        except Exception as e:  # noqa: BLE001 (urllib3's errors are not all OSErrors)
            raise OSError(_describe(e, policy)) from None
        response.release_conn()
        if response.status != 200:
            raise (FileNotFoundError if response.status == 404 else OSError)(f"HTTP {response.status} {response.reason}")
        headers = response.headers
        return headers.get("ETag") or f"length {headers.get('Content-Length')} modified {headers.get('Last-Modified')}"
    import fsspec
    fs, path = fsspec.core.url_to_fs(resolve_env(url))
    fs.invalidate_cache(path)  # the store's answer now, not a listing cached by this process
    info = _bounded(lambda: fs.info(path), policy.timeout)
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("checksum")
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    return str(tag) if tag else f"size {info.get('size')} modified {modified}"


def _skip(reader, count: int):
    while count > 0:
        chunk = reader.read(min(count, 1 << 20))
        if not chunk:
            raise _Retry("the retried read ended before the resume point")
        count -= len(chunk)


class _PipeStream(_Resumable):
    """webdataset's `pipe:command` (a shell command writing the shard to stdout, e.g. `aws s3
    cp ... -`): its stdout polled with the timeout; a command that stops writing is killed,
    and a retry re-runs it and skips the bytes already read."""

    def _open(self, offset: int):
        # its own process group: the shell and what it started (curl, aws) end together; its
        # stderr in a file, whose last line says why a failed command failed
        errors = tempfile.TemporaryFile()
        process = subprocess.Popen(resolve_env(self.url[len("pipe:"):]), shell=True, stdout=subprocess.PIPE,
                                   stderr=errors, bufsize=0, start_new_session=True)
        process.skip, process.errors = offset, errors
        return process

    @staticmethod
    def _last_error_line(process) -> str:
        process.errors.seek(0)
        lines = [line.strip() for line in process.errors.read()[-4096:].decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        return f": {lines[-1][:300]}" if lines else ""

    def _read(self, buffer) -> int:
        process = self.source
        while True:
            ready, _, _ = select.select([process.stdout], [], [], self.policy.timeout)
            if not ready:
                raise TimeoutError("no output")
            data = os.read(process.stdout.fileno(), len(buffer))
            if not data:
                status = process.wait(self.policy.timeout)
                if status != 0:
                    raise _Retry(f"command exited with status {status}{self._last_error_line(process)}")
                if process.skip:
                    raise _Retry("the re-run command ended before the resume point")
                return 0
            if process.skip:
                dropped = min(process.skip, len(data))
                process.skip -= dropped
                data = data[dropped:]
                if not data:
                    continue
            buffer[:len(data)] = data
            return len(data)

    def _close(self, process):
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the shell and the command it runs
            except ProcessLookupError:
                pass
        process.stdout.close()
        process.errors.close()
        process.wait()


class _FsspecStream(_Resumable):
    """s3://, gs://, ... through fsspec, with the filesystem's own timeouts set where it has
    them (s3fs: botocore's connect/read timeouts), and every read also bounded here: a read
    runs on a helper thread and is abandoned after the timeout (a library call cannot be
    interrupted; the abandoned thread ends with its connection)."""

    def _open(self, offset: int):
        import fsspec
        protocol = urlsplit(self.url).scheme
        options = {}
        if protocol == "s3":
            options = {"config_kwargs": {"connect_timeout": self.policy.timeout, "read_timeout": self.policy.timeout,
                                         "retries": {"max_attempts": 1}},  # retries are ours (resuming)
                       # 4 MiB blocks read ahead (s3fs's default is 50 MB per open file: 32
                       # readers per loader worker would hold 1.6 GB)
                       "default_block_size": 4 << 20}
        url = resolve_env(self.url)
        f = _bounded(lambda: fsspec.open(url, "rb", **options).open(), self.policy.timeout)
        if offset:
            _bounded(lambda: f.seek(offset), self.policy.timeout)
        return f

    def _read(self, buffer) -> int:
        data = _bounded(lambda: self.source.read(len(buffer)), self.policy.timeout)
        buffer[:len(data)] = data
        return len(data)


def _bounded(call, timeout: float):
    """call() on a helper thread; TimeoutError if it has not returned within `timeout`."""
    result: list = []

    def run():
        try:
            result.append((True, call()))
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            result.append((False, e))
    helper = threading.Thread(target=run, daemon=True, name="bounded-read")
    helper.start()
    helper.join(timeout)
    if not result:
        raise TimeoutError("no answer")
    ok, value = result[0]
    if ok:
        return value
    if isinstance(value, PermissionError):  # credentials: a retry gets the same answer
        raise ShardReadError(f"{type(value).__name__}: {value}")
    raise value
