"""The `openai` generation backend: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang,
hosted APIs), several servers at once, many requests in flight.

Used through vlaa.backends.make_backend("openai", model, base_url=..., ...) by 01-03 and 06. The request
shape is vlaa.backends'; images (paths or PIL) are decoded when their request is sent and go in as a
PNG data URL.
"""

import json
import os

from vlaa.backends import request_image
from vlaa.qwen import SYSTEM_PROMPT


def _image_data_url(image):
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat_payload(model, request):
    """One request -> the messages of a chat completion; the image goes in as a data URL."""
    system = request.get("system", SYSTEM_PROMPT)
    if request.get("image") is None:  # plain string content: some text-only APIs reject content lists
        content = request["prompt"]
    else:
        content = [{"type": "image_url", "image_url": {"url": _image_data_url(request_image(request))}},
                   {"type": "text", "text": request["prompt"]}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"model": model, "messages": messages}


def _choice_text(choice):
    """R1-style servers return the thinking apart (`reasoning_content`; newer vLLM: `reasoning`): put it back
    in front of the answer as <think>...</think>, the shape every stage parses."""
    msg = choice.get("message") or {}
    content, thinking = msg.get("content") or "", msg.get("reasoning_content") or msg.get("reasoning")
    return f"<think>{thinking}</think>{content}" if isinstance(thinking, str) and thinking else content


def openai_backend(model, base_url=None, api_key=None, concurrency=16, timeout=120.0, retries=5, backoff=1.0,
                    max_backoff=60.0, extra_body=None):
    """Chat completions over plain urllib, `concurrency` requests in flight, spread round-robin over the
    servers of `base_url` (comma list or list: one `vllm serve` per node), each failed attempt retried
    on the next server after an exponential backoff with jitter. Retried: connection errors, timeouts,
    HTTP 408, 429 and 5xx; any other HTTP error is raised at once with the server's message.
    api_key: None reads $OPENAI_API_KEY, "" sends none. extra_body: more fields for every request."""
    import itertools
    import random
    import threading
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from http.client import HTTPException

    base_url = base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    bases = [b.strip().rstrip("/") for b in (base_url.split(",") if isinstance(base_url, str) else base_url)]
    bases = [b for b in bases if b]
    api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key  # "": send no key
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    turn, lock = itertools.count(), threading.Lock()

    def post(payload):
        """One chat completion, retried; -> the list of choice texts."""
        body = json.dumps(payload).encode()
        for attempt in range(retries + 1):
            with lock:
                url = f"{bases[next(turn) % len(bases)]}/chat/completions"
            wait = None
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    data = json.loads(resp.read())
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                return [_choice_text(c) for c in choices]
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read().decode(errors="replace")[:500]
                except (OSError, HTTPException):
                    detail = ""
                if e.code not in (408, 429) and e.code < 500:  # our request is wrong: retrying will not help
                    raise RuntimeError(f"{url}: HTTP {e.code}: {detail}") from None
                error = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
            except (OSError, HTTPException, ValueError, KeyError) as e:  # refused, reset, timed out, bad JSON
                error = f"{type(e).__name__}: {e}"
            if attempt == retries:
                raise RuntimeError(f"openai backend: {retries + 1} attempts failed, last from {url}: {error}")
            delay = wait if wait is not None else backoff * 2 ** attempt * random.uniform(0.5, 1.5)
            time.sleep(min(delay, max_backoff))

    def one(request, n, sampling, seed):
        """n completions of one request; servers that ignore `n` are simply asked again."""
        payload = {**_chat_payload(model, request), **sampling, **(extra_body or {})}
        texts = []
        for k in itertools.count():
            want = n - len(texts)
            if want <= 0:
                return texts[:n]
            if k > n:
                raise RuntimeError(f"openai backend: asked {k} times for {n} completions, got {len(texts)}")
            texts += post({**payload, **({"n": want} if want > 1 else {}),
                           **({"seed": seed + k} if seed is not None else {})})

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, **_):
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        pool = ThreadPoolExecutor(max(1, min(concurrency, len(requests))))
        try:
            return list(pool.map(lambda r: one(r, n, sampling, seed), requests))
        finally:  # on Ctrl-C or an error, start no queued request
            pool.shutdown(wait=False, cancel_futures=True)

    return gen
