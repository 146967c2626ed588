"""Policy weights files: npz archives of arrays plus a JSON ``__meta__`` entry, never a pickle.

    params, meta = read_weights(path)              # PolicyError if it is not a policy file
    write_weights(path, params, meta)              # atomically: a temporary file, then os.replace
    machine_policy_path()                          # <data dir>/policy-<machine>.npz (``looptune train``)
    machine_policy_problem(meta)                   # why such a file cannot serve here, or None

Two files matter: the policy shipped in the package (``SHIPPED_WEIGHTS``) and this machine's
own, fine-tuned on its measurements by ``looptune train`` and kept next to the user's schedule
database (``recordings.data_dir``), named by the machine.  A machine policy is keyed by the
machine without the code generator's version (``policy_identity``): what a policy learned about
a CPU's caches and vector units outlives a code-generator release, as long as its action space
and observation encoding are this build's.  Which file serves is ``policy.Policy.in_use``'s choice.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from looptune.database import MachineKey
from looptune.database.atomic import replace_atomically
from looptune.runtime.compiler.errors import LoopTuneError
from looptune.tuner.agent.actions import ACTION_NAMES, ACTION_SPACE_VERSION
from looptune.tuner.agent.observe import OBSERVATION_VERSION
from looptune.tuner.measure.recordings import data_dir, identity_slug

SHIPPED_WEIGHTS = os.path.join(os.path.dirname(__file__), "data", "policy.npz")
META_KEY = "__meta__"


class PolicyError(LoopTuneError, RuntimeError):
    """Weights missing, or trained for another action space or observation encoding."""


def _load_error_text(e: Exception) -> str:
    """Why weights could not be read, in words (numpy reads any bytes that are neither .npy nor
    .npz as a pickle, and then refuses it)."""
    if isinstance(e, ValueError) and "pickled" in str(e):
        return "not an .npz archive of arrays; numpy would read it as a pickle, which is never loaded"
    if isinstance(e, KeyError):
        return f"missing {e.args[0] if e.args else e}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the metadata of a weights file; ``PolicyError`` naming the file if it is
    missing or not a policy file (an ``OSError`` other than a missing file propagates)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PolicyError(f"no policy weights at {path}")
    try:
        z = np.load(path, allow_pickle=False)     # never unpickle: a policy file is arrays and JSON
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            params = {k: z[k] for k in z.files if k != META_KEY}
            if META_KEY not in z.files:
                raise ValueError("no __meta__ entry")
            meta = json.loads(z[META_KEY].tobytes().decode())
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("its __meta__ is not a policy's metadata")
        return params, meta
    except (ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PolicyError(f"{path}: not a LoopTune policy file ({_load_error_text(e)})") from None


def write_weights(path: str | os.PathLike, params: Mapping[str, np.ndarray], meta: Mapping) -> None:
    """Write a weights file atomically (``database.atomic.replace_atomically``): the archive goes
    to a temporary file in the same folder, is flushed to disk, and replaces ``path`` in one
    rename, so a process killed while saving leaves the previous file as it was (and a failed
    save leaves no temporary behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    arrays[META_KEY] = np.frombuffer(json.dumps(dict(meta)).encode(), dtype=np.uint8)

    def write(temp: str) -> None:
        with open(temp, "wb") as f:      # a file object: numpy adds no ".npz" to the temporary's name
            np.savez_compressed(f, **arrays)

    replace_atomically(str(path), write)


def policy_identity(machine: MachineKey) -> dict:
    """The machine a machine policy is trained for: its key without the code generator's version."""
    identity = machine.to_dict()
    identity.pop("codegen_version", None)
    return identity


def machine_policy_path(machine: Optional[MachineKey] = None) -> Path:
    """This machine's policy file (``machine``: its key, if already known)."""
    machine = machine or MachineKey.current()
    return data_dir() / f"policy-{identity_slug(policy_identity(machine))}.npz"


def version_problem(meta: Mapping) -> Optional[str]:
    """Why weights with this metadata cannot drive this build's agent (None: they can)."""
    actions = meta.get("actions", ())
    if meta.get("action_space") != ACTION_SPACE_VERSION or not isinstance(actions, (list, tuple)) \
            or tuple(actions) != ACTION_NAMES:
        return f"trained for action space {meta.get('action_space')!r}, this build has {ACTION_SPACE_VERSION!r}"
    if meta.get("observation") != OBSERVATION_VERSION:
        return f"trained for observation {meta.get('observation')!r}, this build has {OBSERVATION_VERSION!r}"
    return None


def machine_policy_problem(meta: Mapping, machine: MachineKey) -> Optional[str]:
    """Why a machine policy file with this metadata cannot serve on ``machine`` (None: it can)."""
    version = version_problem(meta)
    if version is not None:
        return version
    trained_on = meta.get("machine")
    if not isinstance(trained_on, dict):
        return "it does not say which machine it was trained on"
    if trained_on != policy_identity(machine):
        return f"trained on another machine ({trained_on.get('cpu_model', '?')}, {trained_on.get('isa', '?')}, " \
               f"{trained_on.get('cores', '?')} cores, {trained_on.get('compiler', '?')})"
    return None
