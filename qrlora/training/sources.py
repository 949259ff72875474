"""Where a run's instance images and their captions come from: one ``Example`` per image, before any pixel loads.

Each image's caption is, in this order: a dataset's ``--caption_column`` value; a sidecar file of the same stem
(``img0.png`` -> ``img0.txt``, ``--caption_extension`` as kohya's sd-scripts name it); for kohya's ``N_name/``
subfolders, the folder's ``name``; otherwise ``--instance_prompt``. ``--caption_prefix`` goes in front of every
caption read from the data (a trigger word for captions written without one); the instance prompt is used as typed.
Images without a caption of their own get the instance prompt, counted in one warning, or are refused with
``--require_captions``. A caption file that is not UTF-8 or is empty is refused naming the file.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: caption_source values, as dataset.json records them
FROM_COLUMN, FROM_SIDECAR, FROM_FOLDER, FROM_INSTANCE_PROMPT = "caption column", "caption file", "folder name", "instance prompt"


@dataclass(frozen=True)
class Example:
    """One training image: ``image`` (a file, or a decoded image from a dataset), its ``name`` in ``dataset.json``
    (path relative to the data folder, or the dataset row), the ``caption`` as trained on (prefix applied), where
    the caption came from (``caption_source``) and how many copies an epoch holds (``repeats``)."""

    image: Path | Image.Image
    name: str
    caption: str
    caption_source: str
    repeats: int = 1


@dataclass(frozen=True)
class CaptionRules:
    """How captions are found and completed (the data flags of ``TrainSettings``)."""

    instance_prompt: str | None = None
    caption_extension: str = ".txt"
    caption_prefix: str | None = None
    require_captions: bool = False
    flag: str = "--instance_data_dir"

    @classmethod
    def of(cls, settings) -> CaptionRules:
        return cls(instance_prompt=settings.instance_prompt, caption_extension=settings.caption_extension,
                   caption_prefix=settings.caption_prefix, require_captions=settings.require_captions)

    def with_prefix(self, caption: str) -> str:
        """``--caption_prefix`` then the caption, one space between (kohya's ``caption_prefix``)."""
        return f"{self.caption_prefix.strip()} {caption}" if self.caption_prefix and self.caption_prefix.strip() else caption


def read_caption(path: Path) -> str:
    """A caption file's text, surrounding whitespace and line breaks folded to single spaces.

    Raises:
        UserError: naming the file when it is not UTF-8 text or holds no caption.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM some editors write is not part of the caption
    except UnicodeDecodeError as err:
        raise UserError(f"caption file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    caption = " ".join(text.split())
    if not caption:
        raise UserError(f"caption file {path} is empty; write the image's caption in it or delete it")
    return caption


def scan_folder(folder: Path, flag: str, caption_extension: str | None) -> tuple[list[Path], dict[str, Path]]:
    """The images of ``folder`` (name order, headers readable) and its caption files by stem. Files that are
    neither are named in one warning that says what they are; images PIL cannot open in another."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, captions, unreadable, other = [], {}, [], []
    for path in files:
        if caption_extension and path.name.lower().endswith(caption_extension.lower()) and path.suffix.lower() not in IMAGE_EXTENSIONS:
            captions[path.name[: -len(caption_extension)]] = path
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(path):
                    images.append(path)
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                unreadable.append(f"{path.name} ({'larger than PIL allows' if isinstance(err, Image.DecompressionBombError) else 'not a readable image'})")
        else:
            other.append(path.name)
    if unreadable:
        warn(f"{flag}: skipped {len(unreadable)} image file(s) in {folder} that do not open: {', '.join(unreadable)}")
    if other:
        kinds = f"images ({', '.join(sorted(IMAGE_EXTENSIONS))})" + (f" nor captions (*{caption_extension})" if caption_extension else "")
        warn(f"{flag}: ignored {len(other)} file(s) in {folder} that are neither {kinds}: {', '.join(other)}")
    return images, captions


def folder_examples(folder: str | Path, rules: CaptionRules, repeats: int = 1) -> list[Example]:
    """The ``Example`` of every image in ``folder`` with its sidecar caption, else the instance prompt.

    Raises:
        UserError: naming the flag or file: the folder is missing or empty, holds no image, a caption file is bad,
            or images lack a caption where there is no instance prompt (or ``--require_captions``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{rules.flag}: folder {folder} does not exist")
    if not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        raise UserError(f"{rules.flag}: folder {folder} is empty")
    images, captions = scan_folder(folder, rules.flag, rules.caption_extension)
    if not images:
        raise UserError(f"{rules.flag}: folder {folder} holds no readable image")
    found = {path: captions.get(path.stem) for path in images}
    orphans = sorted(set(captions) - {p.stem for p in images})
    if orphans:
        warn(f"{rules.flag}: {len(orphans)} caption file(s) in {folder} match no image: "
             + ", ".join(captions[stem].name for stem in orphans))
    examples = []
    for path, sidecar in found.items():
        if sidecar is not None:
            examples.append(Example(path, path.name, rules.with_prefix(read_caption(sidecar)), FROM_SIDECAR, repeats))
        else:
            examples.append(Example(path, path.name, rules.instance_prompt or "", FROM_INSTANCE_PROMPT, repeats))
    return complete_captions(examples, rules, folder)


def complete_captions(examples: list[Example], rules: CaptionRules, where) -> list[Example]:
    """Check the images that fell back to the instance prompt: refused without one or with ``--require_captions``,
    else counted in one warning when other images have captions of their own."""
    missing = [e.name for e in examples if e.caption_source == FROM_INSTANCE_PROMPT]
    if not missing:
        return examples
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    ext = f"*{rules.caption_extension}" if rules.caption_extension else "a caption"
    if rules.require_captions:
        raise UserError(f"--require_captions: {len(missing)} of {len(examples)} image(s) in {where} have no caption "
                        f"({ext}): {shown}")
    if rules.instance_prompt is None:
        raise UserError(f"--instance_prompt is required: {len(missing)} of {len(examples)} image(s) in {where} have no "
                        f"caption ({ext}): {shown}")
    if len(missing) < len(examples):
        warn(f"{len(missing)} of {len(examples)} image(s) in {where} have no caption ({ext}) and train on "
             f"--instance_prompt {rules.instance_prompt!r}: {shown}")
    return examples


def warn(message: str) -> None:
    """One data warning (a ``UserWarning``, as PIL's and the image loader's are)."""
    warnings.warn(message, stacklevel=3)


def caption_counts(examples: list[Example]) -> dict[str, int]:
    """Images per caption source (``dataset.json``'s summary)."""
    return dict(Counter(e.caption_source for e in examples))
