"""The vllm and openai backends by example.

openai: against small chat-completions servers that this file starts on 127.0.0.1 (errors, slow
replies, R1-style `reasoning_content`, servers that ignore `n`), then stages 01 and 02 through them.
vllm: what runs without vllm (the request building, with the tiny model's tokenizer), then the
whole backend against a stand-in `vllm` module that records what it is given.
"""

import base64
import importlib
import io
import sys
import time
import types

import pytest
import torch
from conftest import solid_image
from fake_openai import dead_url, openai

import toy
from vlaa import backends, jsonl, qwen
from vlaa.openai_client import api_key_for

caption = importlib.import_module("01_caption")
distill = importlib.import_module("02_distill")
rewrite_verify = importlib.import_module("03_rewrite_verify")
evaluate = importlib.import_module("06_eval")


# ----------------------------------------------------------------------------------------------------
# openai backend, against the servers of fake_openai.py


def test_openai_sends_the_image_as_a_data_url_with_the_system_prompt_and_sampling(serve):
    server = serve(reply=lambda p: "a red square")
    gen = openai(server.url, api_key="sk-test")
    out = gen([{"prompt": "Describe.", "image": solid_image(28), "system": "Be brief."},
               {"prompt": "Just text.", "image": None, "system": None}], max_new_tokens=7, temperature=0.5, seed=3)
    assert out == [["a red square"], ["a red square"]]
    first = next(p for p in server.payloads if p["messages"][0]["role"] == "system")
    assert first["model"] == "teacher" and first["max_tokens"] == 7 and first["temperature"] == 0.5
    assert first["seed"] == 3 and "n" not in first  # n only when more than one is wanted
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    image, text = first["messages"][1]["content"]
    assert text == {"type": "text", "text": "Describe."}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    from PIL import Image
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (28, 28)
    second = next(p for p in server.payloads if p["messages"][0]["role"] == "user")
    assert second["messages"] == [{"role": "user", "content": "Just text."}]  # plain string: text-only APIs
    assert server.headers[0]["authorization"] == "Bearer sk-test"


def test_openai_sends_no_key_when_none_is_set(serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = serve()
    assert openai(server.url)([{"prompt": "hi", "image": None}]) == [["ok"]]
    assert "authorization" not in server.headers[0]


def test_openai_retries_5xx_and_429_then_succeeds(serve):
    server = serve(script=[500, 429, 503])
    assert openai(server.url)([{"prompt": "hi", "image": None}]) == [["ok"]]
    assert len(server.payloads) == 4


def test_openai_gives_up_after_its_retries_and_says_why(serve):
    server = serve(script=[500] * 10)
    with pytest.raises(RuntimeError, match=r"3 attempts failed.*HTTP 500.*scripted 500"):
        openai(server.url, retries=2)([{"prompt": "hi", "image": None}])
    assert len(server.payloads) == 3


def test_openai_does_not_retry_a_bad_request(serve):
    server = serve(script=[400])
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*scripted 400"):
        openai(server.url)([{"prompt": "hi", "image": None}])
    assert len(server.payloads) == 1


def test_openai_times_out_a_slow_reply_and_retries(serve):
    server = serve(script=["sleep"], sleep=2.0)
    start = time.perf_counter()
    assert openai(server.url, timeout=0.3)([{"prompt": "hi", "image": None}]) == [["ok"]]
    assert time.perf_counter() - start < 1.5 and len(server.payloads) == 2


def test_openai_spreads_requests_over_servers_and_survives_a_dead_one(serve):
    a, b = serve(reply=lambda p: "a"), serve(reply=lambda p: "b")
    out = openai(f"{a.url},{b.url}", concurrency=4)([{"prompt": str(i), "image": None} for i in range(8)])
    assert sorted(x[0] for x in out) == ["a"] * 4 + ["b"] * 4 and len(a.payloads) == len(b.payloads) == 4

    # a node that went down: its requests fail over to the next server
    out = openai([dead_url(), a.url], concurrency=2)([{"prompt": str(i), "image": None} for i in range(4)])
    assert out == [["a"]] * 4


def test_openai_puts_reasoning_content_back_in_think_tags(serve):
    server = serve(reply=lambda p: "The answer is 3.", reasoning="Two plus one is three.")
    assert openai(server.url)([{"prompt": "1+2?", "image": None}]) == \
        [["<think>Two plus one is three.</think>The answer is 3."]]


def test_openai_asks_again_when_the_server_ignores_n(serve):
    honest, lazy = serve(), serve(honour_n=False)
    assert openai(honest.url)([{"prompt": "hi", "image": None}], n=4) == [["ok"] * 4]
    assert len(honest.payloads) == 1 and honest.payloads[0]["n"] == 4
    assert openai(lazy.url)([{"prompt": "hi", "image": None}], n=3, seed=10) == [["ok"] * 3]
    assert [p.get("n") for p in lazy.payloads] == [3, 2, None]
    assert [p["seed"] for p in lazy.payloads] == [10, 11, 12]  # new seeds: not three copies of one sample


def test_caption_and_distill_stages_through_the_openai_backend(serve, tmp_path):
    toy.make_data(str(tmp_path / "data"), 6, test_n=0, seed=0)
    captioner = serve(reply=lambda p: "A flat image with a red square.")
    reasoner = serve(reply=lambda p: "\n\nThe answer is A.", reasoning="The square is red, option A.")
    common = ["--backend", "openai", "--model", "teacher", "--batch-size", "4"]
    caption.main(["--in", str(tmp_path / "data" / "train.jsonl"), "--out", str(tmp_path / "c.jsonl"),
                  "--base-url", captioner.url] + common)
    distill.main(["--in", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "d.jsonl"),
                  "--base-url", reasoner.url] + common)

    rows = [r for _, r in jsonl.read_jsonl(str(tmp_path / "d.jsonl"))]
    assert len(rows) == 6 and all(r["caption"] == "A flat image with a red square." for r in rows)
    assert all(r["reasoning"] == "<think>The square is red, option A.</think>\n\nThe answer is A." for r in rows)
    assert all(p["messages"][0]["content"][0]["type"] == "image_url" for p in captioner.payloads)
    # the reasoner never sees the image, only the caption; requests run concurrently, in any order
    prompts = sorted(reasoner.prompts())
    assert prompts == sorted(distill.distill_prompt(r) for r in rows)
    assert all(p.endswith(f"\n\nCaption:\nA flat image with a red square.\n\nQuestion:\n{r['question']}")
               for p, r in zip(prompts, sorted(rows, key=distill.distill_prompt)))
    assert reasoner.payloads[0]["temperature"] == 0.6 and reasoner.payloads[0]["messages"][0]["role"] == "user"


# ----------------------------------------------------------------------------------------------------
# The API key: one rule in every stage (vlaa.openai_client.api_key_for)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """The inputs of 01, 02, 03 (two toy records, captioned and distilled by the toy teacher) and 06 (a digit
    and an open question in our schema, --bench toy)."""
    root = tmp_path_factory.mktemp("keys")
    toy.make_data(str(root), 2, test_n=0, seed=0)
    caption.main(["--in", str(root / "train.jsonl"), "--out", str(root / "captioned.jsonl")])
    distill.main(["--in", str(root / "captioned.jsonl"), "--out", str(root / "distilled.jsonl"),
                  "--model", "reasoner:error_rate=0"])
    solid_image(28).save(root / "a.png")
    jsonl.write_jsonl(str(root / "test.jsonl"), [
        {"id": "q1", "image": "a.png", "question": "How many?", "answer": "1", "verifier_type": "digit"},
        {"id": "q2", "image": "a.png", "question": "Which shape?", "answer": "a square", "verifier_type": "open"}])
    return root


def run_stage(stage, root, out, flags, model_url):
    """One stage with --backend openai and `flags` -> the model name its requests carry. 06's judge gets the
    flags; its model is then served at model_url."""
    if stage == "01":
        caption.main(["--in", str(root / "train.jsonl"), "--out", str(out), "--backend", "openai",
                      "--model", "teacher", *flags])
    elif stage == "02":
        distill.main(["--in", str(root / "captioned.jsonl"), "--out", str(out), "--backend", "openai",
                      "--model", "teacher", *flags])
    elif stage == "03":
        rewrite_verify.main(["--in", str(root / "distilled.jsonl"), "--out", str(out), "--backend", "openai",
                             "--rewriter-model", "teacher", *flags])
    elif stage == "06":
        evaluate.main(["--model", "teacher", "--bench", "toy", "--data-dir", str(root / "test.jsonl"),
                       "--out", str(out), "--backend", "openai", *flags])
    else:  # 06's judge: the same rule under its own flags (the model's server gets no key)
        judge_flags = [{"--base-url": "--judge-base-url", "--api-key-env": "--judge-api-key-env"}.get(f, f)
                       for f in flags]
        evaluate.main(["--model", "teacher", "--bench", "toy", "--data-dir", str(root / "test.jsonl"),
                       "--out", str(out), "--backend", "openai", "--base-url", model_url,
                       "--judge-backend", "openai", "--judge-model", "judge", *judge_flags])
        return "judge"
    return "teacher"


KEY_CASES = {  # what the user set -> the Authorization header that arrives (None: no header)
    "--base-url, no --api-key-env": (["--base-url", "URL"], {}, None),
    "--base-url and the variable named": (["--base-url", "URL", "--api-key-env", "MY_KEY"], {}, "Bearer sk-mine"),
    "--base-url and OPENAI_API_KEY named": (["--base-url", "URL", "--api-key-env", "OPENAI_API_KEY"], {},
                                            "Bearer sk-openai"),
    "$OPENAI_BASE_URL, nothing named": ([], {"OPENAI_BASE_URL": "URL"}, "Bearer sk-openai"),
    "$OPENAI_BASE_URL and the variable named": (["--api-key-env", "MY_KEY"], {"OPENAI_BASE_URL": "URL"},
                                                "Bearer sk-mine"),
    "--base-url beside $OPENAI_BASE_URL": (["--base-url", "URL"], {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
                                           None),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
@pytest.mark.parametrize("stage", ["01", "02", "03", "06", "06 judge"])
def test_every_stage_sends_a_key_only_where_it_is_named(serve, stage_inputs, tmp_path, monkeypatch, stage, case):
    """$OPENAI_API_KEY goes to OpenAI's endpoint ($OPENAI_BASE_URL), never to a --base-url the user typed: that
    server gets the variable the user names, or nothing. 01-03 used to send $OPENAI_API_KEY anywhere."""
    flags, env, expected = KEY_CASES[case]
    server, model_server = serve(reply=lambda p: "<answer>1</answer>"), serve(reply=lambda p: "<answer>1</answer>")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, server.url if value == "URL" else value)
    model = run_stage(stage, stage_inputs, tmp_path / "out", [server.url if f == "URL" else f for f in flags],
                      model_server.url)
    sent = [h.get("authorization") for p, h in zip(server.payloads, server.headers) if p["model"] == model]
    assert sent and set(sent) == {expected}
    assert all("authorization" not in h for h in model_server.headers)  # 06 judge: the model's --base-url


@pytest.mark.parametrize("stage", ["01", "02", "03", "06", "06 judge"])
def test_a_key_variable_that_is_not_set_is_refused_before_any_request(serve, stage_inputs, tmp_path, monkeypatch,
                                                                      stage):
    server = serve()
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(SystemExit, match="no environment variable NOPE"):
        run_stage(stage, stage_inputs, tmp_path / "out", ["--base-url", server.url, "--api-key-env", "NOPE"],
                  server.url)
    assert server.payloads == []


def test_the_key_rule_by_example(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("MY_SERVER_KEY", "sk-server")
    assert api_key_for(None, None) == "sk-openai"  # OpenAI's own endpoint ($OPENAI_BASE_URL, else api.openai.com)
    assert api_key_for(None, "http://somewhere:8000/v1") == ""  # a --base-url gets no key unless named
    assert api_key_for("MY_SERVER_KEY", "http://somewhere:8000/v1") == "sk-server"
    assert api_key_for("MY_SERVER_KEY", None) == "sk-server"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert api_key_for(None, None) == ""
    with pytest.raises(SystemExit, match="no environment variable NOPE"):
        api_key_for("NOPE", None)


# ----------------------------------------------------------------------------------------------------
# vllm backend


def test_vllm_requests_hold_one_image_placeholder_and_the_image(tiny):
    _, tok, _ = tiny
    image = solid_image(56)
    with_image, text_only = backends.vllm_requests(tok, [{"prompt": "What colour?", "image": image},
                                                     {"prompt": "2+2?", "image": None, "system": None}])
    ids = with_image["prompt_token_ids"]
    assert ids.count(tok.image_token_id) == 1  # vLLM expands it to the image's size itself
    assert with_image["multi_modal_data"] == {"image": image}
    text = tok.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{qwen.SYSTEM_PROMPT}<|im_end|>")
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n")
    assert "multi_modal_data" not in text_only
    assert tok.decode(text_only["prompt_token_ids"]).endswith(
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_vllm_on_a_cpu_refuses_gated_delta_net_models_it_cannot_run(tiny_qwen35_dir, tiny_model_dir, monkeypatch):
    """vLLM's CPU build runs Qwen3.5's gated delta-net layers in bf16 with 64- or 128-wide heads only; in fp32
    (the toy's, and 05's engine on a CPU) it fails at the first prompt with a traceback (docs/qwen3.5.md). The
    vllm backend and 05's colocated engine refuse first, naming the model, before vLLM is even imported."""
    from transformers import AutoConfig

    from vlaa import colocate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vLLM would fail: the refusal must come first
    why = rf"{tiny_qwen35_dir}: vLLM's CPU build runs gated delta-net .* not float32 with \[64\]: on a CPU, generate"
    with pytest.raises(jsonl.InputError, match=why):
        backends.make_backend("vllm", tiny_qwen35_dir)
    with pytest.raises(jsonl.InputError, match=why):
        colocate.make_vllm_engine(types.SimpleNamespace(model=tiny_qwen35_dir), rank=0)
    config = AutoConfig.from_pretrained(tiny_qwen35_dir)
    backends.check_vllm_cpu("m", config, "bfloat16")  # what the CPU build runs (measured, docs/qwen3.5.md)
    config.text_config.linear_key_head_dim = 32
    with pytest.raises(jsonl.InputError, match=r"not bfloat16 with \[32, 64\]"):
        backends.check_vllm_cpu("m", config, "bfloat16")
    backends.check_vllm_cpu("m", AutoConfig.from_pretrained(tiny_model_dir), "float32")  # no linear attention


def test_vllm_backend_builds_one_engine_and_blocks_vision_tokens(tiny, tiny_model_dir, monkeypatch):
    """The backend end to end, with a stand-in vllm module (the real one needs a GPU)."""
    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen["engine"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"], seen["params"] = prompts, params
            one = lambda i: types.SimpleNamespace(text=f"sample {i}")
            return [types.SimpleNamespace(outputs=[one(i) for i in range(params.n)]) for _ in prompts]

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    gen = backends.make_backend("vllm", tiny_model_dir, tensor_parallel_size=8, max_model_len=4096, max_pixels=12845056)
    out = gen([{"prompt": "What colour?", "image": solid_image(56)}] * 2, n=3, max_new_tokens=9, temperature=0.7,
              seed=1)
    assert out == [["sample 0", "sample 1", "sample 2"]] * 2
    engine, params = seen["engine"], seen["params"]
    assert engine["model"] == tiny_model_dir and engine["tensor_parallel_size"] == 8 and engine["max_model_len"] == 4096
    assert engine["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert engine["mm_processor_kwargs"] == {"max_pixels": 12845056}
    assert (params.n, params.max_tokens, params.temperature, params.seed) == (3, 9, 0.7, 1)
    _, tok, _ = tiny
    vision = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    assert set(params.logit_bias) == vision and set(params.logit_bias.values()) == {-100.0}
