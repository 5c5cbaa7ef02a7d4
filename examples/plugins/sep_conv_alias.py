"""A plugin that registers the built-in sep_conv_3x3's own factory under another name, and DARTS' op set with
it in place of sep_conv_3x3: the benchmark that an op costs nothing by coming from a plugin
(`dartsweep bench search --op-set darts_plugin --plugin examples/plugins/sep_conv_alias.py` against
`--op-set darts`; docs/performance.md)."""

from nas.opsets import DARTS_OPS
from nas.registry import OPS, register_op, register_op_set

register_op("plugin_sep_conv_3x3", OPS.get("sep_conv_3x3").factory)
register_op_set("darts_plugin", [p if p != "sep_conv_3x3" else "plugin_sep_conv_3x3" for p in DARTS_OPS])
