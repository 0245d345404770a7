"""The small models trained on Python's own docs (OPT and its LLaMA-family twin): cached, loadable
like any checkpoint, and trained."""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab.eval import chunk_ids, perplexity, unigram_perplexity
from flexlab.models import pydoc_model
from flexlab.models.pydoc_model import PydocRecipe, pydoc_model_path, pydoc_texts

pytestmark = pytest.mark.slow

# Both recipes as shipped: the OPT is the demo's model, the LLaMA twin the ablation's.
RECIPES = {"opt": PydocRecipe(), "llama": PydocRecipe(family="llama")}


@pytest.fixture(scope="module", params=list(RECIPES))
def model(request):
    return flexlab.Model.from_pretrained(pydoc_model_path(RECIPES[request.param]), dtype=torch.float32)


def test_the_twin_is_a_llama_with_grouped_query_attention():
    import transformers

    path = pydoc_model_path(RECIPES["llama"])
    twin = flexlab.Model.from_pretrained(path, dtype=torch.float32)
    assert twin.config.family == "llama" and twin.config.num_kv_heads < twin.config.num_heads
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(path), transformers.LlamaForCausalLM)
    # same data, same tokenizer as the OPT
    opt = flexlab.Model.from_pretrained(pydoc_model_path(), dtype=torch.float32)
    assert twin.tokenizer.get_vocab() == opt.tokenizer.get_vocab()


def test_loads_through_from_pretrained_with_its_tokenizer(model):
    assert model.tokenizer is not None
    ids = model.tokenizer("The for statement")["input_ids"]
    assert ids[0] == model.config.bos_token_id == 2  # OPT's convention: </s> opens a sequence
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "The for statement"


def test_heldout_perplexity_is_far_below_unigram(model):
    train, heldout = pydoc_texts()
    tok = model.tokenizer
    train_ids = [t for d in train for t in tok(d)["input_ids"]]
    heldout_ids = [t for d in heldout for t in tok(d)["input_ids"]]
    ppl = perplexity(model.score, chunk_ids(heldout_ids, 256))
    unigram = unigram_perplexity(train_ids, heldout_ids, model.config.vocab_size)
    assert ppl < unigram / 3, (ppl, unigram)


def test_generates_text_and_honours_stop_strings(model):
    free = model.generate(["The for statement"], max_new_tokens=24, stop_token_ids=None)
    assert isinstance(free.texts[0], str) and len(free.token_ids[0]) == 24
    word = free.texts[0].split()[2]
    stopped = model.generate(["The for statement"], max_new_tokens=24, stop_token_ids=None, stop_strings=[word])
    assert stopped.texts[0].endswith(word) and word in stopped.texts[0]
    assert len(stopped.token_ids[0]) < 24
    assert free.texts[0].startswith(stopped.texts[0])


def test_cached_model_is_reused_without_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(pydoc_model, "train_pydoc_model", boom)
    for recipe in RECIPES.values():
        assert (pydoc_model_path(recipe) / "config.json").exists()


def test_interrupted_training_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXLAB_CACHE", str(tmp_path))

    def interrupted(out_dir, recipe, progress=True):
        (out_dir / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(pydoc_model, "train_pydoc_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pydoc_model_path(PydocRecipe(steps=1), family="llama")
    assert list(tmp_path.iterdir()) == []


def test_unknown_family_is_refused_by_name():
    with pytest.raises(flexlab.ConfigError, match="'opt' or 'llama'"):
        pydoc_model_path(family="bloom")
