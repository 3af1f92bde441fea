"""vlaa/images.py by example: every PIL mode reaches the model as an image viewer shows it, a file cut short is a
bad record when its file is read (01, 04, 05), and every backend and stage sees the one loader's picture."""

import base64
import importlib
import io
import json
import os

import numpy as np
import pytest
from fake_openai import openai
from PIL import Image

import rewards
import toy
from vlaa import backends, jsonl, qwen, records
from vlaa.images import check_image, load_image

caption = importlib.import_module("01_caption")
sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")

RED, BLUE, WHITE = [255, 0, 0], [0, 0, 255], [255, 255, 255]


def row(im):
    """The first row of pixels, [[r, g, b], ...]."""
    return [list(im.getpixel((x, 0))) for x in range(im.width)]


def grey(*values):
    return [[v, v, v] for v in values]


def new(mode, data, size=None, palette=None):
    im = Image.new(mode, size or (len(data), 1))
    if palette:
        im.putpalette(palette)
    im.putdata(data)
    return im


def array(values, dtype):
    return Image.fromarray(np.array([values], dtype=dtype))


# mode -> (the image: a PIL image, or (PIL image, file name, save options) to go through a file, expected first row)
MODES = {
    "1 (bilevel)": ((new("1", [0, 1]), "a.png", {}), grey(0, 255)),
    "L": ((new("L", [0, 200]), "a.png", {}), grey(0, 200)),
    "P": ((new("P", [0, 1], palette=RED + BLUE), "a.png", {}), [RED, BLUE]),
    "P, transparent index (PNG)": ((new("P", [0, 1], palette=RED + BLUE), "a.png", {"transparency": 0}),
                                   [WHITE, BLUE]),
    "P, transparent index (GIF)": ((new("P", [0, 1], palette=RED + BLUE), "a.gif", {"transparency": 0}),
                                   [WHITE, BLUE]),
    # alpha 0 and 128: c * a + 255 * (1 - a), rounded: blue at 128 -> (127, 127, 255)
    "P, alpha palette (PNG tRNS)": ((new("P", [0, 1], palette=RED + BLUE), "a.png", {"transparency": b"\x00\x80"}),
                                    [WHITE, [127, 127, 255]]),
    "PA": (new("PA", [(0, 0), (1, 255)], palette=RED + BLUE), [WHITE, BLUE]),
    "RGBA": ((new("RGBA", [(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)]), "a.png", {}), [WHITE, RED, grey(127)[0]]),
    "RGBa (premultiplied)": (new("RGBa", [(0, 0, 0, 0), (255, 0, 0, 255)]), [WHITE, RED]),
    "LA": ((new("LA", [(0, 0), (50, 255), (0, 128)]), "a.png", {}), grey(255, 50, 127)),
    "La (premultiplied)": (new("La", [(0, 0), (50, 255)]), grey(255, 50)),
    "L, transparent grey (PNG tRNS)": ((new("L", [200, 10]), "a.png", {"transparency": 200}), grey(255, 10)),
    "RGB, transparent colour (PNG tRNS)": ((new("RGB", [(255, 0, 0), (0, 255, 0)]), "a.png",
                                            {"transparency": (255, 0, 0)}), [WHITE, [0, 255, 0]]),
    # 16 bits: v / 257, rounded (32768 -> 127.5 -> 128), never clipped to 255
    "I;16 (16-bit PNG)": ((array([0, 32768, 65535], np.uint16), "a.png", {}), grey(0, 128, 255)),
    "I;16B": (Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes()), grey(0, 128, 255)),
    "I;16L": (Image.frombytes("I;16L", (3, 1), np.array([0, 32768, 65535], "<u2").tobytes()), grey(0, 128, 255)),
    "I (32-bit TIFF), 16-bit values": ((array([0, 32768, 65535], np.int32), "a.tif", {}), grey(0, 128, 255)),
    "I (32-bit TIFF), other range": ((array([-100, 0, 155], np.int32), "a.tif", {}), grey(0, 100, 255)),
    "F (float TIFF), 0-1": ((array([0.0, 0.5, 1.0], np.float32), "a.tif", {}), grey(0, 128, 255)),
    "F, 0-255": ((array([0.0, 100.4, 255.0], np.float32), "a.tif", {}), grey(0, 100, 255)),
    "F, other range": ((array([-1.0, 0.0, 3.0], np.float32), "a.tif", {}), grey(0, 64, 255)),  # 1/4 -> 63.75
    "F, NaN": ((array([float("nan"), 0.5, 1.0], np.float32), "a.tif", {}), grey(0, 128, 255)),
    "CMYK (TIFF)": ((new("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "a.tif", {}),
                    [WHITE, [0, 255, 255], grey(0)[0]]),
    "CMYK (JPEG)": ((new("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "a.jpg", {"quality": 100}),
                    [WHITE, [0, 255, 255], grey(0)[0]]),
    "YCbCr": (new("YCbCr", [(255, 128, 128), (0, 128, 128)]), [WHITE, grey(0)[0]]),
    "HSV": (new("HSV", [(0, 0, 255), (0, 255, 255)]), [WHITE, RED]),
    "RGB": ((new("RGB", [(255, 0, 0), (0, 0, 255)]), "a.png", {}), [RED, BLUE]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_reaches_the_model_as_a_viewer_sees_it(tmp_path, mode):
    image, expected = MODES[mode]
    if isinstance(image, tuple):  # through a file, as the stages read it
        im, name, options = image
        im.save(tmp_path / name, **options)
        image = str(tmp_path / name)
    out = load_image(image)
    assert out.mode == "RGB" and row(out) == expected


def test_lab_goes_through_a_colour_profile(tmp_path):
    """L*a*b* is not RGB bytes: black and white come out black and white (littlecms: within 2 of 0 and 255)."""
    new("LAB", [(0, 128, 128), (255, 128, 128)]).save(tmp_path / "a.tif")
    black, white = row(load_image(str(tmp_path / "a.tif")))
    assert max(black) <= 2 and min(white) >= 253


@pytest.mark.parametrize("orientation, size, green_at", [(1, (3, 2), (0, 0)), (3, (3, 2), (2, 1)),
                                                        (6, (2, 3), (1, 0)), (8, (2, 3), (0, 2))])
def test_exif_orientation_turns_the_image_upright(tmp_path, orientation, size, green_at):
    """A phone photo stores its pixels sideways and says so in EXIF; 6: turn 90 degrees clockwise."""
    im = Image.new("RGB", (3, 2), (255, 0, 0))
    im.putpixel((0, 0), (0, 255, 0))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "a.png", exif=exif)
    out = load_image(str(tmp_path / "a.png"))
    assert out.size == size and out.getpixel(green_at) == (0, 255, 0)
    assert sum(out.getpixel((x, y)) == (0, 255, 0) for x in range(out.width) for y in range(out.height)) == 1
    assert check_image(str(tmp_path / "a.png")) == size


def noise(path):
    """An image whose file is mostly pixel data (noise does not compress)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.gif"])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 0.97])
def test_an_image_cut_short_is_refused_naming_the_file(tmp_path, name, keep):
    path = tmp_path / name
    noise(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with Image.open(path) as im:  # the header is intact: only decoding every pixel finds the cut
        assert im.size == (64, 64)
    with pytest.raises(ValueError, match=rf"rec 7: unreadable image .*{name}: image file is truncated"):
        load_image(str(path), "rec 7")
    with pytest.raises(ValueError, match=rf"unreadable image .*{name}"):
        check_image(str(path))


# ----------------------------------------------------------------------------------------------------
# A cut image is a bad record when its file is read: before any model call (01) or training step (04, 05)


def toy_data_with_a_cut_image(root, line=2):
    """8 toy colour records (with responses, for 04), the image of record `line` cut in half -> (path, id)."""
    toy.make_data(str(root), 8, test_n=0, seed=0, kinds="colour", responses=True)
    path = str(root / "train.jsonl")
    rec = [r for _, r in jsonl.read_jsonl(path)][line - 1]
    image = root / rec["image"]
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])
    return path, rec["id"]


def test_a_cut_image_is_a_bad_record_of_every_stage_that_reads_images(tmp_path):
    path, rid = toy_data_with_a_cut_image(tmp_path / "d")
    why = rf"train\.jsonl:2 \(id '{rid}'\): field 'image': unreadable image .*: image file is truncated"
    with pytest.raises(ValueError, match=why):
        records.load_records(path)  # 04, 05 and 06's toy/jsonl sets
    assert len(records.load_records(path, skip_bad=True)) == 7
    out = str(tmp_path / "cap.jsonl")
    with pytest.raises(ValueError, match=why):
        caption.main(["--in", path, "--out", out])
    assert not os.path.exists(out)  # before any model call
    stats = caption.main(["--in", path, "--out", out, "--skip-bad"])
    assert stats["written"] == 7 and len(stats["bad"]) == 1


@pytest.mark.parametrize("stage", ["04", "05"])
def test_a_cut_image_stops_04_and_05_before_training_or_is_skipped(tmp_path, tiny_model_dir, stage):
    """The record with the cut image is in the first step: it used to stop training there, --skip-bad or not."""
    path, rid = toy_data_with_a_cut_image(tmp_path / "d")
    out = tmp_path / "run"
    if stage == "04":
        main, args = sft.main, ["--global-batch", "4", "--micro-batch", "4", "--max-steps", "2"]
    else:
        main, args = grpo.main, ["--rollout-batch", "4", "--group-size", "2", "--train-batch", "8", "--micro-batch",
                                 "8", "--max-new-tokens", "4", "--temperature", "1.0", "--max-steps", "2"]
    args = ["--model", tiny_model_dir, "--data", path, "--out", str(out)] + args
    with pytest.raises(ValueError, match=rf"train\.jsonl:2 \(id '{rid}'\): field 'image': unreadable image"):
        main(args)
    assert not (out / "metrics.jsonl").exists()
    main(args + ["--skip-bad", "--overwrite"])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------------------------------
# Every backend and stage sees the one loader's picture


def sideways_transparent_png(path):
    """3x2 opaque red, its top-left pixel transparent black, EXIF orientation 6: a viewer shows 2x3, red, the
    top-right pixel white. PIL's plain open-and-convert gives 3x2 with a black pixel."""
    im = Image.new("RGBA", (3, 2), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif)
    return str(path)


def as_viewer_sees_it(im):
    px = np.asarray(im)
    assert im.mode == "RGB" and im.size == (2, 3)
    assert px[0, 1].tolist() == WHITE and (px.reshape(-1, 3) == RED).all(axis=1).sum() == 5


def capture(monkeypatch, module, name, arg):
    """Wrap module.name so that its argument `arg` (an index) is recorded in the returned list."""
    seen, real = [], getattr(module, name)

    def wrapper(*args, **kw):
        seen.append(args[arg])
        return real(*args, **kw)
    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("as_path", [True, False])  # 06's hub copies hand backends PIL images
def test_the_openai_backend_sends_the_viewers_picture(serve, tmp_path, as_path):
    path = sideways_transparent_png(tmp_path / "a.png")
    server = serve()
    image = path if as_path else Image.open(path)
    assert openai(server.url)([{"prompt": "p", "image": image, "system": None}]) == [["ok"]]
    url = server.payloads[0]["messages"][0]["content"][0]["image_url"]["url"]
    as_viewer_sees_it(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_the_vllm_request_builder_hands_the_engine_the_viewers_picture(tmp_path, tiny):
    path = sideways_transparent_png(tmp_path / "a.png")
    _, tok, _ = tiny
    for image in (path, Image.open(path)):
        (prompt,) = backends.vllm_requests(tok, [{"prompt": "p", "image": image}])
        as_viewer_sees_it(prompt["multi_modal_data"]["image"])


def test_the_hf_backend_and_04_05s_encoder_process_the_viewers_picture(tmp_path, tiny, monkeypatch):
    path = sideways_transparent_png(tmp_path / "a.png")
    seen = capture(monkeypatch, backends, "encode_example", 3)  # (tokenizer, image_processor, question, image)
    gen = backends.make_backend("hf", tiny)
    gen([{"prompt": "p", "image": path}, {"prompt": "p", "image": Image.open(path)}], max_new_tokens=1)
    encoded = capture(monkeypatch, qwen, "encode_example", 3)
    _, tok, ip = tiny
    qwen.prompt_encoder(tok, ip)({"id": "1", "question": "p", "image": path})  # 04 and 05
    assert len(seen) == 2 and len(encoded) == 1
    for image in seen + encoded:
        as_viewer_sees_it(image)


def test_the_toy_teacher_and_the_reward_judges_read_the_viewers_picture(tmp_path, monkeypatch):
    path = sideways_transparent_png(tmp_path / "a.png")
    seen = capture(monkeypatch, toy, "caption_image", 0)
    backends.make_backend("toy", "captioner")([{"prompt": "p", "image": path}])
    seen.append(rewards._pil(path))
    assert len(seen) == 2
    for image in seen:
        as_viewer_sees_it(image)
