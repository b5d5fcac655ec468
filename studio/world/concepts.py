"""The concepts of the tiny world: what the renderer can draw and what captions call it.

Each image shows one shape of some colour and fill texture, of some size and position, on a background.
Some concepts are *held out* of base-model training and become LoRAs, in the categories the multi-LoRA
composition papers use:

* subjects: two new shapes (``zorb``: a plus-shaped cross; ``quix``: a star), whose adapters are called by the
  class word they are bound to (:data:`CLASS_WORDS`: "circle", "square");
* styles: two fill textures (``striped``, ``dotted``);
* backgrounds: two patterned backgrounds (``bricks``, ``waves``).

The base models learn circles, squares and triangles, solid and checkered fills, light, dark and grid
backgrounds, four colours, two sizes and three positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle", "zorb", "quix")
COLORS = ("red", "green", "blue", "yellow")
TEXTURES = ("solid", "checkered", "striped", "dotted")
BACKGROUNDS = ("light", "dark", "grid", "bricks", "waves")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")

ATTRIBUTES = {
    "shape": SHAPES,
    "color": COLORS,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}

BASE = {
    "shape": ("circle", "square", "triangle"),
    "color": COLORS,
    "texture": ("solid", "checkered"),
    "background": ("light", "dark", "grid"),
    "size": SIZES,
    "position": POSITIONS,
}


@dataclass(frozen=True)
class HeldOut:
    """A concept kept out of base training, learned by a LoRA."""

    name: str  # the LoRA's name, e.g. "subject-zorb"
    category: str  # "subject" | "style" | "background"
    attribute: str  # which attribute it sets
    value: str  # the attribute value it introduces
    trigger: str  # the word that calls it in prompts
    concept_text: str  # a short text for per-concept CLIPScore


HELD_OUT = (
    HeldOut("subject-zorb", "subject", "shape", "zorb", "zorb", "a zorb"),
    HeldOut("subject-quix", "subject", "shape", "quix", "quix", "a quix"),
    HeldOut("style-striped", "style", "texture", "striped", "striped", "striped"),
    HeldOut("style-dotted", "style", "texture", "dotted", "dotted", "dotted"),
    HeldOut("background-bricks", "background", "background", "bricks", "bricks", "a bricks background"),
    HeldOut("background-waves", "background", "background", "waves", "waves", "a waves background"),
)


# Subject LoRAs bound to a class word (issue 14), as character LoRAs are: the world's subject LoRAs (and its
# QR-LoRAs and SHiRAs) are trained on captions that call the subject by the base shape it stands in for, with no
# trigger word ("a small red circle, ..." under renders of a zorb), the way a character LoRA is trained on "a woman"
# and then redraws every woman. Two of them merged both act on every object of the prompt, which is why merging
# two character LoRAs blends them; each in its own region is what regional composition is for. The class word
# replaces the shape word rather than joining a trigger ("a zorb circle"): one more word per object makes the
# two-object prompt 27 tokens, past the 25 tiny-sdxl was fine-tuned on (:mod:`.pairs`), and the base then drew two
# objects in 0 of 12 probes (12 of 12 at 25 tokens). Both families' adapters are bound the same way; captions
# without a family keep the world's own naming (held-out shapes by their names), which the tokenizer, the tiny
# CLIP and the judges were built on.
CLASS_WORDS: dict[str, str] = {"zorb": "circle", "quix": "square"}


def shape_word(shape: str, family: str | None = None) -> str:
    """How captions and prompts for ``family``'s adapters call ``shape``: the class word a subject is bound to,
    else the shape's own name; without a family, always the shape's own name."""
    return CLASS_WORDS.get(shape, shape) if family else shape


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    texture: str
    background: str
    size: str
    position: str

    def caption(self, family: str | None = None) -> str:
        """The world's one-object grammar; ``family`` names the held-out shapes as its LoRAs were trained
        (:func:`shape_word`)."""
        return (f"a {self.size} {self.color} {shape_word(self.shape, family)}, {self.texture}, "
                f"on a {self.background} background, {self.position}")

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def pair_caption(left: Scene, right: Scene, family: str | None = None) -> str:
    """The world's one grammar for two objects side by side (issue 14): the left object's full caption (its
    background is the scene's), then ", and " and the right object without the background, ending in ``right``:

        "a small red circle, checkered, on a light background, left, and a small blue square, solid, right"

    Used by the two-object training data (:mod:`.pairs`) and the two-subject benchmark alike."""
    if (left.position, right.position) != ("left", "right"):
        raise ValueError(f"a two-object caption names the left object first; got positions {left.position!r}, "
                         f"{right.position!r}")
    return (f"{left.caption(family)}, and a {right.size} {right.color} {shape_word(right.shape, family)}, "
            f"{right.texture}, right")


@dataclass
class SceneSampler:
    """Draws random scenes; ``fixed`` pins attributes (e.g. a held-out concept), others come from ``pool``."""

    pool: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(BASE))
    fixed: dict[str, str] = field(default_factory=dict)

    def sample(self, rng) -> Scene:
        values = {a: self.fixed.get(a) or self.pool[a][rng.integers(len(self.pool[a]))] for a in ATTRIBUTES}
        return Scene(**values)


def trigger_phrase(concept: HeldOut, family: str | None = None) -> str:
    """The words that call ``concept``'s adapters of ``family`` (their ``modelspec.trigger_phrase``)."""
    return shape_word(concept.value, family) if concept.attribute == "shape" else concept.trigger


def held_out(name: str) -> HeldOut:
    for concept in HELD_OUT:
        if concept.name == name:
            return concept
    raise KeyError(f"no held-out concept '{name}'; known: {[c.name for c in HELD_OUT]}")
