"""The network guard (issue 46): put this folder first on PYTHONPATH and every Python
process started with that environment imports it at start-up (site.py imports
`sitecustomize`). It records, one JSON line per attempt in $NETWORK_GUARD_LOG, every
name lookup and every connection to an address outside the machine (not loopback, not
this host's own name), and refuses it, so that a library that phones home fails fast
here instead of waiting on a DNS timeout. Unix sockets and loopback pass untouched."""
import ipaddress
import json
import os
import socket
import sys
import traceback

LOG = os.environ.get("NETWORK_GUARD_LOG", "")
_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex
_LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname()}


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback or host == "0.0.0.0" or host == "::"
    except ValueError:
        return host.lower() in _LOCAL_NAMES or host.lower().endswith(".localhost")


def _record(kind: str, target) -> None:
    stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]][-8:]
    with open(LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:4], "kind": kind, "target": repr(target),
                            "stack": stack}) + "\n")


def getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _record("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"network guard: lookup of {host!r} refused")
    return _getaddrinfo(host, *args, **kwargs)


def _checked(method):
    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _record("connect", address)
            raise ConnectionRefusedError(f"network guard: connection to {address!r} refused")
        return method(self, address)
    return guarded


if LOG:
    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = _checked(_connect)
    socket.socket.connect_ex = _checked(_connect_ex)
