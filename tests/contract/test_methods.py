"""The contract every registered method passes (netpress.testing.check_method_contract)."""

import pytest

import netpress as npr
from netpress.testing import check_method_contract, toy_batches, toy_models, toy_transformer

#: One representative config per method; a new method must add itself here.
EXAMPLES = {
    "GlobalMagnitudePrune": npr.GlobalMagnitudePrune(sparsity=0.7, floor=0.05),
    "LayerwiseMagnitudePrune": npr.LayerwiseMagnitudePrune(sparsity=0.5),
    "FineTune": npr.FineTune(max_steps=4, lr=1e-2),
    "Distill": npr.Distill(max_steps=4, lr=1e-2),
    "LabelPreserve": npr.LabelPreserve(max_steps=4, lr=1e-2,
                                       candidates=((1.0, 1.0, 0.0), (1.0, 1.0, 1.0))),
    "LC": npr.LC(max_steps=4, iterations=2, lr=1e-2),
    "StructuredPrune": npr.StructuredPrune(macs=0.5, round_to=1),
    "Quantize": npr.Quantize(),
    "QAT": npr.QAT(max_steps=3, lr=1e-3),
    "WeightOnly": npr.WeightOnly(bits=4),
    "Codebook": npr.Codebook(bits=4),
    "DepthPrune": npr.DepthPrune(blocks=0.34),
    "FisherPrune": npr.FisherPrune(macs=0.6, calibration_batches=2),
    "SparseGPT": npr.SparseGPT(sparsity=0.5),
    "Wanda": npr.Wanda(sparsity=0.5),
    "GPTQ": npr.GPTQ(bits=4, group_size=32),
    "DynamicQuantize": npr.DynamicQuantize(target="generic"),
    "Split": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=4, stage1_steps=2,
                       stage2_steps=2),
    "Split(factorized)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=4, stage1_steps=2,
                                   stage2_steps=2, entropy="factorized", rate=1e-3),
    "Split(cache_head)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=4, stage1_steps=2,
                                   stage2_steps=2, train_head=False, cache_head=True,
                                   tail_lr=1e-4),
    "Split(stage1_rate=0)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=4,
                                      stage1_steps=2, stage2_steps=2, train_head=False,
                                      cache_head=True, entropy="factorized", rate=1e-3,
                                      stage1_rate=0.0, prior_steps=2),
    "Split(head_bn=frozen)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=4,
                                       stage1_steps=2, stage2_steps=2, head_bn="frozen",
                                       stage2_trains=("head", "decoder", "tail")),
    "Split(small latent)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=3, stride=4,
                                     hidden=8, depth=2, stage1_steps=2, stage2_steps=2,
                                     train_head=False, cache_head=True, tail_lr=1e-4,
                                     alpha=1.0, temperature=2.0, logit_mse=0.1),
    # issue 15: a server-side decoder of its own width and depth (residual blocks)
    "Split(server decoder)": npr.Split(at="re:fc1|conv1|stem", channels=2, bits=2, hidden=4,
                                       depth=2, decoder_hidden=8, decoder_depth=3,
                                       stage1_steps=2, stage2_steps=2, train_head=False,
                                       cache_head=True, tail_lr=1e-4),
    # options of existing methods (issue 15): data-driven unstructured importance and the
    # activation-sparsity / condition-number recovery terms
    "GlobalMagnitudePrune(grad_norm)": npr.GlobalMagnitudePrune(sparsity=0.5,
                                                                importance="grad_norm"),
    "Distill(act_sparsity, cond_reg)": npr.Distill(max_steps=3, lr=1e-2, act_sparsity=1e-3,
                                                   act_layers=("re:fc1|conv1|stem",),
                                                   cond_reg=1e-3),
    # issue 13: recovery with some parameters frozen (e.g. an encoder's input embeddings)
    "Distill(freeze)": npr.Distill(max_steps=3, lr=1e-2, freeze=("re:fc1|conv1|stem",)),
    # issue 13: the relational term (the batch's output similarity matrix vs the reference's)
    "Distill(relation_weight)": npr.Distill(max_steps=3, lr=1e-2, loss="mse",
                                            relation_weight=1.0),
    # issue 11: SparseGPT's ALPS-style ADMM mask refinement
    "SparseGPT(mask_refine)": npr.SparseGPT(sparsity=0.5, mask_refine="admm"),
}

#: Methods for transformer stacks only: checked on netpress.testing.toy_transformer().
TRANSFORMER_ONLY = {"DepthPrune", "FisherPrune"}

#: Methods that need a compression step before them in the recipe.
NEEDS_COMPRESSION = {"LC"}


def test_every_registered_method_has_an_example():
    missing = {m.name for m in npr.list_methods()} - set(EXAMPLES)
    assert not missing, f"add contract examples for: {sorted(missing)}"


@pytest.mark.parametrize("model_name", list(toy_models()))
@pytest.mark.parametrize("method", list(EXAMPLES))
def test_contract(method, model_name):
    if method in TRANSFORMER_ONLY:
        pytest.skip("a transformer-only method (see test_transformer_contract)")
    model = toy_models()[model_name]
    before = (npr.GlobalMagnitudePrune(sparsity=0.5),) if method in NEEDS_COMPRESSION else ()
    check_method_contract(EXAMPLES[method], model, toy_batches(model=model), before=before)


@pytest.mark.parametrize("method", sorted(TRANSFORMER_ONLY))
def test_transformer_contract(method):
    model = toy_transformer()
    check_method_contract(EXAMPLES[method], model, toy_batches(model=model))
