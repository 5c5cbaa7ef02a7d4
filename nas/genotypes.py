"""Genotypes: discrete DARTS cells (two inputs per node) plus the op-set options they were searched with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from nas.errors import ConfigError
from nas.ops import OpOptions, check_primitive, uses_bottleneck_ratio

Edge = tuple[str, int]


def _check_cell(kind: str, edges: tuple[Edge, ...], concat: tuple[int, ...]) -> None:
    if not edges or len(edges) % 2:
        raise ConfigError(f"genotype {kind} cell needs an even, non-zero number of edges, got {len(edges)}")
    nodes = len(edges) // 2
    for i, (op, src) in enumerate(edges):
        check_primitive(op)
        node = i // 2
        if not 0 <= src < node + 2:
            raise ConfigError(f"genotype {kind} edge {i} ({op}, {src}): node {node + 2} can only take inputs 0..{node + 1}")
    for c in concat:
        if not 0 <= c < nodes + 2:
            raise ConfigError(f"genotype {kind}_concat index {c} is out of range 0..{nodes + 1}")
    if not concat:
        raise ConfigError(f"genotype {kind}_concat is empty")


@dataclass(frozen=True)
class Genotype:
    """A searched cell pair. ``options`` are the op-set options the primitives are built with."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    options: OpOptions = field(default_factory=OpOptions)
    name: str | None = None

    def __post_init__(self) -> None:
        for attr in ("normal", "reduce"):
            try:
                edges = tuple((str(op), int(src)) for op, src in getattr(self, attr))
            except (TypeError, ValueError):
                raise ConfigError(f"genotype {attr} must be a list of [op, input] pairs") from None
            object.__setattr__(self, attr, edges)
        for attr in ("normal_concat", "reduce_concat"):
            try:
                object.__setattr__(self, attr, tuple(int(c) for c in getattr(self, attr)))
            except (TypeError, ValueError):
                raise ConfigError(f"genotype {attr} must be a list of node indices") from None
        _check_cell("normal", self.normal, self.normal_concat)
        _check_cell("reduce", self.reduce, self.reduce_concat)

    @property
    def id(self) -> str:
        """The name (built-in, or a variant's: ``PIBCONV-F3``), else ``g-<hash>`` of the cell structure and
        options; ``-gelu_all`` / ``-gcd`` follow for the first release's forms (:meth:`OpOptions.form_suffix`)."""
        uses_pib = any(op.startswith("pib_conv_") for op in self.primitives)
        return self.first_release_id + self.options.form_suffix(uses_pib)

    @property
    def first_release_id(self) -> str:
        """The id dartsweep's first release gave this genotype (its hash body had no form options, and
        the options' identity leaves out the first release's values): what its sweeps' configs refer to."""
        if self.name:
            return self.name
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        body["options"] = self.options.identity()
        return "g-" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def primitives(self) -> set[str]:
        return {op for op, _ in self.normal + self.reduce}

    @property
    def uses_bottleneck_ratio(self) -> bool:
        """Whether F changes the network (the cell has a PIBConv or ConvNeXt op)."""
        return any(uses_bottleneck_ratio(p) for p in self.primitives)

    @property
    def used_bottleneck_ratio(self) -> float | None:
        """F where an op uses it, else None (what trials report as their F)."""
        return self.options.bottleneck_ratio if self.uses_bottleneck_ratio else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
            "options": asdict(self.options),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], first_release: bool = False) -> "Genotype":
        """A genotype from its mapping; see :meth:`OpOptions.from_dict` for ``first_release``."""
        if not isinstance(data, Mapping):
            raise ConfigError("a genotype must be a JSON object with normal, normal_concat, reduce, reduce_concat")
        required = {"normal", "normal_concat", "reduce", "reduce_concat"}
        missing = required - set(data)
        if missing:
            raise ConfigError(f"genotype is missing key(s) {sorted(missing)}")
        unknown = set(data) - required - {"options", "name"}
        if unknown:
            raise ConfigError(f"genotype has unknown key(s) {sorted(unknown)}")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError("genotype 'options' must be an object with activation, norm, bottleneck_ratio")
        try:
            opts = OpOptions.from_dict(options, first_release)
        except ConfigError as exc:
            raise ConfigError(f"genotype options: {exc}") from None
        return cls(data["normal"], data["normal_concat"], data["reduce"], data["reduce_concat"], opts,
                   data.get("name"))


DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=(2, 3, 4, 5),
    options=OpOptions("relu", "bn"),
    name="DARTS_V1",
)

DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
    options=OpOptions("relu", "bn"),
    name="DARTS_V2",
)

PIBCONV = Genotype(
    normal=(("pib_conv_3x3", 0), ("pib_conv_5x5", 1), ("pib_conv_3x3", 0), ("pib_conv_3x3", 2),
            ("pib_conv_3x3", 2), ("pib_conv_3x3", 1), ("pib_conv_3x3", 1), ("pib_conv_3x3", 3)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("avg_pool_3x3", 0), ("pib_conv_5x5", 1), ("avg_pool_3x3", 0), ("dil_conv_5x5", 2),
            ("avg_pool_3x3", 0), ("skip_connect", 2), ("pib_conv_3x3", 3), ("pib_conv_3x3", 0)),
    reduce_concat=(2, 3, 4, 5),
    options=OpOptions("gelu", "bn", 2.0),
    name="PIBCONV",
)

GENOTYPES: dict[str, Genotype] = {g.name: g for g in (DARTS_V1, DARTS_V2, PIBCONV)}  # type: ignore[misc]


def load_genotype(spec: str | Path | Mapping[str, Any] | Genotype, first_release: bool = False) -> Genotype:
    """A genotype from a built-in name, a JSON file path, a mapping, or a Genotype (``first_release``: a
    mapping from a sweep written by the first release, see :meth:`Genotype.from_dict`)."""
    if isinstance(spec, Genotype):
        return spec
    if isinstance(spec, Mapping):
        return Genotype.from_dict(spec, first_release)
    text = str(spec)
    if text in GENOTYPES:
        return GENOTYPES[text]
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"genotype {text!r} is neither a built-in ({', '.join(GENOTYPES)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"genotype file {path} is not valid JSON: {exc}") from None
    # A search result file wraps the genotype under "genotype".
    if isinstance(data, Mapping) and "genotype" in data and "normal" not in data:
        data = data["genotype"]
    try:
        return Genotype.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"genotype file {path}: {exc}") from None
