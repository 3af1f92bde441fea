"""Time the `hf` backend: 8 samples for each of 4 image prompts, 32 new tokens, on the tiny model.

    python bench/generate.py [--model DIR] [--repeats 5]

Target (issue 2): under 2 s on a 2-core CPU. Prints each run and the median.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import toy  # noqa: E402
from vlaa import backends  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: build the tiny model in a temp dir)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    path = args.model or toy.build_model(tempfile.mkdtemp(), "tiny")
    gen = backends.make_backend("hf", path, device="cpu", batch_size=32)
    reqs = [{"prompt": "What colour is the square?", "image": Image.new("RGB", (s, s), (200, 30, 30))}
            for s in (56, 84, 112, 140)]
    gen(reqs[:1], n=2, max_new_tokens=4, temperature=1.0)  # warm-up
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        out = gen(reqs, n=8, max_new_tokens=32, temperature=1.0, seed=r)
        times.append(time.perf_counter() - t)
        assert len(out) == 4 and all(len(o) == 8 for o in out)
        print(f"run {r}: {times[-1]:.3f} s for 4 prompts x 8 samples x 32 new tokens")
    med = statistics.median(times)
    print(f"median {med:.3f} s  (target 2 s: {med / 2:.2f}x of target; threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
