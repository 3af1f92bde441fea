"""math-verify in helper processes that are killed when late: the engine under rewards.math_reward.

sympy (under math-verify) can hang on `9^{9^{9^9}}` inside C code that no signal interrupts, and
math-verify's own timeouts use signals, which fail off the main thread. So each check runs in a worker
process with a hard deadline: a late worker is killed and a warm one takes its place in milliseconds.

    ask_math(gold, pred, timeout) -> 1.0, 0.0, or None when the check was too slow

Safe from any thread or process. Helpers are started on demand and reused; their number is capped per
node: the CPUs divided among the ranks torchrun starts on it (LOCAL_WORLD_SIZE). Verdicts are cached by
(gold, prediction): GRPO's G samples of one prompt often repeat an answer.
"""

import contextlib
import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding the package
CACHE_SIZE = 100_000  # (gold, prediction) verdicts kept


def max_helpers():
    """This rank's share of the node's CPUs: torchrun's ranks on one node split them, at least one each."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ----------------------------------------------------------------------------------------------------
# The helper process (`python -m vlaa.mathverify`)


@functools.lru_cache(maxsize=4096)
def _parse_math(s):
    """math-verify's parse, bare LaTeX wrapped in $...$ first: bare, `\\sqrt{8}` parses to nothing and
    `2\\sqrt{2}` to 2. No signal timeouts (they fail off the main thread): the parent kills us instead."""
    from math_verify import parse

    if not any(d in s for d in ("$", "\\(", "\\[", "\\boxed")):
        wrapped = parse(f"${s}$", parsing_timeout=None)
        if wrapped:
            return wrapped
    return parse(s, parsing_timeout=None)


def math_equal(gold, pred):
    """Runs in a helper. Gold first: math-verify's verify is not symmetric."""
    from math_verify import verify

    from vlaa.answers import canon_math

    g, p = _parse_math(gold), _parse_math(pred)
    if not g:  # the gold is not math ("no solution"): compare spellings
        return canon_math(gold) == canon_math(pred)
    return bool(p) and verify(g, p, timeout_seconds=None)


def serve():
    """The helper: imports sympy and math-verify once (about a second), then forks a worker that inherits
    them warm; when the parent kills a late worker, the next one is forked in milliseconds. The helper has
    no threads, so fork is safe here."""
    out = os.fdopen(os.dup(1), "w")   # the protocol gets a private copy of stdout,
    os.dup2(2, 1)                     # so stray prints from sympy go to stderr
    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeout is off
    math_equal("1", "1")              # import, and build the LaTeX grammar
    while True:
        pid = os.fork()
        if pid == 0:
            import resource  # a memory bomb raises MemoryError in the worker instead of swapping the node

            resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
            out.write(f"ready {os.getpid()}\n")
            out.flush()
            for line in sys.stdin:  # one [gold, pred] JSON line in, "1" or "0" out
                try:
                    ok = math_equal(*json.loads(line))
                except Exception:  # noqa: BLE001  MemoryError, RecursionError, sympy's own: not a proof
                    ok = False
                out.write("1\n" if ok else "0\n")
                out.flush()
            os._exit(0)
        if os.WIFEXITED(os.waitpid(pid, 0)[1]):  # the worker saw stdin close: the parent is done
            return


# ----------------------------------------------------------------------------------------------------
# The parent's side


class _Helper:
    """The parent's end of one helper. subprocess (fork + exec, like the "spawn" start method) rather
    than multiprocessing: safe after torch has started threads or CUDA, where a bare fork is not, and,
    unlike multiprocessing's spawn and forkserver, it does not re-import the caller's main script
    (05_grpo.py, so all of torch) in the helper."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "vlaa.mathverify"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.worker, self.buffer = None, b""

    def _readline(self, timeout):
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                raise RuntimeError("the math-verify helper process died; is math-verify installed?")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def ask(self, gold, pred, timeout):
        """1.0 or 0.0; None when the worker was late (it is killed, and a warm one takes its place)."""
        while self.worker is None:  # deadlines start once a worker is up, not while it imports sympy
            line = self._readline(60)
            if line is None:
                raise RuntimeError("the math-verify helper process did not start in 60 s")
            if line.startswith(b"ready"):  # (skips a late answer from a worker we killed)
                self.worker = int(line.split()[1])
        self.proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if line is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker, signal.SIGKILL)
            self.worker = None
            return None
        if line.startswith(b"ready"):  # the worker crashed on this item, and the next one is up
            self.worker = int(line.split()[1])
            return 0.0
        return float(line)


_IDLE, _STARTED = [], [0]  # the pool: helpers not in use, and how many exist
_POOL_LOCK = threading.Condition()
_CACHE = {}  # (gold, pred) -> verdict, insertion-ordered: the oldest goes first when full


def _forget_helpers():
    """A forked child (a DataLoader worker, say) must not share its parent's helpers: it starts its own."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Condition()
    _IDLE.clear()
    _STARTED[0] = 0


os.register_at_fork(after_in_child=_forget_helpers)


def ask_math(gold, pred, timeout):
    """Does math-verify prove pred equal to gold within `timeout` s? 1.0 / 0.0, or None when too slow
    (not cached: a later call with more time may still decide it)."""
    if (gold, pred) in _CACHE:
        return _CACHE[(gold, pred)]
    with _POOL_LOCK:
        while not _IDLE and _STARTED[0] >= max_helpers():
            _POOL_LOCK.wait()
        if _IDLE:
            helper = _IDLE.pop()
        else:
            helper, _STARTED[0] = _Helper(), _STARTED[0] + 1
    try:
        verdict = helper.ask(gold, pred, timeout)
    finally:
        with _POOL_LOCK:
            _IDLE.append(helper)
            _POOL_LOCK.notify()
    if verdict is not None:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[(gold, pred)] = verdict
    return verdict


if __name__ == "__main__":
    serve()
