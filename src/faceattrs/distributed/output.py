"""The output of ``--engine ray``, written by the driver: the records streamed back in input
order into one ``.jsonl`` (or stdout), ``.csv`` or ``.parquet`` file, renamed into place
only when every input is in it exactly once (:class:`Tally`)."""

from __future__ import annotations

import csv
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..exceptions import FaceattrsError
from ..io import atomic_path, clean_stale_temps
from ..predict_files import check_out_file
from .sources import is_uri

OUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROW_GROUP = 16_384  # rows of a Parquet row group (about 16 MB of records)


class Tally:
    """Counts of the output, and the check that every input is in it exactly once: an
    input's records are one error record or faces 0, 1, ...: one of them has face 0."""

    def __init__(self, inputs: int | None):
        self.inputs = inputs
        self.firsts = np.zeros(inputs or 0, np.int64)
        self.counts = {"files": 0, "faces": 0, "failed": 0}

    def add(self, image, face, error) -> None:
        """Columns of a batch of records (lists, None for null)."""
        image = np.array([-1 if i is None else i for i in image], np.int64)
        failed = np.array([e is not None for e in error], bool)
        first = failed | np.array([f == 0 for f in face], bool)
        self.counts["failed"] += int(failed.sum())
        self.counts["faces"] += int((~failed).sum())
        self.counts["files"] += int(first.sum())
        if self.inputs is not None:
            np.add.at(self.firsts, image[first], 1)

    def check(self) -> dict:
        if self.inputs is not None:
            missing, twice = int((self.firsts == 0).sum()), int((self.firsts > 1).sum())
            if missing or twice:
                raise FaceattrsError(
                    f"the Ray run lost {missing} and repeated {twice} of {self.inputs} "
                    "input(s); nothing was written"
                )
        return self.counts


def check_out(out) -> None:
    """FaceattrsError before any work for an ``--out`` this engine cannot write."""
    if out is None:
        return
    if is_uri(out):
        raise FaceattrsError(f"--out {out}: name a file of this machine, not a URI")
    check_out_file(out, OUT_SUFFIXES, ".jsonl, .csv or .parquet")


@contextmanager
def _text_out(out, binary: bool = False):
    """A stream: stdout (``out`` None) or a temporary file renamed onto ``out`` at the end."""
    if out is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    clean_stale_temps(Path(out).parent, [Path(out).name])  # of a killed run
    with atomic_path(out) as tmp:
        if binary:
            with open(tmp, "wb") as fh:
                yield fh
            return
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            yield fh


def write_records(ds, out, inputs: int | None) -> dict:
    """Stream ``ds`` to the driver, in input order, into ``out``: a ``.jsonl`` (or stdout),
    ``.csv`` or ``.parquet`` file, renamed into place only when every input is in it once."""
    import pyarrow as pa  # comes with ray[data] (an optional extra)
    import pyarrow.parquet as pq

    tally = Tally(inputs)
    kind = Path(out).suffix.lower() if out is not None else ".jsonl"
    with _text_out(out, binary=kind == ".parquet") as fh:
        table, rows = None, []  # Parquet: row groups of ROW_GROUP rows, not one per batch
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tally.add(*(batch.column(c).to_pylist() for c in ("image", "face", "error")))
            if kind == ".parquet":
                table = table or pq.ParquetWriter(fh, batch.schema)
                rows.append(batch)
                if sum(len(b) for b in rows) >= ROW_GROUP:
                    table.write_table(pa.concat_tables(rows))
                    rows = []
            elif kind == ".csv":
                if table is None:
                    table = csv.DictWriter(fh, [c for c in batch.column_names if c != "record"])
                    table.writeheader()
                table.writerows(batch.drop_columns(["record"]).to_pylist())
            else:
                fh.write("".join(r + "\n" for r in batch.column("record").to_pylist()))
        if kind == ".parquet" and table is not None:
            if rows:
                table.write_table(pa.concat_tables(rows))
            table.close()
        counts = tally.check()  # before the rename: an incomplete output is not written
    return counts
