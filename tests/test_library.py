"""`studio.library.Library` (ids, search, base filter, refusal of crafted names, recipe matching, uploads) and
`studio.preview` (live previews decoded from intermediate latents)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import writers
from pipelines.errors import IncompatibleLoraError, LoraFileError, StudioError
from studio import Studio
from studio.library import Library
from studio.preview import LatentPreview, decode_latents
from ui_support import build_library


@pytest.fixture()
def library(tmp_path):
    return Library(build_library(tmp_path / "loras"))


@pytest.fixture(scope="module")
def sdxl():
    return Studio("tiny-sdxl")


def test_ids_metadata_and_search(library):
    ids = sorted(e.id for e in library.entries)
    assert ids == ["flux/flux-style.safetensors", "random-subject.safetensors", "styles/random-style.safetensors"]
    subject = library.get("random-subject.safetensors")
    assert subject.info.triggers == ["zorb"] and subject.info.base == "sdxl" and subject.info.rank == 4
    assert subject.preview is not None and subject.preview.name == "random-subject.preview.png"
    assert library.get("styles/random-style.safetensors").preview is None
    assert [e.id for e in library.search("inkwash")] == ["styles/random-style.safetensors"]
    assert [e.id for e in library.search("ZORB kohya")] == ["random-subject.safetensors"]
    assert {e.id for e in library.search("", family="sdxl")} == {"random-subject.safetensors",
                                                                  "styles/random-style.safetensors"}
    assert [e.id for e in library.search("", family="flux")] == ["flux/flux-style.safetensors"]
    assert library.bases() == ["FLUX.1", "SDXL"]


def test_several_roots_get_labelled_ids(tmp_path):
    a, b = build_library(tmp_path / "a" / "loras"), build_library(tmp_path / "b" / "loras")
    library = Library([a, b])
    assert "loras/random-subject.safetensors" in library and "loras#2/random-subject.safetensors" in library
    assert library.path("loras#2/random-subject.safetensors") == (b / "random-subject.safetensors").resolve()


@pytest.mark.parametrize("crafted", ["../../etc/passwd", "/etc/passwd", "random-subject", "./random-subject.safetensors",
                                     "styles/../random-subject.safetensors", "../outside.safetensors", "", None, 3])
def test_crafted_names_are_refused(library, crafted, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(
        (library.roots[0] / "random-subject.safetensors").read_bytes())
    with pytest.raises(LoraFileError, match="is not a LoRA of the library"):
        library.get(crafted)


def test_symlinks_out_of_the_library_are_not_listed(library, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes((library.roots[0] / "random-subject.safetensors").read_bytes())
    (outside / "secret.png").write_bytes((library.roots[0] / "random-subject.preview.png").read_bytes())
    (library.roots[0] / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (library.roots[0] / "styles" / "random-style.png").symlink_to(outside / "secret.png")
    library.refresh()
    assert "link.safetensors" not in library
    assert library.get("styles/random-style.safetensors").preview is None


def test_a_file_swapped_for_a_symlink_after_the_scan_is_refused(library, tmp_path):
    target = library.roots[0] / "random-subject.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(LoraFileError, match="no longer a file inside the LoRA library"):
        library.get("random-subject.safetensors")


def test_find_matches_by_hash_then_name(library, tmp_path):
    style = library.get("styles/random-style.safetensors")
    sha = library.sha256(style)
    assert library.find(source="/somewhere/else/renamed.safetensors", sha256=sha) == style  # renamed: by hash
    assert library.find(name="random-style") == style                                       # A1111 <lora:name:w>
    assert library.find(source=str(style.path)) == style
    assert library.find(name="random-style", sha256="0" * 64) is None                       # other version
    assert library.find(source="../../etc/passwd", name="passwd") is None


def test_upload_is_validated_and_stored_in_the_managed_folder(library, sdxl, tmp_path):
    src = tmp_path / "incoming"
    src.mkdir()
    good = src / "x.safetensors"
    good.write_bytes((library.roots[0] / "random-subject.safetensors").read_bytes())
    entry = library.add_upload(good, "../../evil name.safetensors", max_bytes=10**8, validate=sdxl.inspect)
    assert entry.id == "uploads/evil_name.safetensors"
    assert entry.path == (library.roots[0] / "uploads" / "evil_name.safetensors").resolve()
    again = library.add_upload(good, "evil name.safetensors", max_bytes=10**8, validate=sdxl.inspect)
    assert again == entry  # an identical file is reused, not copied twice
    with pytest.raises(LoraFileError, match="only .safetensors"):
        library.add_upload(good, "model.ckpt", max_bytes=10**8)
    with pytest.raises(LoraFileError, match="uploads are limited to"):
        library.add_upload(good, "big.safetensors", max_bytes=1000)
    bad = src / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraFileError, match=r"^bad\.safetensors: corrupt"):
        library.add_upload(bad, "bad.safetensors", max_bytes=10**8)
    flux = src / "flux.safetensors"
    flux.write_bytes(library.get("flux/flux-style.safetensors").path.read_bytes())
    with pytest.raises(IncompatibleLoraError, match=r"^flux\.safetensors: .*FLUX"):
        library.add_upload(flux, "flux.safetensors", max_bytes=10**8, validate=sdxl.inspect)
    stored = sorted(p.name for p in (library.roots[0] / "uploads").iterdir())
    assert stored == ["evil_name.safetensors"]  # nothing else reached the library, no temporary files left


def test_upload_folder_must_be_inside_the_library(tmp_path):
    with pytest.raises(StudioError, match="must lie inside a LoRA folder"):
        Library(build_library(tmp_path / "loras"), upload_dir=tmp_path / "elsewhere")


def test_block_weights_expand_presets_and_reject_unknown_blocks(sdxl):
    weights = sdxl.block_weights("style: outer blocks")
    assert weights["mid"] == 0.0 and weights["down.0"] == 1.0 and weights["te1"] == 0.0
    assert sdxl.block_weights("down=0,mid=0.5")["down.1"] == 0.0
    with pytest.raises(StudioError, match="block 'middle' does not exist"):
        sdxl.block_weights("middle=1")


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_preview_of_the_last_step_is_the_final_image(model, sdxl):
    studio = sdxl if model == "tiny-sdxl" else Studio(model)
    seen = []
    preview = LatentPreview(studio, lambda step, n, image: seen.append((step, image)), every=2,
                            max_side=None).set_size(64, 64)
    result = studio.compose("a zorb", [], "merge", steps=5, seed=3, callback=preview)
    assert [step for step, _ in seen] == [1, 3, 4]  # every 2nd step and always the last
    assert np.array_equal(np.asarray(seen[-1][1]), np.asarray(result.image))
    assert not np.array_equal(np.asarray(seen[0][1]), np.asarray(result.image))


def test_large_images_are_previewed_smaller(sdxl):
    side = 64 // sdxl.pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    (full,) = decode_latents(sdxl.pipe, "sdxl", latents, 64, 64)
    (small,) = decode_latents(sdxl.pipe, "sdxl", latents, 64, 64, max_side=32)
    assert full.size == (64, 64) and small.size == (32, 32)


def test_inspect_checks_a_file_without_attaching_it(sdxl, tmp_path):
    path = writers.peft_sdxl(tmp_path / "p", 5)
    parsed = sdxl.inspect(path)
    assert parsed.deltas and not sdxl.composer.adapters
