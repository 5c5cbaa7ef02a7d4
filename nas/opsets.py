"""Op sets: the candidate operations of a search space plus op-set-wide options.

Presets follow the paper's roadmap (Fig. 1): darts -> darts_gelu -> darts_gelu_ln -> convnext -> pibconv.
Each op set has a stable, readable id used in result tables and trial names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from nas.errors import ConfigError
from nas.ops import USES_BOTTLENECK_RATIO, OpOptions, check_primitive

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
CONVNEXT_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                "convnext_3x3", "convnext_5x5", "dil_conv_3x3", "dil_conv_5x5")
PIBCONV_OPS = ("none", "skip_connect", "pib_conv_3x3", "pib_conv_5x5", "pib_conv_7x7",
               "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7", "max_pool_3x3", "avg_pool_3x3")


@dataclass(frozen=True)
class OpSet:
    """A list of primitive names and the options they are built with."""

    primitives: tuple[str, ...]
    options: OpOptions = field(default_factory=OpOptions)

    def __post_init__(self) -> None:
        prims = tuple(self.primitives)
        if not prims:
            raise ConfigError("an op set needs at least one primitive")
        for name in prims:
            check_primitive(name)
        if len(set(prims)) != len(prims):
            raise ConfigError(f"op set lists a primitive twice: {list(prims)}")
        if set(prims) <= {"none"}:
            raise ConfigError("an op set needs at least one primitive besides 'none'")
        object.__setattr__(self, "primitives", prims)

    @property
    def uses_bottleneck_ratio(self) -> bool:
        return any(p in USES_BOTTLENECK_RATIO for p in self.primitives)

    @property
    def used_bottleneck_ratio(self) -> float | None:
        """F where an op uses it, else None (what trials report as their F)."""
        return self.options.bottleneck_ratio if self.uses_bottleneck_ratio else None

    @property
    def id(self) -> str:
        """Preset name (with ``-F<ratio>`` when F differs from the preset's), else ``custom-<hash>``."""
        for name, preset in OP_SETS.items():
            same_ops = preset.primitives == self.primitives
            if same_ops and replace(preset.options, bottleneck_ratio=self.options.bottleneck_ratio) == self.options:
                if not self.uses_bottleneck_ratio or preset.options.bottleneck_ratio == self.options.bottleneck_ratio:
                    return name
                return f"{name}-F{self.options.bottleneck_ratio:g}"
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return f"custom-{digest}"

    def with_ratio(self, bottleneck_ratio: float) -> "OpSet":
        return replace(self, options=replace(self.options, bottleneck_ratio=bottleneck_ratio))

    def to_dict(self) -> dict[str, Any]:
        return {"primitives": list(self.primitives), **asdict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OpSet":
        known = {"primitives", "activation", "norm", "bottleneck_ratio"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown op set key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        if "primitives" not in data or isinstance(data["primitives"], str):
            raise ConfigError("an explicit op set needs 'primitives': a list of primitive names")
        opts = {k: data[k] for k in ("activation", "norm", "bottleneck_ratio") if k in data}
        return cls(tuple(data["primitives"]), OpOptions(**opts))


OP_SETS: dict[str, OpSet] = {
    "darts": OpSet(DARTS_OPS, OpOptions("relu", "bn")),
    "darts_gelu": OpSet(DARTS_OPS, OpOptions("gelu", "bn")),
    "darts_gelu_ln": OpSet(DARTS_OPS, OpOptions("gelu", "ln")),
    "convnext": OpSet(CONVNEXT_OPS, OpOptions("gelu", "bn", 4.0)),  # the paper kept BN after the LN step
    "pibconv": OpSet(PIBCONV_OPS, OpOptions("gelu", "bn", 2.0)),
}


def resolve_op_set(spec: str | Mapping[str, Any] | OpSet, bottleneck_ratio: float | None = None) -> OpSet:
    """An op set from a preset name, an explicit mapping, or an OpSet; optionally overriding F."""
    if isinstance(spec, OpSet):
        op_set = spec
    elif isinstance(spec, str):
        if spec not in OP_SETS:
            raise ConfigError(f"unknown op set {spec!r}; presets: {', '.join(OP_SETS)} (or give a list of primitives)")
        op_set = OP_SETS[spec]
    elif isinstance(spec, Mapping):
        op_set = OpSet.from_dict(spec)
    else:
        raise ConfigError(f"an op set is a preset name or a mapping with 'primitives', got {spec!r}")
    return op_set if bottleneck_ratio is None else op_set.with_ratio(bottleneck_ratio)
