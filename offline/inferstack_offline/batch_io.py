"""What `inferstack batch` reads and writes, without Spark: the input listing, the output parts.

OUT is written as part files, one per finished Spark partition, each renamed into place whole
(`part-<first row>-<run>.parquet`), so a killed run leaves only complete parts and a re-run skips
the rows they hold. A Parquet OUT is the folder of parts; a `.jsonl` OUT is one file assembled
from the parts (kept in `OUT.parts/` until then) when the run ends.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from inferstack.client import iter_images

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
# The key of a row without a `path` column: its position in the input table.
ROW_KEY_PREFIX = "#"
PART_GLOB = "part-*.parquet"


class InputError(ValueError):
    """INPUT or OUT cannot be used; the message says why."""


def result_schema() -> pa.Schema:
    """OUT's columns: path, predictions (list of {label, probability}), error (null when fine)."""
    prediction = pa.struct([("label", pa.string()), ("probability", pa.float32())])
    return pa.schema([("path", pa.string()), ("predictions", pa.list_(prediction)), ("error", pa.string())])


def is_table(spec: str) -> bool:
    """A Parquet / JSON Lines file, or a folder of Parquet files (as Spark writes them)."""
    path = Path(spec)
    if path.suffix.lower() in TABLE_SUFFIXES and (path.is_file() or path.is_dir()):
        return True
    return path.is_dir() and any(path.glob("*.parquet")) and not any(iter_images([path]))


def list_images(spec: str) -> list[str]:
    """Image files of a folder (walked recursively, sorted) or of a glob pattern (sorted)."""
    if Path(spec).is_dir():
        return list(iter_images([spec]))
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if Path(spec).is_file():
        return [spec]
    raise InputError(f"INPUT {spec!r} is neither a folder, a glob pattern, an image file nor a table")


@dataclass(frozen=True)
class Output:
    """Where the parts of OUT live, and how the finished OUT is assembled."""

    out: Path

    @property
    def jsonl(self) -> bool:
        return self.out.suffix.lower() == ".jsonl"

    @property
    def parts(self) -> Path:
        return self.out.with_name(self.out.name + ".parts") if self.jsonl else self.out

    def prepare(self) -> None:
        """Create the parts folder and drop what a killed run left half-written."""
        if not self.jsonl and self.out.exists() and not self.out.is_dir():
            raise InputError(f"OUT {str(self.out)!r} is a file; a Parquet OUT is a folder (or name it .jsonl)")
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob(".part-*.tmp"):
            stale.unlink(missing_ok=True)

    def done_keys(self) -> set[str]:
        """Paths (row keys) already answered, in complete parts or a finished JSON Lines OUT."""
        keys: set[str] = set()
        for part in sorted(self.parts.glob(PART_GLOB)):
            keys.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        if self.jsonl and self.out.is_file():
            keys.update(json.loads(line)["path"] for line in self.out.read_text().splitlines() if line.strip())
        return keys

    def finish(self) -> None:
        """JSON Lines OUT: earlier lines, then every part in row order, swapped in whole."""
        if not self.jsonl:
            return
        tmp = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:8]}.tmp")
        parts = sorted(self.parts.glob(PART_GLOB))
        with tmp.open("w", encoding="utf-8") as sink:
            if self.out.is_file():
                sink.write(self.out.read_text(encoding="utf-8"))
            for part in parts:
                for record in pq.read_table(part).to_pylist():
                    sink.write(json.dumps(record) + "\n")
        os.replace(tmp, self.out)
        for part in parts:
            part.unlink()
        self.parts.rmdir()


def write_part(folder: str, first_row: int, run_id: str, batches: Iterable[pa.RecordBatch]) -> tuple[str, int, int]:
    """One finished partition as a part file, renamed into place whole: (name, rows, errors)."""
    table = pa.Table.from_batches(list(batches), schema=result_schema())
    name = f"part-{first_row:012d}-{run_id}.parquet"
    tmp = os.path.join(folder, f".{name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(folder, name))
    return name, table.num_rows, table.num_rows - table.column("error").null_count
