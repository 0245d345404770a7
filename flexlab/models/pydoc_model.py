"""Small models trained on text that ships with Python, for when no real checkpoint is at hand.

Nothing can be downloaded on many research machines, and a random model's generations and
perplexity say nothing (about compression, say). This module trains — once, then cached — a tiny
model on the ``pydoc_data`` topics (the text behind ``help()``), with a byte-level BPE tokenizer
trained on the same text, and saves both as an ordinary Hugging Face checkpoint directory, so it
loads through ``Model.from_pretrained`` like any other checkpoint. Two architectures share the
data, the tokenizer and the training: an OPT, and a LLaMA-family twin (RMSNorm, rotary
embeddings, SwiGLU, grouped-query attention with 2 KV heads for 4 query heads).

    >>> import flexlab
    >>> model = flexlab.Model.from_pretrained(flexlab.pydoc_model_path())  # doctest: +SKIP
    >>> twin = flexlab.Model.from_pretrained(flexlab.pydoc_model_path(family="llama"))  # doctest: +SKIP

Training takes one to three minutes on two CPU cores. The recipe's fingerprint is part of the
cache directory's name, so a changed recipe trains a new model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from flexlab.errors import ConfigError
from flexlab.files import disown, owned_dir, remove, sweep_stale
from flexlab.models.config import ModelConfig
from flexlab.models.registry import get_family

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: 0, 1 (pad), 2 (bos and eos), 3


@dataclass(frozen=True)
class PydocRecipe:
    """Everything that determines the trained model."""

    family: Literal["opt", "llama"] = "opt"
    # Chosen by held-out perplexity relative to a unigram model, within ~2 min on two cores:
    # vocab 1024 reached 60 vs 382 (unigram); vocab 2048 reached 117 vs 587; wider models overfit.
    # 300 steps at lr 2e-3 reach 72 (the LLaMA twin 52) in half the time of 600 at 1e-3 (61; the
    # twin at 250 steps of 1e-3 reached 80); lr 3e-3 is unstable (105). Measured 2026-12-04.
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 300
    lr: float = 2e-3
    seed: int = 0
    heldout_every: int = 10  # every 10th topic (sorted by name) is held out for evaluation
    num_kv_heads: int = 2  # the LLaMA twin's grouped-query attention

    def __post_init__(self) -> None:
        if self.family not in ("opt", "llama"):
            raise ConfigError(f"PydocRecipe.family={self.family!r}: the pydoc model comes as 'opt' or 'llama'")

    def config(self) -> ModelConfig:
        shape: dict = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            max_positions=self.max_positions,
        )
        if self.family == "opt":
            return ModelConfig(name="opt-pydoc", ffn_dim=4 * self.hidden_size, **shape)
        # SwiGLU has three matrices where OPT's MLP has two: 2/3 of OPT's width (rounded to 32)
        # keeps the parameter count alike. The tokenizer's ids are OPT's (pad 1, </s> 2).
        ffn = 32 * round(8 * self.hidden_size / 3 / 32)
        return ModelConfig(
            name="llama-pydoc",
            family="llama",
            ffn_dim=ffn,
            num_kv_heads=self.num_kv_heads,
            enable_bias=False,
            activation="silu",
            norm_eps=1e-5,
            tie_word_embeddings=True,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            **shape,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    """``$FLEXLAB_CACHE``, else ``$XDG_CACHE_HOME/flexlab``, else ``~/.cache/flexlab``."""
    if os.environ.get("FLEXLAB_CACHE"):
        return Path(os.environ["FLEXLAB_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flexlab"


def pydoc_texts(heldout_every: int = 10) -> tuple[list[str], list[str]]:
    """The pydoc topics split into (training, held-out) documents, deterministically."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % heldout_every]
    heldout = [topics[n] for i, n in enumerate(names) if not i % heldout_every]
    return train, heldout


def pydoc_model_path(
    recipe: PydocRecipe = PydocRecipe(),
    *,
    family: Literal["opt", "llama"] | None = None,
    train_if_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The cached checkpoint directory of the pydoc model, training it first if needed.

    ``family="llama"`` gives the LLaMA-family twin (the same recipe otherwise)."""
    if family is not None:
        recipe = replace(recipe, family=family)
    name = recipe.config().name
    path = cache_dir() / f"{name}-{recipe.fingerprint()}"
    if (path / "config.json").exists():
        return path
    if not train_if_missing:
        raise FileNotFoundError(f"{path} does not exist; call pydoc_model_path() to train it (a few minutes)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Train into a temporary sibling and rename: a crash or Ctrl-C never leaves a half-written model.
    sweep_stale(path.parent, f".{name}-")
    tmp = owned_dir(path.parent, f".{name}-")
    try:
        train_pydoc_model(tmp, recipe, progress=progress)
        disown(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; its model is the same recipe
            pass
    finally:
        remove(tmp)
    return path


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer in OPT's conventions (``</s>`` opens every sequence)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    bpe.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def train_pydoc_model(out_dir: Path, recipe: PydocRecipe = PydocRecipe(), *, progress: bool = True) -> None:
    """Train the tokenizer and the model and save both to ``out_dir`` (save_pretrained layout)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    train_docs, _ = pydoc_texts(recipe.heldout_every)
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    stream = torch.tensor([t for doc in train_docs for t in tokenizer(doc)["input_ids"]])  # each doc starts with </s>

    torch.manual_seed(recipe.seed)
    config = recipe.config()
    hf = get_family(config.family).config_to_hf(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, recipe.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (recipe.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(
        range(recipe.steps), desc=f"training the pydoc model, {recipe.family} (once; cached)", disable=not progress
    )
    for _ in bar:
        starts = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + recipe.seq_len] for s in starts.tolist()])  # [batch, seq]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "flexlab_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
