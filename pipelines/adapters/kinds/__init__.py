"""Adapter kinds: each module turns the tensors one file stores for one layer into a :class:`LayerDelta`.

A kind declares the key suffixes it owns (``SUFFIXES``) and a ``build(tensors, alpha)`` function; the parser
routes each layer's tensors to the kind whose suffixes they use. Adding a kind is a new file plus a line here.
QR-LoRA files (:mod:`.qr`) have their own route in the parser, because their layers must be checked against the
base weights they were made for; so do SHiRA files (:mod:`.shira`, sparse deltas checked against their layers).
"""

from . import dora, full, loha, lokr, lora, qr, shira

KINDS = (lora, loha, lokr, full)

# Suffixes that mark known-but-unsupported LyCORIS algorithms, with the algorithm name for the error message.
UNSUPPORTED_SUFFIXES = {
    "w_norm": "norm-layer fine-tuning (LyCORIS 'norm')",
    "b_norm": "norm-layer fine-tuning (LyCORIS 'norm')",
    "oft_blocks": "OFT",
    "oft_diag": "Diag-OFT",
    "oft_R": "BOFT",
    "a1.weight": "GLoRA",
    "on_input": "(IA)^3",
}


def kind_for(suffixes: set[str]):
    """The kind module that owns these key suffixes, or ``None``."""
    for kind in KINDS:
        if suffixes & set(kind.SUFFIXES):
            return kind
    return None


__all__ = ["KINDS", "UNSUPPORTED_SUFFIXES", "kind_for", "dora", "full", "loha", "lokr", "lora", "qr", "shira"]
