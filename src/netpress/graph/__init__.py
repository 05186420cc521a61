"""The channel-dependency graph of a model, from an op-recording trace of one forward pass."""

from netpress.graph.groups import ChannelGraph, Group, Unsupported, analyze, explain
from netpress.graph.trace import OpRecord, Trace, record

__all__ = ["analyze", "explain", "ChannelGraph", "Group", "Unsupported", "record", "Trace",
           "OpRecord"]
