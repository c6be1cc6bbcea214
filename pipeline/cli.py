"""The opening every command-line entry point shares (`python -m eval`, `eval.suite`,
`eval.compare`, `launch.sweep`, `launch/train.py`, `pipeline.weights`, `pipeline.tracking`):
this process's output redacted before anything prints, then a parser whose help is the
module's docstring."""
from __future__ import annotations

import argparse

from pipeline.redact import redact_output


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
