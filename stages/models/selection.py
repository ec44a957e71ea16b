"""`select_by: confirmed_val_wer`: which student a training stage keeps, such that one lucky check cannot pick it.

With `select_by: val_wer` a stage keeps the student of its lowest val check. Free-running WER on a few hundred
val clips swings from check to check (a loop on one clip is dozens of errors), and the lowest check can be a
student at the edge of a loop that the next check shows (the [Grounding proof] issue: val WER 9.5% -> 28% on the
next check, and the 9.5% student looped on a held-out clip). Here a check's student is scored by the worse of its
own val WER and the next check's: it is kept only where it also holds one check later. The last check, which has
no next one, is scored with the check before it. Of equal scores the lower own WER wins (of two checks that
confirm each other, the better), then the lower val loss where the stage has one, then the earlier student
(nearer the one the stage started from).

On disk, in the stage directory:
    candidates/step-XXXXXX/   the student of a check, until a later check has scored it (save_student layout)
    best/                     the best confirmed student so far
The state (`state()`, kept in the stage's checkpoints) is what the checks saw; final/ takes, at the end, best/ or
the last check's candidate (scored with the check before it), whichever scores lower: best/ itself stays what the
checkpoint's state says, so that training longer continues from the same selection.

A killed stage resumes from its newest checkpoint and repeats the checks made after it: each check's candidate is
a folder of its own, kept until a checkpoint's state no longer names it (the stage calls `checkpointed()` after each
checkpoint), so a repeated check scores the candidate its checkpoint's state names, never a later check's student.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

CANDIDATES, BEST = "candidates", "best"
LEGACY_CANDIDATE = "candidate"  # one folder for the pending check's student (before candidates/)


def _key(score: float, check: dict) -> tuple:
    """Lower is better: the confirmed score, then the check's own WER (of two checks that confirm each other, the
    better one), then its val loss."""
    return (score, check["val_wer"], check["val_loss"] if check.get("val_loss") is not None else 0.0)


class ConfirmedSelection:
    def __init__(self, stage_dir: Path, state: Optional[dict] = None):
        self.dir = Path(stage_dir)
        self.load_state(state)

    def load_state(self, state: Optional[dict]) -> None:
        """What state() returned (a checkpoint's, or the main process's after a check); None: nothing checked."""
        st = state or {}
        self.best: dict = dict(st.get("best") or {"step": None, "val_wer": None, "val_loss": None, "score": None})
        self.pending: Optional[dict] = st.get("pending")  # the last check; its student is in candidate(step)
        self.previous: Optional[dict] = st.get("previous")  # the check before it

    def state(self) -> dict:
        return {"best": dict(self.best), "pending": self.pending, "previous": self.previous}

    def check(self, step: int, val_wer: Optional[float], val_loss: Optional[float],
              save: Callable[[Path], None]) -> None:
        """A val check of the student at `step`; save(directory) writes the current student there. Scores the
        previous check with this one (promoting its candidate to best/ where it wins), then makes this student
        the candidate. A check without a val WER (no transcribing val clips) selects nothing."""
        if val_wer is None:
            return
        if self.pending is not None:
            self._consider(self.pending, max(self.pending["val_wer"], val_wer))
        save(self.candidate(step))
        self.previous = self.pending
        self.pending = {"step": int(step), "val_wer": float(val_wer), "val_loss": val_loss}

    def final_choice(self) -> tuple[Optional[Path], dict]:
        """(the folder final/ takes, the chosen check with its score): best/, or the last check's candidate where it,
        scored with the check before it, beats best/. (None, {}) when nothing was checked. Writes nothing."""
        last = self.pending
        if last is not None:
            before = self.previous["val_wer"] if self.previous is not None else last["val_wer"]
            score = max(last["val_wer"], before)
            if self.best["step"] is None or _key(score, last) < _key(self.best["score"], self.best):
                return self.candidate(last["step"]), dict(last, score=score)
        if self.best["step"] is None:
            return None, {}
        return self.dir / BEST, dict(self.best)

    def _consider(self, check: dict, score: float) -> None:
        if self.best["step"] is not None and not _key(score, check) < _key(self.best["score"], self.best):
            return
        from stages.models.student import student_folder

        with student_folder(self.dir / BEST) as tmp:  # the previous best/ stays whole until this one is written
            shutil.copytree(self.candidate(check["step"]), tmp, dirs_exist_ok=True)
        self.best = dict(check, score=score)

    def candidate(self, step: int) -> Path:
        """The folder of the check at `step`'s student (a stage directory written before candidates/ holds the
        pending one in candidate/)."""
        own = self.dir / CANDIDATES / f"step-{int(step):06d}"
        legacy = self.dir / LEGACY_CANDIDATE
        if not own.is_dir() and legacy.is_dir() and self.pending is not None and int(step) == self.pending["step"]:
            return legacy
        return own

    def checkpointed(self) -> None:
        """A checkpoint with this state is complete: a resume starts from it or a later one, so only the pending
        check's candidate (and later ones) can be needed again. Removes the others (main process only)."""
        root = self.dir / CANDIDATES
        keep = None if self.pending is None else f"step-{int(self.pending['step']):06d}"
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if keep is None or d.name < keep:
                shutil.rmtree(d, ignore_errors=True)
        if (self.dir / LEGACY_CANDIDATE).is_dir() and (self.dir / CANDIDATES / (keep or "")).is_dir():
            shutil.rmtree(self.dir / LEGACY_CANDIDATE, ignore_errors=True)
