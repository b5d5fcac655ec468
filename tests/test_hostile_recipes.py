"""Hostile recipes, grids and settings (issue 15), and one source of render defaults (issue 16 item 6).

* every parser of outside text is linear and size-capped: the issue's quadratic infotext parses at 1 MB;
* recipes and grids open only files in the folders the user allowed, and errors say nothing of files outside;
* every render setting is checked once (``studio.settings``), before any model loads, by API, CLI, batch and
  recipes alike;
* the defaults come from one place, and the CLI's progress bar ends where the render does;
* the web app names the uploaded file in its errors, and a slow restore cannot hold another user's request.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import gradio as gr
import pytest
import tomli_w
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from pipelines.errors import RecipeError, StrategyError, StudioError
from studio import Recipe, Studio
from studio.cli import app
from studio.grid import GridError, load_grid
from studio.path_policy import PathPolicy
from studio.settings import Limits, SettingsError, check_settings

ROOT = Path(__file__).resolve().parent.parent
ZORB = ROOT / "assets" / "loras" / "tiny-sdxl" / "subject-zorb.safetensors"
runner = CliRunner()


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything tries to load a model (settings must be refused before that)."""
    import studio.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(api, "load_pipeline", refuse)


def _png(path: Path, **chunks) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# ------------------------------------------------------------------------------------------ infotext parser
def test_the_issue_infotext_parses_at_one_megabyte():
    text = "a cat\nSteps: 2, " + "a " * 499_990  # was quadratic: 40 K characters took 15 s
    recipe = Recipe.from_a1111(text)
    assert (recipe.prompt, recipe.steps, recipe.loras) == ("a cat", 2, [])


@pytest.mark.parametrize("text", [
    "a" + " " * 999_000 + "<lora:x:0.5>\nSteps: 2",      # whitespace before a tag (was re.sub(r"\s*<lora:...") )
    "<lora:x:1" * 100_000 + "\nSteps: 2",                  # unterminated tags
    'p\nSteps: 2, A: "' + '\\"' * 400_000,                  # an unterminated quoted value
])
def test_adversarial_infotexts_parse_or_are_refused(text):
    try:
        Recipe.from_a1111(text)
    except RecipeError:
        pass


def test_infotext_fields_and_lora_tags():
    recipe = Recipe.from_a1111('a fox <lora:armor:0.7> in <lora:oil> snow\nNegative prompt: blur\n'
                               'Steps: 20, Sampler: Euler a, CFG scale: 6.5, Seed: 7, Size: 512x768, '
                               'Lora hashes: "armor: abc, oil: def", Model: sdxl')
    assert (recipe.prompt, recipe.negative_prompt, recipe.steps, recipe.guidance, recipe.seed) == (
        "a fox in snow", "blur", 20, 6.5, 7)
    assert (recipe.width, recipe.height, recipe.model, recipe.scheduler) == (512, 768, "sdxl", None)
    assert [(lora.name, lora.weight) for lora in recipe.loras] == [("armor", 0.7), ("oil", 1.0)]


@pytest.mark.parametrize("text, message", [
    ("x <lora:x:1e>\nSteps: 2", r"the weight of <lora:x:1e> is not a number"),
    ("x\nSteps: 2, Seed: 1e30", "seed must be at least 0"),
    ("x\nSteps: two", "steps must be a whole number"),
    ("x\nSteps: 2, CFG scale: nan", "guidance must be a finite number"),
    ("x\nSteps: 2, Size: 12", "Size must look like"),
    ("x\n" + "x" * 1_000_001 + "\nSteps: 2", "at most 1000000 are read"),
])
def test_bad_infotexts_are_refused_clearly(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_a1111(text, origin="img.png")


def test_deeply_nested_toml_is_refused():
    with pytest.raises(RecipeError, match="nested too deeply|invalid TOML"):
        Recipe.from_toml("a = " + "[" * 100_000)


# ------------------------------------------------------------------------------------------ recipe fields
@pytest.mark.parametrize("field, value, message", [
    ("guidance", math.nan, "guidance must be a finite number"),
    ("guidance", math.inf, "guidance must be a finite number"),
    ("seed", 1e30, "seed must be at least 0"),
    ("scheduler", 5, "scheduler must be text"),
    ("scheduler", "os.system", "not a diffusers scheduler"),
    ("prompt", 123, "prompt must be text"),
    ("strategy_params", "abc", "strategy parameters must be a table"),
    ("steps", 10**9, None),
])
def test_recipe_fields_of_the_wrong_type_are_refused(field, value, message):
    data = {"model": "tiny-sdxl", "prompt": "a zorb", field: value}
    if message is None:  # a type-correct value: the work limits apply where it renders (next test)
        assert Recipe.from_dict(data).steps == 10**9
        return
    with pytest.raises(RecipeError, match=f"recipe: .*{message}"):
        Recipe.from_dict(data)


@pytest.mark.parametrize("lora, message", [
    ({"source": "x.safetensors", "blocks": 5}, "blocks must be a preset name"),
    ({"source": "x.safetensors", "weight": "heavy"}, "weight must be a finite number"),
    ({"source": 7}, "source must be a file name or path"),
])
def test_recipe_lora_fields(lora, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"model": "tiny-sdxl", "prompt": "x", "loras": [lora]})


@pytest.mark.parametrize("fields, message", [
    ({"steps": 10**9}, "steps must be at least 1 and at most 1000"),
    ({"width": 65536, "height": 65536}, "width must be at least 8 and at most 4096"),
    ({"guidance": math.nan}, "guidance must be a finite number"),
    ({"strategy": "switch", "strategy_params": {"tau": "abc"}}, "parameter 'tau' expects int"),
])
def test_cli_refuses_a_recipe_before_loading_the_model(tmp_path, no_model, fields, message):
    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps({"model": "tiny-sdxl", "prompt": "x", **fields}))
    result = runner.invoke(app, ["render", "--recipe", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--steps", str(10**9)], "steps must be at least 1 and at most 1000, got 1000000000 (raise the limit with --max-steps)"),
    (["--width", "65536", "--height", "65536"], "width must be at least 8 and at most 4096"),
    (["--width", "4096", "--height", "4096"], "4096x4096 is 16777216 pixels; at most 4194304"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--strategy", "switch", "--param", "tau=abc"], "parameter 'tau' expects int"),
    (["--scheduler", "NoSuchScheduler"], "not a diffusers scheduler class"),
])
def test_cli_refuses_settings_before_loading_the_model(tmp_path, no_model, args, message):
    result = runner.invoke(app, ["render", "a zorb", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_the_limits_can_be_raised(tmp_path, no_model):
    result = runner.invoke(app, ["render", "a zorb", "--steps", "2000", "--max-steps", "5000", "--out", str(tmp_path)])
    assert "a model was loaded" in str(result.exception)  # got past the settings check


@pytest.fixture(scope="module")
def random_studio():
    return Studio("tiny-sdxl-random")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(steps=10**9), SettingsError, "steps must be at least 1 and at most 1000"),
    (dict(width=65536, height=65536), SettingsError, "width must be"),
    (dict(guidance=float("inf")), SettingsError, "guidance must be a finite number"),
    (dict(seed=1e30), SettingsError, "seed must be at least 0"),
    (dict(scheduler=5), SettingsError, "scheduler must be text"),
    (dict(strategy_params="abc"), SettingsError, "strategy parameters must be a table"),
    (dict(strategy="switch", strategy_params={"tau": float("nan")}), StrategyError, "expects int|finite"),
    (dict(count=0), SettingsError, "count must be at least 1"),
])
def test_the_api_checks_settings_before_loading_anything(random_studio, kwargs, error, message):
    studio = random_studio
    with pytest.raises(error, match=message):
        studio.compose("a zorb", [ZORB], **kwargs)
    assert not studio.composer.adapters
    with pytest.raises(SettingsError, match="prompt must be text"):
        studio.compose(123)
    with pytest.raises(SettingsError, match="blocks must be a preset name"):
        studio.compose("a zorb", [{"source": str(ZORB), "blocks": 5}])


def test_grid_settings_are_checked_when_the_grid_is_read(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('model = "tiny-sdxl"\nsteps = 1000000000\n[[prompts]]\ntext = "x"\n')
    with pytest.raises(GridError, match="steps must be at least 1 and at most 1000"):
        load_grid(grid)
    grid.write_text('model = "tiny-sdxl"\nwidth = 65536\nheight = 65536\n[[prompts]]\ntext = "x"\n')
    with pytest.raises(GridError, match="width must be at least 8 and at most 4096"):
        load_grid(grid)
    assert load_grid(grid, limits=Limits(max_side=65536, max_pixels=2**32))[0]


def test_rich_markup_does_not_eat_grid_errors(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('model = "tiny-sdxl"\n[[prompts]]\ntext = "x"\n[axes]\nbogus = [1]\n')
    result = runner.invoke(app, ["batch", str(grid), "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2
    assert "unknown key 'bogus' in [axes]" in " ".join(result.output.split())


# ------------------------------------------------------------------------------------------ path policy
def _recipe_png(path: Path, source: str) -> Path:
    recipe = Recipe(model="tiny-sdxl", prompt="x", steps=2)
    data = recipe.to_dict()
    data["loras"] = [{"source": source, "name": "l"}]
    return _png(path, studio_recipe=tomli_w.dumps(data))


@pytest.mark.parametrize("source", ["/etc/shadow", "/proc/self/environ", "../../../../etc/passwd"])
def test_a_recipe_cannot_make_the_studio_open_system_files(tmp_path, no_model, source):
    png = _recipe_png(tmp_path / "crafted.png", source)
    result = runner.invoke(app, ["render", "--recipe", str(png), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "is outside the folders the recipe crafted.png may read" in output and "not opened" in output


def test_an_a1111_lora_tag_cannot_escape_the_recipe_folder(tmp_path, no_model):
    png = _png(tmp_path / "a1111.png", parameters="x <lora:../../../../etc/passwd:1>\nSteps: 2, Model: tiny-sdxl")
    result = runner.invoke(app, ["render", "--recipe", str(png), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "outside the folders" in result.output


def test_errors_say_nothing_about_files_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x" * 12345)
    policy = PathPolicy(folder=tmp_path / "recipes", shipped=False)
    messages = []
    for name in ("secret.safetensors", "absent.safetensors"):
        with pytest.raises(StudioError) as info:
            policy.resolve(str(outside / name), "the recipe r.png")
        messages.append(str(info.value).replace(name, "NAME"))
    assert messages[0] == messages[1] and "12345" not in messages[0]
    # the same file is opened when the user allows its folder
    allowed = PathPolicy(folder=tmp_path / "recipes", allowed=[outside], shipped=False)
    assert allowed.resolve(str(outside / "secret.safetensors"), "r") == (outside / "secret.safetensors").resolve()


def test_links_out_of_an_allowed_folder_are_refused(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "link.safetensors").symlink_to(ZORB)
    with pytest.raises(StudioError, match="outside the folders"):
        PathPolicy(folder=tmp_path / "recipes", shipped=False).resolve("link.safetensors", "r")


def test_recipe_loras_resolve_in_its_folder_and_by_name_in_the_library(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.safetensors").write_bytes(ZORB.read_bytes())
    policy = PathPolicy(folder=tmp_path / "recipes", libraries=[ZORB.parent])
    assert policy.resolve("mine", "r").name == "mine.safetensors"
    # made on another machine: found by file name in the library, and only with the recorded SHA-256
    from pipelines.adapters.parse import file_sha256

    elsewhere = "/home/someone/loras/subject-zorb.safetensors"
    assert policy.resolve(elsewhere, "r") == ZORB.resolve()
    assert policy.resolve(elsewhere, "r", sha256=file_sha256(ZORB)) == ZORB.resolve()
    with pytest.raises(StudioError, match="outside the folders"):
        policy.resolve(elsewhere, "r", sha256="0" * 64)


def test_grids_only_read_allowed_folders(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('model = "tiny-sdxl"\nloras = ["/etc/passwd"]\n[[prompts]]\ntext = "x"\n')
    with pytest.raises(GridError, match=r"g\.toml:2: LoRA /etc/passwd: is outside the folders the grid g\.toml"):
        load_grid(grid)
    grid.write_text('model = "tiny-sdxl"\nlora_dir = "/etc"\n[[prompts]]\ntext = "x"\n')
    with pytest.raises(GridError, match="lora_dir is outside the folders the grid may read"):
        load_grid(grid)
    grid.write_text(f'model = "tiny-sdxl"\nloras = ["{ZORB}"]\n[[prompts]]\ntext = "x"\n')
    assert load_grid(grid)[0][0].loras[0].source == str(ZORB.resolve())  # the shipped LoRAs are a library


# ------------------------------------------------------------------------------------------ one source of defaults
def test_defaults_come_from_the_model_everywhere(tmp_path, monkeypatch):
    import json

    import studio.cli as cli
    from studio.library import Library
    from ui.callbacks import Callbacks

    shipped = json.loads((ROOT / "assets" / "models" / "tiny-sdxl" / "studio_defaults.json").read_text())
    studio = Studio("tiny-sdxl")
    defaults = studio.render_defaults()
    assert (defaults.steps, defaults.guidance, defaults.width) == (shipped["steps"], shipped["guidance"], shipped["size"])
    (tmp_path / "empty").mkdir()
    settings = Callbacks(studio, Library(tmp_path / "empty"), out_dir=tmp_path / "ui").default_settings()
    assert (settings.steps, settings.guidance, settings.width) == (defaults.steps, defaults.guidance, defaults.width)
    recipe = studio.compose("a zorb", [], steps=None).recipe
    assert (recipe.steps, recipe.guidance) == (defaults.steps, defaults.guidance)
    # the CLI's progress bar counts the steps that run
    totals, done = [], []
    real = cli.step_progress

    def spy(images, steps):
        progress, callback = real(images, steps)
        totals.append(images * steps)
        return progress, lambda *a: (done.append(1), callback(*a))

    monkeypatch.setattr(cli, "step_progress", spy)
    result = runner.invoke(app, ["render", "a zorb", "--model", "tiny-sdxl", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    png = Path(result.stdout.strip().splitlines()[-1])
    assert totals == [len(done)] == [Recipe.load(png).steps] == [shipped["steps"]]


def test_check_settings_normalises():
    assert check_settings(steps=3.0, seed="7", guidance="4.5") == {"steps": 3, "seed": 7, "guidance": 4.5}
    with pytest.raises(SettingsError, match="steps must be a whole number, got True"):
        check_settings(steps=True)


# ------------------------------------------------------------------------------------------ web app
@pytest.fixture()
def handlers(random_studio, tmp_path):
    from studio.library import Library
    from ui.callbacks import Callbacks
    from ui.handlers import Handlers
    from ui_support import build_library

    studio = random_studio
    return Handlers(Callbacks(studio, Library(build_library(tmp_path / "loras")), out_dir=tmp_path / "out"))


def test_restore_of_the_issue_png_is_quick_and_right(handlers, tmp_path):
    png = _png(tmp_path / "hostile.png", parameters="a cat\nSteps: 2, " + "a " * 100_000)
    out = handlers.restore(str(png), {}, "merge", 0, 0)
    assert (out[0], out[3]) == ("a cat", 2)


def test_restore_errors_name_the_file_not_the_server_path(handlers, tmp_path):
    png = _png(tmp_path / "holiday.png", parameters="x <lora:x:1e>\nSteps: 2")
    with pytest.raises(gr.Error, match=r"holiday\.png: the weight of &lt;lora:x:1e&gt; is not a number") as info:
        handlers.restore(str(png), {}, "merge", 0, 0)
    assert str(tmp_path) not in str(info.value)


def test_upload_errors_name_the_file(handlers, tmp_path):
    bad = tmp_path / "gradio-tmp-123" / "my-style.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[[[[[[[[[[[[[[[[")
    with pytest.raises(gr.Error, match=r"my-style\.safetensors: corrupt safetensors header") as info:
        handlers.upload(str(bad), 0)
    assert "gradio-tmp-123" not in str(info.value)


def test_a_slow_restore_is_cut_off_and_does_not_hold_other_requests(handlers, tmp_path, monkeypatch):
    """A restore whose parse never ends is refused after the time limit; meanwhile another request is served."""
    import ui.handlers as handlers_module

    release = threading.Event()

    def endless(*args, **kwargs):
        release.wait(30)
        raise RecipeError("released")

    monkeypatch.setattr(handlers_module, "RESTORE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(Recipe, "from_png", staticmethod(endless))
    png = _png(tmp_path / "slow.png", parameters="x\nSteps: 2")
    outcome = {}

    def restore():
        try:
            handlers.restore(str(png), {}, "merge", 0, 0)
        except gr.Error as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=restore)
    worker.start()
    stack, rev, message = handlers.add("random-subject.safetensors", [], 0)   # another user's request
    assert worker.is_alive() and len(stack) == 1 and "Added" in message       # served while the restore runs
    worker.join(20)
    release.set()
    assert "slow.png: reading it took longer than 2 s; refused" in outcome["error"]


# ------------------------------------------------------------------------------------------ seeded fuzz of recipes
def test_fuzzed_recipe_tables_never_raise_raw_exceptions():
    import random

    values = [None, 0, -1, 10**30, 1.5, math.nan, math.inf, "", "x", "1e5", "EulerDiscreteScheduler", [], [1], {},
              {"tau": "abc"}, True, [{"source": "x"}], [{"source": 5}], [{"source": "x", "blocks": [1]}],
              [{"source": "x", "weight": math.nan}], [{"src": "x"}], ["x"]]
    fields = ["model", "prompt", "negative_prompt", "strategy", "strategy_params", "loras", "seed", "steps",
              "guidance", "width", "height", "scheduler", "studio_version"]
    rng = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        data = {"model": "m", "prompt": "p"}
        for name in rng.sample(fields, rng.randint(1, 5)):
            data[name] = rng.choice(values)
        try:
            recipe = Recipe.from_dict(data)
            assert recipe.steps is None or type(recipe.steps) is int
            outcomes["ok"] += 1
        except RecipeError:
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"]


def test_fuzzed_infotexts_never_raise_raw_exceptions():
    import random

    base = ('a fox <lora:armor:0.7> in <lora:oil> snow\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, '
            'CFG scale: 6.5, Seed: 7, Size: 512x768, Lora hashes: "armor: abc, oil: def", Model: sdxl')
    alphabet = list('<>:,"\\\n xSteps0123456789.eE-+')
    rng = random.Random(1)
    parsed = 0
    for _ in range(3000):
        chars = list(base)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(chars))
            choice = rng.random()
            if choice < 0.4:
                chars[at] = rng.choice(alphabet)
            elif choice < 0.7:
                chars.insert(at, rng.choice(alphabet))
            else:
                del chars[at]
        try:
            recipe = Recipe.from_a1111("".join(chars))
            assert recipe.steps is None or type(recipe.steps) is int
            parsed += 1
        except RecipeError:
            pass
    assert parsed
