"""A kill -9 at a known point, for tests that run the trainer as a subprocess.

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
