"""4-bit SVDQuant-style denoisers whose 16-bit low-rank branch hosts the studio's LoRAs (issue 6).

* :mod:`.formats` — INT4 / NVFP4 quantizers, 4-bit packing, integer-exact group products;
* :mod:`.linear` — :class:`QuantLinear`, the W4A4 / W4A16 layer that hosts adapters;
* :mod:`.runtime` — which runtime computes a layer's 4-bit product: ``reference`` (exact), ``dequant`` (W4A16,
  :mod:`.dequant`), ``triton`` (W4A4 on INT8 tensor cores, :mod:`.triton_kernels`), ``auto``;
* :mod:`.targets` — which layers of FLUX.1 / SDXL are quantized (as Nunchaku does);
* :mod:`.calibrate` — activation statistics from real pipeline runs;
* :mod:`.quantizer` — smoothing with a per-layer α search, the SVD branch, 4-bit residuals, RTN baseline;
* :mod:`.storage` — the quantized folder (``studio_quant.json`` + safetensors) and loading it back;
* :mod:`.memory` — bytes of a quantized denoiser vs 16-bit, by arithmetic and on the ``meta`` device.

Only the light modules are imported here; the others are imported where they are used.
"""

from .formats import FORMATS
from .linear import QuantLinear, quantized_layers

__all__ = ["FORMATS", "QuantLinear", "quantized_layers"]
