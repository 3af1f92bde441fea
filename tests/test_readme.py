"""Every toy command of the README runs as written: the ```bash blocks are read from README.md, the commands
that need a GPU, a server or the internet are left out by what they name (GPU_OR_NET), and the rest run in
README order with bash, in a scratch copy of the repository (runs/ and docs/ of its own). Only sizes shrink:
--max-steps to 2 and the toy data to 100 records, so the whole chain takes about two minutes."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

# what a command names when it cannot run here: GPUs, vLLM servers, hosted APIs, the hub, downloads, installs
GPU_OR_NET = ("torchrun", "Qwen/", "vllm serve", "hf download", "wget", "--backend openai", "--backend vllm",
              "--rollout vllm", "export ", "make ", "pip ", " data/", "deepseek", "--source", "tar ", "cat ", "shuf ",
              "...")


def readme_commands(text):
    """The commands of the README's bash blocks: continuation lines joined, a for-loop kept whole, comments out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        current, depth = "", 0
        for line in block.splitlines():
            line = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line + "\n"
            depth += len(re.findall(r"\bdo\b", line)) - len(re.findall(r"\bdone\b", line))
            if not line.endswith("\\") and depth == 0:
                commands.append(current.strip())
                current = ""
    return commands


def toy_commands(text):
    """The commands that run on the toy: in each block, those before the first that names GPU_OR_NET (the
    commands after it may read its outputs)."""
    out = []
    for block in re.findall(r"```bash\n.*?```", text, re.S):
        for c in readme_commands(block):
            if any(m in c for m in GPU_OR_NET):
                break
            out.append(c)
    return out


def test_the_readme_lists_its_toy_chain():
    commands = toy_commands(open(os.path.join(ROOT, "README.md")).read())
    names = [c.split()[1] if c.startswith("python ") else c.split()[0] for c in commands]
    for stage in ("toy.py", "01_caption.py", "02_distill.py", "03_rewrite_verify.py", "04_sft.py", "05_grpo.py", "for",
                  "-m"):
        assert stage in names, stage
    assert not any("Qwen/" in c or "torchrun" in c for c in commands)


@pytest.mark.slow
def test_every_toy_command_of_the_readme_runs_as_written(tmp_path):
    for name in os.listdir(ROOT):
        if name not in ("runs", "docs", ".git", ".venv") and not name.startswith(".venv"):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "docs").mkdir()
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", PYTHONPATH=ROOT)
    ran = []
    for command in toy_commands(open(os.path.join(ROOT, "README.md")).read()):
        small = re.sub(r"--max-steps \d+", "--max-steps 2", command.replace("--n 2000", "--n 100"))
        done = subprocess.run(["bash", "-c", small], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 10
    assert (tmp_path / "runs" / "grpo" / "model" / "config.json").exists()
    assert (tmp_path / "docs" / "ablation_loss_agg.png").exists()
