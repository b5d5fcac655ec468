"""CLIPScore with open_clip: how well an image matches a text.

``score = 100 * max(cos(E_image, E_text), 0)`` (Hessel et al. 2021, *CLIPScore*, without their w=2.5 rescale;
the form torchmetrics and the multi-LoRA composition papers report). The default scorer is open_clip's
``ViT-B-32`` with the ``openai`` weights, the one MLPerf's SDXL benchmark uses (``text_to_image/tools/clip``:
``create_model_and_transforms('ViT-B-32', pretrained='openai')``, cosine times 100). As in MLPerf, the name is
the plain ``ViT-B-32`` config (GELU), not ``ViT-B-32-quickgelu``, so numbers are comparable with MLPerf's.

Which model ``--clip-model`` / ``--clip-pretrained`` name (see :func:`resolve_clip`):

* an open_clip architecture plus a pretrained tag: ``ViT-L-14`` + ``laion2b_s32b_b82k``;
* an open_clip architecture plus a local weights file: ``ViT-B-32`` + ``weights.safetensors`` (or ``.pt``);
* ``hf-hub:org/repo``: open_clip's Hub layout;
* a local folder with ``open_clip_config.json`` and a weights file (open_clip's own ``local-dir`` layout, the
  layout ``open_clip.push_to_hf_hub`` writes);
* a name of a model shipped in ``assets/models/<name>/`` (same folder layout), e.g. a tiny offline CLIP;
* a ``.json`` file holding an open_clip model config, plus a weights file as ``--clip-pretrained``.

Weights are read with safetensors, or ``torch.load(weights_only=True)`` for ``.pt/.pth/.bin`` (tensors only,
no pickled code). A model without weights is refused: random weights would give meaningless scores.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from PIL import Image

from pipelines.assets import MissingAssetError, assets_root
from pipelines.errors import StudioError

if TYPE_CHECKING:
    import torch

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_NAME = "open_clip_config.json"


WORLD_MODELS = ("tiny-sdxl", "tiny-flux")
WORLD_CLIP = "tiny-clip"


def _world_models() -> Path | None:
    """The shipped ``assets/models`` folder, or ``None`` in an installation without the tiny world."""
    try:
        return assets_root() / "models"
    except MissingAssetError:
        return None


def _no_grad(method):
    """``torch.no_grad()`` around ``method``, importing torch only when it runs (listings import this module)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


def default_clip_model(models: Iterable[str]) -> str:
    """The scorer used when none is named: the tiny world's CLIP (``assets/models/tiny-clip``, trained on the
    world's captions) for images of the tiny world models, which the web-scale CLIPs do not understand and which
    must score offline; ``ViT-B-32``/``openai`` for everything else."""
    names = {str(m) for m in models}
    world = _world_models()
    if names and names <= set(WORLD_MODELS) and world is not None and (world / WORLD_CLIP / CONFIG_NAME).is_file():
        return WORLD_CLIP
    return DEFAULT_CLIP_MODEL


class ScorerError(StudioError):
    """A CLIP scorer that cannot be built: unknown name, missing weights or config."""


@dataclass(frozen=True)
class ClipSpec:
    """Where a CLIP model comes from, as open_clip's ``create_model_and_transforms`` wants it."""

    model: str                 # open_clip name, 'hf-hub:...' or 'local-dir:...'
    pretrained: str | None     # tag or weights file (None with a schema)
    label: str                 # what reports show

    def create(self, device: torch.device):
        import pickle

        import open_clip
        from safetensors import SafetensorError

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model, pretrained=self.pretrained, device=device, weights_only=True)
            tokenizer = open_clip.get_tokenizer(self.model)
        except (RuntimeError, ValueError, OSError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
            reason = str(e).split("\n")[0]  # torch's weights_only refusal is long; its first line says it
            raise ScorerError(f"cannot build the CLIP scorer {self.label}: {type(e).__name__}: {reason}") from None
        return model.eval(), preprocess, tokenizer


def _local_dir_spec(folder: Path, pretrained: str | None) -> ClipSpec:
    if not (folder / CONFIG_NAME).is_file():
        raise ScorerError(f"{folder}: a local CLIP model folder needs {CONFIG_NAME} (open_clip's local-dir layout)")
    if pretrained:
        raise ScorerError(f"{folder}: a CLIP model folder carries its own weights; drop --clip-pretrained "
                          f"({pretrained}) or pass the config file with the weights instead")
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ScorerError(f"{folder}: no CLIP weights ({', '.join(WEIGHT_SUFFIXES)}) next to {CONFIG_NAME}")
    return ClipSpec(model=f"local-dir:{folder}", pretrained=None, label=str(folder))


def _config_file_spec(config: Path, pretrained: str | None) -> ClipSpec:
    import open_clip

    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ScorerError(f"{config}: cannot read the CLIP config ({e})") from None
    if not all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ScorerError(f"{config}: an open_clip model config needs embed_dim, vision_cfg and text_cfg "
                          f"(a folder with {CONFIG_NAME} takes open_clip's model_cfg/preprocess_cfg layout)")
    if not pretrained or not Path(pretrained).is_file():
        raise ScorerError(f"{config}: give the weights file with --clip-pretrained (got {pretrained!r})")
    open_clip.add_model_config(config)  # registers the config under its file stem
    return ClipSpec(model=config.stem, pretrained=str(pretrained), label=f"{config.stem}/{Path(pretrained).name}")


def resolve_clip(model: str | Path = DEFAULT_CLIP_MODEL, pretrained: str | Path | None = None) -> ClipSpec:
    """Turn ``--clip-model`` / ``--clip-pretrained`` into a :class:`ClipSpec` (see the module docstring).

    ``pretrained=None`` means: the model's own weights (a folder), or ``openai`` for the default ``ViT-B-32``.
    """
    import open_clip

    model_text = str(model)
    pretrained = str(pretrained) if pretrained not in (None, "") else None
    if model_text.startswith("local-dir:"):
        return _local_dir_spec(Path(model_text.removeprefix("local-dir:")), pretrained)
    if model_text.startswith("hf-hub:"):
        return ClipSpec(model=model_text, pretrained=None, label=model_text)
    path = Path(model_text).expanduser()
    if path.is_dir():
        return _local_dir_spec(path.resolve(), pretrained)
    if path.suffix == ".json":
        if not path.is_file():
            raise ScorerError(f"{path}: CLIP config file not found")
        return _config_file_spec(path.resolve(), pretrained)
    world = _world_models()
    if world is not None and (world / model_text / CONFIG_NAME).is_file():
        return _local_dir_spec(world / model_text, pretrained)
    if model_text.replace("/", "-") not in open_clip.list_models():
        raise ScorerError(f"unknown CLIP model '{model_text}': not an open_clip architecture "
                          f"(see open_clip.list_models()), a folder with {CONFIG_NAME}, a .json config or hf-hub:ID")
    if pretrained is None and model_text == DEFAULT_CLIP_MODEL:
        pretrained = DEFAULT_CLIP_PRETRAINED
    if pretrained is None:
        raise ScorerError(f"CLIP model '{model_text}' needs --clip-pretrained (a tag such as 'openai' or a weights "
                          "file); random weights give meaningless scores")
    if Path(pretrained).suffix in WEIGHT_SUFFIXES and not Path(pretrained).is_file():
        raise ScorerError(f"{pretrained}: CLIP weights file not found")
    if not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_text.replace("/", "-"))
        if pretrained not in tags:
            raise ScorerError(f"'{pretrained}' is not a pretrained tag of {model_text} ({', '.join(tags)}) nor a file")
    label = f"{model_text}/{Path(pretrained).name if Path(pretrained).is_file() else pretrained}"
    return ClipSpec(model=model_text, pretrained=pretrained, label=label)


class ClipScorer:
    """An open_clip model that scores images against texts; text embeddings are cached.

    >>> scorer = ClipScorer()                                    # ViT-B-32 / openai
    >>> scorer.score([image], ["a corgi, watercolor"])           # tensor([31.4])
    """

    def __init__(self, model: str | Path = DEFAULT_CLIP_MODEL, pretrained: str | Path | None = None,
                 *, device: str | torch.device | None = None, batch_size: int = 32):
        import torch

        self.spec = resolve_clip(model, pretrained)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = int(batch_size)
        self.model, self.preprocess, self.tokenizer = self.spec.create(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:
        return self.spec.label

    @_no_grad
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[T, D]`` (float32, on the CPU)."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            features = self.model.encode_text(tokens).float()
            features = torch.nn.functional.normalize(features, dim=-1).cpu()
            self._text_cache.update(zip(chunk, features))
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._text_cache[t] for t in texts])

    @_no_grad
    def embed_images(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings ``[I, D]``, in batches of ``batch_size``."""
        import torch

        out, batch = [], []

        def flush():
            pixels = torch.stack(batch).to(self.device)
            features = self.model.encode_image(pixels).float()
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu())
            batch.clear()

        for image in images:
            batch.append(self.preprocess(image.convert("RGB")))
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        return torch.cat(out) if out else torch.zeros(0, 0)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """CLIPScore of image ``i`` with text ``i``: ``[I]``."""
        import torch

        if len(images) != len(texts):
            raise ValueError("score() pairs images and texts one to one")
        if not images:
            return torch.zeros(0)
        cos = (self.embed_images(images) * self.embed_texts(texts)).sum(-1)
        return 100.0 * cos.clamp(min=0)

    def score_many(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[list[float]]:
        """CLIPScores of image ``i`` with each text of ``texts[i]`` (the prompt, then each concept)."""
        if len(images) != len(texts):
            raise ValueError("score_many() needs one list of texts per image")
        if not images:
            return []
        image_features = self.embed_images(images)
        scores = []
        for features, item_texts in zip(image_features, texts):
            if not item_texts:
                scores.append([])
                continue
            cos = self.embed_texts(list(item_texts)) @ features
            scores.append((100.0 * cos.clamp(min=0)).tolist())
        return scores


class LazyClipScorer:
    """A ``scorer(images, texts) -> list[float | None]`` for front ends: loads the CLIP model on first use.

    When the model cannot be loaded (offline, no such checkpoint) it warns once and returns ``None`` scores,
    which the app shows as "n/a", instead of failing the render.
    """

    def __init__(self, model: str | Path = DEFAULT_CLIP_MODEL, pretrained: str | Path | None = None,
                 device: str | torch.device | None = None):
        self.model, self.pretrained, self.device = model, pretrained, device
        self._scorer: ClipScorer | None = None
        self.error: str | None = None

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float | None]:
        if self._scorer is None and self.error is None:
            try:
                self._scorer = ClipScorer(self.model, self.pretrained, device=self.device)
            except Exception as e:  # noqa: BLE001 - any loading failure means "no scores", said once
                self.error = f"CLIPScore unavailable ({self.model}): {e}"
                logging.getLogger(__name__).warning(self.error)
        if self._scorer is None:
            return [None] * len(images)
        return self._scorer.score(list(images), list(texts)).tolist()
