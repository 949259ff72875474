"""Where a run's instance images and their captions come from: one ``Example`` per image, before any pixel loads.

Each image's caption is, in this order: a dataset's ``--caption_column`` value; a sidecar file of the same stem
(``img0.png`` -> ``img0.txt``, ``--caption_extension`` as kohya's sd-scripts name it); for kohya's ``N_name/``
subfolders, the folder's ``name``; otherwise ``--instance_prompt``. ``--caption_prefix`` goes in front of every
caption read from the data (a trigger word for captions written without one); the instance prompt is used as typed.
Images without a caption of their own get the instance prompt, counted in one warning, or are refused with
``--require_captions``. A caption file that is not UTF-8 or is empty is refused naming the file.
"""
from __future__ import annotations

import csv
import io
import json
import re
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
        if any(name in ("metadata.jsonl", "metadata.csv") for name in other):
            other = [f"{n} (an imagefolder's captions: pass the folder as --dataset_name)" if n in ("metadata.jsonl", "metadata.csv")
                     else n for n in other]
        kinds = f"images ({', '.join(sorted(IMAGE_EXTENSIONS))})" + (f" nor captions (*{caption_extension})" if caption_extension else "")
        warn(f"{flag}: ignored {len(other)} file(s) in {folder} that are neither {kinds}: {', '.join(other)}")
    return images, captions


def folder_examples(folder: str | Path, rules: CaptionRules, repeats: int = 1) -> list[Example]:
    """The ``Example`` of every image in ``folder`` with its sidecar caption, else the instance prompt; kohya's
    ``N_name/`` subfolders add their images with ``N`` repeats and ``name`` as the caption of those without one.

    Raises:
        UserError: naming the flag or file: the folder is missing or empty, holds no image, a caption file is bad,
            or images lack a caption where there is no instance prompt (or ``--require_captions``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{rules.flag}: folder {folder} does not exist")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UserError(f"{rules.flag}: folder {folder} is empty")
    examples = []
    if any(p.is_file() for p in entries):
        examples += _captioned(folder, folder, rules, repeats, fallback=None)
    subfolders = sorted(p for p in entries if p.is_dir())
    kohya = [(p, KOHYA_FOLDER.fullmatch(p.name)) for p in subfolders]
    skipped = [p.name for p, match in kohya if not match]
    if skipped:
        warn(f"{rules.flag}: ignored {len(skipped)} subfolder(s) of {folder} not named like kohya's <repeats>_<name> "
             f"(e.g. 10_sks dog): {', '.join(skipped)}")
    for sub, match in kohya:
        if match and int(match["repeats"]) < 1:
            raise UserError(f"{rules.flag}: {sub} repeats its images {match['repeats']} times; use 1 or more")
        if match:
            examples += _captioned(sub, folder, rules, repeats * int(match["repeats"]), fallback=match["name"].strip())
    if not examples:
        raise UserError(f"{rules.flag}: folder {folder} holds no readable image")
    return complete_captions(examples, rules, folder)


KOHYA_FOLDER = re.compile(r"(?P<repeats>\d+)_(?P<name>.+)")


def _captioned(folder: Path, root: Path, rules: CaptionRules, repeats: int, fallback: str | None) -> list[Example]:
    """The images of one folder with their sidecar captions, else ``fallback`` (a kohya folder's name), else the
    instance prompt; names relative to ``root``."""
    images, captions = scan_folder(folder, rules.flag, rules.caption_extension)
    orphans = sorted(set(captions) - {p.stem for p in images})
    if orphans:
        warn(f"{rules.flag}: {len(orphans)} caption file(s) in {folder} match no image: "
             + ", ".join(captions[stem].name for stem in orphans))
    examples = []
    for path in images:
        name = path.relative_to(root).as_posix()
        if path.stem in captions:
            examples.append(Example(path, name, rules.with_prefix(read_caption(captions[path.stem])), FROM_SIDECAR, repeats))
        elif fallback:
            examples.append(Example(path, name, rules.with_prefix(fallback), FROM_FOLDER, repeats))
        else:
            examples.append(Example(path, name, rules.instance_prompt or "", FROM_INSTANCE_PROMPT, repeats))
    return examples


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


def dataset_examples(name: str, rules: CaptionRules, image_column: str = "image", caption_column: str | None = None,
                     repeats: int = 1) -> list[Example]:
    """The ``Example`` of every row of a ``datasets`` dataset: a local HF imagefolder (images plus
    ``metadata.jsonl`` / ``metadata.csv``), a folder written by ``save_to_disk``, or a hub id; its ``train`` split.

    Captions come from ``caption_column`` (default: ``text`` where the dataset has it), else the instance prompt.

    Raises:
        UserError: naming the flag, file, line or column: no ``datasets`` package, a hub id without network, a
            metadata line that is not JSON or names a missing file, a missing column.
    """
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset_name needs the datasets package: pip install datasets") from None
    folder = Path(name)
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))
        elif folder.is_dir():
            check_metadata(folder, caption_column)
            loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))
        else:
            loaded = datasets.load_dataset(name)
    except UserError:
        raise
    except Exception as err:  # hub, network and format errors come in many types; all mean "cannot load it"
        where = "a local folder" if folder.is_dir() else "not a local folder; the hub could not be reached or has no such dataset"
        raise UserError(f"--dataset_name {name}: cannot load it ({where}): {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    columns = loaded.column_names
    if image_column not in columns:
        raise UserError(f"--image_column {image_column!r}: dataset {name} has no such column (it has: {', '.join(columns)})")
    if caption_column is not None and caption_column not in columns:
        raise UserError(f"--caption_column {caption_column!r}: dataset {name} has no such column (it has: {', '.join(columns)})")
    caption_column = caption_column or ("text" if "text" in columns else None)
    rows = loaded.cast_column(image_column, datasets.Image(decode=False))  # file names kept; PIL decodes below
    examples = []
    for index, row in enumerate(rows):
        image = row[image_column]
        label = Path(image["path"]).name if image.get("path") else f"row {index}"
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        try:
            decoded = Image.open(source)
            decoded.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise UserError(f"--dataset_name {name}: image {label} does not open ({type(err).__name__})") from None
        caption = row[caption_column] if caption_column else None
        if caption is not None and not isinstance(caption, str):
            raise UserError(f"--caption_column {caption_column!r}: {label}'s value {caption!r} is not text")
        caption = " ".join(caption.split()) if caption else ""
        if caption:
            examples.append(Example(decoded, label, rules.with_prefix(caption), FROM_COLUMN, repeats))
        else:
            examples.append(Example(decoded, label, rules.instance_prompt or "", FROM_INSTANCE_PROMPT, repeats))
    if not examples:
        raise UserError(f"--dataset_name {name}: the dataset has no rows")
    return complete_captions(examples, rules, f"dataset {name}")


def check_metadata(folder: Path, caption_column: str | None) -> None:
    """An imagefolder's ``metadata.jsonl`` / ``metadata.csv`` checked line by line before ``datasets`` reads it, so
    a fault names its file and line: not JSON, no ``file_name``, a file that does not exist, no caption column."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    rows = []
    if jsonl.is_file():
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"--dataset_name: {jsonl} line {number} is not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"--dataset_name: {jsonl} line {number} is not a JSON object")
            rows.append((f"{jsonl} line {number}", row))
    elif table.is_file():
        with open(table, newline="", encoding="utf-8") as handle:
            rows = [(f"{table} line {number}", row) for number, row in enumerate(csv.DictReader(handle), 2)]
    for where, row in rows:
        if "file_name" not in row:
            raise UserError(f"--dataset_name: {where} has no file_name")
        if not (folder / str(row["file_name"])).is_file():
            raise UserError(f"--dataset_name: {where}: file_name {row['file_name']!r} does not exist in {folder}")
        if caption_column is not None and caption_column not in row:
            raise UserError(f"--caption_column {caption_column!r}: {where} has no such key (it has: {', '.join(row)})")
