"""Offline tiny random diffusers pipelines for tests and the demo.

Why this module exists: the tests and the CPU demo must never reach the
Hugging Face hub (there is no network where they run), yet the training code
is written against real ``StableDiffusion3Pipeline`` / ``FluxPipeline`` /
``StableDiffusionXLPipeline`` checkpoints.  So we build, from nothing but a
seed, a *structurally faithful* miniature of each backbone -- same component
classes, same folder layout, same scheduler configs, same attention module
names (so diffusers' default LoRA targets exist) -- with widths small enough
that a whole pipeline builds in well under a second and draws a 64x64 image on
the CPU in a few hundredths of a second.

Everything is offline and deterministic:

* model weights come from each component's default random init, seeded per
  component from ``seed`` and the component's name (so the two CLIP encoders
  of SD3 are not clones), inside ``torch.random.fork_rng`` so the caller's
  global RNG state is left alone;
* the CLIP byte-level BPE vocabulary and merges are learned here from a small
  built-in corpus of prompt-like sentences and written as CLIP's own
  vocab.json / merges.txt;
* the T5 tokenizer is a sentencepiece unigram model trained in-process on the
  same corpus (single-threaded, hence reproducible), written as spiece.model.

The same seed gives bit-identical files, tokenizers included.

Layout written (the standard ``save_pretrained`` one)::

    DIR/model_index.json
    DIR/transformer/ | DIR/unet/
    DIR/vae/  DIR/scheduler/
    DIR/text_encoder/  DIR/tokenizer/
    DIR/text_encoder_2/  DIR/tokenizer_2/
    DIR/text_encoder_3/  DIR/tokenizer_3/      (SD3 only)
    DIR/qrlora_tiny.json                       (marker: backbone, seed)

CLI::

    python -m qrlora.tiny --backbone sd3|flux|sdxl --output DIR [--seed 0]
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import zlib

import sentencepiece as spm
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.utils import logging as transformers_logging

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from ..backbones import BACKBONES as BACKBONE_REGISTRY
from ..errors import UserError

__all__ = [
    "BACKBONES", "TinyPipelineError", "build_clip_text_encoder", "build_clip_tokenizer", "build_t5_encoder",
    "build_t5_tokenizer", "build_tiny_pipeline", "flow_match_scheduler", "no_progress_bars", "seeded",
]

# The families come from the backbone registry (one owner); each name needs a maker below.
BACKBONES = tuple(BACKBONE_REGISTRY)
# Pipeline class recorded in model_index.json for each backbone (the registry's ``pipeline_class``).
_PIPELINE_CLASSES = {name: BACKBONE_REGISTRY[name].pipeline_cls() for name in BACKBONES}

# Written last into the build folder: its presence means the build completed.
MARKER_FILE = "qrlora_tiny.json"
_MARKER_VERSION = 1

CLIP_MAX_LENGTH = 77  # CLIP context length, as in every real SD/FLUX checkpoint
T5_MAX_LENGTH = 512  # FLUX pads T5 prompts to 512 tokens
CLIP_WIDTH = 32  # hidden size of every tiny CLIP text encoder
_CLIP_NUM_MERGES = 300  # upper bound on learned BPE merges
_T5_VOCAB_SIZE = 300  # soft target for the sentencepiece model (plus 100 sentinels)
_T5_EXTRA_IDS = 100  # <extra_id_*> sentinels, as in real T5 tokenizers

# Prompt-like sentences the tokenizers are learned from.  Kept in the source so
# that the tokenizers are a pure function of this file.
_CORPUS = """\
a photo of a sks dog
a photo of sks dog in a bucket
a photo of a sks dog on the beach
a sks dog sleeping on a red sofa
a close up photo of a sks cat
a photo of a cat wearing a hat
a dog in the style of van gogh
a painting of a dog in the style of monet
a cat in the style of a watercolor painting
a portrait of a woman in the style of picasso
a landscape in the style of ukiyo-e
a photo of a house in the snow
a photo of a red car on a mountain road
a castle on a hill at sunset
an oil painting of a city at night
a watercolor painting of a forest with a river
a pencil sketch of a tree
a cartoon drawing of a robot
a 3d render of a teapot on a wooden table
a digital illustration of a dragon flying over the sea
a cute corgi dog running in the grass
a black and white photo of a bridge
a close-up photo of a flower with morning dew
a vase of sunflowers on a table, still life
the mona lisa in the style of pop art
a dog and a cat sitting together, studio lighting
a high quality photo of an astronaut riding a horse
a blue bird standing on a branch, 4k, detailed
a bowl of fruit, impressionist style, soft light
a sks toy on a shelf, product photo
a sks backpack in the jungle
a sks teapot floating in space
an anime style girl with long hair
a minimalist poster of a lighthouse
a colorful mosaic of a fish
a medieval knight in shining armor
a steampunk airship above the clouds
a cozy cabin in the woods, warm light
a futuristic city skyline with neon lights
a golden retriever puppy playing with a ball
a sketch of a sks dog in the style of a children's book
a photo of two dogs in the park, bokeh
a small boat on a calm lake at dawn
a plate of pasta, food photography
a snowy mountain with a blue sky
a photo of 1 cat and 2 dogs
A Photo Of A SKS Dog, In The Style Of Van Gogh!
abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789
. , ; : ! ? ' " ( ) [ ] { } - _ + = * / \\ | & % $ # @ ~ ` ^ < >
"""


# ---------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------


class TinyPipelineError(UserError, FileExistsError):
    """The output folder holds something that is not the requested tiny pipeline (a user error: one line)."""


def corpus_lines() -> list[str]:
    """The non-blank lines of the built-in tokenizer corpus."""
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _seed_for(seed: int, component: str) -> int:
    """Per-component seed: stable across runs (crc32, not ``hash``) and distinct per name."""
    return (int(seed) * 1_000_003 + zlib.crc32(component.encode())) % (2**63)


@contextlib.contextmanager
def seeded(seed: int, component: str):
    """Seed the torch RNG for one component, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(seed, component))
        yield


@contextlib.contextmanager
def no_progress_bars():
    """Silence transformers' "Writing model shards" bars while saving; restore the setting after."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


# ---------------------------------------------------------------------------
# tokenizers (shared by all backbones)
# ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# CLIP's pre-tokenisation (lower-cased words, single digits, punctuation runs).
_CLIP_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


@functools.lru_cache(maxsize=None)
def _learn_bpe_merges(lines: tuple[str, ...], num_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn byte-level BPE merges CLIP-style (the last symbol of a word carries ``</w>``).

    Ties are broken lexicographically so the result is a pure function of the corpus.
    """
    byte_map = _bytes_to_unicode()
    words = collections.Counter()
    for line in lines:
        for word in _CLIP_WORD_RE.findall(line.lower()):
            chars = [byte_map[b] for b in word.encode("utf-8")]
            words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = collections.Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return tuple(merges)


def build_clip_tokenizer(lines: tuple[str, ...] | None = None, model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Byte-level BPE tokenizer laid out like CLIP's, learned from ``lines`` (default: the built-in corpus).

    vocab = 256 byte characters + the same with ``</w>`` (512) + one entry per
    learned merge + ``<|startoftext|>``, ``<|endoftext|>`` (the last two ids).
    Written as CLIP's own vocab.json / merges.txt and loaded the way a hub
    checkpoint is, so any transformers version reads it the same way.
    ``model_max_length`` is the padded prompt length the pipelines use (77 in real checkpoints; the CPU world
    uses a short one so its denoiser attends over few text tokens).
    """
    byte_chars = list(_bytes_to_unicode().values())
    merges = _learn_bpe_merges(tuple(lines) if lines is not None else tuple(corpus_lines()), _CLIP_NUM_MERGES)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


@functools.lru_cache(maxsize=None)
def _t5_sentencepiece_model(lines: tuple[str, ...], model_type: str = "unigram") -> bytes:
    """Serialized sentencepiece model (``model_type``) trained on ``lines`` (pad=0, eos=1, unk=2, no bos)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=_T5_VOCAB_SIZE,
        hard_vocab_limit=False,  # the corpus is small; take what it supports
        model_type=model_type,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # reproducible EM
        minloglevel=2,
    )
    return model.getvalue()


def build_t5_tokenizer(lines: tuple[str, ...] | None = None, model_type: str = "unigram") -> T5TokenizerFast:
    """T5-style tokenizer learned from ``lines`` (default: the built-in corpus): the sentencepiece pieces, then
    ``<extra_id_*>`` sentinels.  ``model_type`` is sentencepiece's (T5's is ``unigram``; on a corpus of a few
    dozen short captions unigram keeps single characters, ``word`` gives one piece per word).

    Written as T5's own spiece.model and loaded the way a hub checkpoint is.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "spiece.model").write_bytes(
            _t5_sentencepiece_model(tuple(lines) if lines is not None else tuple(corpus_lines()), model_type))
        return T5TokenizerFast.from_pretrained(folder, extra_ids=_T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------------------
# text encoders (shared)
# ---------------------------------------------------------------------------


def build_clip_text_encoder(
    tokenizer: CLIPTokenizer, seed: int, component: str, with_projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text tower: 2 layers, hidden 32 (q/k/v/out_proj 32x32, fc1 32->64), 4 heads.

    ``with_projection`` adds ``text_projection`` 32->32 (``text_embeds`` [B, 32]);
    without it the pooled output is ``pooler_output`` [B, 32].
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=2 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH,
        num_hidden_layers=2,  # SDXL/SD3 read hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the EOS position
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with seeded(seed, component):
        return cls(config).eval()


def build_t5_encoder(tokenizer: T5TokenizerFast, seed: int, component: str, d_model: int) -> T5EncoderModel:
    """Tiny T5 v1.1-style encoder: 2 layers, ``d_model`` wide, 4 heads of d_model/4, gated-GELU FFN."""
    config = T5Config(
        vocab_size=len(tokenizer),  # sentencepiece pieces + <extra_id_*> sentinels
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with seeded(seed, component):
        return T5EncoderModel(config).eval()


# ---------------------------------------------------------------------------
# VAE (shared)
# ---------------------------------------------------------------------------


def build_vae(seed: int, latent_channels: int, flow_style: bool, **config) -> AutoencoderKL:
    """Tiny AutoencoderKL with 4 blocks, so ``vae_scale_factor`` = 8: image [B,3,64,64] <-> latent [B,C,8,8].

    ``flow_style`` mirrors the SD3/FLUX VAE (no quant convs); otherwise SDXL's (with them).
    Remaining keyword arguments (scaling/shift factors) go straight into the config.
    """
    with seeded(seed, "vae"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=latent_channels,
            sample_size=64,
            use_quant_conv=not flow_style,
            use_post_quant_conv=not flow_style,
            **config,
        )
    return vae.eval()


# ---------------------------------------------------------------------------
# schedulers shared by the families (each family's own pipeline: ``Backbone.tiny_pipeline``)
# ---------------------------------------------------------------------------


def flow_match_scheduler(dynamic_shifting: bool) -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler config, or FLUX's resolution-dependent (``mu``) shifting one."""
    if dynamic_shifting:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)




# ---------------------------------------------------------------------------
# reuse / refusal checks and atomic write
# ---------------------------------------------------------------------------


def _describe_existing(path: pathlib.Path) -> tuple[str, dict] | None:
    """Return (backbone, marker) if ``path`` holds a complete tiny pipeline, else None."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    backbone = marker.get("backbone")
    if backbone not in _PIPELINE_CLASSES or index.get("_class_name") != _PIPELINE_CLASSES[backbone].__name__:
        return None
    for name, value in index.items():
        # components look like  "vae": ["diffusers", "AutoencoderKL"]; optional ones are [null, null]
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if not (path / name).is_dir() or not any((path / name).iterdir()):
            return None
    return backbone, marker


def holds_pipeline(path: pathlib.Path, backbone: str, seed: int) -> bool:
    """True if ``path`` already holds the requested pipeline; False if it is free; raise if foreign."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise TinyPipelineError(f"{path} exists and is not a directory; refusing to touch it")
    if not any(path.iterdir()):
        return False
    found = _describe_existing(path)
    if found is None:
        raise TinyPipelineError(
            f"{path} is not empty and holds no complete qrlora.tiny pipeline; refusing to touch it"
        )
    if found[0] != backbone:
        raise TinyPipelineError(f"{path} holds a tiny {found[0]} pipeline, not {backbone}; refusing to touch it")
    if found[1].get("seed") != seed:
        raise TinyPipelineError(
            f"{path} holds a tiny {backbone} pipeline built with seed {found[1].get('seed')}, not {seed}; "
            "refusing to touch it"
        )
    return True


def build_tiny_pipeline(backbone: str, output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build (or reuse) a tiny random ``backbone`` pipeline in ``output_dir`` and return its path.

    ``backbone`` is one of :data:`BACKBONES`.  The result loads offline with
    ``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``StableDiffusionXLPipeline``
    ``.from_pretrained(output_dir)``.  The same seed always gives bit-identical weights.

    If ``output_dir`` already holds a complete tiny pipeline of the same backbone
    and seed it is reused untouched.  If it is a non-empty folder holding anything
    else, :class:`TinyPipelineError` (a ``FileExistsError``) is raised and nothing
    is written.  The pipeline is built in a temporary sibling folder and renamed
    into place, so an interrupted build never leaves a half-written ``output_dir``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    seed = int(seed)
    path = pathlib.Path(output_dir).expanduser().absolute()
    if holds_pipeline(path, backbone, seed):
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        pipe = BACKBONE_REGISTRY[backbone].tiny_pipeline(seed, sys.modules[__name__])
        with no_progress_bars():
            pipe.save_pretrained(tmp, safe_serialization=True)
        marker = {"builder": "qrlora.tiny", "version": _MARKER_VERSION, "backbone": backbone, "seed": seed}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty target folder may be replaced
        try:
            os.rename(tmp, path)
        except OSError:
            # Someone else filled ``path`` meanwhile: fine if it is what we wanted.
            if holds_pipeline(path, backbone, seed):
                return path
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
