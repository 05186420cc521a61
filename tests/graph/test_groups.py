"""Channel dependency groups, one toy model per op family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netpress.graph import analyze
from netpress.testing import TinyResNet


def _groups(model: nn.Module, x: torch.Tensor, **kw):
    g = analyze(model.eval(), x, **kw)
    return g, {gr.name: gr for gr in g.groups}


def _params(graph, group) -> set[str]:
    return {f"{graph.trace.param_name(pid)}[{d}]" for pid, d in group.slices}


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        y = F.relu(y + self.bn(self.b(y)))
        return self.head(y.mean((2, 3)))


def test_residual_add_couples_both_branches_and_bn():
    g, groups = _groups(Residual(), torch.randn(1, 3, 8, 8))
    (only,) = g.groups  # the residual stream is one group: a, b, bn, head's input
    assert len(only) == 8
    assert _params(g, only) == {"a.weight[0]", "a.bias[0]", "b.weight[0]", "b.bias[0]",
                                "b.weight[1]", "bn.weight[0]", "bn.bias[0]",
                                "bn.running_mean[0]", "bn.running_var[0]", "head.weight[1]"}


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_maps_each_input_to_its_output_range():
    g, groups = _groups(Concat(), torch.randn(1, 3, 4, 4))
    a, b = groups["a.weight[dim 0]"], groups["b.weight[dim 0]"]
    c_a = [p.tolist() for key, ps in a.slices.items() if key[1] == 1 for p in ps]
    c_b = [p.tolist() for key, ps in b.slices.items() if key[1] == 1 for p in ps]
    assert sorted(sum(c_a, [])) == [0, 1, 2, 3]
    assert sorted(sum(c_b, [])) == [4, 5, 6, 7, 8, 9]


class Gated(nn.Module):
    """chunk + GLU-style gating, and a squeeze-excitation block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.se1 = nn.Linear(4, 2)
        self.se2 = nn.Linear(2, 4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        y = a * torch.sigmoid(b)
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3))))))
        return self.out(y * s[:, :, None, None])


def test_chunk_gating_and_se_couple_positions():
    g, groups = _groups(Gated(), torch.randn(1, 3, 4, 4))
    conv = groups["conv.weight[dim 0]"]
    assert len(conv) == 4  # unit j = channel j of both halves
    rows = conv.slices[next(k for k in conv.slices if k[1] == 0
                            and g.trace.param_name(k[0]) == "conv.weight")]
    assert sorted(r.tolist() for r in rows) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "se2.weight[0]" in _params(g, conv) and "se1.weight[1]" in _params(g, conv)
    assert "se1.weight[dim 0]" in groups  # the SE bottleneck is its own group


class Sliced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x)[:, :4])


def test_constant_slice_fixes_the_sliced_channels():
    g, _ = _groups(Sliced(), torch.randn(1, 3, 4, 4))
    assert g.groups == []  # a constant slice on the channel dim: nothing removable


def test_channel_padding_keeps_padded_channels():
    g, groups = _groups(TinyResNet(), torch.randn(1, 1, 8, 8))
    stem = groups["stem.weight[dim 0]"]
    assert len(stem) == 8
    conv_b = [ps for key, ps in stem.slices.items()
              if g.trace.param_name(key[0]) == "conv_b.weight" and key[1] == 0][0]
    assert sorted(int(p[0]) for p in conv_b) == list(range(4, 12))  # pad 4 each side fixed
    assert len(groups["conv_a.weight[dim 0]"]) == 16


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.conv(x), 2), 1))


def test_flatten_maps_a_channel_to_its_spatial_block():
    g, groups = _groups(FlattenLinear(), torch.randn(1, 1, 4, 4))
    grp = groups["conv.weight[dim 0]"]
    fc_cols = [ps for key, ps in grp.slices.items()
               if g.trace.param_name(key[0]) == "fc.weight"][0]
    assert [p.tolist() for p in fc_cols] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                             [12, 13, 14, 15]]


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.gn(self.dw(self.grouped(self.a(x)))))


def test_grouped_conv_prunes_whole_groups_and_groupnorm_by_group():
    g, groups = _groups(GroupedConvs(), torch.randn(1, 3, 4, 4))
    (grp,) = g.groups  # grouped conv couples its input and output channels of a group
    assert len(grp) == 2 and grp.width == 4


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(self.ln(self.fc1(x)))))


def test_layernorm_dims_are_inexact_and_mlp_neurons_exact():
    g, groups = _groups(Norms(), torch.randn(2, 4))
    assert list(groups) == ["fc1.weight[dim 0]", "fc2.weight[dim 0]"]
    ln = groups["fc1.weight[dim 0]"]  # the normalised dim, with the norm's weights
    assert not ln.exact and {"ln.weight[0]", "ln.bias[0]", "fc2.weight[1]"} <= _params(g, ln)
    assert groups["fc2.weight[dim 0]"].exact


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 12)
        self.out = nn.Linear(12, 8)

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        return self.out(F.relu(self.fc(y)))


def test_multihead_attention_is_kept_whole_and_the_rest_prunable():
    g, groups = _groups(MHA(), torch.randn(1, 5, 8))
    assert list(groups) == ["fc.weight[dim 0]"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.fc2(F.relu(self.fc1(h))) + h
        return F.linear(h, self.emb.weight)  # output layer tied to the embedding


def test_tied_embedding_couples_the_output_layer():
    g, groups = _groups(Tied(), torch.randint(0, 10, (1, 4)))
    emb = groups["emb.weight[dim 1]"]
    assert len(emb) == 8
    assert {"fc1.weight[1]", "fc2.weight[0]", "fc2.bias[0]"} <= _params(g, emb)


def test_outputs_and_protected_layers_are_fixed():
    model = Residual()
    g, groups = _groups(model, torch.randn(1, 3, 8, 8), protect=["b"])
    assert g.groups == []  # protecting b fixes the whole residual stream it is coupled to


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.logit(torch.sigmoid(self.fc1(x))))


def test_unknown_op_is_reported_with_module_path():
    g = analyze(Unknown(), torch.randn(2, 4))
    assert [u.where for u in g.unsupported] == ["op 'logit' in module '<root>'"]
    g2 = analyze(Unknown(), torch.randn(2, 4), exclude_unsupported=True)
    assert g2.groups == []


class FusedQKV(nn.Module):
    """One projection for q, k and v, split as [3, heads, head_dim], with a relative-position
    bias looked up per head and a stacked rotary-style pair."""

    def __init__(self, heads: int = 4, head_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(16, 3 * heads * head_dim)
        self.table = nn.Parameter(torch.randn(9, heads))
        self.register_buffer("index", torch.randint(0, 9, (5, 5)), persistent=False)
        self.proj = nn.Linear(heads * head_dim, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q = torch.stack((q, -q), dim=-1).mean(-1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_fused_qkv_carries_heads_through_lookup_and_stack():
    g, groups = _groups(FusedQKV(), torch.randn(1, 5, 16))
    heads = groups["qkv.weight[dim 0]"]
    assert len(heads) == 4 and heads.width == 12  # q, k and v rows of one head
    rows = heads.slices[next(k for k in heads.slices if k[1] == 0
                             and g.trace.param_name(k[0]) == "qkv.weight")]
    assert rows[0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35]
    assert "table[1]" in _params(g, heads)


class Standardized(nn.Module):
    """A 1x1 conv whose weight is standardised per output channel (BiT style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        w = self.conv.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True).reshape_as(w)
        return self.out(F.conv2d(x, w, self.conv.bias))


def test_size_one_and_whole_dims_are_never_units():
    g, groups = _groups(Standardized(), torch.randn(1, 3, 4, 4))
    assert list(groups) == ["conv.weight[dim 0]"] and len(groups["conv.weight[dim 0]"]) == 8


def test_explain_names_the_ops_that_fix_channels():
    from netpress.graph.groups import explain

    g = analyze(Norms().eval(), torch.randn(2, 4))
    assert explain(g, "fc3.weight", 0) == ["a model input or output"]
    assert explain(g, "fc1.weight", 0) == []  # removable, though inexact (the layer norm)
    assert explain(g, "fc2.weight", 0) == []
    assert any("layer_norm" in why for why in g.spaces.soft_by)


def test_connected_components_matches_a_reference():
    import numpy as np

    from netpress.graph.spaces import connected_components

    rng = np.random.default_rng(0)
    n = 500
    a, b = rng.integers(0, n, 400), rng.integers(0, n, 400)
    labels = connected_components(n, a, b)
    assert (labels[a] == labels[b]).all()
    parent = list(range(n))  # a plain union-find

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        parent[max(find(x), find(y))] = min(find(x), find(y))
    assert [find(i) for i in range(n)] == labels.tolist()
