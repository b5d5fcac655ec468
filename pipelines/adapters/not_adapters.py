"""Safetensors files that live among LoRAs but are no adapter, which a library lists as nothing.

* ``qr-bases``: the shared Q and R of a family's QR-LoRA adapters (:mod:`pipelines.adapters.qr_lora`);
* ``gates``: AutoLoRA fusion gates trained by ``studio train-gates`` (:mod:`fusion.gates`), recognised by their
  header's ``format`` entry.
"""

GATES_FORMAT = "lora-studio-autolora-gates"  # header "format" of fusion.gates files
NOT_ADAPTERS = ("qr-bases", "gates")  # LoraInfo.format values that are no LoRA

__all__ = ["GATES_FORMAT", "NOT_ADAPTERS"]
