"""Third-party messages on every run: those a user cannot act on are silenced, a repeated one is said once.

Installed by every command-line entry (``qrlora.errors.cli_entry``), never on import: a library user keeps
diffusers' and transformers' logging as they configured it. What is silenced, and why:

* ``There are modules in AutoencoderKL that should be kept in float32: []``: an empty list, nothing to keep;
* ``CLIPImageProcessor requires torchvision ... falling back``: the fallback is what runs, and no tool here uses it;
* ``Token indices sequence length is longer than ...``: tokenizer-level; the truncation itself is reported (below);
* ``Repo card metadata block was not found``: said while the model card is built from its own template;
* the ``torch_dtype is deprecated`` FutureWarning: the argument our code passes to diffusers, not the user's.

The pipelines' truncation warning (``The following part of your input was truncated ...``, once per encode: 27
times for one 9-image grid) is said once per prompt in our words, and not at all when the trainer's own check
(``qrlora.core.prompts``) already named the words lost.
"""
from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings

SILENCED = (
    "should be kept in float32: []",
    "requires torchvision",
    "Token indices sequence length is longer than the specified maximum sequence length",
    "Repo card metadata block was not found",
)
TRUNCATED = re.compile(r"The following part of your input was truncated because (.*?) (\d+) tokens: (.*)$", re.S)
_said: set[str] = set()


def mark_said(lost: str) -> None:
    """Record that the words ``lost`` from a prompt were reported already (the pipelines' warning is then dropped)."""
    _said.add(lost.strip())


class QuietFilter(logging.Filter):
    """Drops the messages of ``SILENCED``; rewords the first truncation warning of each prompt, drops the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in SILENCED):
            return False
        match = TRUNCATED.search(message)
        if match:
            reason, tokens, lost = match.groups()
            key = lost.strip()
            if key in _said or any(said and said in key for said in _said):
                return False
            if key.strip("[]'\" ,") == "":
                # The pipelines slice the cut text at the CLIP limit, so a T5 cut at --max_sequence_length shows as
                # ['']: the words lost were named by our own check (prompts.warn_truncated), or are not known here.
                if _said:
                    return False
                record.msg, record.args = (f"prompt truncated to {tokens} tokens by the T5 prompt length "
                                           "(--max_sequence_length); its end is cut"), ()
                return True
            _said.add(key)
            limit = "the T5 prompt length (--max_sequence_length)" if "max_sequence_length" in reason else "the CLIP tokenizer"
            record.msg, record.args = f"prompt truncated to {tokens} tokens by {limit}; the model never sees: {lost}", ()
        return True


_FILTER = QuietFilter()


def install() -> None:
    """Attach the filter where these messages pass: diffusers' and transformers' own handlers (their records do
    propagate) and the hub's model-card logger; ignore the ``torch_dtype`` FutureWarning. Idempotent.

    transformers lets its records propagate to the root logger when ``CI`` is set (``CI=1`` on every CI service);
    there the root handler would print them a second time, unfiltered, so a command keeps them on the library's
    own (filtered) handler."""
    for library in ("diffusers", "transformers"):
        if library in sys.modules:  # configure its logging (adds its handler) without importing it afresh
            importlib.import_module(f"{library}.utils.logging").get_logger(library)
        library_logger = logging.getLogger(library)
        if library_logger.handlers:
            library_logger.propagate = False
        for handler in library_logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    hub = logging.getLogger("huggingface_hub.repocard")
    if _FILTER not in hub.filters:
        hub.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated", category=FutureWarning)
