"""Helpers shared by the metadata commands: caption cleaning and a streaming parquet writer."""
from __future__ import annotations

import html
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_TAG = re.compile(r"<[^>]{0,500}>")
_WS = re.compile(r"\s+")


def clean_text(text: str | None) -> str:
    """Strip HTML tags and entities, collapse whitespace. None -> ""."""
    if not text:
        return ""
    text = html.unescape(_TAG.sub(" ", text))
    return _WS.sub(" ", text).strip()


class ParquetRowWriter:
    """Appends rows in batches to one parquet file with a fixed string schema, so
    inputs of any size stream through in bounded memory. Writes to a temporary name
    and renames on close: a crashed run never leaves a truncated parquet behind."""

    def __init__(self, path: str | Path, columns: list[str], batch_rows: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.columns = columns
        self.schema = pa.schema([(c, pa.string()) for c in columns])
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.batch_rows = batch_rows
        self.buffer: dict[str, list] = {c: [] for c in columns}
        self.rows = 0

    def write(self, **row: str):
        for c in self.columns:
            self.buffer[c].append(row[c])
        self.rows += 1
        if len(self.buffer[self.columns[0]]) >= self.batch_rows:
            self._flush()

    def write_table(self, table: pa.Table):
        self._flush()
        self.writer.write_table(table.select(self.columns).cast(self.schema))
        self.rows += table.num_rows

    def _flush(self):
        if self.buffer[self.columns[0]]:
            self.writer.write_table(pa.table(self.buffer, schema=self.schema))
            self.buffer = {c: [] for c in self.columns}

    def close(self):
        self._flush()
        self.writer.close()
        self.tmp.replace(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
