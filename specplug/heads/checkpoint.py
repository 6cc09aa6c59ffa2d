"""Head checkpoints: a folder with ``config.json`` (``HeadConfig``) and ``model.safetensors``
(the trained weights and ``draft_vocab``). Never pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from specplug.files import atomic_write_text, temporary_sibling
from specplug.heads.config import HeadConfig
from specplug.heads.nets import DraftNet, build_net

__all__ = ["save_head", "load_head", "CHECKPOINT_FILES"]

CHECKPOINT_FILES = ("config.json", "model.safetensors")


def save_head(net: DraftNet, folder: str | os.PathLike[str],
              dtype: torch.dtype = torch.bfloat16, metadata: dict[str, str] | None = None
              ) -> Path:
    """Write ``net`` to ``folder`` (floating weights in ``dtype``; ``draft_vocab`` int64)."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in net.state_dict().items()}
    config = net.config.model_dump_json(indent=2) + "\n"
    weights = temporary_sibling(out / "model.safetensors")
    try:  # weights first, each file atomically; the weights name their config's sha256, so
        # a pair that a killed save left mismatched is refused by load_head, never mixed
        save_file(state, str(weights), metadata={**(metadata or {}),
                                                 CONFIG_DIGEST: _sha256(config.encode())})
        os.replace(weights, out / "model.safetensors")
    finally:
        weights.unlink(missing_ok=True)
    atomic_write_text(out / "config.json", config)
    return out


#: safetensors metadata key: the sha256 of the config.json saved with these weights
CONFIG_DIGEST = "specplug_config_sha256"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _check_pair(path: Path) -> None:
    """Refuse weights saved with another config.json than the one beside them (a save killed
    between its two files). Checkpoints from before the digest carry none and pass."""
    from safetensors import SafetensorError, safe_open

    from specplug.errors import InputFileError

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            want = (f.metadata() or {}).get(CONFIG_DIGEST)
    except SafetensorError:
        return  # load_safetensors reports a damaged file with its own message
    if want is not None and want != _sha256((path / "config.json").read_bytes()):
        raise InputFileError(f"{path}: model.safetensors was saved with another config.json "
                             "than the one beside it (a save was interrupted): save or train "
                             "the head again")


def load_head(folder: str | os.PathLike[str]) -> DraftNet:
    """Load a head saved by ``save_head``, or a published Medusa / EAGLE head in its authors'
    layout (``specplug.heads.foreign``), as float32 on CPU. Raises a clear error on a folder
    that is no head, a pickle checkpoint, or weights that do not fit the config."""
    from pydantic import ValidationError

    from specplug.errors import InputFileError, load_safetensors, read_json

    path = Path(folder)
    if not path.is_dir():
        raise InputFileError(f"head checkpoint {path}: no such folder (expected one holding "
                             f"{', '.join(CHECKPOINT_FILES)}, as `specplug train --out` writes)")
    if not (path / "config.json").is_file():
        raise InputFileError(f"{path} is not a head checkpoint: no config.json "
                             f"(expected {', '.join(CHECKPOINT_FILES)})")
    raw = read_json(path / "config.json", "head config")
    if not isinstance(raw, dict):
        raise InputFileError(f"head config {path / 'config.json'}: not a JSON object")
    if raw.get("format") != "specplug-head":
        from specplug.heads.foreign import load_foreign

        return load_foreign(path)  # FasterDecoding/Medusa or SafeAILab/EAGLE layouts
    try:
        config = HeadConfig.model_validate(raw)
    except ValidationError as err:
        raise InputFileError(f"head config {path / 'config.json'}: {err}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" ({', '.join(pickles)} found: pickle checkpoints are never loaded; convert "
                "them to safetensors)") if pickles else ""
        raise InputFileError(f"{path}: no model.safetensors{hint}")
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in load_safetensors(weights, "head weights").items()}
    _check_pair(path)
    net = build_net(config, state.get("draft_vocab"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a {config.kind} head with this config "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return net.eval()
