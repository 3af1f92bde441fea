"""The offline world: a tiny random Qwen2.5-VL or Qwen3-VL, a synthetic visual-reasoning dataset, a toy teacher.

No model or data set can be downloaded on a CPU box or in CI, yet every stage of the recipe must run
(and learn) there. This file stands in for the hub:

    python toy.py build-model runs/tiny [--size tiny|small]     # random Qwen2.5-VL, saved like a real one
    python toy.py build-model runs/tiny3 --family qwen3-vl      # random Qwen3-VL (or qwen3.5; toy_model.py builds them)
    python toy.py make-data runs/data --n 2000 --seed 0         # images/, train.jsonl, test.jsonl
    python toy.py make-data runs/direct --responses   # + each question's direct answer: demo.py's base learns on it

The model folder holds what `from_pretrained` expects of a real Qwen2.5-VL (or Qwen3-VL) checkpoint (config,
safetensors, a byte-level BPE tokenizer with Qwen's special tokens and chat template, the image
processor), so every stage loads it with the same code that loads Qwen/Qwen2.5-VL-3B-Instruct. It builds in
about a second.

The data mirrors the paper's sources (§2, Table 1), one small task per verifier type (§4.1):

    task          verifier  source          question (answer)
    colour        mcq       toy-colour      What colour is the square? A. red B. green C. blue D. yellow  (A)
    largest       mcq       toy-arxivqa     What colour is the largest shape? A. red ...                  (C)
    count         digit     toy-clevr-math  How many objects are there?                                   (3)
    remove        digit     toy-clevr-math  Remove all red objects. How many objects are left?            (2)
    remove-shape  digit     toy-clevr-math  Remove all blue circles. How many objects are left?           (2)
    box           iou       toy-grounding   Give the bounding box of the blue square.   ([0.25, 0.00, 0.75, 0.50])
    sum, expr     math      toy-puma        What is the sum of the numbers in the image?                  (12)
    shapes        open      toy-allava      What shapes are in the image?                     (circle, triangle)
    read          open      toy-docvqa      What number is written in the image?                          (407)

The defaults are what a tiny model learns on a CPU in minutes (measured in docs/toy.md):
112 px images, 1-4 objects, boxes on a quarter grid, options always in the order red, green, blue,
yellow, and a mix weighted towards colour, box and counting. Harder variants are one flag away:
`--shuffle-options`, `--max-objects 6`, `--grid 8`, `--size 168`, `--kinds count,remove-shape,expr,read`.
Only the question, answer and choices go into a record; whatever knows the scene must read the pixels.

The toy teacher plays the paper's models, as the `toy` backend of vlaa/backends.py
(`--backend toy --model reasoner:error_rate=0.1,hesitation_rate=0.3`), so stages 01-03 run their
real code offline: a captioner that reads the pixels back exactly, an R1-like reasoner that sees only
caption and question (with dials for wrong steps and for hesitant "wait, let me double-check" loops),
a rewriter and a Yes/No judge. In Python: `gen = make_teacher(*parse_teacher_spec("captioner"))`,
then `gen([{"prompt": "...", "image": pil_image, "system": None}], n=1, seed=0) -> [["..."]]`.

toy.py imports only toy_model.py of the project: the package imports toy.py (lazily, for that backend), never
the reverse.
"""

import argparse
import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The tiny models live in toy_model.py; re-exported here, since tests, demo.py and bench/ call toy.build_model
from toy_model import (  # noqa: F401
    FAMILIES,
    SIZES,
    SPECIAL_TOKENS,
    VLAA_SYSTEM_PROMPT,
    build_model,
    build_tokenizer,
    tokenizer_corpus,
)

# The values in a sentence (numbers, option letters, colours, shapes): the corpus is cut at them, so that
# merges (which cross spaces, see build_tokenizer) make phrases into tokens but never glue an answer to a phrase.
VALUE = re.compile(r"(\d+(?:\.\d+)?|\b[A-D]\b|(?i:red|green|blue|yellow|circle|square|triangle))")


def world_corpus(n=200, seed=0):
    """Questions and teacher traces of the toy world, so that what the model reads and writes is few tokens.

    Drawn by the real generators and the real teacher (plain and hesitant traces), so the merges fit
    the text exactly. Captions are left out: only the teacher reads them, never the tiny model."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        record, _, image = make_example(rng, rng.choice(list(TASKS)), World())
        trace = reason(caption_image(image), record["question"], rng, error_rate=0.1, hesitation_rate=0.3,
                       caption_mention_rate=0.0)
        think, _, answer = trace.rpartition("</think>")
        lines += [piece for piece in re.split(r"(\d+)", record["question"]) if piece]  # prompts: few tokens
        lines += [piece for piece in VALUE.split(f"{think}</think> <answer>{answer.strip()}</answer>") if piece]
    return lines


# ----------------------------------------------------------------------------------------------------
# The toy world: scenes drawn so that a program can read them back exactly

# Shapes and colours as measured in docs/toy.md. Every object is drawn in one flat
# colour (base colour plus a jitter, unique within the image, no anti-aliasing), so the captioner can
# find each object as "all pixels of one colour" and nothing is ever ambiguous.
BACKGROUND, INK = (245, 245, 245), (20, 20, 20)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 40), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES, JITTER = ("circle", "square", "triangle"), 20  # JITTER: +- per channel, so each object has its own shade
CELL = 28  # one merged Qwen2.5-VL vision token covers 28x28 px: one object per cell, one cell per token (Qwen3-VL's
# processor scales 112 px to 128, its 4x4 tokens of 32 px: again one cell per token, toy_model.PIXELS_PER_TOKEN)


@dataclass
class World:
    """The knobs of make-data (defaults: what a tiny model learns on a CPU in minutes)."""
    size: int = 112  # image side in px (16 image tokens)
    max_objects: int = 4  # count tasks draw 1..max_objects objects
    grid: int = 4  # the box task's grid: boxes snap to quarters of the image
    shuffle_options: bool = False  # mcq options in a random order instead of red, green, blue, yellow


def cells(size):
    """Cells per side and the cell size in px."""
    n = max(2, size // CELL)
    return n, max(1, size // n)  # an image a few px wide still has 1 px cells


def in_cell(row, col, cell, margin, span=1):
    """The (x0, y0, x1, y1) box (end exclusive) of an object drawn in a span x span block of cells."""
    return col * cell + margin, row * cell + margin, (col + span) * cell - margin, (row + span) * cell - margin


def scatter(rng, world, k):
    """k objects in distinct random cells, each of a random colour and shape, 4 px inside its cell."""
    n, cell = cells(world.size)
    spots = rng.sample(range(n * n), min(k, n * n))
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES), in_cell(s // n, s % n, cell, 4)) for s in spots]


# A seven-segment font plus a vertical bar "h" for "+": each glyph is a set of bars at fixed places
# on the image's middle line, so reading text back is looking at one pixel per bar.
GLYPHS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
          "7": "abc", "8": "abcdefg", "9": "abcdfg", "-": "g", "+": "gh", " ": ""}
READ_GLYPH = {frozenset(bars): ch for ch, bars in GLYPHS.items()}


def text_slots(size):
    """The top-left corner of every character slot, and the bars of a glyph at (x, y)."""
    h = size // 4
    w, t = h // 2, max(2, h // 8)
    n = (size - 8) // (w + 2 * t)
    x0, y0 = (size - n * (w + 2 * t)) // 2 + t, (size - h) // 2

    def bars(x, y):
        m = y + h // 2
        return {"a": (x, y, x + w, y + t), "b": (x + w - t, y, x + w, m), "c": (x + w - t, m, x + w, y + h),
                "d": (x, y + h - t, x + w, y + h), "e": (x, m, x + t, y + h), "f": (x, y, x + t, m),
                "g": (x, m - t // 2, x + w, m - t // 2 + t),
                "h": (x + (w - t) // 2, y + h // 4, x + (w - t) // 2 + t, y + 3 * h // 4)}
    return [(x0 + k * (w + 2 * t), y0) for k in range(n)], bars


def draw_text(draw, text, size):
    slots, bars = text_slots(size)
    if len(text) > len(slots):
        raise ValueError(f"text {text!r} does not fit a {size} px image ({len(slots)} characters)")
    start = (len(slots) - len(text)) // 2  # centred on the middle line
    for ch, (x, y) in zip(text, slots[start:]):
        for bar in GLYPHS[ch]:
            x0, y0, x1, y1 = bars(x, y)[bar]
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=INK)


def draw_image(rng, size, objects=(), text=""):
    """Paint the scene: flat objects with jittered colours (unique per object), then the text."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    used = set()
    for colour, shape, (x0, y0, x1, y1) in objects:
        rgb = None
        while rgb is None or rgb in used:
            rgb = tuple(v + rng.randint(-JITTER, JITTER) for v in COLOURS[colour])
        used.add(rgb)
        if shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)  # PIL boxes include their last pixel
        elif shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)
    draw_text(draw, text, size)
    return image


# ----------------------------------------------------------------------------------------------------
# Tasks: each draws a scene and asks one question about it


def mcq(question, right, options, rng, world):
    """Lettered options in the question text, the answer a letter (as in GeoQA and ArxivQA)."""
    options = rng.sample(options, len(options)) if world.shuffle_options else list(options)
    letters = "ABCD"[:len(options)]
    text = " ".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    return {"question": f"{question} {text}", "answer": letters[options.index(right)], "choices": options}


def task_colour(rng, world):
    # one big solid square: the one-feature task GRPO learns from a format-only start (docs/toy.md)
    colour, m = rng.choice(list(COLOURS)), world.size // 8
    scene = {"objects": [(colour, "square", (m, m, world.size - m, world.size - m))]}
    return mcq("What colour is the square?", colour, list(COLOURS), rng, world) | scene


def task_largest(rng, world):
    # docs/toy.md (options in a fixed order): one shape on a 2x2 block of cells, 1-2 small ones elsewhere
    n, cell = cells(world.size)
    colours = rng.sample(list(COLOURS), rng.randint(2, 3))
    r, c = rng.randrange(n - 1), rng.randrange(n - 1)
    free = [s for s in range(n * n) if not (r <= s // n <= r + 1 and c <= s % n <= c + 1)]
    objects = [(colours[0], rng.choice(SHAPES), in_cell(r, c, cell, 3, span=2))]
    objects += [(colour, rng.choice(SHAPES), in_cell(s // n, s % n, cell, 7))
                for colour, s in zip(colours[1:], rng.sample(free, min(len(free), len(colours) - 1)))]
    return mcq("What colour is the largest shape?", colours[0], list(COLOURS), rng, world) | {"objects": objects}


def task_count(rng, world):
    objects = scatter(rng, world, rng.randint(1, world.max_objects))
    return {"question": "How many objects are there?", "answer": str(len(objects)), "objects": objects}


def task_remove(rng, world):
    objects = scatter(rng, world, rng.randint(1, world.max_objects))
    left = sum(colour != "red" for colour, _, _ in objects)
    return {"question": "Remove all red objects. How many objects are left?", "answer": str(left), "objects": objects}


def task_remove_shape(rng, world):
    # CLEVR-Math style: the removed kind is one that is present, so the answer depends on colour and shape
    objects = scatter(rng, world, rng.randint(1, world.max_objects))
    colour, shape, _ = rng.choice(objects)
    left = sum((c, s) != (colour, shape) for c, s, _ in objects)
    return {"question": f"Remove all {colour} {shape}s. How many objects are left?", "answer": str(left),
            "objects": objects}


def box_text(box, size):
    return "[" + ", ".join(f"{v / size:.2f}" for v in box) + "]"


def task_box(rng, world):
    # one square snapped to a world.grid x world.grid grid (quarters by default), 1 to grid/2 cells wide
    side = rng.randint(1, max(1, world.grid // 2))
    i, j = rng.randint(0, world.grid - side), rng.randint(0, world.grid - side)
    box = tuple(round(v * world.size / world.grid) for v in (j, i, j + side, i + side))
    colour = rng.choice(list(COLOURS))
    return {"question": f"Give the bounding box of the {colour} square.", "answer": box_text(box, world.size),
            "objects": [(colour, "square", box)]}


def task_sum(rng, world):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"question": "What is the sum of the numbers in the image?", "answer": str(a + b), "text": f"{a} {b}"}


def task_expr(rng, world):
    a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
    a, b = (b, a) if op == "-" and a < b else (a, b)
    return {"question": "What is the value of the expression in the image?",
            "answer": str(a + b if op == "+" else a - b), "text": f"{a}{op}{b}"}


def task_shapes(rng, world):
    objects = scatter(rng, world, rng.randint(1, min(3, world.max_objects)))
    answer = ", ".join(s for s in SHAPES if any(shape == s for _, shape, _ in objects))
    return {"question": "What shapes are in the image?", "answer": answer, "objects": objects}


def task_read(rng, world):
    number = str(rng.randint(10, 999))
    return {"question": "What number is written in the image?", "answer": number, "text": number}


TASKS = {  # name: (make, verifier_type, source)
    "colour": (task_colour, "mcq", "toy-colour"), "largest": (task_largest, "mcq", "toy-arxivqa"),
    "count": (task_count, "digit", "toy-clevr-math"), "remove": (task_remove, "digit", "toy-clevr-math"),
    "remove-shape": (task_remove_shape, "digit", "toy-clevr-math"), "box": (task_box, "iou", "toy-grounding"),
    "sum": (task_sum, "math", "toy-puma"), "expr": (task_expr, "math", "toy-puma"),
    "shapes": (task_shapes, "open", "toy-allava"), "read": (task_read, "open", "toy-docvqa"),
}
# favours what learns on a CPU (colour, box, counts) and keeps one of each other verifier type
DEFAULT_MIX = "colour:2,box:2,count:2,remove:2,largest,sum,shapes"


def parse_mix(text):
    """'colour:2,count' -> {'colour': 2.0, 'count': 1.0}"""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in --kinds; known: {', '.join(TASKS)}")
        try:
            mix[name] = float(weight or 1)
        except ValueError:
            mix[name] = float("nan")
        if not 0 < mix[name] < float("inf"):
            raise ValueError(f"weight {weight!r} of {name!r} in --kinds: a positive number, or none for 1")
    return mix


def mix_flag(text):
    """--kinds checked while parsing: a bad task or weight is a usage error naming it, not a traceback."""
    try:
        parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def make_example(rng, task, world):
    """(record without id and image path, scene, image). The scene (objects, text) stays out of the record."""
    make, verifier_type, source = TASKS[task]
    made = make(rng, world)
    scene = {"objects": made.pop("objects", []), "text": made.pop("text", "")}
    record = {"question": made["question"], "answer": made["answer"], "verifier_type": verifier_type}
    record |= {k: made[k] for k in ("choices",) if k in made} | {"source": source, "task": task}
    return record, scene, draw_image(rng, world.size, **scene)


def direct_response(record, scene, world):
    """An instruct model's own answer: the facts, then the answer; no slip, no loop. The words of the reasoner's
    plain traces, so the teacher's SFT data differs from it only in what the teacher adds (slips, hesitation)."""
    seen, conclusion, answer = solve(record["question"], world.size, scene["objects"], scene["text"], None, False)
    return f"<think>{' '.join(filter(None, (seen, conclusion)))}</think> <answer>{answer}</answer>"


def make_data(out, n, test_n=200, seed=0, kinds=DEFAULT_MIX, world=None, responses=False):
    """Write OUT/train.jsonl, OUT/test.jsonl and OUT/images/. The same arguments give the same bytes.
    responses: each record also gets `response`, its direct answer (the data of the demo's instruct base)."""
    world, mix = world or World(), parse_mix(kinds)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for split, count in (("train", n), ("test", test_n)):
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for i in range(count):
                rng = random.Random(f"{seed}:{split}:{i}")  # one stream per record: stable under any --n
                record, scene, image = make_example(rng, rng.choices(list(mix), list(mix.values()))[0], world)
                record |= {"response": direct_response(record, scene, world)} if responses else {}
                path = f"images/{split}-{i:06d}.png"
                image.save(os.path.join(out, path), compress_level=1)  # fast; flat images compress well anyway
                f.write(json.dumps({"id": f"{split}-{i:06d}", "image": path} | record) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------
# The toy teacher: captioner (pixels -> caption), reasoner (caption + question -> R1-style trace),
# rewriter and judge (03). Each role sees only what its model in the paper saw.

MAX_FLAT_COLOURS = 64  # a toy scene has a few flat colours; a photograph has thousands


def read_image(image):
    """The scene as the pixels show it: objects (colour, shape, box, rgb) in reading order, and the text."""
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    key = a[..., 0] << 16 | a[..., 1] << 8 | a[..., 2]
    colours = np.unique(key)
    objects, colours = [], colours if len(colours) <= MAX_FLAT_COLOURS else colours[:0]  # more: a photograph
    for k in colours:
        rgb = (int(k) >> 16 & 255, int(k) >> 8 & 255, int(k) & 255)
        if rgb in (BACKGROUND, INK):
            continue
        ys, xs = np.nonzero(key == k)  # one flat colour = one object
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        fill = len(xs) / ((box[2] - box[0]) * (box[3] - box[1]))  # square 1.0, circle ~0.78, triangle ~0.52
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        colour = min(COLOURS, key=lambda c: sum((u - v) ** 2 for u, v in zip(COLOURS[c], rgb)))
        objects.append((colour, shape, box, rgb))
    slots, bars = text_slots(a.shape[0])
    ink = key == (INK[0] << 16 | INK[1] << 8 | INK[2])
    inked = lambda px, py: 0 <= py < ink.shape[0] and 0 <= px < ink.shape[1] and ink[py, px]  # any image size
    text = ""
    for x, y in slots:  # one probe pixel per bar; "h" is probed above the middle bar it crosses
        probes = {name: ((x0 + x1) // 2, (y0 + y1) // 2) for name, (x0, y0, x1, y1) in bars(x, y).items()}
        probes["h"] = (probes["h"][0], bars(x, y)["h"][1] + 1)
        text += READ_GLYPH.get(frozenset(b for b, (px, py) in probes.items() if inked(px, py)), "?")
    return sorted(objects, key=lambda o: (o[2][1], o[2][0])), text.strip()


def span(word, lo, hi, cell):
    first, last = lo // cell + 1, (hi - 1) // cell + 1
    return f"{word} {first}" if first == last else f"{word}s {first}-{last}"


def describe(size, objects, text):
    """A structured caption (paper: setting, objects with colour, shape and position, text verbatim)."""
    n, cell = cells(size)
    setting = (f"Setting: a flat synthetic image, {size} by {size} pixels, plain light grey background, "
               f"a {n} by {n} grid of cells.")
    lines = [setting, f"Objects ({len(objects)}):" if objects else "Objects: none."]
    for colour, shape, (x0, y0, x1, y1), rgb in objects:  # the exact shade makes every caption its own
        lines.append(f"- a {colour} {shape} (rgb {rgb[0]}, {rgb[1]}, {rgb[2]}) at {span('row', y0, y1, cell)}, "
                     f"{span('column', x0, x1, cell)}, x {x0}-{x1}, y {y0}-{y1}")
    lines.append(f'Text: "{text}"' if text else "Text: none.")
    return "\n".join(lines)


def caption_image(image):
    return describe(image.size[0], *read_image(image))


def parse_caption(caption):
    """What the reasoner knows: image size, objects (colour, shape, box), text."""
    size = re.search(r"(\d+) by \d+ pixels", caption)
    size = int(size[1]) if size else World.size  # a caption from elsewhere: assume the default size
    found = re.findall(r"- a (\w+) (\w+) .*x (\d+)-(\d+), y (\d+)-(\d+)", caption)
    objects = [(c, s, (int(x0), int(y0), int(x1), int(y1))) for c, s, x0, x1, y0, y1 in found]
    text = re.search(r'Text: "(.*)"', caption)
    return size, objects, text[1] if text else ""


def plural(word, k):
    return word if k == 1 else word + "s"


def nudge(value, rng, lo=0, hi=None):
    """value +- 1 within [lo, hi]: the plausible slip of a miscount or an arithmetic step."""
    steps = [d for d in (-1, 1) if lo <= value + d and (hi is None or value + d <= hi)]
    return value + rng.choice(steps)


def solve(question, size, objects, text, rng, wrong):
    """(observation, conclusion, answer) for a question of the toy world. wrong: one step slips."""
    area = lambda o: (o[2][2] - o[2][0]) * (o[2][3] - o[2][1])
    if m := re.search(r"What colour is the (.+?)\?", question):
        options = dict(re.findall(r"\b([A-D])\. (\w+)", question))
        target = m[1].replace("largest ", "")
        seen = [o for o in objects if target in ("shape", o[1])] or objects
        colour = max(seen, key=area)[0] if seen else "red"
        if wrong:  # misreads the colour
            colour = rng.choice([c for c in options.values() if c != colour])
        letter = {c: k for k, c in options.items()}.get(colour, "A")
        return f"The image shows that the {m[1]} is {colour}.", f"{colour.capitalize()} is option {letter}.", letter
    if m := re.search(r"Remove all (\w+) (\w+?)s?\. How many", question):
        n = len(objects)
        shape = None if m[2] == "object" else m[2]
        r = sum(c == m[1] and shape in (None, s) for c, s, _ in objects)
        if wrong:  # miscounts the removed ones
            r = nudge(r, rng, 0, n)
        what = f"{m[1]} {plural(shape, r)}" if shape else m[1]
        return f"The image shows {n} {plural('object', n)}, {r} of them {what}.", f"{n} - {r} = {n - r}.", str(n - r)
    if "How many objects" in question:
        n = nudge(len(objects), rng) if wrong else len(objects)
        return f"The image shows {n} {plural('object', n)}.", f"So there are {n}.", str(n)
    if m := re.search(r"bounding box of the (\w+) (\w+)", question):
        seen = [o for o in objects if o[:2] == (m[1], m[2])] or objects or [(m[1], m[2], (0, 0, size, size))]
        x0, y0, x1, y1 = seen[0][2]
        if wrong:  # places it one box-width off, along one axis
            w, h = x1 - x0, y1 - y0
            if rng.random() < 0.5:
                x0, x1 = (x0 + w, x1 + w) if x1 + w <= size else (x0 - w, x1 - w)
            else:
                y0, y1 = (y0 + h, y1 + h) if y1 + h <= size else (y0 - h, y1 - h)
        # fractions of the side, not pixels: the answer is then a copy, a trace a tiny model can learn
        return (f"The image shows the {m[1]} {m[2]} from x {x0 / size:.2f} to {x1 / size:.2f} "
                f"and y {y0 / size:.2f} to {y1 / size:.2f}.", "That is the box.", box_text((x0, y0, x1, y1), size))
    if "sum of the numbers" in question:
        numbers = [int(t) for t in re.findall(r"\d+", text)] or [0]
        if wrong:  # misreads one number
            k = rng.randrange(len(numbers))
            numbers[k] = nudge(numbers[k], rng, 0, 9)
        return (f"The image shows the numbers {' and '.join(map(str, numbers))}.",
                f"{' + '.join(map(str, numbers))} = {sum(numbers)}.", str(sum(numbers)))
    if (m := re.fullmatch(r"(\d+)([+-])(\d+)", text)) and "expression" in question:
        a, op, b = int(m[1]), m[2], int(m[3])
        b = nudge(b, rng, 0, 9) if wrong else b
        value = a + b if op == "+" else a - b
        return f"The image shows {a}{op}{b}.", f"{a} {op} {b} = {value}.", str(value)
    if "What shapes" in question:
        kinds = [s for s in SHAPES if any(o[1] == s for o in objects)]
        if wrong:  # overlooks one kind, or sees one that is not there
            flip = rng.choice([s for s in SHAPES if s not in kinds] if len(kinds) < 2 else kinds)
            kinds = [s for s in SHAPES if (s in kinds) != (s == flip)]
        answer = ", ".join(kinds)
        return f"The image shows these shapes: {answer}.", "", answer
    if "number is written" in question:
        digits = list(text or "0")
        if wrong:  # misreads one digit
            k = rng.randrange(len(digits))
            digits[k] = str(nudge(int(digits[k]), rng, 0, 9))
        return f"The image shows the number {''.join(digits)}.", "", "".join(digits)
    return "The image does not show what is asked.", "", "unknown"


MENTIONS = ["The caption says", "The description mentions"]
RECHECKS = ["Wait, let me double-check.", "Hmm, let me look again.", "Let me check the image once more.",
            "I should confirm this.", "Maybe I made a mistake, so let me look again.",
            "Alternatively, let me go over it in another way."]


def reason(caption, question, rng, error_rate, hesitation_rate, caption_mention_rate):
    """An R1-like trace from text only: `<think> observation conclusion </think> answer`.

    error_rate: a step slips and the answer is wrong. hesitation_rate: re-checking loops with the paper's
    aha words (the long, hesitant "pseudo reasoning"); otherwise no aha word appears at all.
    caption_mention_rate: says "the caption says" instead of speaking as if it saw the image (03 rewrites it)."""
    size, objects, text = parse_caption(caption)
    wrong, mention, hesitant = (rng.random() < p for p in (error_rate, caption_mention_rate, hesitation_rate))
    seen, conclusion, answer = solve(question, size, objects, text, rng, wrong)
    if mention:
        seen = seen.replace("The image shows", rng.choice(MENTIONS), 1)
    steps = [seen]
    for _ in range(rng.randint(1, 3) if hesitant else 0):
        steps += [rng.choice(RECHECKS), seen]
    return "<think> " + " ".join(steps + [conclusion]).strip() + f" </think> {answer}"


def rewrite(text):
    """03's minimal edit: references to the caption/description/rationale become references to the image."""
    return re.sub(r"\b(the) (caption|description|rationale)( says| mentions| states| shows)?",
                  lambda m: m[1] + " image" + (" shows" if m[3] else ""), text, flags=re.IGNORECASE)


def normalise(answer):
    answer = re.sub(r"</?answer>", "", answer.rpartition("</think>")[2])
    return " ".join(answer.split()).lower().rstrip(".").strip()


def judge(prompt):
    """03's verifier: Yes if the last 'Answer:' line matches the last 'Ground truth:' line, else No."""
    gold, pred = (re.findall(rf"^{k}:(.*)$", prompt, re.MULTILINE) for k in ("Ground truth", "Answer"))
    if not gold or not pred:
        raise ValueError("the judge's prompt needs a 'Ground truth: ...' line and an 'Answer: ...' line")
    return "Yes" if normalise(gold[-1]) == normalise(pred[-1]) else "No"


TEACHER_ROLES = {"captioner": {}, "reasoner": {"error_rate": 0.1, "hesitation_rate": 0.3, "caption_mention_rate": 0.3},
                 "rewriter": {}, "judge": {}}  # role: its options and their defaults


def parse_teacher_spec(spec):
    """'reasoner:error_rate=0.1,hesitation_rate=0.3' -> ('reasoner', {'error_rate': 0.1, 'hesitation_rate': 0.3})"""
    role, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"toy teacher option {item!r} in {spec!r} is not key=number") from None
    check_teacher(role.strip(), options)
    return role.strip(), options


def check_teacher(role, options):
    if role not in TEACHER_ROLES:
        raise ValueError(f"unknown toy teacher role {role!r}; known: {', '.join(TEACHER_ROLES)}")
    for key, value in options.items():
        if key not in TEACHER_ROLES[role]:
            known = ", ".join(TEACHER_ROLES[role]) or "none"
            raise ValueError(f"unknown option {key!r} for the toy {role}; known: {known}")
        if not 0 <= value <= 1:
            raise ValueError(f"toy {role} option {key}={value} must be a probability in [0, 1]")


def after_last(prompt, marker):
    if marker not in prompt:
        raise ValueError(f"the toy teacher's prompt has no {marker.strip()!r} block")
    return prompt.rpartition(marker)[2]


def make_teacher(role, options=None, **more):
    """gen(requests, n=1, seed=None, ...) -> n strings per request; a request is {"prompt", "image", "system"}.

    The role comes from the spec only, never from the prompt. Deterministic given seed (and the prompt)."""
    options = {**(options or {}), **more}
    check_teacher(role, options)
    settings = {**TEACHER_ROLES[role], **options}

    def answer(request, rng):
        prompt = request.get("prompt") or ""
        if role == "captioner":
            image = request.get("image")
            if image is None:
                raise ValueError("the toy captioner needs request['image'] (it reads only the pixels)")
            return caption_image(Image.open(image) if isinstance(image, str) else image)
        if role == "reasoner":
            caption, _, question = after_last(prompt, "Caption:\n").rpartition("Question:\n")
            return reason(caption, question.strip(), rng, **settings)
        if role == "rewriter":
            return rewrite(after_last(prompt, "Text:\n"))
        return judge(prompt)

    def gen(requests, n=1, max_new_tokens=None, temperature=None, seed=None, **ignored):
        return [[answer(r, random.Random(f"{seed}|{k}|{r.get('prompt')}")) for k in range(n)] for r in requests]
    return gen


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    from vlaa.flags import nonneg_int, parse, positive_int
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="write a random Qwen2.5-VL, Qwen3-VL or Qwen3.5 (and its tokenizer)")
    b.add_argument("out", help="output folder")
    b.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (~0.2M params) or small (~0.9M)")
    b.add_argument("--seed", type=nonneg_int, default=0, help="weight init seed")
    b.add_argument("--family", choices=FAMILIES, default=FAMILIES[0], help="model family (default qwen2.5-vl)")
    d = sub.add_parser("make-data", help="write OUT/images/, OUT/train.jsonl and OUT/test.jsonl")
    d.add_argument("out", help="output folder")
    d.add_argument("--n", type=nonneg_int, default=2000, help="training records (default 2000)")
    d.add_argument("--test-n", type=nonneg_int, default=200, help="test records (default 200)")
    d.add_argument("--seed", type=nonneg_int, default=0, help="data seed: the same seed writes the same bytes")
    d.add_argument("--kinds", type=mix_flag, default=DEFAULT_MIX,
                   help=f"tasks with optional weights, from: {', '.join(TASKS)} (default {DEFAULT_MIX})")
    d.add_argument("--size", type=positive_int, default=112, help="image side in px (default 112: 16 image tokens)")
    d.add_argument("--max-objects", type=positive_int, default=4, help="count tasks draw 1..N objects (default 4)")
    d.add_argument("--grid", type=positive_int, default=4, help="the box task's grid per side (default 4: quarters)")
    d.add_argument("--shuffle-options", action="store_true", help="mcq options in random order (default fixed)")
    d.add_argument("--responses", action="store_true", help="add each record's direct answer as `response`")
    args = parse(p, argv)  # every number in its range, or a usage error naming the flag
    if args.cmd == "build-model":
        build_model(args.out, args.size, args.seed, args.family)
        print(f"wrote a random {args.family} ({args.size}) to {args.out}")
    else:
        world = World(args.size, args.max_objects, args.grid, args.shuffle_options)
        make_data(args.out, args.n, args.test_n, args.seed, args.kinds, world, args.responses)
        print(f"wrote {args.n} train and {args.test_n} test records to {args.out}")


if __name__ == "__main__":
    main()
