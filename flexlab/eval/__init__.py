"""Accuracy measures: perplexity (and, later, teacher-forced decode scoring, token agreement)."""

from flexlab.eval.perplexity import chunk_ids, perplexity, unigram_perplexity

__all__ = ["perplexity", "unigram_perplexity", "chunk_ids"]
