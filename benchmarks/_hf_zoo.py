"""Every ``transformers`` model class with a vision, text-encoder or decoder head, built small.

The classes are those of ``transformers``' own auto mappings: image classification (vision),
masked language modelling (text encoders) and causal language modelling (decoders), each class
once. A model is built from its config class's defaults, shrunk generically by the names of
the config's fields (no per-architecture table):

* layer counts (``num_hidden_layers``, ``depths``, ...): at most 2 (3 per stage in lists);
* head counts: at most 4 (2 per stage in lists); key/value heads: as many as the heads, or 2
  when the model groups its queries (GQA stays grouped);
* widths (hidden, embedding, intermediate, channel sizes, lists of stage widths): scaled by
  one factor that brings the model width to 64, rounded to multiples of 16 (so every head
  count above divides them); an explicit ``head_dim`` becomes 16;
* vocabulary 512 words (token ids wrapped into it), at most 128 positions, images 64x64
  pixels, rotary dims at most 8, window sizes and norm group counts at most 4; lists with
  one entry per layer follow the new layer count; derived backbone fields (``out_features``)
  are left to the config to recompute.

A model must have at most 20M parameters once shrunk (it is first built on the meta device
to check). Inputs: pixels for a vision class whose forward takes ``pixel_values``, else 16
token ids.

A class that still cannot be built, or whose forward fails on the example input, is listed as
skipped with the reason.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Entry", "entries", "build", "BuildError", "shrink"]

WIDTH = 64
HEADS = 4
VOCAB = 512
POSITIONS = 128
IMAGE = 64
SEQ = 16
MAX_PARAMS = 20_000_000

_LAYERS = re.compile(r"^(num_(hidden_)?layers|n_layers?|num_hidden_layers|depths?|"
                     r"(encoder|decoder)_layers|num_(encoder|decoder)_layers|num_blocks|"
                     r"stage_num_blocks|stage_numb_of_layers|num_stages_layers|"
                     r"num_hidden_groups|n_layer)$")
_HEADS = re.compile(r"^(num_attention_heads|num_heads|n_heads?|(encoder|decoder)_attention_heads|"
                    r"num_attention_heads_per_layer)$")
_KV = re.compile(r"^(num_key_value_heads|num_kv_heads|n_kv_heads|multi_query_group_num|"
                 r"num_key_value_groups)$")
_WIDTH = re.compile(r"(hidden_size|hidden_sizes|hidden_dim|embed_dim|embedding_size|"
                    r"embedding_dim|d_model|n_embd|^dim$|^d_ff$|intermediate_size|ffn_dim|"
                    r"n_inner|inner_dim|channels|^width$|^widths$|mlp_dim|proj_size|"
                    r"pooler_hidden_size|word_embed_proj_dim|decoder_hidden_size|"
                    r"expert_hidden_size|moe_intermediate_size|shared_expert_intermediate_size|"
                    r"hidden_size_per_head|kv_lora_rank|q_lora_rank|qk_nope_head_dim|"
                    r"qk_rope_head_dim|v_head_dim|embedding_dims|bottleneck_size|"
                    r"true_hidden_size)")
_NOT_WIDTH = re.compile(r"^(num_channels|in_channels|input_channels|image_channels|"
                        r"num_mel_bins|.*_ratio.*|.*multiplier.*|.*_factor)$")
_MAIN = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "hidden_sizes",
         "embed_dims", "widths", "embedding_size")


@dataclass(frozen=True)
class Entry:
    """One model class of the sweep: its kind (image, encoder, decoder) and auto-map key."""

    kind: str
    model_types: tuple[str, ...]
    class_name: str

    @property
    def name(self) -> str:
        return self.class_name


def entries() -> list[Entry]:
    """The sweep: every class of the three auto mappings, once (decoders first, then text
    encoders, then vision), sorted by class name within each kind."""
    from transformers.models.auto import modeling_auto as auto

    seen: set[str] = set()
    out: list[Entry] = []
    for kind, mapping in (("decoder", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("encoder", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
                          ("image", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)):
        types: dict[str, list[str]] = {}
        for model_type, names in mapping.items():
            for cls in (names,) if isinstance(names, str) else names:
                if cls not in seen:
                    types.setdefault(cls, []).append(model_type)
        seen.update(types)
        out.extend(sorted((Entry(kind, tuple(t), c) for c, t in types.items()),
                          key=lambda e: e.class_name.lower()))
    return out


def _main_width(d: dict[str, Any]) -> int | None:
    for key in _MAIN:
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
            return int(v[0])
    return None


def _round16(v: float) -> int:
    return max(16, int(round(v / 16)) * 16)


def _shrink_value(key: str, v: Any, scale: float, heads_ratio: int | None) -> Any:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    ints = isinstance(v, (list, tuple)) and v and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not (is_int or ints):
        return v
    if _LAYERS.match(key):
        return min(v, 2) if is_int else type(v)(min(x, 3) for x in v)
    if _HEADS.match(key):
        return min(v, HEADS) if is_int else type(v)(min(x, 2) for x in v)
    if _KV.match(key) and is_int:
        return min(v, HEADS) if not heads_ratio or heads_ratio <= 1 else 2
    if key in ("head_dim", "d_head", "attention_head_size") and is_int and v > 0:
        return 16
    if ("rotary_dim" in key or key == "rope_dim") and is_int and v > 8:
        return 8
    if key in ("window_size", "num_groups") and is_int and v > 4:
        return 4
    if key.endswith("token_id") and is_int and v >= VOCAB:
        return v % VOCAB
    if key.endswith("vocab_size") and is_int and v > VOCAB:
        return VOCAB
    if key in ("max_position_embeddings", "n_positions", "max_seq_len",
               "max_sequence_length") and is_int and v > POSITIONS:
        return POSITIONS
    if key in ("image_size", "img_size") and (is_int or ints):
        return IMAGE if is_int else type(v)(IMAGE for _ in v)
    if scale < 1 and _WIDTH.search(key) and not (is_int and _NOT_WIDTH.match(key)):
        if is_int:
            return _round16(v * scale) if v > 16 else v
        return type(v)(_round16(x * scale) if x > 16 else x for x in v)
    return v


_DERIVED = ("out_features", "out_indices", "stage_names")


def _per_layer(d: dict[str, Any], changes: dict[str, Any]) -> None:
    """Lists with one entry per layer (``layer_types``, ...) follow the new layer count."""
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        old, new = d.get(key), changes.get(key)
        if isinstance(old, int) and isinstance(new, int) and new < old:
            for k, v in d.items():
                v = changes.get(k, v)
                if isinstance(v, list) and len(v) == old:
                    changes[k] = v[:new]
            break


def shrink(config: Any, widths: bool = True, decoder: bool = False) -> Any:
    """A copy of ``config`` with layer counts, head counts and (with ``widths``) widths
    scaled down; ``decoder`` sets ``is_decoder`` where the config has it."""
    d = config.to_dict()
    main = _main_width(d)
    scale = min(1.0, WIDTH / main) if main and widths else 1.0
    heads = d.get("num_attention_heads")
    kv = d.get("num_key_value_heads")
    ratio = heads // kv if isinstance(heads, int) and isinstance(kv, int) and kv else None
    changes = {k: _shrink_value(k, v, scale, ratio) for k, v in d.items()
               if not isinstance(v, dict)}
    if d.get("vocab_size", 0) is None:
        changes["vocab_size"] = VOCAB
    if "head_dim" in d and d["head_dim"] is None:
        changes["head_dim"] = 16
    if decoder and "is_decoder" in d:
        changes["is_decoder"] = True
    for k, v in d.items():  # nested sub-configs (text_config, vision_config, ...)
        sub = getattr(config, k, None)
        if isinstance(v, dict) and hasattr(sub, "to_dict"):
            changes[k] = shrink(sub, widths, decoder)
    changes = {k: v for k, v in changes.items() if v is not d.get(k) and v != d.get(k)}
    _per_layer(d, changes)
    base = {k: v for k, v in d.items() if k not in _DERIVED}
    new = config.__class__.from_dict({**base, **{k: (v.to_dict() if hasattr(v, "to_dict") else v)
                                                 for k, v in changes.items()}})
    for k, v in changes.items():
        if hasattr(v, "to_dict"):
            setattr(new, k, v)
    if hasattr(new, "use_cache"):
        new.use_cache = False
    return new


def example_inputs(model: nn.Module, config: Any, kind: str) -> Any:
    """Pixels for a vision model whose forward takes ``pixel_values``, else 16 token ids."""
    import inspect

    gen = torch.Generator().manual_seed(0)
    params = inspect.signature(model.forward).parameters
    if "pixel_values" in params and (kind == "image" or "input_ids" not in params):
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", IMAGE)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return torch.randn(1, channels, size, size, generator=gen)
    vocab = getattr(config, "vocab_size", None) or VOCAB
    return {"input_ids": torch.randint(3, max(4, min(vocab, VOCAB)), (1, SEQ), generator=gen)}


def build(entry: Entry) -> tuple[nn.Module, Any]:
    """The shrunk model (eval mode, seeded weights) and its example inputs: widths scaled
    if that builds and runs, else layer and head counts only. Raises :class:`BuildError`
    when no variant does."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from netpress._inputs import call_model

    errors: list[str] = []
    for model_type, widths in itertools.product(entry.model_types, (True, False)):
        try:
            config = shrink(CONFIG_MAPPING[model_type](), widths, entry.kind == "decoder")
            cls = getattr(transformers, entry.class_name)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
            if size > MAX_PARAMS:
                raise ValueError(f"{size / 1e6:.0f}M parameters even when shrunk")
            torch.manual_seed(0)
            model = cls(config).eval()
            x = example_inputs(model, config, entry.kind)
            with torch.no_grad():
                call_model(model, x)
            return model, x
        except Exception as exc:
            msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
            errors.append(f"{model_type}{'' if widths else ' (widths kept)'}: {msg}")
    raise BuildError("; ".join(errors))


class BuildError(Exception):
    """The class cannot be built small (every variant's error, joined)."""
