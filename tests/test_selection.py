"""select_by: confirmed_val_wer (stages/models/selection.py): a check's student is kept only where its val WER also
holds at the next check."""

import json

from stages.models.selection import ConfirmedSelection


def _save(step):
    def save(directory):
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        (directory / "student.json").write_text(json.dumps({"step": step}))
    return save


def _chosen(path):
    return json.loads((path / "student.json").read_text())["step"]


def expected(wers, losses=None):
    """The rule, written out: score_i = max(w_i, w_i+1); the last check's max(w_last, w_before); the lowest
    (score, own WER, loss) wins, the earlier on a tie."""
    n = len(wers)
    losses = losses or [0.0] * n
    scores = [max(wers[i], wers[i + 1]) for i in range(n - 1)] + [max(wers[-1], wers[-2] if n > 1 else wers[-1])]
    return min(range(n), key=lambda i: (scores[i], wers[i], losses[i], i))


def test_one_lucky_check_is_not_kept(tmp_path):
    wers = [0.30, 0.10, 0.40, 0.20, 0.22]  # step 1 is lucky: the next check is the worst
    sel = ConfirmedSelection(tmp_path)
    for i, w in enumerate(wers):
        sel.check(i, w, None, _save(i))
    folder, pick = sel.final_choice()
    assert pick["step"] == expected(wers) == 3 and pick["score"] == 0.22
    assert folder == tmp_path / "best" and _chosen(folder) == 3
    # the plain rule (lowest check) would have kept step 1
    assert min(range(len(wers)), key=lambda i: wers[i]) == 1


def test_the_last_check_is_scored_with_the_one_before_it(tmp_path):
    wers = [0.50, 0.40, 0.10, 0.12]
    sel = ConfirmedSelection(tmp_path)
    for i, w in enumerate(wers):
        sel.check(i, w, None, _save(i))
    folder, pick = sel.final_choice()
    assert pick["step"] == expected(wers) == 2  # 2 and 3 (the last) confirm each other at .12; 2 is the better
    assert folder == tmp_path / "best" and _chosen(folder) == 2
    wers = [0.50, 0.40, 0.12, 0.08, 0.05]  # still falling: the last check, confirmed by the one before it
    sel = ConfirmedSelection(tmp_path / "b")
    for i, w in enumerate(wers):
        sel.check(i, w, None, _save(i))
    folder, pick = sel.final_choice()
    assert pick["step"] == expected(wers) == 4 and folder == tmp_path / "b" / "candidates" / "step-000004"
    assert _chosen(folder) == 4
    assert _chosen(tmp_path / "b" / "best") == 3  # best/ stays what the checks confirmed


def test_val_loss_breaks_ties_and_a_resumed_selection_ends_the_same(tmp_path):
    wers, losses = [0.2, 0.2, 0.2, 0.3], [1.0, 0.8, 0.9, 0.7]  # 0 and 1 score 0.2 with WER 0.2: the loss decides
    whole = ConfirmedSelection(tmp_path / "whole")
    for i, (w, lo) in enumerate(zip(wers, losses)):
        whole.check(i, w, lo, _save(i))
    assert whole.final_choice()[1]["step"] == expected(wers, losses) == 1
    first = ConfirmedSelection(tmp_path / "cut")
    for i in range(2):
        first.check(i, wers[i], losses[i], _save(i))
    state = json.loads(json.dumps(first.state()))  # through a checkpoint's JSON
    again = ConfirmedSelection(tmp_path / "cut", state)
    for i in range(2, 4):
        again.check(i, wers[i], losses[i], _save(i))
    assert again.final_choice()[1] == whole.final_choice()[1]
    assert _chosen(again.final_choice()[0]) == 1


def test_a_check_without_a_val_wer_selects_nothing(tmp_path):
    sel = ConfirmedSelection(tmp_path)
    sel.check(0, None, 1.0, _save(0))
    assert sel.final_choice() == (None, {}) and not (tmp_path / "candidates").exists()


def test_a_check_repeated_after_a_kill_scores_the_candidate_its_checkpoint_names(tmp_path):
    """A stage checkpoints (state with check 1 pending), checks 2 and 3 run, it is killed before its next
    checkpoint and resumes from the first: checks 2 and 3 run again. Each reads the candidate of the check its
    state names (1, then 2), not the later students written before the kill."""
    wers = [0.30, 0.12, 0.10, 0.40, 0.35]
    whole = ConfirmedSelection(tmp_path / "whole")
    for i, w in enumerate(wers):
        whole.check(i, w, None, _save(i))
    sel = ConfirmedSelection(tmp_path / "cut")
    for i in range(2):
        sel.check(i, wers[i], None, _save(i))
    state = json.loads(json.dumps(sel.state()))
    sel.checkpointed()  # the checkpoint with check 1 pending: check 0's candidate goes
    assert sorted(d.name for d in (tmp_path / "cut" / "candidates").iterdir()) == ["step-000001"]
    for i in range(2, 4):  # past the checkpoint, then killed
        sel.check(i, wers[i], None, _save(i))
    again = ConfirmedSelection(tmp_path / "cut", state)  # resumed from the checkpoint
    for i in range(2, 5):
        again.check(i, wers[i], None, _save(i))
    assert again.final_choice()[1] == whole.final_choice()[1]
    assert _chosen(again.final_choice()[0]) == _chosen(whole.final_choice()[0]) == expected(wers) == 1
    assert _chosen(tmp_path / "cut" / "best") == _chosen(tmp_path / "whole" / "best")
    again.checkpointed()
    assert sorted(d.name for d in (tmp_path / "cut" / "candidates").iterdir()) == ["step-000004"]
