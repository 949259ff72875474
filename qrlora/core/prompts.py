"""Prompts the text encoders would cut: found before training, from the pipeline's own tokenizers.

A pipeline truncates a prompt longer than a tokenizer's limit (CLIP: its ``model_max_length``, 77 on the real
models; T5: ``--max_sequence_length``) and only logs it, once per encode. For the instance prompt that means the
adapter binds to a shorter prompt than the one typed (often without its trigger), so the trainer refuses it; for
the class and validation prompts it says so once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import quiet
from ..errors import UserError

logger = logging.getLogger("qrlora.prompts")


def load_tokenizers(model_path: str) -> dict:
    """``{subfolder: tokenizer}`` of every ``tokenizer*`` component in the pipeline's ``model_index.json``."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        index = Path(hf_hub_download(model_path, "model_index.json"))
    names = [k for k, v in json.loads(index.read_text()).items() if k.startswith("tokenizer") and v and v[0]]
    return {name: AutoTokenizer.from_pretrained(model_path, subfolder=name) for name in sorted(names)}


def lost_words(tokenizer, prompt: str, max_sequence_length: int) -> str | None:
    """The end of ``prompt`` this tokenizer would cut off (as text), or None when it fits.

    T5 tokenizers are cut at ``max_sequence_length`` (the pipelines pass it to T5 only), the others (CLIP) at their
    ``model_max_length``; both counts include the special tokens the tokenizer adds (CLIP's BOS/EOS, T5's EOS).
    """
    limit = _limit(tokenizer, max_sequence_length)
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids  # verbose: no length warning
    keep = limit - tokenizer.num_special_tokens_to_add()
    return tokenizer.decode(ids[keep:]).strip() if len(ids) > keep else None


def check_prompt_lengths(model_path: str, max_sequence_length: int, trained: dict[str, str],
                         other_prompts: dict[str, str | None]) -> None:
    """Refuse a trained prompt a tokenizer truncates (``trained``: ``{where it comes from: prompt}``, the instance
    prompt and every caption); warn once for each other prompt (``{flag: prompt}``) it does.

    Raises:
        UserError: naming where the prompt comes from (the flag or the caption file), the tokenizer, its limit,
            and the words and number of tokens it would drop.
    """
    tokenizers = load_tokenizers(model_path)

    def cut(prompt):
        return next(((name, tok, lost) for name, tok in tokenizers.items()
                     if (lost := lost_words(tok, prompt, max_sequence_length))), None)

    for where, prompt in trained.items():
        found = cut(prompt)
        if found:
            name, tok, lost = found
            dropped = len(tok(lost, add_special_tokens=False, verbose=False).input_ids)
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            raise UserError(f"{where} {shown!r}: {type(tok).__name__} ({model_path}/{name}) keeps "
                            f"{_limit(tok, max_sequence_length)} tokens and would drop {lost!r} ({dropped} token(s)), "
                            "so the adapter would learn a shorter prompt than the one typed; shorten it"
                            + (" or raise --max_sequence_length" if "T5" in type(tok).__name__ else "")
                            + " (a word the tokenizer does not know takes several tokens)")
    for flag, prompt in other_prompts.items():
        warn_truncated(tokenizers, prompt, max_sequence_length, flag)


def warn_truncated(tokenizers: dict, prompt: str | None, max_sequence_length: int | None, flag: str) -> bool:
    """Warn once, naming the words cut, when a tokenizer of ``tokenizers`` (``{name: tokenizer}``) truncates
    ``prompt``; T5 tokenizers are checked only when ``max_sequence_length`` is given. True when it warned.

    The pipelines' own warning names the cut text from the CLIP limit only, so a short ``--max_sequence_length``
    read "the model never sees: ['']" (issue 30); this one names the words T5 loses."""
    if not prompt:
        return False
    for name, tok in tokenizers.items():
        if max_sequence_length is None and "T5" in type(tok).__name__:
            continue
        lost = lost_words(tok, prompt, max_sequence_length)
        if lost:
            quiet.mark_said(lost)  # the pipelines' own warning of the same cut is then not repeated
            logger.warning("%s %r: %s (%s) keeps %d tokens; %r will be cut off", flag, prompt, type(tok).__name__,
                           name, _limit(tok, max_sequence_length), lost)
            return True
    return False


def _limit(tokenizer, max_sequence_length: int) -> int:
    return max_sequence_length if "T5" in type(tokenizer).__name__ else tokenizer.model_max_length
