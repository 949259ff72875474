"""``--push_to_hub``: upload a finished run folder to the Hugging Face Hub through ``huggingface_hub``'s own API.

The upload is what diffusers' training scripts do at the end of training (``create_repo`` then ``upload_folder``);
checkpoints and logs stay local, the adapter, the kohya file, the model card and the validation images go up.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..errors import UserError

IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "wandb/**", "*.tmp"]


def push_run_folder(folder: str | Path, repo_id: str, token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the commit URL.

    Raises:
        UserError: the hub could not be reached or refused the upload (the run folder stays as it is).
    """
    folder = Path(folder)
    try:
        repo = create_repo(repo_id, exist_ok=True, token=token, repo_type="model")
        commit = upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(folder), token=token,
                               commit_message="QR-LoRA training run", ignore_patterns=IGNORE_PATTERNS)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--push_to_hub: uploading {folder} to {repo_id} failed ({reason}); the run is intact in {folder}") from None
    return str(getattr(commit, "commit_url", commit))
