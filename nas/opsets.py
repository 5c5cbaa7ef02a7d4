"""Op sets: the candidate operations of a search space plus op-set-wide options.

Presets follow the paper's roadmap (Fig. 1): darts -> darts_gelu -> darts_gelu_ln -> convnext -> pibconv.
Each op set has a stable, readable id used in result tables and trial names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from nas.errors import ConfigError
from nas.ops import FIRST_RELEASE_OPTIONS, STEMS, OpOptions, check_primitive, is_pooling, uses_bottleneck_ratio
from nas.registry import BUILTIN, OP_SET_PRESETS, register_op_set, registering

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
CONVNEXT_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                "convnext_3x3", "convnext_5x5", "dil_conv_3x3", "dil_conv_5x5")
PIBCONV_OPS = ("none", "skip_connect", "pib_conv_3x3", "pib_conv_5x5", "pib_conv_7x7",
               "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7", "max_pool_3x3", "avg_pool_3x3")


@dataclass(frozen=True)
class OpSet:
    """A list of primitive names, the options they are built with, and the search network's stem and
    whether its pooling ops are followed by an affine-free BN (DARTS) or not (the released PIBConv code)."""

    primitives: tuple[str, ...]
    options: OpOptions = field(default_factory=OpOptions)
    stem: str = "conv3x3"
    pooling_bn: bool = True

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
        if self.stem not in STEMS:
            raise ConfigError(f"stem: must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if not isinstance(self.pooling_bn, bool):
            raise ConfigError(f"pooling_bn: must be true or false, got {self.pooling_bn!r}")
        object.__setattr__(self, "primitives", prims)

    @property
    def uses_bottleneck_ratio(self) -> bool:
        return any(uses_bottleneck_ratio(p) for p in self.primitives)

    @property
    def used_bottleneck_ratio(self) -> float | None:
        """F where an op uses it, else None (what trials report as their F)."""
        return self.options.bottleneck_ratio if self.uses_bottleneck_ratio else None

    def _form(self) -> dict[str, Any]:
        """The form fields that change this op set's networks: the activation's scope (non-ReLU
        activations), the PIB grouping (non-integer F), the stem, and pooling BN (with pooling ops)."""
        form: dict[str, Any] = {"stem": self.stem}
        if self.options.activation != "relu":
            form["activation_scope"] = self.options.activation_scope
        if any(p.startswith("pib_conv_") for p in self.primitives) and not self.options.bottleneck_ratio.is_integer():
            form["pib_groups"] = self.options.pib_groups
        if any(is_pooling(p) for p in self.primitives):
            form["pooling_bn"] = self.pooling_bn
        return form

    def _preset(self) -> str | None:
        """The preset with these primitives, activation and norm (F and form may differ), if any."""
        for name, preset in OP_SETS.items():
            if preset.primitives == self.primitives and (preset.options.activation, preset.options.norm) == \
                    (self.options.activation, self.options.norm):
                return name
        return None

    def _name(self) -> str | None:
        """``preset[-F<ratio>]`` when this is a preset's op set up to F and form, else None."""
        name = self._preset()
        if name is None:
            return None
        preset = OP_SETS[name]
        same_f = not self.uses_bottleneck_ratio or preset.options.bottleneck_ratio == self.options.bottleneck_ratio
        return name if same_f else f"{name}-F{self.options.bottleneck_ratio:g}"

    @property
    def id(self) -> str:
        """Preset name, with ``-F<ratio>`` when F differs from the preset's and one suffix per form field
        that differs from the preset's (``-gelu_all``, ``-gcd``, ``-pool_bn``, ``-patchify``); else
        ``custom-<hash>``."""
        name = self._name()
        if name is None:
            return self.first_release_id
        preset = OP_SETS[name.split("-F")[0]]
        theirs = {"stem": preset.stem, "pooling_bn": preset.pooling_bn,
                  "activation_scope": preset.options.activation_scope, "pib_groups": preset.options.pib_groups}
        suffix = ""
        for key, value in self._form().items():
            if value == theirs.get(key):
                continue
            if key == "activation_scope":
                suffix += f"-{self.options.activation}_{value}"
            elif key == "pooling_bn":
                suffix += "-pool_bn" if value else "-no_pool_bn"
            else:
                suffix += f"-{value}"
        return name + suffix

    @property
    def first_release_id(self) -> str:
        """The id dartsweep's first release gave this op set: the preset's name without a form suffix, else
        the hash of primitives, activation, norm and F plus any form field not at the first release's value
        (what the trial configs of a sweep written then refer to, and stable for its networks)."""
        name = self._name()
        if name is not None:
            return name
        body: dict[str, Any] = {"primitives": list(self.primitives), "activation": self.options.activation,
                                "norm": self.options.norm, "bottleneck_ratio": self.options.bottleneck_ratio}
        first = {**FIRST_RELEASE_OPTIONS, "stem": "conv3x3", "pooling_bn": True}
        body.update({k: v for k, v in self._form().items() if v != first[k]})
        digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]
        return f"custom-{digest}"

    def with_ratio(self, bottleneck_ratio: float) -> "OpSet":
        return replace(self, options=replace(self.options, bottleneck_ratio=bottleneck_ratio))

    def to_dict(self) -> dict[str, Any]:
        return {"primitives": list(self.primitives), **asdict(self.options), "stem": self.stem,
                "pooling_bn": self.pooling_bn}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], first_release: bool = False) -> "OpSet":
        """An op set from a mapping; see :meth:`OpOptions.from_dict` for ``first_release``."""
        known = {"primitives", "stem", "pooling_bn", *(f.name for f in fields(OpOptions))}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown op set key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        if "primitives" not in data or isinstance(data["primitives"], str):
            raise ConfigError("an explicit op set needs 'primitives': a list of primitive names")
        opts = OpOptions.from_dict({k: v for k, v in data.items() if k not in ("primitives", "stem", "pooling_bn")},
                                   first_release)
        return cls(tuple(data["primitives"]), opts, data.get("stem", "conv3x3"), data.get("pooling_bn", True))


# The released PIBConv search code's PRIMITIVES (cnn/genotypes.py), in its order.
PIBCONV_RELEASED_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                        "pib_conv_3x3", "pib_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")

def _register_builtins() -> None:
    """The roadmap's presets, registered exactly as a plugin registers its own (``nas.registry``)."""
    register_op_set("darts", OpSet(DARTS_OPS, OpOptions("relu", "bn")))
    register_op_set("darts_gelu", OpSet(DARTS_OPS, OpOptions("gelu", "bn")))
    register_op_set("darts_gelu_ln", OpSet(DARTS_OPS, OpOptions("gelu", "ln")))
    register_op_set("convnext", OpSet(CONVNEXT_OPS, OpOptions("gelu", "bn", 4.0)))  # the paper kept BN after LN
    # the paper's text: its 10 ops and DARTS' stem; no BN after pooling, as the released MixedOp
    register_op_set("pibconv", OpSet(PIBCONV_OPS, OpOptions("gelu", "bn", 2.0), pooling_bn=False))
    # the released search network exactly: its 8 ops in its order, the patchify stem, no BN after pooling
    register_op_set("pibconv_released", OpSet(PIBCONV_RELEASED_OPS, OpOptions("gelu", "bn", 2.0), stem="patchify",
                                              pooling_bn=False))


with registering(BUILTIN):
    _register_builtins()

# The first release's presets: resuming one of its sweeps must build what it meant by these names.
FIRST_RELEASE_PRESETS = ("darts", "darts_gelu", "darts_gelu_ln", "convnext", "pibconv")


# name -> OpSet, built-ins and loaded plugins alike (a view of the registry)
OP_SETS: Mapping[str, OpSet] = OP_SET_PRESETS.view(lambda entry: entry.build())


def first_release_preset(name: str) -> OpSet:
    """Preset ``name`` as dartsweep's first release built it: GELU everywhere, gcd groups, BN after pooling
    (a sweep written then names presets; resuming it must build the same networks)."""
    preset = OP_SETS[name]
    return replace(preset, options=replace(preset.options, **FIRST_RELEASE_OPTIONS), pooling_bn=True)


def resolve_op_set(spec: str | Mapping[str, Any] | OpSet, bottleneck_ratio: float | None = None,
                   first_release: bool = False) -> OpSet:
    """An op set from a preset name, an explicit mapping, or an OpSet; optionally overriding F.
    ``first_release``: names and mappings mean what they meant in a sweep written by the first release."""
    if isinstance(spec, OpSet):
        op_set = spec
    elif isinstance(spec, str):
        if spec not in OP_SETS or (first_release and spec not in FIRST_RELEASE_PRESETS):
            raise ConfigError(f"unknown op set {spec!r}; presets: {', '.join(OP_SETS)} (or give a list of primitives)")
        op_set = first_release_preset(spec) if first_release else OP_SETS[spec]
    elif isinstance(spec, Mapping):
        op_set = OpSet.from_dict(spec, first_release)
    else:
        raise ConfigError(f"an op set is a preset name or a mapping with 'primitives', got {spec!r}")
    return op_set if bottleneck_ratio is None else op_set.with_ratio(bottleneck_ratio)


def first_release_op_set_id(old_id: str) -> str:
    """Today's id of the network an op-set id meant in a sweep written by the first release
    (``pibconv`` -> ``pibconv-gelu_all-pool_bn``, ``darts`` -> ``darts``); custom ids are unchanged."""
    name, _, ratio = old_id.partition("-F")
    if name not in FIRST_RELEASE_PRESETS:
        return old_id
    try:
        op_set = first_release_preset(name) if not ratio else first_release_preset(name).with_ratio(float(ratio))
    except (ValueError, ConfigError):
        return old_id
    return op_set.id
