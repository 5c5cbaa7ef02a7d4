"""Bad input everywhere: random one-key mutations of the shipped sweep files end in a clean `--dry-run`
(exit 0) or one error line (exit 2), never a traceback, and never accept a value of the wrong type."""

import random

import pytest
import yaml

from nas.cli import main
from sweeps.spec import builtin_sweeps

REPLACEMENTS = ["false", [None], True, -1, -0.5, 10**12, {}, None, "x", 0, 2.5, [{}], [], {"a": 1}]
# keys whose null means "the default" (no scheduler, grid search, ...)
NULL_MEANS_DEFAULT = {"F", "scheduler", "search_alg", "failure", "description", "max_concurrent_trials", "storage",
                      "resources"}


def leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    yield path, node


def same_kind(new, old) -> bool:
    def kind(v):
        return "bool" if isinstance(v, bool) else "num" if isinstance(v, (int, float)) else type(v).__name__

    if isinstance(old, list) and not isinstance(new, list):  # a single value stands for a one-value list
        return any(kind(new) == kind(o) for o in old)
    return kind(new) == kind(old)


def mutations(count: int, seed: int = 0):
    rng = random.Random(seed)
    files = {name: yaml.safe_load(path.read_text()) for name, path in sorted(builtin_sweeps().items())}
    for _ in range(count):
        name = rng.choice(sorted(files))
        paths = [p for p, _ in leaves(files[name]) if p]
        path = rng.choice(paths)
        yield name, files[name], path, rng.choice(REPLACEMENTS)


@pytest.mark.parametrize("name,raw,path,value", list(mutations(40)),
                         ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_mutated_sweep_file(tmp_path, capsys, name, raw, path, value):
    import copy

    mutated = copy.deepcopy(raw)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    old = node[path[-1]]
    node[path[-1]] = value
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(mutated))
    code = main(["sweep", "run", str(file), "--dry-run"])  # an exception here is a traceback for the user
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("dartsweep: error:"), err
    else:
        assert same_kind(value, old) or (value is None and path[-1] in NULL_MEANS_DEFAULT), \
            f"{'.'.join(map(str, path))}: {value!r} accepted in place of {old!r}"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args,message", [
    (["complexity", "--genotype", "PIBCONV", "--layers", "100000"], "layers must be between 1 and 200"),
    (["bench", "search", "--C", "0"], None),
    (["bench", "search", "--batch", "-1"], None),
    (["sweep", "status", "/nonexistent"], "not a sweep directory"),
    (["sweep", "resume", "/nonexistent"], "not a sweep directory"),
    (["train", "--genotype", "nope.json", "--layers", "2"], "neither a built-in"),
    (["search", "--op-set", "nope"], "unknown op set"),
    (["data", "download", "cifar10", "--data-dir", "/proc/nope"], None),
])
def test_bad_cli_calls_exit_2(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    if message:
        assert message in err


def test_genotype_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"normal": [["skip_connect", 0]]}')
    assert main(["complexity", "--genotype", str(bad), "--layers", "2"]) == 2
    assert f"genotype file {bad}: genotype is missing key(s)" in capsys.readouterr().err
