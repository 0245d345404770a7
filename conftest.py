"""Collection rules for the whole checkout (tests/ and the doctests in flexlab/)."""

import importlib.util

# flexlab.eval.lm_eval is the optional lm-eval backend (pip install flexlab[eval]): without lm-eval
# there is nothing to import, so its doctests are not collected (its tests skip themselves).
collect_ignore = [] if importlib.util.find_spec("lm_eval") else ["flexlab/eval/lm_eval.py"]
