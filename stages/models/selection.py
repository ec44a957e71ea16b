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
    candidate/   the student of the last check, until the next check scores it (save_student layout)
    best/        the best confirmed student so far
The state (`state()`, kept in the stage's checkpoints) is what the checks saw; final/ takes, at the end, best/ or
candidate/ (the last check, scored with the one before it), whichever scores lower: best/ itself stays what the
checkpoint's state says, so that training longer continues from the same selection.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

CANDIDATE, BEST = "candidate", "best"


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
        self.pending: Optional[dict] = st.get("pending")  # the last check; its student is in candidate/
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
        save(self.dir / CANDIDATE)
        self.previous = self.pending
        self.pending = {"step": int(step), "val_wer": float(val_wer), "val_loss": val_loss}

    def final_choice(self) -> tuple[Optional[Path], dict]:
        """(the folder final/ takes, the chosen check with its score): best/, or candidate/ where the last check,
        scored with the check before it, beats best/. (None, {}) when nothing was checked. Writes nothing."""
        last = self.pending
        if last is not None:
            before = self.previous["val_wer"] if self.previous is not None else last["val_wer"]
            score = max(last["val_wer"], before)
            if self.best["step"] is None or _key(score, last) < _key(self.best["score"], self.best):
                return self.dir / CANDIDATE, dict(last, score=score)
        if self.best["step"] is None:
            return None, {}
        return self.dir / BEST, dict(self.best)

    def _consider(self, check: dict, score: float) -> None:
        if self.best["step"] is not None and not _key(score, check) < _key(self.best["score"], self.best):
            return
        from stages.models.student import student_folder

        with student_folder(self.dir / BEST) as tmp:  # the previous best/ stays whole until this one is written
            shutil.copytree(self.dir / CANDIDATE, tmp, dirs_exist_ok=True)
        self.best = dict(check, score=score)
