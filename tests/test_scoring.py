"""CLIPScore against an independent computation, and the scorer's model resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from batch_support import TINY_CLIP_CONFIG, write_tiny_clip
from studio.scoring import ClipScorer, ScorerError, resolve_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def independent_cosines(folder, pictures, texts) -> torch.Tensor:
    """open_clip's CLIP class + the safetensors file + torchvision transforms written out by hand."""
    import open_clip
    from safetensors.torch import load_file
    from torchvision import transforms

    model = open_clip.CLIP(**TINY_CLIP_CONFIG).eval()
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    prep = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([prep(p.convert("RGB")) for p in pictures]))
        text_features = model.encode_text(open_clip.tokenize(texts))
    return torch.nn.functional.cosine_similarity(image_features[:, None], text_features[None], dim=-1)


def test_clipscore_equals_independent_cosine(tiny_clip):
    texts = ["a zorb in a garden", "inkwash painting", "a red square", "a portrait of a dog"]
    pictures = images(3)
    cos = independent_cosines(tiny_clip, pictures, texts)                       # [3, 4]
    scorer = ClipScorer(tiny_clip, batch_size=2)                                # batches of 2 images
    assert torch.allclose(scorer.embed_images(pictures) @ scorer.embed_texts(texts).T, cos, atol=1e-5)
    expected = 100 * cos.clamp(min=0)
    got = torch.tensor(scorer.score_many(pictures, [texts] * 3))
    assert torch.allclose(got, expected, atol=1e-3)
    assert (expected > 0).any() and (cos < 0).any()                            # both sides of the clamp occur
    pairs = scorer.score(pictures, texts[:3])
    assert torch.allclose(pairs, expected[torch.arange(3), torch.arange(3)], atol=1e-3)


def test_config_file_with_weights_file(tiny_clip, tmp_path):
    config = tmp_path / "tinyclip-b.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    scorer = ClipScorer(config, tiny_clip / "open_clip_model.safetensors")
    reference = ClipScorer(tiny_clip)
    assert torch.allclose(scorer.embed_images(images(1)), reference.embed_images(images(1)), atol=1e-6)
    assert scorer.name == "tinyclip-b/open_clip_model.safetensors"


def test_pt_state_dict_is_read_with_weights_only(tiny_clip, tmp_path):
    """A ``.pt`` checkpoint of plain tensors loads; one holding pickled objects is refused by weights_only."""
    from safetensors.torch import load_file

    config = tmp_path / "tinyclip-c.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.save(load_file(tiny_clip / "open_clip_model.safetensors"), tmp_path / "w.pt")
    ClipScorer(config, tmp_path / "w.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ScorerError, match="cannot build the CLIP scorer"):
        ClipScorer(config, tmp_path / "evil.pt")


def test_resolution_errors(tmp_path, tiny_clip):
    assert resolve_clip().model == "ViT-B-32" and resolve_clip().pretrained == "openai"    # MLPerf's scorer
    with pytest.raises(ScorerError, match="unknown CLIP model 'ViT-Q-99'"):
        resolve_clip("ViT-Q-99")
    with pytest.raises(ScorerError, match="needs --clip-pretrained"):
        resolve_clip("ViT-L-14")
    with pytest.raises(ScorerError, match="not a pretrained tag"):
        resolve_clip("ViT-B-32", "no-such-tag")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(ScorerError, match="no CLIP weights"):
        resolve_clip(tmp_path / "empty")
    with pytest.raises(ScorerError, match="carries its own weights"):
        resolve_clip(tiny_clip, "openai")
    with pytest.raises(ScorerError, match="needs open_clip_config.json"):
        resolve_clip(tmp_path)


def test_lazy_scorer_for_front_ends(tmp_path):
    from PIL import Image

    from studio.scoring import LazyClipScorer

    missing = LazyClipScorer(str(tmp_path / "no-such-clip"))
    assert missing([Image.new("RGB", (64, 64))], ["a corgi"]) == [None]
    assert "unavailable" in missing.error
