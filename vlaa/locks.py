"""One writer per output: an exclusive lock on what a stage writes, taken before any model loads.

Two processes appending to one JSONL write every record twice; two trainers resuming one run folder log
the same steps twice and race on its checkpoints. So every stage holds a lock while it runs:

    hold(OUT + ".lock")              01 and 02 (through vlaa.datastage.run_stage): beside the output file
    hold(os.path.join(OUT, ".lock")) 03, 04, 05 and 06: inside the output folder (runs.hold_run_folder under
                                     torchrun: rank 0 holds it for the whole job)

A second start on the same output stops at once, naming the process that holds it (pid, host, command,
since when). The lock is fcntl.flock on the lock file: the kernel drops it when its holder exits, however
it exits (SIGKILL included), so a stale lock file never blocks a rerun and is never deleted (deleting a lock
file races with the next locker). flock works on local disks and on NFS (Linux emulates it with byte-range
locks); on a filesystem without locks, hold() says so instead of running unguarded.
"""

import fcntl
import json
import os
import socket
import sys
import time

_held = {}  # realpath of a lock file -> its open file: the lock lives as long as the file stays open


def _holder(f):
    """What the holder wrote into the lock file, as one line for the message."""
    f.seek(0)
    try:
        who = json.loads(f.read(4096) or "{}")
    except ValueError:
        who = {}
    if not who:
        return "another process (it has not written its name yet)"
    return (f"pid {who.get('pid')} on {who.get('host')} ({who.get('command')}), since {who.get('since')}")


def hold(lock_path, what=None):
    """Hold an exclusive lock on lock_path until this process exits (or release()); a second holder is refused
    with SystemExit naming the first. Taking it again in the same process is a no-op (a stage called twice in
    one process, as the tests do)."""
    key = os.path.realpath(lock_path)
    f = _held.pop(key, None)
    if f is not None:  # held already, unless its file was deleted with its folder since (a run redone afresh)
        if os.path.exists(key) and os.path.samestat(os.fstat(f.fileno()), os.stat(key)):
            _held[key] = f
            return
        f.close()
    os.makedirs(os.path.dirname(key), exist_ok=True)
    f = open(key, "a+", encoding="utf-8")  # a+: never truncates what the holder wrote
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(f)
        f.close()
        raise SystemExit(f"{what or lock_path} is being written by {holder}; two writers would mix their "
                         f"records. Wait for it to end or stop it, or use another --out (lock: {lock_path})") from None
    except OSError as e:
        f.close()
        raise SystemExit(f"{lock_path}: cannot lock ({e}); use an --out on a filesystem with locks") from None
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    f.flush()
    _held[key] = f


def release(lock_path):
    """Give the lock up (the end of a trainer called in-process); the file stays for the next holder."""
    f = _held.pop(os.path.realpath(lock_path), None)
    if f is not None:
        f.close()
