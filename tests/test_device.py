"""The scorer's settings follow the device it runs on (tmkd.teachers.device): checked on a CPU for any device."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig

from tmkd.teachers.device import (CPU_BATCH_TOKENS, CPU_TRAIN_PART_TOKENS, GPU_MAX_BATCH_TOKENS, DeviceInfo,
                                  activation_bytes_per_token, scoring_settings, train_part_tokens)

MINILM = BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=6)
GB = 1 << 30


def test_cpu_gets_bf16_and_the_measured_cpu_batch():
    s = scoring_settings(DeviceInfo("cpu"), MINILM, "bfloat16", 128)
    assert (s.autocast, s.compute_dtype, s.batch_tokens, s.max_rows, s.attention) == \
           (torch.bfloat16, "bfloat16", CPU_BATCH_TOKENS, 512, "sdpa")
    assert scoring_settings(DeviceInfo("cpu"), MINILM, "float32", 128).autocast is None


def test_fp16_on_a_cpu_falls_back_to_fp32_with_a_warning():
    with pytest.warns(UserWarning, match="float16 is not usable on this CPU"):
        s = scoring_settings(DeviceInfo("cpu"), MINILM, "float16", 128)
    assert s.autocast is None and s.compute_dtype == "float32"


def test_a_gpu_without_bf16_scores_in_fp16():
    with pytest.warns(UserWarning, match="no bfloat16"):
        s = scoring_settings(DeviceInfo("cuda", 16 * GB, bf16=False), MINILM, "bfloat16", 128)
    assert s.autocast is torch.float16


def test_gpu_token_budget_follows_free_memory():
    """More free memory, bigger batches (whole rows of max_length), up to a cap; fp32 needs twice the bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU with bf16 asked for bf16: nothing to warn about
        small = scoring_settings(DeviceInfo("cuda", 2 * GB), MINILM, "bfloat16", 128)
        big = scoring_settings(DeviceInfo("cuda", 139 * GB), MINILM, "bfloat16", 128)
        fp32 = scoring_settings(DeviceInfo("cuda", 2 * GB), MINILM, "float32", 128)
    assert small.batch_tokens % 128 == 0 and small.batch_tokens > CPU_BATCH_TOKENS
    # half the free memory over the activation bytes of a token, within one row of 128
    per_token = activation_bytes_per_token(MINILM, 128, 2)
    assert small.batch_tokens <= GB // per_token < small.batch_tokens + 128
    assert big.batch_tokens == GPU_MAX_BATCH_TOKENS and big.max_rows == 8192
    assert fp32.batch_tokens < small.batch_tokens and abs(fp32.batch_tokens * 2 - small.batch_tokens) <= 256
    tiny = scoring_settings(DeviceInfo("cuda", 1 << 20), MINILM, "bfloat16", 128)
    assert tiny.batch_tokens == 128  # never below one row of the longest length


def test_batch_tokens_from_teachers_toml_wins_on_any_device():
    for info in (DeviceInfo("cpu"), DeviceInfo("cuda", 80 * GB)):
        assert scoring_settings(info, MINILM, "bfloat16", 128, batch_tokens=2048).batch_tokens == 2048


def test_fine_tuning_parts_follow_the_device_unless_the_teacher_sets_them():
    """Fine-tuning runs each step in parts of this many padded tokens: the measured 1,024 on a CPU; on a GPU whole
    batches (32 rows of 128 = 4,096 tokens) unless the free memory would not hold them; the teacher's
    micro_batch_tokens wins, and 0 means whole batches."""
    assert train_part_tokens(DeviceInfo("cpu"), MINILM, 128, True) == CPU_TRAIN_PART_TOKENS == 1024
    assert train_part_tokens(DeviceInfo("cpu"), MINILM, 2048, True) == 2048  # never below one row
    big = train_part_tokens(DeviceInfo("cuda", 80 * GB), MINILM, 128, True)
    small = train_part_tokens(DeviceInfo("cuda", 1 * GB), MINILM, 128, True)
    fp32 = train_part_tokens(DeviceInfo("cuda", 1 * GB), MINILM, 128, False)  # a bf16 GPU, a job in fp32
    assert big > 32 * 128 and big % 128 == 0
    assert 128 <= fp32 < small < big and small % 128 == 0
    assert train_part_tokens(DeviceInfo("cuda", 1 << 20), MINILM, 128, True) == 128
    for info in (DeviceInfo("cpu"), DeviceInfo("cuda", 80 * GB)):
        assert train_part_tokens(info, MINILM, 128, True, requested=4096) == 4096
        assert train_part_tokens(info, MINILM, 128, True, requested=0) > 10**9


def test_describe_asks_the_gpu_it_is_given(monkeypatch):
    """Free memory and native bf16 of that device (compute capability 8.0+; emulated bf16 on a V100/T4 is not bf16)."""
    from tmkd.teachers import device as dev

    asked = []
    monkeypatch.setattr(dev.torch.cuda, "mem_get_info", lambda d=None: asked.append(d) or (40 * GB, 80 * GB))
    for capability, bf16 in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(dev.torch.cuda, "get_device_capability", lambda d=None, c=capability: asked.append(d) or c)
        assert dev.describe(torch.device("cuda", 1)) == DeviceInfo("cuda", 40 * GB, bf16)
    assert set(asked) == {torch.device("cuda", 1)}


def test_a_cpu_has_bf16_only_with_avx512_bf16_or_amx(monkeypatch):
    from tmkd.teachers import device as dev

    monkeypatch.setattr("platform.machine", lambda: "x86_64")

    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(dev.torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(dev.torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert dev.describe(torch.device("cpu")) == DeviceInfo("cpu", bf16=native)
    # on ARM the x86 probes say nothing: oneDNN's own answer counts
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    for native in (False, True):
        monkeypatch.setattr(dev.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=native: v)
        assert dev.describe(torch.device("cpu")) == DeviceInfo("cpu", bf16=native)


def test_a_cpu_without_native_bf16_scores_and_trains_in_fp32_and_says_so(monkeypatch):
    """Emulated bf16 ran 8.3x (scoring) and 27x (training) slower than fp32 on an AVX2 CPU (BENCHMARKS.md section
    12): asked for bf16 there, the scorer and the training jobs compute in fp32, with a warning; where the CPU has
    bf16 nothing changes."""
    from tmkd.teachers import device as dev

    with pytest.warns(UserWarning, match="no native bfloat16 .*; scoring in float32"):
        s = scoring_settings(DeviceInfo("cpu", bf16=False), MINILM, "bfloat16", 128)
    assert s.autocast is None and s.compute_dtype == "float32"

    monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: False)  # a CPU-only machine, whatever this one is
    monkeypatch.setattr(dev.torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    with pytest.warns(UserWarning, match="no native bfloat16 .*; training in float32"):
        assert dev.train_mixed_precision("bf16") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    with pytest.warns(UserWarning, match="training in float32"):
        assert dev.train_mixed_precision(None) == "no"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.train_mixed_precision("no") == "no"  # the job's own setting wins over the launcher's
        # a GPU here: bf16 is its business, not the CPU's ...
        monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: True)
        assert dev.train_mixed_precision("bf16") == "bf16"
    # ... unless `accelerate launch --cpu` puts the job on the CPU (it sets ACCELERATE_USE_CPU="True")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.warns(UserWarning, match="training in float32"):
        assert dev.train_mixed_precision("bf16") == "no"
    assert dev.finetune_bf16(True, cpu=True) is False and dev.finetune_bf16(False, cpu=True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)  # a CPU with native bf16: as asked
        assert dev.train_mixed_precision("bf16") == "bf16" and dev.train_mixed_precision(None) is None
        assert dev.finetune_bf16(True, cpu=True) is True
        monkeypatch.setattr(dev, "cuda_has_bf16", lambda: False)  # a V100: fp32 (its bf16 is emulated)
        assert dev.finetune_bf16(True, cpu=False) is False


def test_loaded_teacher_asks_for_fused_attention_and_the_device_budget(tiny_teachers, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from tmkd.teachers.scoring import LoadedTeacher, load_tokenizer
    from tmkd.teachers.spec import TeacherSpec

    folder = next(iter(tiny_teachers.values()))
    tok = load_tokenizer(folder)
    asked = []
    real = AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: asked.append(k.get("attn_implementation")) or real(*a, **k))
    from tmkd.teachers import device as dev

    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)  # a CPU with native bf16, whatever this one has
    auto = LoadedTeacher(TeacherSpec(name="t", path=str(folder), max_length=32, dtype="bfloat16"), None, folder,
                         torch.device("cpu"), tok)
    assert asked == ["sdpa"] and auto.model.config._attn_implementation == "sdpa"
    assert (auto.settings.batch_tokens, auto.compute_dtype) == (CPU_BATCH_TOKENS, "bfloat16")
    given = LoadedTeacher(TeacherSpec(name="t", path=str(folder), max_length=32, batch_tokens=64), None, folder,
                          torch.device("cpu"), tok)
    assert given.settings.batch_tokens == 64 and given.compute_dtype == "float32"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        emulated = LoadedTeacher(TeacherSpec(name="t", path=str(folder), max_length=32, dtype="bfloat16"), None,
                                 folder, torch.device("cpu"), tok)
    assert emulated.compute_dtype == "float32"


def test_reports_name_the_dtype_scoring_really_computes_in():
    """The evaluation tables print pairs/s next to a precision: a CPU without native bf16 scores in float32, and
    the table must say float32, not the bfloat16 that was asked for."""
    from tmkd.teachers.device import computed_dtype

    assert computed_dtype("bfloat16", DeviceInfo("cpu", bf16=False)) == "float32"
    assert computed_dtype("bfloat16", DeviceInfo("cpu", bf16=True)) == "bfloat16"
    assert computed_dtype("float32", DeviceInfo("cpu", bf16=True)) == "float32"
    assert computed_dtype("bfloat16", DeviceInfo("cuda", 16 * GB, bf16=False)) == "float16"
