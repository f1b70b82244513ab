"""User-facing errors and dead-letter records.

A :class:`CairnError` is a mistake the user can fix (a missing file, a wrong column, a bad flag value); its
message says what is wrong and what to do, and the CLI prints it as one line with a non-zero exit.

A :class:`DeadLetter` is one input record that a job could not process. Jobs never drop a record silently:
every input ends up either in the outputs or in the dead letters, with the stage and the reason.
"""

from __future__ import annotations

import csv
import io
from typing import NamedTuple

# Stages a record can fail in, in pipeline order.
STAGES = ("manifest", "read", "decode", "extract")
DEAD_LETTER_COLUMNS = ("id", "stage", "reason", "path")


class CairnError(Exception):
    """An error caused by the user's input or flags; the message says what to do about it."""


class ManifestError(CairnError):
    """A manifest that cannot be used at all (unreadable, empty, missing columns)."""


class ConfigMismatchError(CairnError):
    """A stored artefact was made with a different configuration than the one requested."""


class DryRun(Exception):  # noqa: N818 - not an error: the job stops after a successful dry run
    """Raised after a runner's dry run (``--dry_run=true`` on DataflowRunner): the pipeline was built, translated
    and validated but not run, so there are no outputs to read back."""


class DeadLetter(NamedTuple):
    """One record a job could not process."""

    id: str  # the image id from the manifest ("" when the row had none; then path says which row)
    stage: str  # one of STAGES
    reason: str  # a human-readable explanation
    path: str = ""  # the image path or manifest location, to help the user find the record

    def to_csv_line(self) -> str:
        """One CSV line (no newline), quoted as needed."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(self)
        return buf.getvalue()


def parse_dead_letters(text: str) -> list[DeadLetter]:
    """The dead letters of a CSV document written by a job (header ``id,stage,reason,path``)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    return [DeadLetter(r["id"], r["stage"], r["reason"], r.get("path", "")) for r in rows]


def dead_letters_csv(letters: list[DeadLetter]) -> str:
    """Render dead letters as a CSV document with a header."""
    lines = [",".join(DEAD_LETTER_COLUMNS)] + [d.to_csv_line() for d in letters]
    return "\n".join(lines) + "\n"
