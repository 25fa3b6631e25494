"""How a teacher scores on a given device: compute dtype, tokens per batch, rows per batch, attention; and the
optimizer every training job uses (fused_adamw).

The choices are plain functions of a ``DeviceInfo`` (what kind of device, how much memory is free, whether it
has bf16), so they are tested on a CPU for any device, and the scorer only asks ``describe(device)`` once.

- dtype: bf16 autocast where the device has it natively; fp16 on a GPU without bf16; on a CPU without it (no
  AVX512-BF16 or AMX), fp32: oneDNN emulates bf16 there, 8.3x slower than fp32 on an AVX2 CPU (BENCHMARKS.md,
  section 12). fp16 on a CPU falls back to fp32 too (CPUs run fp16 matmuls at a few GFLOP/s). The training jobs
  follow the same rule (``train_mixed_precision``).
- tokens per batch: on a GPU, a share of the free memory over an estimate of the activation bytes per token
  (inference: no gradients are kept); on a CPU, 4,096 (measured best on this project's CPUs, BENCHMARKS.md:
  bigger batches stop paying once the matmuls are large enough to use the cores). ``batch_tokens`` in
  teachers.toml overrides either.
- streams: on a CPU, 2 forwards at once, each on half the threads torch has (``cpu_streams`` in teachers.toml
  overrides it): with 2 threads on one forward, the small matmuls and the element-wise ops between them leave the
  cores idle part of the time (BENCHMARKS.md, section 13). A row's logits are those of one forward on a stream's
  threads, whichever stream takes its batch. On a GPU, 1.
- attention: PyTorch's fused scaled-dot-product attention (``sdpa``) on every device: transformers' BERT uses it
  when asked, and it is what reaches the flash / memory-efficient kernels on a GPU.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch

CPU_BATCH_TOKENS = 4096
CPU_TRAIN_PART_TOKENS = 1024  # fine-tuning: padded tokens per forward/backward on a CPU (BENCHMARKS.md section 10)
CPU_MAX_ROWS = 512
CPU_STREAMS = 2  # forwards at once on a CPU, the threads split between them (BENCHMARKS.md section 13)
GPU_MAX_ROWS = 8192
GPU_MAX_BATCH_TOKENS = 1 << 20  # past this a batch only adds latency: the GPU is full long before
GPU_MEMORY_SHARE = 0.5  # of the free memory, for activations; the rest is headroom (allocator, other teachers)
CPU_NO_BF16 = ("this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated bf16 runs several times slower "
               "than float32 here")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DeviceInfo:
    """What scoring needs to know about a device."""

    type: str  # "cpu", "cuda", "mps", ...
    free_bytes: int | None = None  # free accelerator memory; None on a CPU
    bf16: bool = True  # native bf16 matmuls (CUDA: compute capability 8.0+; CPU: AVX512-BF16 or AMX)


@dataclass(frozen=True)
class ScoringSettings:
    autocast: torch.dtype | None  # None: plain float32
    batch_tokens: int  # padded tokens per forward batch
    max_rows: int  # rows per forward batch, whatever their length
    attention: str  # transformers' attn_implementation
    streams: int = 1  # batches forwarded at once, each on threads // streams of torch's threads (a CPU only)

    @property
    def compute_dtype(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.autocast]


def cuda_has_bf16(device: torch.device | None = None) -> bool:
    """Native bf16 on this CUDA device (compute capability 8.0+). Not ``torch.cuda.is_bf16_supported()``: that also
    says yes where bf16 is only emulated (V100, T4), which is slower than fp16 there; and it asks about GPU 0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU: AVX512-BF16 or AMX tiles on x86; on ARM, oneDNN's own answer (BF16 in
    Neoverse V1/V2, Apple M2+). Without them oneDNN emulates bf16, much slower than fp32 (8.3x for a MiniLM forward,
    27x for a training step, on an AVX2 Zen 3: BENCHMARKS.md, section 12)."""
    import platform

    cpu = torch.cpu
    x86 = hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported")
    if x86 and platform.machine().lower() not in ("aarch64", "arm64"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe(device: torch.device) -> DeviceInfo:
    """The ``DeviceInfo`` of a torch device on this machine (queries CUDA for free memory and bf16, a CPU for bf16)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return DeviceInfo("cuda", int(free), cuda_has_bf16(device))
    if device.type == "cpu":
        return DeviceInfo("cpu", bf16=cpu_has_bf16())
    return DeviceInfo(device.type)


def autocast_dtype(dtype: str, info: DeviceInfo) -> torch.dtype | None:
    """The autocast dtype for a requested compute ``dtype`` on this device, or None for plain float32."""
    if dtype == "float32":
        return None
    if info.type == "cpu" and dtype == "float16":
        warnings.warn("float16 is not usable on this CPU; scoring in float32 (use bfloat16 for speed)")
        return None
    if info.type == "cpu" and dtype == "bfloat16" and not info.bf16:
        warnings.warn(CPU_NO_BF16 + "; scoring in float32")
        return None
    if info.type == "cuda" and dtype == "bfloat16" and not info.bf16:
        warnings.warn("this GPU has no bfloat16; scoring in float16")
        return torch.float16
    return TORCH_DTYPES[dtype]


def computed_dtype(dtype: str, info: DeviceInfo) -> str:
    """The name of the dtype that scoring at ``dtype`` really computes in on this device ("float32" where a
    CPU lacks bf16), for reports that print a speed next to its precision."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast_dtype already warned, or will, where scoring falls back
        got = autocast_dtype(dtype, info)
    return "float32" if got is None else str(got).removeprefix("torch.")


def activation_bytes_per_token(config, max_length: int, dtype_bytes: int) -> int:
    """A generous estimate of the activation memory one token needs at the peak of an inference forward: the
    hidden states and their residual copies, the Q/K/V projections, the feed-forward's inner layer, and a row of
    attention scores per head (in case the attention kernel materialises them), times 2 for the allocator."""
    hidden = int(getattr(config, "hidden_size", 768))
    inner = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(getattr(config, "num_attention_heads", 12))
    per_token = 6 * hidden + inner + heads * max_length
    return 2 * per_token * dtype_bytes


def token_budget(info: DeviceInfo, config, max_length: int, autocast: torch.dtype | None) -> int:
    """Padded tokens per batch for this device when teachers.toml sets none (see the module docstring)."""
    if info.type != "cuda" or not info.free_bytes:
        return max(CPU_BATCH_TOKENS, max_length)
    dtype_bytes = 4 if autocast is None else 2
    tokens = int(GPU_MEMORY_SHARE * info.free_bytes) // activation_bytes_per_token(config, max_length, dtype_bytes)
    tokens = min(tokens, GPU_MAX_BATCH_TOKENS) // max_length * max_length  # whole rows of the longest length
    return max(tokens, max_length)


def train_part_tokens(info: DeviceInfo, config, max_length: int, half: bool, requested: int | None = None) -> int:
    """Padded tokens per forward/backward in fine-tuning (a step runs its batch in parts this big; 0: whole batches).

    ``requested`` (the teacher's ``micro_batch_tokens``) wins. On a CPU, 1,024: it kept fine-tuning under 2 GB at
    no measurable cost. On a GPU, the memory share over the inference estimate times the layers, since training
    keeps every layer's activations for the backward pass: whole batches unless they would not fit. ``half``: the
    job computes in bf16/fp16 (2 bytes an activation), else fp32 (4).
    """
    if requested is not None:
        return requested or sys.maxsize
    if info.type != "cuda" or not info.free_bytes:
        return max(CPU_TRAIN_PART_TOKENS, max_length)
    layers = int(getattr(config, "num_hidden_layers", 12))
    per_token = layers * activation_bytes_per_token(config, max_length, 2 if half else 4)
    return max(int(GPU_MEMORY_SHARE * info.free_bytes) // per_token // max_length * max_length, max_length)


def scoring_settings(info: DeviceInfo, config, dtype: str, max_length: int,
                     batch_tokens: int | None = None, cpu_streams: int | None = None,
                     threads: int | None = None) -> ScoringSettings:
    """Everything the scorer decides from the device; ``batch_tokens`` and ``cpu_streams`` (teachers.toml) win
    when given. ``threads``: torch's intra-op threads (default: what torch has now); no more streams than that."""
    amp = autocast_dtype(dtype, info)
    tokens = batch_tokens or token_budget(info, config, max_length, amp)
    streams = 1
    if info.type == "cpu":
        streams = max(1, min(cpu_streams or CPU_STREAMS, threads or torch.get_num_threads()))
    return ScoringSettings(amp, tokens, GPU_MAX_ROWS if info.type == "cuda" else CPU_MAX_ROWS, "sdpa", streams)


def training_on_cpu() -> bool:
    """Whether a training job's Accelerator runs on the CPU: asked for (`accelerate launch --cpu` sets
    ACCELERATE_USE_CPU), or no accelerator device here (CUDA, MPS, XPU)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    xpu = getattr(torch, "xpu", None)
    xpu_here = xpu is not None and xpu.is_available()
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or xpu_here)


def train_mixed_precision(requested: str | None) -> str | None:
    """The ``mixed_precision`` a training job gives its Accelerator: what was asked (here or by ``accelerate launch``,
    through ACCELERATE_MIXED_PRECISION), except bf16 on a CPU without native bf16, which trains in fp32 with a
    warning (the scorer's rule). None leaves the choice to accelerate."""
    asked = requested or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked == "bf16" and training_on_cpu() and not cpu_has_bf16():
        warnings.warn(CPU_NO_BF16 + "; training in float32")
        return "no"
    return requested or None


def finetune_bf16(requested: bool, cpu: bool) -> bool:
    """Whether teacher fine-tuning computes in bf16: where asked and the device has it natively (a GPU of compute
    capability 8.0+, a CPU with native bf16); otherwise fp32."""
    return requested and (cpu_has_bf16() if cpu else cuda_has_bf16())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: on CUDA it is pinned and copied non-blocking (a
    copy from pageable memory waits for the stream to drain first); on a CPU it is the tensor itself."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def fused_adamw(groups, lr: float):
    """AdamW with its fused kernel (one pass per tensor, no temporary copies of the parameters), where this torch
    build has it for these parameters, else the default foreach kernels. Fused ran ~6x faster steps on this CPU
    (the student trainer) and 1.07x faster fine-tuning epochs (BENCHMARKS.md section 10)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)
