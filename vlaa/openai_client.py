"""The `openai` generation backend: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang,
hosted APIs), several servers at once, many requests in flight.

    gen = openai_backend("Qwen/Qwen2.5-VL-72B-Instruct", base_url="http://node1:8000/v1,http://node2:8000/v1")
    gen(requests, n=1, max_new_tokens=1024, on_error="return") -> per request: [text] * n, or the Exception

Used through vlaa.backends.make_backend("openai", ...) by 01-03 and 06. The HTTP, the key and the typed
errors are the `openai` package's. Its own retries are off (they stay on one server) and its timeout is a
per-read one, so what a long run over several servers needs is added here:

- Each attempt of a request goes to the next server, and a server that failed (no connection, a timeout,
  408, 429, 5xx, a broken reply) is skipped for a cool-down that doubles with each failure in a row (its
  Retry-After when it sends one): a dead node costs a few attempts, not the run.
- `timeout` bounds one attempt on the wall clock, connect to last byte (a server that trickles bytes is
  cut off too); a request gets at most `retries` + 1 attempts. An empty completion is retried like an error.
- A request that fails for good (refused with another 4xx, its image unreadable, every attempt failed) is
  with on_error="return" an Exception in its place, so a data stage counts it as a bad record and keeps
  the others; with "raise" (the default) gen raises it. 401, 403 and 404 mean every request would fail
  (key, URL, model name): gen always raises those.
- gen returns as soon as it has its answer or an error: queued requests never start, requests in flight are
  abandoned (their threads are daemons that stop at their next chunk) and never delay the process's exit.
- The API key only goes into the Authorization header; it is cut out of every message. api_key_for decides it.
- Images (paths or PIL) go through vlaa.images.load_image when their attempt is sent: at most `concurrency`
  in memory, only files that decode sent (as PNG data URLs), each as an image viewer shows it.
"""

import base64
import collections
import io
import itertools
import json
import os
import queue
import random
import re
import threading
import time

from vlaa.images import load_image

FATAL_STATUS = (401, 403, 404)  # wrong key, URL or model name: every request would fail the same way
MAX_REPLY_BYTES = 64 * 1024 * 1024  # a completion is at most a few MB; a longer reply is a broken server


class RequestFailed(RuntimeError):
    """One request failed for good; the message says why (and which server said what)."""


class _Retry(Exception):
    """An attempt failed in a way the next may not, and the server is to blame (it cools down). wait: the
    server's Retry-After, in seconds."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


class _Refused(Exception):
    """The request itself is refused (a 4xx other than 408/429) or cannot be built: no attempt will do."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def api_key_for(env_name=None, base_url=None):
    """The key to send ("" none), one rule for 01-03 and 06 (--api-key-env, --judge-api-key-env): the variable
    env_name names, to any URL; else $OPENAI_API_KEY, to the default endpoint only ($OPENAI_BASE_URL, else
    OpenAI's; the openai client pairs the two), never to a base_url the user gave: anyone's server."""
    if env_name and env_name not in os.environ:
        raise SystemExit(f"no environment variable {env_name} (named by --api-key-env / --judge-api-key-env)")
    return os.environ[env_name] if env_name else "" if base_url else os.environ.get("OPENAI_API_KEY", "")


# ----------------------------------------------------------------------------------------------------
# One request as a chat completion, and the texts of a reply


def _chat_messages(request):
    """One request -> the messages of a chat completion; an image (decoded now) goes in as a data URL."""
    if "system" in request:
        system = request["system"]
    else:
        from vlaa.qwen import SYSTEM_PROMPT  # only here: vlaa.qwen pulls in torch, which this backend never needs

        system = SYSTEM_PROMPT
    image = request.get("image")
    if image is None:  # plain string content: some text-only APIs reject content lists
        content = request["prompt"]
    else:
        buf = io.BytesIO()
        load_image(image).save(buf, format="PNG")  # a path or PIL, as a viewer shows it; refuses non-images
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": request["prompt"]}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def _choice_text(choice):
    """R1-style servers return the thinking apart (`reasoning_content`; newer vLLM: `reasoning`): put it back
    in front of the answer as <think>...</think>, the shape every stage parses. "" when there is no text."""
    msg = choice.get("message") if isinstance(choice, dict) else None
    msg = msg if isinstance(msg, dict) else {}
    content = msg.get("content") if isinstance(msg.get("content"), str) else ""
    thinking = msg.get("reasoning_content") or msg.get("reasoning")
    return f"<think>{thinking}</think>{content}" if isinstance(thinking, str) and thinking.strip() else content


def _reply_texts(body):
    """A reply's bytes -> its choices' texts, in index order. A reply that is not a chat completion is
    the server's fault (retried elsewhere)."""
    try:
        choices = json.loads(body)["choices"]
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _Retry(f"not a chat completion ({type(e).__name__}: {str(e)[:200]})") from None
    return [_choice_text(c) for c in choices]


# ----------------------------------------------------------------------------------------------------
# The servers, and their cool-downs


class _Servers:
    """The servers of base_url, each attempt on the next one that is not cooling down. A server that failed
    cools down for backoff * 2^(failures in a row - 1) seconds (x0.5-1.5 jitter, at most max_backoff), or for
    its Retry-After. Failures of attempts sent before the last one was seen count once: one outage, one
    doubling, however many requests were in flight."""

    def __init__(self, urls, backoff, max_backoff):
        self.urls, self.backoff, self.max_backoff = urls, backoff, max_backoff
        self.free_at = [0.0] * len(urls)  # monotonic time its cool-down ends
        self.strikes = [0] * len(urls)  # failures in a row
        self.failed_at = [float("-inf")] * len(urls)
        self.turn = 0  # where first attempts start: requests are spread over the servers

    def pick(self, now, after=None):
        """The next server free now: after `after` (a retry moves on), else in turn. None when all cool down."""
        start = self.turn if after is None else after + 1
        for k in range(len(self.urls)):
            s = (start + k) % len(self.urls)
            if self.free_at[s] <= now:
                if after is None:
                    self.turn = s + 1
                return s
        return None

    def failed(self, s, sent_at, now, wait=None):
        if sent_at < self.failed_at[s]:
            return  # sent before its last failure was seen: the same outage
        self.strikes[s] += 1
        self.failed_at[s] = now
        delay = wait if wait is not None else self.backoff * 2 ** (self.strikes[s] - 1) * random.uniform(0.5, 1.5)
        self.free_at[s] = now + min(delay, self.max_backoff)

    def worked(self, s):
        self.strikes[s] = 0

    def next_free(self):
        return min(self.free_at)


def _retry_after(response):
    value = response.headers.get("retry-after", "") if response is not None else ""
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date: our own backoff instead


# ----------------------------------------------------------------------------------------------------
# The backend


def openai_backend(model, base_url=None, api_key=None, concurrency=16, timeout=120.0, retries=5, backoff=1.0,
                   max_backoff=60.0, extra_body=None):
    """Chat completions over the `openai` package, `concurrency` requests in flight over the servers of
    `base_url` (a comma list or a list: one `vllm serve` per node; default $OPENAI_BASE_URL). timeout: the wall
    clock of one attempt; retries: more attempts of a request; backoff, max_backoff: the servers' cool-downs.
    api_key: the key, "" sends none; None: api_key_for's rule. extra_body: more fields for every request."""
    import openai

    api_key = api_key_for(None, base_url) if api_key is None else api_key  # before base_url gets its default
    base_url = base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    urls = [u.strip().rstrip("/") for u in (base_url.split(",") if isinstance(base_url, str) else base_url)]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("openai backend: no server URL")
    # no key: the client still wants one, so it gets a stand-in and every request omits the header
    clients = [openai.OpenAI(base_url=u, api_key=api_key or "no-key", max_retries=0, timeout=timeout) for u in urls]
    no_auth = {} if api_key else {"Authorization": openai.Omit()}

    def redact(text):
        text = re.sub(r"^Error code: \d+ - ", "", str(text))[:500]
        return text.replace(api_key, "***") if api_key else text

    def post(s, payload, cancel):
        """One attempt on server s -> the choices' texts (None when cancelled); _Retry or _Refused on failure."""
        try:
            with clients[s].chat.completions.with_streaming_response.create(
                    **payload, extra_headers=no_auth, extra_body=extra_body, timeout=timeout) as reply:
                body = bytearray()
                try:
                    for chunk in reply.iter_bytes():  # read as it comes: the caller may give up on us meanwhile
                        if cancel.is_set():
                            return None
                        body += chunk
                        if len(body) > MAX_REPLY_BYTES:
                            raise _Retry(f"reply longer than {MAX_REPLY_BYTES} bytes")
                except _Retry:
                    raise
                except Exception as e:  # cut off mid-reply or timed out: the HTTP library's own errors
                    raise _Retry(f"reply broken off ({type(e).__name__}: {redact(e)})") from None
        except openai.APIStatusError as e:
            why = f"HTTP {e.status_code}: {redact(e.message)}"
            if e.status_code in (408, 429) or e.status_code >= 500:
                raise _Retry(why, wait=_retry_after(e.response)) from None
            raise _Refused(why, e.status_code) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise _Retry(f"{type(e).__name__}: {redact(e.__cause__ or e)}") from None
        except openai.OpenAIError as e:
            raise _Retry(f"{type(e).__name__}: {redact(e)}") from None
        return _reply_texts(bytes(body))

    def attempt(key, s, job, want, sampling, cancel, replies):
        """One attempt in its own daemon thread; what came of it goes to `replies` as (key, kind, value)."""
        try:
            messages = _chat_messages(job.request)
            if cancel.is_set():  # the call ended while the image was encoded: send nothing
                return
            texts = post(s, {"model": model, "messages": messages, **sampling,
                             **({"n": want} if want > 1 else {})}, cancel)
            replies.put((key, "ok", texts))
        except (_Retry, _Refused) as e:
            replies.put((key, type(e).__name__, e))
        except (ValueError, OSError) as e:  # the request cannot be built: its image does not decode
            replies.put((key, "_Refused", _Refused(redact(e))))
        except BaseException as e:  # a bug: the caller raises it
            replies.put((key, "crash", e))

    servers = _Servers(urls, backoff, max_backoff)
    lock = threading.Lock()  # gen may be called from several threads; one schedule at a time

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, on_error="raise", **_):
        if on_error not in ("raise", "return"):
            raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
        with lock:
            return schedule(requests, n, {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p},
                            seed, on_error)

    def schedule(requests, n, sampling, seed, on_error):
        """Run every request to an answer or a failure: start attempts while there is room and a server, wait
        for a reply, a deadline or the end of a cool-down, and act on it."""
        jobs = [_Job(r) for r in requests]
        results = [None] * len(jobs)
        todo = collections.deque(range(len(jobs)))  # jobs waiting for their next attempt, retries in front
        flying = {}  # attempt key -> (job index, server, sent at, deadline, cancel event)
        replies = queue.Queue()
        keys = itertools.count()
        left = len(jobs)

        def finish(i, value):
            nonlocal left
            results[i], left = value, left - 1
            if isinstance(value, Exception) and on_error == "raise":
                raise value

        def failed(i, why):
            job = jobs[i]
            job.failures += 1
            if job.failures > retries:
                finish(i, RequestFailed(f"openai backend: {job.failures} attempts failed, last: {why}"))
            else:
                todo.appendleft(i)

        def got(i, texts):
            job = jobs[i]
            job.texts += [t for t in texts if t.strip()]
            if len(job.texts) >= n:
                finish(i, job.texts[:n])
            elif job.sent > n + job.failures:  # a server that ignores `n` is asked again, but not forever
                finish(i, RequestFailed(f"openai backend: asked {job.sent} times for {n} completions, "
                                        f"got {len(job.texts)}"))
            else:
                todo.appendleft(i)

        try:
            while left:
                now = time.monotonic()
                while todo and len(flying) < concurrency:
                    i = todo[0]
                    s = servers.pick(now, jobs[i].server)
                    if s is None:
                        break
                    todo.popleft()
                    job, key, cancel = jobs[i], next(keys), threading.Event()
                    job.server, want = s, n - len(job.texts)
                    job_sampling = {**sampling, **({"seed": seed + job.sent} if seed is not None else {})}
                    job.sent += 1
                    flying[key] = (i, s, now, now + timeout, cancel)
                    threading.Thread(target=attempt, args=(key, s, job, want, job_sampling, cancel, replies),
                                     daemon=True).start()
                wake = [d for _, _, _, d, _ in flying.values()]
                if todo and len(flying) < concurrency:  # room, but every server cools down
                    wake.append(servers.next_free())
                try:
                    key, kind, value = replies.get(timeout=max(0.0, min(wake) - now) if wake else None)
                except queue.Empty:
                    key = None
                now = time.monotonic()
                if key in flying:
                    i, s, sent_at, _, _ = flying.pop(key)
                    url = servers.urls[s]
                    if kind == "ok":
                        servers.worked(s)
                        if any(t.strip() for t in value or []):
                            got(i, value)
                        else:  # content null or "": another attempt, on the next server; not the server's fault
                            failed(i, f"{url}: empty completion")
                    elif kind == "_Retry":
                        servers.failed(s, sent_at, now, value.wait)
                        failed(i, f"{url}: {value}")
                    elif kind == "_Refused" and value.status in FATAL_STATUS:
                        raise RuntimeError(f"openai backend: {url} refused with {value} (check the API key, "
                                           f"--base-url and the model name {model!r})")
                    elif kind == "_Refused" and value.status is None:  # never sent: its image does not decode
                        finish(i, RequestFailed(f"openai backend: cannot send the request: {value}"))
                    elif kind == "_Refused":
                        finish(i, RequestFailed(f"openai backend: refused by {url}: {value}"))
                    elif kind == "crash":
                        raise value
                for key, (i, s, sent_at, deadline, cancel) in list(flying.items()):
                    if deadline <= now:  # its thread may still be reading: it stops at its next chunk
                        cancel.set()
                        del flying[key]
                        servers.failed(s, sent_at, now)
                        failed(i, f"{servers.urls[s]}: no complete reply within {timeout:g} s")
        finally:  # done, an error or Ctrl-C: attempts still in flight are abandoned
            for *_, cancel in flying.values():
                cancel.set()
        return results

    return gen


class _Job:
    """One request's progress: completions so far, attempts sent and failed, the last server it went to."""

    def __init__(self, request):
        self.request, self.texts, self.sent, self.failures, self.server = request, [], 0, 0, None
