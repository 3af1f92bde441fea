"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the tests, with faults on demand.

    with servers() as serve:
        server = serve(reply=lambda payload: "ok", script=[500, "null"], rule=lambda payload: None)
        gen = make_backend("openai", "teacher", base_url=server.url)

What a request gets: the next fate of `script`, else `rule(payload)` when it returns one, else a completion
whose content is `reply(payload)`. A fate is an HTTP status (an error body naming it), "sleep" (the
completion after `sleep` seconds), "trickle" (the completion one byte every 0.1 s), "null" (content null),
"empty" (content ""), "echo-key" (a 400 whose message repeats the Authorization header, as a hostile
server might), "cut" (the connection closes mid-reply) or "garbage" (a 200 that is not a chat completion).
Waits end when the server closes, so a test never outlives its server by more than 0.1 s.
"""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, reply=lambda payload: "ok", script=(), rule=lambda payload: None, reasoning=None,
                 honour_n=True, sleep=1.0, retry_after=None):
        self.reply, self.script, self.rule, self.reasoning = reply, list(script), rule, reasoning
        self.honour_n, self.sleep, self.retry_after = honour_n, sleep, retry_after
        self.payloads, self.headers, self.lock, self.closing = [], [], threading.Lock(), threading.Event()
        self.answered = 0  # replies sent in full
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.payloads.append(payload)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    fate = server.script.pop(0) if server.script else server.rule(payload)
                if isinstance(fate, int):
                    return self.send(fate, {"error": {"message": f"scripted {fate}"}})
                if fate == "echo-key":
                    return self.send(400, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
                if fate == "sleep" and server.closing.wait(server.sleep):
                    return
                if fate == "garbage":
                    return self.send(200, {"choices": "none today"})
                content = None if fate == "null" else "" if fate == "empty" else server.reply(payload)
                message = {"role": "assistant", "content": content}
                if server.reasoning:
                    message["reasoning_content"] = server.reasoning
                n = payload.get("n", 1) if server.honour_n else 1
                self.send(200, {"object": "chat.completion", "model": payload["model"],
                                "choices": [{"index": i, "message": message, "finish_reason": "stop"}
                                            for i in range(n)]}, trickle=fate == "trickle", cut=fate == "cut")

            def send(self, code, body, trickle=False, cut=False):
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data) + (100 if cut else 0)))
                    if code == 429 and server.retry_after is not None:
                        self.send_header("Retry-After", str(server.retry_after))
                    self.end_headers()
                    for k in range(len(data)) if trickle else ():
                        self.wfile.write(data[k:k + 1])
                        self.wfile.flush()
                        if server.closing.wait(0.1):
                            return
                    if not trickle:
                        self.wfile.write(data)
                    if cut:
                        self.close_connection = True
                        return
                    with server.lock:
                        server.answered += 1
                except (BrokenPipeError, ConnectionResetError):  # the client gave up and left
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def prompts(self):
        """The user text of every request received, in order."""
        def text(payload):
            content = payload["messages"][-1]["content"]
            return content if isinstance(content, str) else next(c["text"] for c in content if c["type"] == "text")
        return [text(p) for p in self.payloads]

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url():
    """The URL of a server that went down: nothing listens on its port any more."""
    server = ChatServer()
    server.close()
    return server.url


def openai(url, **kw):
    """The project's openai backend pointed at URL, retrying fast (the servers here answer at once)."""
    from vlaa import backends

    return backends.make_backend("openai", "teacher", base_url=url, **{"backoff": 0.01, "timeout": 5, **kw})


@contextlib.contextmanager
def servers():
    """with servers() as serve: serve(**ChatServer options) -> a running server; all closed on leaving."""
    started = []

    def start(**kw):
        started.append(ChatServer(**kw))
        return started[-1]
    try:
        yield start
    finally:
        for s in started:
            s.close()
