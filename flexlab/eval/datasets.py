"""Evaluation text: WikiText-2 when it can be downloaded, else text that ships with Python.

>>> name, texts = eval_texts("pydoc")
>>> name, len(texts) >= 5
('pydoc held-out topics', True)
"""

from __future__ import annotations

import warnings

from flexlab.errors import FlexlabError
from flexlab.models.pydoc_model import pydoc_texts

DATASETS = ("auto", "wikitext-2", "pydoc")


def eval_texts(name: str = "auto") -> tuple[str, list[str]]:
    """``(what it is, documents)`` for ``name``:

    * ``"wikitext-2"``: the WikiText-2 raw test split through the ``datasets`` package (needs it
      installed and the Hugging Face hub reachable, as on Colab);
    * ``"pydoc"``: the pydoc topics the small trained model did *not* train on (offline);
    * ``"auto"``: WikiText-2 if it loads, else pydoc, with a warning naming what was used.
    """
    if name not in DATASETS:
        raise FlexlabError(f"unknown evaluation dataset {name!r}; choose one of {DATASETS}")
    if name == "pydoc":
        return "pydoc held-out topics", pydoc_texts()[1]
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "wikitext-2 (test)", ["".join(rows)]
    except Exception as e:  # not installed, offline, hub down: all mean "not here"
        if name == "wikitext-2":
            raise FlexlabError(
                f"WikiText-2 could not be loaded ({type(e).__name__}: {e}); install `datasets` "
                "and check the network, or use eval_texts('pydoc') offline"
            ) from None
        warnings.warn(
            f"WikiText-2 is not available here ({type(e).__name__}); evaluating on the pydoc held-out topics instead",
            stacklevel=2,
        )
        return "pydoc held-out topics", pydoc_texts()[1]


def token_windows(texts: list[str], tokenizer, seq_len: int, limit: int | None = None) -> list[list[int]]:
    """The documents tokenized as one stream, cut into windows of ``seq_len`` tokens (each
    starting with the BOS token, as OPT was trained)."""
    bos = tokenizer.bos_token_id
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    body = seq_len - 1
    windows = [[bos] + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
    return windows[:limit] if limit is not None else windows
