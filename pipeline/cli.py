"""The opening every command-line entry point shares (`launch/train.py`, `launch/demo.sh`,
`python -m eval`, `eval.suite`, `eval.compare`, `launch.sweep`, `pipeline.weights`,
`pipeline.tracking`, `data_prep.*`): nothing leaves the machine unless the user asks, this
process's output is redacted before anything prints, and the parser's help is the
module's docstring.

Nothing leaves the machine unless the user asks: MLflow 3 sends usage telemetry from
every client and server process (it fetches a config from an external host, then posts
records) unless told not to, Hugging Face's hub client does too, and albumentations
(imported by img2dataset) checks PyPI for updates. On a cluster that is a DNS lookup per
process on hundreds of ranks with no route out, and traffic many labs forbid. Importing
this module turns them off, before any of those libraries is imported (they read the
variables once, at import), unless the user chose: a variable already set wins, so
`MLFLOW_DISABLE_TELEMETRY=false` turns MLflow's back on. Every process an entry point
starts (the deepspeed launcher's ranks, an `mlflow server`) inherits the choice.
tests/test_demo.py runs the whole flow under a network guard that refuses and records
any connection beyond loopback.
"""
from __future__ import annotations

import argparse
import os

from pipeline.redact import redact_output

# (the variables through which a user chooses for one library, what is set when none is)
LOCAL_ONLY = (
    (("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"), {"MLFLOW_DISABLE_TELEMETRY": "true"}),
    (("HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK"), {"HF_HUB_DISABLE_TELEMETRY": "1"}),
    (("NO_ALBUMENTATIONS_UPDATE",), {"NO_ALBUMENTATIONS_UPDATE": "1"}),
)


def keep_local(environ=os.environ) -> dict[str, str]:
    """Set the no-telemetry defaults the user has not chosen otherwise; returns those set."""
    given = dict(environ)
    added = {}
    for choices, defaults in LOCAL_ONLY:
        if not any(name in given for name in choices):
            added.update(defaults)
    environ.update(added)
    return added


keep_local()  # at import: entry points import this module before any library that phones home


def command_line(prog: str, doc: str, notes: bool = True) -> argparse.ArgumentParser:
    """Route stdout and stderr through the redaction first (pipeline/redact.py: the URLs of
    stores, shards and datasets these commands print go without their credentials, and so
    do the logs of the libraries they call), then the parser: the docstring's first
    paragraph is its description and, with `notes`, the rest is the help's epilog."""
    redact_output()
    head, _, rest = doc.strip().partition("\n\n")
    if notes and rest:
        return argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(prog=prog, description=head)
