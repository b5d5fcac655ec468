"""Which runtime computes a :class:`~pipelines.quant.linear.QuantLinear`'s 4-bit product.

=============  ===============================================================  ==============================
runtime        computes                                                         runs on
=============  ===============================================================  ==============================
``reference``  W4A4 exactly: activations quantized per token and group, the     any device (slow: group by
               4-bit product group by group on integer-valued operands          group)
``dequant``    W4A16: the residual dequantized (λ folded in) to the activation   any device, at 16-bit GEMM
               dtype at the layer, one GEMM (:mod:`.dequant`)                   speed plus the dequantization
``triton``     W4A4, the same numbers as ``reference`` up to float32 rounding:  CUDA, compute capability 8.0+
               INT8 tensor cores, INT32 per group (:mod:`.triton_kernels`)      (Ampere, Ada, Hopper, ...)
``auto``       ``triton`` where it can run, else ``dequant``                    anywhere
=============  ===============================================================  ==============================

The runtime is a per-layer setting (``layer.runtime``), resolved at every call against the device the input is
on, so offloading and ``.to()`` keep working. Layers that are not eligible for the kernel take ``dequant``
under ``auto`` and ``triton``: the W4A16 layers (weight-only by design: there are no activations to quantize)
and formats the kernel lacks (NVFP4). Asking for ``triton`` where no capable GPU or no Triton is present is an
error, raised when the runtime is set (:func:`set_runtime`), not in the middle of a render; under ``auto`` a
kernel that fails to compile or launch is recorded (:func:`kernel_failed`) and ``dequant`` runs instead. Under
``TRITON_INTERPRET=1`` the CPU counts as a Triton device (Triton's interpreter; slow, for tests). The kernel has
no backward: when gradients are being recorded (e.g. training gates on a 4-bit model) ``auto`` runs ``dequant``,
and an explicit ``triton`` adds the branch outside the kernel so that its gradient still flows.

A freshly built layer runs ``reference`` (quantization measures exactly what the W4A4 kernel computes);
loading a quantized folder selects the runtime recorded in it (``studio quantize --runtime``, default ``auto``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter

import torch
from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "dequant", "triton", "reference")
DEFAULT_RUNTIME = "auto"
KERNEL_GROUPS = (32, 64, 128)  # group sizes the Triton INT4 kernels take (tl.dot on INT8 needs K >= 32)
MIN_CAPABILITY = (8, 0)


def check_runtime(runtime: str, origin: str = "runtime") -> str:
    """``runtime`` if it names a runtime; otherwise a ``ValueError`` listing them."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{origin}: unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
    return runtime


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why ``import triton`` fails (None: it works). Cached: the answer does not change within a process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{type(e).__name__}: {e}"
    return None


def interpreted() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU in Triton's numpy interpreter (read by Triton when it
    is first imported, so it must be set before that)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_kernel_failure: str | None = None


def kernel_failed(error: Exception) -> None:
    """Record that the kernel failed to compile or launch here: ``auto`` uses ``dequant`` from now on (warned
    once); an explicit ``triton`` keeps raising."""
    global _kernel_failure
    if _kernel_failure is None:
        _kernel_failure = f"the Triton kernel failed here ({type(error).__name__}: {str(error)[:300]})"
        log.warning("%s; runtime auto falls back to dequant", _kernel_failure)


def triton_unavailable(device: torch.device | str) -> str | None:
    """Why the Triton W4A4 kernel cannot run on ``device`` (None: it can)."""
    if _kernel_failure is not None:
        return _kernel_failure
    device = torch.device(device)
    if device.type == "cpu" and interpreted():
        return triton_import_error()  # Triton's interpreter runs the kernels on the CPU (how the tests check them)
    if device.type != "cuda":
        return f"the model runs on {device.type}; the Triton W4A4 kernel needs a CUDA GPU"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _capability(index)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(index)} has compute capability {capability[0]}.{capability[1]}; the "
                f"kernel needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (INT8 tensor cores: Ampere, Ada, "
                "Hopper, Blackwell)")
    error = triton_import_error()
    if error is not None:
        return f"triton cannot be imported ({error})"
    return None


def kernel_unsupported(layer) -> str | None:
    """Why ``layer`` has no Triton W4A4 kernel (None: it has one)."""
    if layer.mode != "w4a4":
        return "a weight-only (W4A16) layer"
    if layer.fmt != "int4":
        return f"{layer.fmt.upper()} has no Triton kernel yet"
    if layer.group_size not in KERNEL_GROUPS:
        return f"groups of {layer.group_size} (the kernel takes {', '.join(map(str, KERNEL_GROUPS))})"
    return None


def resolve(requested: str, layer, device: torch.device | str) -> str:
    """The runtime that computes ``layer`` on ``device`` when ``requested`` was asked for."""
    if requested == "reference":
        return "reference"
    if requested == "dequant" or kernel_unsupported(layer) is not None:
        return "dequant"
    why = triton_unavailable(device)
    if why is None:
        return "triton"
    if requested == "triton":
        raise RuntimeError(f"runtime 'triton' cannot run: {why}; use 'auto' or 'dequant'")
    return "dequant"


def _layers(module: nn.Module) -> dict:
    from .linear import QuantLinear

    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}


def plan(module: nn.Module, runtime: str, device: torch.device | str | None = None) -> Counter:
    """How many quantized layers of ``module`` each concrete runtime computes on ``device`` (default: the
    layers' own device) under ``runtime``; raises ``RuntimeError`` when ``triton`` cannot run there."""
    check_runtime(runtime)
    counts = Counter()
    for layer in _layers(module).values():
        counts[resolve(runtime, layer, device if device is not None else layer.qweight.device)] += 1
    if runtime == "triton" and counts and "triton" not in counts:
        reasons = sorted({kernel_unsupported(m) for m in _layers(module).values()} - {None})
        raise RuntimeError(f"runtime 'triton': no layer of this model has a kernel ({'; '.join(reasons)}); "
                           "use 'auto' or 'dequant'")
    return counts


def set_runtime(module: nn.Module, runtime: str, device: torch.device | str | None = None) -> Counter:
    """Select ``runtime`` for every quantized layer of ``module`` (checked first: on error nothing changes);
    returns :func:`plan`'s counts for ``device``."""
    counts = plan(module, runtime, device)
    for layer in _layers(module).values():
        layer.runtime = runtime
    return counts


def describe(counts: Counter, requested: str) -> str:
    """One line for the CLI: ``runtime auto: triton (W4A4 INT8 tensor cores) on 114 layers, dequant on 57``."""
    if not counts:
        return "no 4-bit layers (16-bit model)"
    what = {"triton": "triton (W4A4 on INT8 tensor cores)", "dequant": "dequant (W4A16)",
            "reference": "reference (exact W4A4, slow)"}
    parts = [f"{what[name]} on {n} layer{'s' if n != 1 else ''}" for name, n in counts.most_common()]
    return f"runtime {requested}: " + ", ".join(parts)


def primary(counts: Counter) -> str | None:
    """The runtime of the W4A4 product for a recipe: ``triton`` or ``reference`` if any layer runs it, else
    ``dequant`` (W4A16 layers always dequantize); None for a model without 4-bit layers."""
    for name in ("triton", "reference", "dequant"):
        if counts.get(name):
            return name
    return None


def select_runtime(denoiser: nn.Module, runtime: str | None, device: torch.device | str,
                   quant_info: dict | None = None) -> tuple[str, Counter]:
    """:func:`set_runtime` for a loaded pipeline's denoiser, with user-facing errors: ``runtime`` None means the
    folder's recorded runtime (``quant_info``, i.e. ``studio_quant.json``), else ``auto``. Returns the runtime
    and :func:`plan`'s counts (empty for a 16-bit model). Raises :class:`StudioError` naming the problem."""
    from ..errors import StudioError

    requested = runtime or (quant_info or {}).get("runtime") or DEFAULT_RUNTIME
    try:
        return requested, set_runtime(denoiser, check_runtime(requested), device)
    except (ValueError, RuntimeError) as e:
        raise StudioError(str(e)) from None


def recipe_runtime(recorded: str, device: str | torch.device | None) -> tuple[str | None, str | None]:
    """The runtime to reproduce a recipe that ran ``recorded``, and a note when it differs: a ``triton`` image
    is reproduced by ``reference`` (the same W4A4 numbers, slowly) where the kernel cannot run; ``auto`` (a
    16-bit model or an old recipe) leaves the choice to the model (None)."""
    if recorded == "auto":
        return None, None
    if recorded == "triton":
        from ..loading import pick_device

        why = triton_unavailable(pick_device(device))
        if why is not None:
            return "reference", (f"this image ran the Triton W4A4 kernel, which cannot run here ({why}); reproducing "
                                 "it with the reference path (the same W4A4 numbers, slower; --runtime dequant is "
                                 "fast but W4A16)")
    return recorded, None
