"""Safe loading of PyTorch files: ``torch.load(weights_only=True)``, one line per problem."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first.split(". ", 1)[0][:limit]  # torch's messages go on with advice that does not apply


def state_dict_error(error: BaseException, limit: int = 300) -> str:
    """One line out of ``load_state_dict``'s multi-line RuntimeError (missing / unexpected / size mismatch)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text[:limit] + ("..." if len(text) > limit else "")


def _unsafe_reason(message: str) -> str:
    """What a refused pickle asked for, from torch's weights_only error text."""
    found = re.search(r"GLOBAL ([\w.<>]+)", message)
    if found:
        return f"it needs {found.group(1)}, which is not a tensor or plain container"
    found = re.search(r"(Unsupported operand [^\n.]*)", message)
    if found:
        return f"it uses pickle instructions torch's safe loader does not allow ({found.group(1).strip()})"
    return "it needs objects other than tensors and plain containers"


def load_weights_only(path: str | os.PathLike, *, what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` to CPU; FileNotFoundError / ValueError name the file and problem.

    A pickle that needs anything beyond tensors and plain containers (custom classes, ``os.system``, ...)
    is refused by torch's restricted unpickler before anything in it runs; the message says so.

    Args:
        what: what the file should be, for messages ("checkpoint", "deploy file").
        hint: the fix appended to every message.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file{tail}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what} file{tail}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file, not a {what}{tail}")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_OPCODE)):
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise ValueError(f"{path}: not a {what} (it holds {kind}, not a PyTorch file){tail}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every load failure is a bad file for the user
        message = str(err)
        if "Weights only load failed" in message or "weights_only" in message.split("\n", 1)[0]:
            raise ValueError(
                f"{path}: refused as unsafe: {_unsafe_reason(message)}; it was not loaded and nothing in "
                f"it was run (only tensors and plain containers are read, torch.load weights_only=True){tail}"
            ) from None
        raise ValueError(f"{path}: corrupt or truncated {what} ({_first_line(err)}){tail}") from None
