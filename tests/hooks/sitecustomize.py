"""A kill -9, or a NaN loss on one process, at a known point, for tests that run the trainer as a subprocess.

With ``PYTHONPATH=tests/hooks`` and ``TMKD_TEST_KILL_AT_SAVE=N``, the process sends itself SIGKILL
when the trainer is about to save the checkpoint of optimizer step N: the output folder is left
exactly as a kill at that instant leaves it. Python imports ``sitecustomize`` at startup, so the
trainer itself carries no test hook.
"""
import os

if os.environ.get("TMKD_TEST_KILL_AT_SAVE"):
    import signal

    import tmkd.student.checkpoint as checkpoint

    _save = checkpoint.save_checkpoint

    def _killed_at_save(accelerator, out, step, *args, **kwargs):
        if step == int(os.environ["TMKD_TEST_KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(accelerator, out, step, *args, **kwargs)

    checkpoint.save_checkpoint = _killed_at_save

if os.environ.get("TMKD_TEST_NAN_AT"):
    # ``TMKD_TEST_NAN_AT=R:N``: on the process of rank R only, the N-th batch's loss (and every later one) is NaN
    import tmkd.student.losses as losses

    _rank, _n = map(int, os.environ["TMKD_TEST_NAN_AT"].split(":"))
    _distill, _calls = losses.distill_loss, []

    def _nan_on_one_rank(*args, **kwargs):
        loss = _distill(*args, **kwargs)
        _calls.append(1)
        if int(os.environ.get("RANK", "0")) == _rank and len(_calls) >= _n:
            return loss * float("nan")
        return loss

    losses.distill_loss = _nan_on_one_rank
