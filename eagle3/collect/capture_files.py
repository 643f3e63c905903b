"""The connector's per-request capture files: their names (a tag per client), the space they need
in flight, reading one under its writer's lock, and removing a client's leftovers."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from eagle3.collect.server_pool import ServerError


def client_tag(output_dir: str | os.PathLike, rank: int) -> str:
    """Prefix of this client's request ids, hence of the connector's file names (``cmpl-<id>-<random>``):
    one per output directory and rank, so a client removes its own orphans and never the files of
    another client sharing ``--hidden-states-dir`` (another rank, another output directory)."""
    digest = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    return f"eagle3-{digest}-r{rank:02d}-"


def capture_bytes_in_flight(
    concurrent_requests: int, servers: int, max_length: int, num_ids: int, hidden_size: int, element_size: int = 2
) -> int:
    """Most bytes of capture files this client can have waiting in --hidden-states-dir: one file of up
    to --max-length tokens x captured states x hidden size (the server's dtype, bf16: 2 bytes) per
    conversation of its window (2 x --concurrent-requests x servers, see ``VllmBackend.samples``)."""
    return 2 * concurrent_requests * servers * max_length * num_ids * hidden_size * element_size


def space_note(hidden_states_dir: str, needed: int) -> str | None:
    """A warning when --hidden-states-dir has less free space than ``needed`` (None: it fits)."""
    path = Path(hidden_states_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    if free >= needed:
        return None
    return (
        f"--hidden-states-dir {hidden_states_dir} has {free / 2**30:.1f} GiB free, but the capture files of the "
        f"conversations in flight may take up to {needed / 2**30:.1f} GiB (every one --max-length tokens long): a "
        "full disk loses captures (each is retried). Free space there, point it elsewhere (/dev/shm when it is "
        "large enough: the files live a few seconds) or lower --concurrent-requests."
    )


def remove_orphans(hidden_states_dir: str, tag: str) -> int:
    """Delete this client's files left by an earlier run (killed between the server's write and
    our read, or requests abandoned when a server went down); returns how many."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(hidden_states_dir), f"*{tag}*.safetensors*")):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class LostFile(Exception):
    """The server answered but its file is missing or incomplete (it died while writing)."""


class LockTimeout(Exception):
    """The capture file stayed locked by its writer past the wait (a frozen server, a stalled filesystem)."""


LOCK_POLL_SECONDS = (0.002, 0.02)  # first and longest sleep between tries of the capture file's lock: a
# file written while we wait is read within 20 ms (a 200 ms cap made a capture of a few ms wait up to 0.2 s)


def _lock_shared(lock, timeout: float) -> None:
    """Shared flock on ``lock``, waiting at most ``timeout`` seconds. A blocking flock in a thread
    could never be given up: a frozen writer would hang the run past --request-timeout."""
    deadline = time.monotonic() + timeout
    pause = LOCK_POLL_SECONDS[0]
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{lock.name} was still locked by its writer after {timeout:g} s") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, LOCK_POLL_SECONDS[1])


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def read_hidden_states(path: str, lock_timeout: float) -> dict[str, torch.Tensor]:
    """Read a connector file once its writer released the lock (``LockTimeout`` after
    ``lock_timeout`` seconds), then delete both files."""
    lock_path = path + ".lock"
    if not os.path.exists(path) and not os.path.exists(lock_path):
        raise ServerError(
            f"the server wrote {path}, which is not visible on this machine: run_collect.py and the "
            "vLLM server must share a filesystem (see --hidden-states-dir)."
        )
    try:
        if os.path.exists(lock_path):
            with open(lock_path) as lock:
                _lock_shared(lock, lock_timeout)  # until the writer thread is done (or died)
                data = load_file(path)
            os.remove(lock_path)
        else:
            data = load_file(path)
    except (FileNotFoundError, SafetensorError) as error:
        _remove(path, lock_path)
        raise LostFile(f"{path}: {error}") from None
    except LockTimeout:
        # Given up: a writer that wakes up later leaves a file that close() removes (by tag).
        _remove(path, lock_path)
        raise
    os.remove(path)
    return data
