"""RUN/run.log: what the console showed during a run (rank 0), appended attempt after attempt. Progress bars
redraw a line with carriage returns; the log keeps each line as it last stood."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from pipeline.errors import UserError


class _Lines:
    """Text in, whole lines out to `f`: the part of a line after its last carriage return."""

    def __init__(self, f: TextIO):
        self.f, self.buf = f, ""

    def write(self, s: str) -> None:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if line.strip():
                self.f.write(line + "\n")
        self.f.flush()


class _Tee:
    """A stream that writes through to `stream` and into the log."""

    def __init__(self, stream: TextIO, lines: _Lines):
        self._stream, self._lines = stream, lines

    def write(self, s: str) -> int:
        self._lines.write(s)
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _LogRecords(logging.Handler):
    """Warnings of the loggers (what the console's logging handler shows) into the log too."""

    def __init__(self, lines: _Lines):
        super().__init__(logging.WARNING)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.write(self.format(record) + "\n")


@contextmanager
def console_log(path: Path) -> Iterator[None]:
    """While the block runs, what goes to stdout, stderr and the loggers' warnings also goes to `path`; a user
    error that ends the block is written there too (the console gets it from the CLI, as one line)."""
    f = open(path, "a", encoding="utf-8")
    f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} groundgan {' '.join(sys.argv[1:])}\n")
    lines = _Lines(f)
    out, err = sys.stdout, sys.stderr
    handler = _LogRecords(lines)
    logging.getLogger().addHandler(handler)
    sys.stdout, sys.stderr = _Tee(out, lines), _Tee(err, lines)
    try:
        yield
    except UserError as e:
        lines.write(f"\nerror: {e}\n")
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        logging.getLogger().removeHandler(handler)
        lines.write("\n")
        f.close()
