"""Accuracy measures: perplexity (prefill or teacher-forced decode), token agreement, last-word
accuracy, evaluation text, and the compression ablation built on them."""

from flexlab.eval.ablation import AblationSetting, ablation_settings, run_ablation, setting_generator
from flexlab.eval.accuracy import LastWordItem, last_word_accuracy, last_word_items, token_agreement
from flexlab.eval.datasets import eval_texts, token_windows
from flexlab.eval.perplexity import chunk_ids, perplexity, unigram_perplexity
from flexlab.eval.sweep import policy_sweep

__all__ = [
    "perplexity",
    "unigram_perplexity",
    "chunk_ids",
    "token_agreement",
    "last_word_accuracy",
    "last_word_items",
    "LastWordItem",
    "eval_texts",
    "token_windows",
    "AblationSetting",
    "ablation_settings",
    "run_ablation",
    "setting_generator",
    "policy_sweep",
]
