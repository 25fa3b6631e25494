"""Scoring streams on a CPU (tmkd.teachers.scoring.LoadedTeacher.forward_streams): several batches forwarded at once
give the same labels bit for bit as one at a time, count every row once for the progress bar, leave torch's thread
count as it was, and a failure in one stream stops the part with that error rather than hanging."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tmkd.teachers.device import CPU_STREAMS, DeviceInfo, scoring_settings

from test_device import MINILM
from test_first_token import loaded, texts


def test_streams_follow_the_device_and_the_threads():
    assert scoring_settings(DeviceInfo("cpu"), MINILM, "float32", 128, threads=8).streams == CPU_STREAMS == 2
    assert scoring_settings(DeviceInfo("cpu"), MINILM, "float32", 128, threads=1).streams == 1  # one thread: one
    assert scoring_settings(DeviceInfo("cpu"), MINILM, "float32", 128, cpu_streams=4, threads=8).streams == 4
    assert scoring_settings(DeviceInfo("cpu"), MINILM, "float32", 128, cpu_streams=4, threads=2).streams == 2
    assert scoring_settings(DeviceInfo("cuda", 16 << 30), MINILM, "bfloat16", 128, cpu_streams=4).streams == 1


def scorer(folder, **spec):
    """A scorer on small batches (256 tokens), so that a part has many of them."""
    return loaded(folder, batch_tokens=256, **spec)


def pairs(tok, n: int = 400):
    from tmkd.teachers.scoring import encode_pairs

    a, b = texts(n)
    return encode_pairs(tok, a, b, 64, "longest_first")


def test_two_streams_write_the_same_labels_and_count_every_row_once(tiny_teachers):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, tok = scorer(tiny_teachers["t1"], cpu_streams=1)
        two, _ = scorer(tiny_teachers["t1"], cpu_streams=2)
        assert (one.settings.streams, two.settings.streams) == (1, 2)
        enc = pairs(tok)
        seen = []
        got = two.score(enc, on_batch=seen.append)
        assert sum(seen) == len(enc) and len(seen) == two.forward_passes > 10  # every batch once
        assert threads_of_a_new_thread() == 2  # the streams' own thread counts did not leak into threads started later
        assert np.array_equal(two.score(enc), got)  # the same bits again, whichever stream took which batch
        # Each stream forwards on 1 thread: bit for bit what one forward on 1 thread gives. One forward on 2 threads
        # may round differently for some batch shapes (it does for these 256-token ones: the matmuls split their
        # sums across threads), as it did before streams.
        np.testing.assert_allclose(got, one.score(enc), rtol=0, atol=1e-5)
        assert one.forward_passes == len(seen)
        torch.set_num_threads(1)
        assert np.array_equal(got, one.score(enc))
    finally:
        torch.set_num_threads(threads)


def test_a_failing_stream_stops_the_part_with_its_error(tiny_teachers):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        teacher, tok = scorer(tiny_teachers["t2"], cpu_streams=2, first_token_last_layer=False)
        model, calls = teacher.model, []

        def flaky(**batch):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory in batch 3")
            return model.forward(**batch)

        teacher.model = flaky
        teacher.model.config = model.config
        with pytest.raises(RuntimeError, match="batch 3"):
            teacher.score(pairs(tok))
        assert len(calls) < teacher.forward_passes  # the other stream stopped too, not after every batch
        assert threads_of_a_new_thread() == 2
    finally:
        torch.set_num_threads(threads)


def threads_of_a_new_thread() -> int:
    """torch's thread count in a thread started now (a stream's setting would be inherited by it)."""
    import threading

    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_streams_share_out_every_thread(tiny_teachers):
    """3 threads over 2 streams: one forwards on 2 threads, the other on 1 (none left idle)."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        teacher, tok = scorer(tiny_teachers["t1"], cpu_streams=2)
        model, seen = teacher.model, {}

        def recording(**batch):
            seen[threading.current_thread().name] = torch.get_num_threads()
            return model(**batch)

        teacher.model = recording
        teacher.model.config = model.config
        teacher.score(pairs(tok))
        assert sorted(seen.values()) == [1, 2]
    finally:
        torch.set_num_threads(threads)


def test_compile_scores_in_one_stream(tiny_teachers):
    teacher, _ = scorer(tiny_teachers["t1"], compile=True, cpu_streams=2)
    assert teacher.settings.streams == 1  # dynamo does not compile from two threads at once


def test_cpu_streams_must_be_a_whole_number(tiny_teachers):
    from tmkd.teachers.spec import TeacherError, TeacherSpec

    for bad in (0, 1.5, "2", 1000, True):
        with pytest.raises(TeacherError, match="cpu_streams"):
            TeacherSpec(name="t", path=str(tiny_teachers["t1"]), cpu_streams=bad)
