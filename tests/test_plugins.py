"""Plugins (nas.registry, nas.plugins): a user's ops, op-set presets and datasets through the same API as the
built-ins, checked on load with one-line errors, and used by everything downstream (search of both orders,
genotypes, eval networks, params/GMACs, the LUT); image folders as datasets (nas.image_folder)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from nas import plugins as plugins_lib
from nas import registry
from nas.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "mbconv_se.py"


@pytest.fixture(autouse=True)
def clean_registries():
    """Each test sees the built-ins only, whatever the one before it loaded (registries are per process)."""
    registry.OPS.names()
    saved = {r: dict(r._entries) for r in (registry.OPS, registry.OP_SET_PRESETS, registry.DATASETS)}
    loaded = dict(plugins_lib._LOADED)
    yield
    for r, entries in saved.items():
        r._entries.clear()
        r._entries.update(entries)
    plugins_lib._LOADED.clear()
    plugins_lib._LOADED.update(loaded)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_builtins_register_through_the_public_api():
    assert {e.source for _, e in registry.OPS.items()} == {registry.BUILTIN}
    assert registry.OPS.get("pib_conv_3x3").uses_bottleneck_ratio and registry.OPS.get("max_pool_3x3").pooling
    assert not registry.OPS.get("sep_conv_3x3").uses_bottleneck_ratio
    assert registry.OP_SET_PRESETS.names() == ["darts", "darts_gelu", "darts_gelu_ln", "convnext", "pibconv",
                                               "pibconv_released"]
    assert registry.DATASETS.get("cifar10").shape == (3, 32, 10) and registry.DATASETS.get("digits").shape == (1, 8, 10)


def test_example_plugin_registers_and_everything_downstream_uses_it(digits):
    from nas.complexity import complexity, search_complexity
    from nas.config import SearchConfig
    from nas.eval_network import EvalNetwork
    from nas.genotypes import Genotype
    from nas.opsets import resolve_op_set
    from nas.train import run_search

    plugin = plugins_lib.load_plugin(str(EXAMPLE))
    assert plugin.ops == ("mbconv_se_3x3", "mbconv_se_5x5") and plugin.op_sets == ("mbconv_pib",)
    assert plugin.sha256 == plugins_lib.file_sha256(EXAMPLE) and plugin.module.startswith("dartsweep_plugin_mbconv_se_")
    assert plugins_lib.load_plugin(str(EXAMPLE)) is plugin  # once per process
    op_set = resolve_op_set("mbconv_pib")
    assert op_set.id == "mbconv_pib" and op_set.uses_bottleneck_ratio
    assert resolve_op_set("mbconv_pib", 3.0).id == "mbconv_pib-F3"
    # F reaches the plugin's factory: the expansion grows the search network
    small, large = (search_complexity(resolve_op_set("mbconv_pib", f), 3, 8, 2, 10, 1, 8) for f in (2.0, 4.0))
    assert large.params_m > small.params_m and large.gmac > small.gmac > 0
    # a search of each order over the plugin's op set, on digits
    for order in (1, 2):
        cfg = SearchConfig(op_set="mbconv_pib", dataset="digits", epochs=1, batch_size=32, channels=4, layers=3,
                           nodes=2, order=order, max_steps_per_epoch=2, seed=0)
        result = run_search(cfg, data=digits, device="cpu")
        assert result.genotype.primitives <= set(op_set.primitives) and len(result.history) == 1
    # an eval network of a genotype made of plugin ops, its params and GMACs counted (never 0)
    g = Genotype(normal=(("mbconv_se_3x3", 0), ("mbconv_se_5x5", 1)), normal_concat=(2,),
                 reduce=(("mbconv_se_3x3", 0), ("skip_connect", 1)), reduce_concat=(2,))
    net = EvalNetwork(g, 8, 3, 10, 1, auxiliary=False)
    assert net(torch.randn(2, 1, 8, 8))[0].shape == (2, 10)
    cost = complexity(g, 3, 8, 10, 1, 8)
    assert cost.gmac > 0 and cost.params_m == pytest.approx(sum(p.numel() for p in net.parameters()) / 1e6)
    # cost-aware search's per-op table: the plugin's ops cost more than a pooling op, F raises them
    from nas.cost import op_costs
    from nas.search_network import SearchNetwork

    tables = {}
    for f in (2.0, 4.0):
        model = SearchNetwork(resolve_op_set("mbconv_pib", f), 4, 3, 2, 10, 1)
        tables[f] = op_costs(model, "gmac", (1, 8, 8))[0]
    mb, pool = op_set.primitives.index("mbconv_se_5x5"), op_set.primitives.index("max_pool_3x3")
    assert (tables[2.0][:, mb] > tables[2.0][:, pool]).all() and (tables[4.0][:, mb] > tables[2.0][:, mb]).all()


def test_cli_plugin_option_reaches_complexity_lut_and_genotypes(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "nas.cli", *a], capture_output=True, text=True)  # noqa: E731
    out = run("complexity", "--op-set", "mbconv_pib", "--layers", "3", "--channels", "8", "--json", "--plugin",
              str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gmac"] > 0
    without = run("complexity", "--op-set", "mbconv_pib", "--layers", "3")
    assert without.returncode == 2 and "unknown op set 'mbconv_pib'" in without.stderr
    listing = run("genotypes", "--plugin", str(EXAMPLE))
    assert f"mbconv_se_5x5    from {EXAMPLE}" in listing.stdout and "mbconv_pib" in listing.stdout
    lut = tmp_path / "lut.json"
    out = run("lut", "build", "--op-set", "mbconv_pib", "--channels", "4", "--layers", "3", "--image-size", "8",
              "--out", str(lut), "--plugin", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    table = json.loads(lut.read_text())
    timed = {key.split(next(k for k in key if not (k.isalnum() or k == "_")))[0] for key in table["ops"]}
    assert {"mbconv_se_3x3", "mbconv_se_5x5"} <= timed and table["op_set"] == "mbconv_pib"


def test_stated_macs_replace_ptflops_count(tmp_path):
    from nas.complexity import _count
    from nas.ops import OpOptions, build_op

    class Opaque(torch.nn.Module):  # ptflops knows no hook for it and it computes with its weight directly
        def __init__(self, c, stride):
            super().__init__()
            self.weight, self.stride = torch.nn.Parameter(torch.randn(c, c)), stride

        def forward(self, x):
            return torch.einsum("nchw,dc->ndhw", x[..., ::self.stride, ::self.stride], self.weight)

    registry.register_op("opaque_stated", lambda c, s, a, o: Opaque(c, s),
                         macs=lambda m, x, y: x[0].numel() * m.weight.shape[0] * 7)
    registry.register_op("opaque_unstated", lambda c, s, a, o: Opaque(c, s))
    plugins_lib.check_op(registry.OPS.get("opaque_stated"))
    _, macs = _count(build_op("opaque_stated", 8, 1, True, OpOptions()).eval(), torch.zeros(1, 8, 8, 8))
    assert macs == 8 * 8 * 8 * 8 * 7
    with pytest.raises(ConfigError, match="'opaque_unstated'.*has 64 weights but ptflops counts 0 MACs.*macs="):
        plugins_lib.check_op(registry.OPS.get("opaque_unstated"))


BAD_PLUGINS = [
    ("import torch\nx = 1\nraise RuntimeError('boom')\n", r"failed to import: RuntimeError: boom \(at .*bad.py:3\)"),
    ("def f(:\n", r"failed to import: SyntaxError: .*\(at .*bad.py:1\)"),
    ("import torch\n", r"registers no op, op set or dataset"),
    ("from nas.registry import register_op\nimport torch.nn as nn\n"
     "register_op('twice', lambda c, s, a, o: nn.Identity())\nregister_op('twice', lambda c, s, a, o: nn.Identity())\n",
     r"registers primitive 'twice' twice"),
    ("from nas.registry import register_op\nimport torch.nn as nn\n"
     "register_op('sep_conv_3x3', lambda c, s, a, o: nn.Identity())\n",
     r"primitive 'sep_conv_3x3' from .*bad.py is already registered by dartsweep \(built-in\)"),
    ("from nas.registry import register_op\nimport torch.nn as nn\n"
     "register_op('halves', lambda c, s, a, o: nn.Conv2d(c, c // 2, 1))\n",
     r"op 'halves' .* maps input \(2, 8, 8, 8\) to \(2, 4, 8, 8\) with stride 1; it must give \(2, 8, 8, 8\)"),
    ("from nas.registry import register_op\nimport torch.nn as nn\n"
     "register_op('nostride', lambda c, s, a, o: nn.Conv2d(c, c, 3, padding=1))\n",
     r"op 'nostride' .* to \(2, 8, 8, 8\) with stride 2; it must give \(2, 8, 4, 4\)"),
    ("from nas.registry import register_op\nimport torch.nn as nn\n"
     "class T(nn.Module):\n    def forward(self, x):\n        return (x, x)\n"
     "register_op('tuple_op', lambda c, s, a, o: T())\n", r"op 'tuple_op' .* returns tuple, not a Tensor"),
    ("from nas.registry import register_op_set\nregister_op_set('p', ['none', 'no_such_op'])\n",
     r"unknown primitive 'no_such_op'"),
]


@pytest.mark.parametrize("source,message", BAD_PLUGINS)
def test_bad_plugins_are_one_line_and_leave_nothing_registered(tmp_path, source, message):
    bad = write(tmp_path / "bad.py", source)
    before = registry.OPS.names()
    with pytest.raises(ConfigError, match=message) as info:
        plugins_lib.load_plugin(str(bad))
    assert "\n" not in str(info.value)
    assert registry.OPS.names() == before  # a failed plugin registers nothing


def test_two_plugins_cannot_take_one_name(tmp_path):
    code = "from nas.registry import register_op\nimport torch.nn as nn\nregister_op('mine', lambda c, s, a, o: nn.AvgPool2d(1, s))\n"
    plugins_lib.load_plugin(str(write(tmp_path / "a.py", code)))
    with pytest.raises(ConfigError, match=r"primitive 'mine' from .*b.py is already registered by .*a.py"):
        plugins_lib.load_plugin(str(write(tmp_path / "b.py", code)))


def _dataset_plugin(tmp_path: Path, body: str, classes: int = 3) -> Path:
    return write(tmp_path / "data_plugin.py", f"""
        import torch
        from nas.data import image_data
        from nas.registry import register_dataset

        @register_dataset("blobs", in_channels=1, image_size=8, num_classes={classes})
        def blobs(data_dir, download):
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=g)
            y = torch.arange(60) % 3
        {textwrap.indent(textwrap.dedent(body), '    ')}
        """)


@pytest.mark.parametrize("body,message", [
    ("    return image_data('blobs', x.float(), y, x, y, ['a', 'b', 'c'])",
     r"train images must be a uint8 tensor N x C x H x W, got torch.float32"),
    ("    return image_data('blobs', x, y + 5, x, y, ['a', 'b', 'c'])", r"train labels must lie in 0..2, found 5..7"),
    ("    return image_data('blobs', x[:0], y[:0], x, y, ['a', 'b', 'c'])", r"the training split is empty"),
    ("    return image_data('blobs', x, y, x[:0], y[:0], ['a', 'b', 'c'])", r"the test split is empty"),
    ("    return image_data('blobs', x, y * 0, x, y, ['a', 'b', 'c'])", r"fewer than 2 classes"),
    ("    return image_data('blobs', x[:, :, :4, :4], y, x, y, ['a', 'b', 'c'])",
     r"train images are \(1, 4, 4\) but it was registered as \(1, 8, 8\)"),
    ("    return {'x': x}", r"its loader must return nas.data.ImageData .* got dict"),
])
def test_bad_datasets_are_refused_on_load(tmp_path, body, message):
    from nas.data import load_dataset

    plugins_lib.load_plugin(str(_dataset_plugin(tmp_path, body)))
    with pytest.raises(ConfigError, match=message):
        load_dataset("blobs")


def test_dataset_plugin_feeds_the_sweep_and_dry_run(tmp_path):
    from nas.data import load_dataset

    _dataset_plugin(tmp_path, "    return image_data('blobs', x, y, x[:12], y[:12], ['a', 'b', 'c'])")
    data = load_dataset("blobs") if plugins_lib.load_plugin(str(tmp_path / "data_plugin.py")) else None
    assert data.class_names == ("a", "b", "c") and data.num_classes == 3 and data.crop_padding == 1
    assert len(data.mean) == 1 and 0 < data.mean[0] < 1
    raw = {"name": "blobby", "plugins": ["data_plugin.py"], "dataset": "blobs",
           "eval": {"genotypes": ["DARTS_V2"], "layers": [2], "epochs": 1, "channels": 4}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "up", str(tmp_path / "s.yaml"), "--dry-run",
                          "--storage", str(tmp_path / "results")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "DARTS_V2" in out.stdout and f"data: blobs from {tmp_path / 'data_plugin.py'}" in out.stderr
    assert not (tmp_path / "results").exists()


def test_sweep_file_plugin_errors_are_one_line_exit_2_before_any_work(tmp_path):
    write(tmp_path / "broken.py", "import torch\n\n\nundefined_name\n")
    raw = {"name": "x", "plugins": ["broken.py"], "dataset": "digits",
           "search": {"op_sets": [{"primitives": ["none", "my_op"]}], "epochs": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    for plugins, message in ((["broken.py"], f"NameError: name 'undefined_name' is not defined (at {tmp_path}/broken.py:4)"),
                             (["missing.py"], f"plugin missing.py: no such file ({tmp_path}/missing.py)"),
                             ([], "unknown primitive 'my_op'"),
                             ("broken.py", "plugins: must be a list")):
        raw["plugins"] = plugins
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
        out = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "up", str(tmp_path / "s.yaml"),
                              "--storage", str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (tmp_path / "results").exists()


def test_module_plugins_and_entry_points(tmp_path, monkeypatch):
    pkg = tmp_path / "labops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "blocks.py", """
        import torch.nn as nn
        from nas.registry import register_op
        register_op("lab_conv_3x3", lambda c, s, a, o: nn.Conv2d(c, c, 3, s, 1))
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = plugins_lib.load_plugin("labops.blocks")
    assert plugin.ops == ("lab_conv_3x3",) and plugin.ship == str(pkg) and plugin.module == "labops.blocks"
    assert plugin.sha256 == plugins_lib.folder_sha256(pkg)
    assert plugins_lib.ship_folder([plugin]) == [str(pkg)]  # Ray ships the whole package
    # an installed package registering through the entry-point group
    dist = tmp_path / "labext-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labext\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dartsweep.plugins]\nlabext = labext_ops\n")
    write(tmp_path / "labext_ops.py", """
        import torch.nn as nn
        from nas.registry import register_op
        register_op("ext_identity", lambda c, s, a, o: nn.Identity() if s == 1 else nn.AvgPool2d(1, s), pooling=True)
        """)
    assert plugins_lib.load_entry_points() == ["entry point labext (labext_ops)"]
    assert registry.OPS.get("ext_identity").source == "entry point labext (labext_ops)"


def test_placeholders_let_analysis_read_names_without_the_code(tmp_path):
    from nas.genotypes import Genotype
    from nas.ops import build_op, OpOptions

    plugin = plugins_lib.load_plugin(str(EXAMPLE))
    record = plugin.record()
    for name in plugin.ops + plugin.op_sets:
        registry.OPS._entries.pop(name, None)
        registry.OP_SET_PRESETS._entries.pop(name, None)
    plugins_lib.register_placeholders(record, "no such file")
    g = Genotype(normal=(("mbconv_se_3x3", 0), ("skip_connect", 1)), normal_concat=(2,),
                 reduce=(("mbconv_se_5x5", 0), ("skip_connect", 1)), reduce_concat=(2,))
    assert g.uses_bottleneck_ratio  # known from the record
    with pytest.raises(ConfigError, match=f"plugin {EXAMPLE} is needed to build this network but cannot be imported"):
        build_op("mbconv_se_3x3", 8, 1, True, OpOptions())


# ------------------------------------------------------------------------------------------ image folders

def _image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=5, size=(20, 12), split=False) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for part in (("train", "test") if split else ("",)):
        for c, name in enumerate(classes):
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
                pixels[0, 0] = torch.tensor([c, i, 7], dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_image_folder_loads_splits_and_caches(tmp_path, monkeypatch):
    from nas import image_folder
    from nas.data import load_dataset
    from nas.image_folder import folder_spec

    monkeypatch.setenv("DARTSWEEP_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "pets", per_class=10)
    spec = folder_spec({"image_folder": "pets", "size": 8, "test_fraction": 0.3, "seed": 2}, tmp_path)
    data = load_dataset(spec.name)
    assert data.class_names == ("cat", "dog", "emu") and data.train_x.shape == (21, 3, 8, 8)
    assert data.test_x.shape == (9, 3, 8, 8) and data.train_x.dtype == torch.uint8
    assert torch.bincount(data.test_y).tolist() == [3, 3, 3]
    cached = list((tmp_path / "cache" / "image_folder").glob("*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(image_folder, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_dataset(spec.name)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    # another seed: another split; the same files and seed: the same split
    other = folder_spec({"image_folder": str(root), "size": 8, "test_fraction": 0.3, "seed": 3}, tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("DARTSWEEP_CACHE", str(tmp_path / "cache"))
    assert not torch.equal(load_dataset(other.name).test_x, data.test_x)
    # train/ and test/ folders, grey
    split = _image_folder(tmp_path / "split", per_class=4, split=True)
    grey = load_dataset(folder_spec({"image_folder": str(split), "size": 6, "channels": 1}).name)
    assert grey.train_x.shape == (12, 1, 6, 6) and grey.test_x.shape == (12, 1, 6, 6)


def test_image_folder_bad_input(tmp_path, monkeypatch):
    from nas.data import load_dataset
    from nas.image_folder import folder_spec

    monkeypatch.setenv("DARTSWEEP_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "pets")
    (root / "dog" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=f"image folder: cannot read {root}/dog/2.png"):
        load_dataset(folder_spec({"image_folder": str(root)}).name)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ConfigError, match="one sub-folder per class, at least 2; found 1"):
        load_dataset(folder_spec({"image_folder": str(tmp_path / "one")}).name)
    with pytest.raises(ConfigError, match="dataset.image_folder: .*nowhere is not a folder"):
        folder_spec({"image_folder": "nowhere"}, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        folder_spec({"image_folder": str(root), "colour": 1})


def test_data_check_and_the_object_store_bound(tmp_path, monkeypatch):
    from sweeps import driver
    from sweeps.spec import parse_sweep

    monkeypatch.setenv("DARTSWEEP_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "pets", per_class=6)
    out = subprocess.run([sys.executable, "-m", "nas.cli", "data", "check", str(root), "--size", "8", "--json"],
                         capture_output=True, text=True, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["classes"] == ["cat", "dog", "emu"] and report["train_images"] + report["test_images"] == 18
    assert report["per_class"]["test"] == [1, 1, 1] and report["bytes"] == 18 * 3 * 8 * 8 + 18 * 8
    spec = parse_sweep({"name": "p", "dataset": {"image_folder": "pets", "size": 8},
                        "eval": {"genotypes": ["DARTS_V2"], "layers": [2]}}, tmp_path)
    assert spec.raw["dataset"] == {"image_folder": str(root), "size": 8, "channels": 3, "test_fraction": 0.2, "seed": 0}
    monkeypatch.setattr(driver, "SHIP_LIMIT_BYTES", 1000)
    monkeypatch.setattr("nas.image_folder._decode", lambda *a: pytest.fail("decoded before the bound was checked"))
    with pytest.raises(ConfigError, match="more than the .* GiB dartsweep ships .*set data_transfer: shared_path"):
        driver.load_sweep_data(spec)


def test_stacked_search_cell_runs_plugin_ops(tmp_path):
    """The CUDA path's stacked cell (run here on CPU tensors) computes what the per-edge cell does, whether a
    plugin op joins a stacked family (a Sequential of known layers) or runs on its own (a module of its own)."""
    from nas.opsets import OpSet
    from nas.search_network import SearchNetwork

    plugins_lib.load_plugin(str(EXAMPLE))
    registry.register_op("seq_conv_3x3", lambda c, s, a, o: torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 3, s, 1, bias=False), torch.nn.BatchNorm2d(c, affine=a)))
    op_set = OpSet(("none", "skip_connect", "seq_conv_3x3", "mbconv_se_3x3", "pib_conv_3x3", "max_pool_3x3"))
    torch.manual_seed(0)
    stacked = SearchNetwork(op_set, 4, 3, 2, 10, 3, stacked=True).double()
    plain = SearchNetwork(op_set, 4, 3, 2, 10, 3, stacked=False).double()
    plain.load_state_dict(stacked.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(stacked(x)[0], plain(x)[0], atol=1e-9)


def test_a_plugin_op_builds_exactly_what_the_same_builtin_factory_builds():
    """What `dartsweep bench search --op-set darts_plugin --plugin examples/plugins/sep_conv_alias.py` times
    against `--op-set darts`: the same modules, parameters and outputs, so a step cannot cost more because
    an op came from a plugin (the name is looked up once, when the network is built)."""
    from nas.opsets import resolve_op_set
    from nas.search_network import SearchNetwork

    plugins_lib.load_plugin(str(ROOT / "examples" / "plugins" / "sep_conv_alias.py"))
    torch.manual_seed(0)
    builtin = SearchNetwork(resolve_op_set("darts"), 4, 3, 2, 10, 3)
    torch.manual_seed(0)
    plugin = SearchNetwork(resolve_op_set("darts_plugin"), 4, 3, 2, 10, 3)
    assert [type(m) for m in builtin.modules()] == [type(m) for m in plugin.modules()]
    assert {k: v.shape for k, v in builtin.state_dict().items()} == {k: v.shape for k, v in plugin.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(builtin(x)[0], plugin(x)[0])
