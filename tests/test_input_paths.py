"""Every input path of every stage is checked before any model loads: a missing file or folder stops the stage
with one line naming the flag and the path (vlaa.runs.check_inputs), never a traceback after the models load."""

import importlib
from types import SimpleNamespace

import pytest

import toy
from vlaa import runs, training

caption, distill, verify, sft, grpo, evaluate = (importlib.import_module(m) for m in (
    "01_caption", "02_distill", "03_rewrite_verify", "04_sft", "05_grpo", "06_eval"))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the check must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input paths were checked")

    monkeypatch.setattr(training, "load_trainable", refuse)
    monkeypatch.setattr(training, "init_distributed", refuse)
    monkeypatch.setattr(evaluate, "make_judge", refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    toy.make_data(str(root), n=8, test_n=0, seed=0, responses=True)
    return str(root / "train.jsonl")


@pytest.mark.parametrize("stage", ["04", "05"])
@pytest.mark.parametrize("flag,what", [("--data", "does not exist"), ("--eval-data", "does not exist"),
                                       ("--image-root", "does not exist"), ("--model", "does not exist")])
def test_training_stages_name_the_missing_flag_and_path(stage, flag, what, tmp_path, data, tiny_model_dir,
                                                        no_model_loads, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/... is a local path then, not a hub id
    argv = {"--model": tiny_model_dir, "--data": data, "--out": str(tmp_path / "out")}
    argv[flag] = "runs/nothing/here" if flag == "--model" else str(tmp_path / "held_out.jsonl")
    if flag == "--eval-data":
        argv["--eval-every"] = "1"  # --eval-data alone is a usage error (flags.check_training), before any path
    main = sft.main if stage == "04" else grpo.main
    with pytest.raises(SystemExit, match=f"^{flag} {argv[flag]}: {what} "):
        main([x for kv in argv.items() for x in kv])


def test_a_folder_where_a_file_is_expected(tmp_path, tiny_model_dir, no_model_loads):
    with pytest.raises(SystemExit, match=f"^--data {tmp_path}: is not a file "):
        grpo.main(["--model", tiny_model_dir, "--data", str(tmp_path), "--out", str(tmp_path / "out")])


def test_data_stages_check_before_their_backend(tmp_path, data, monkeypatch):
    import vlaa.datastage

    monkeypatch.setattr(vlaa.datastage, "backend_from_args", lambda *a: pytest.fail("backend built first"))
    missing = str(tmp_path / "missing.jsonl")
    for main, extra in [(caption.main, []), (distill.main, []), (verify.main, [])]:
        with pytest.raises(SystemExit, match=f"^--in {missing}: does not exist"):
            main(["--in", missing, "--out", str(tmp_path / "o.jsonl"), *extra])
    with pytest.raises(SystemExit, match="^--prompt-file nope.txt: does not exist"):
        caption.main(["--in", data, "--out", str(tmp_path / "c.jsonl"), "--prompt-file", "nope.txt"])
    with pytest.raises(SystemExit, match="^--model ./no/such/model: does not exist"):
        distill.main(["--in", data, "--out", str(tmp_path / "d.jsonl"), "--backend", "hf",
                      "--model", "./no/such/model"])


def test_eval_checks_data_dir_and_model(tmp_path, tiny_model_dir, no_model_loads):
    with pytest.raises(SystemExit, match=f"^--data-dir {tmp_path}/none: does not exist"):
        evaluate.main(["--model", tiny_model_dir, "--bench", "toy", "--data-dir", f"{tmp_path}/none",
                       "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=f"^--model {tmp_path}/m: does not exist"):
        evaluate.main(["--model", f"{tmp_path}/m", "--backend", "hf", "--out", str(tmp_path / "e")])


def test_hub_ids_pass_and_local_looking_paths_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs.check_inputs(SimpleNamespace(model="Qwen/Qwen2.5-VL-3B-Instruct", rm=None), models=("model", "rm"))
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="^--model runs/tiny: does not exist"):
        runs.check_inputs(SimpleNamespace(model="runs/tiny"), models=("model",))


def test_check_images_lists_what_is_missing_by_folder(tmp_path, capsys):
    import json

    from PIL import Image

    from vlaa import records

    (tmp_path / "images" / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "coco" / "train2017" / "1.jpg")
    (tmp_path / "images" / "vg").mkdir()
    (tmp_path / "images" / "vg" / "2.jpg").write_text("not an image")
    rows = [{"image": "coco/train2017/1.jpg"}, {"image": "coco/train2017/9.jpg"}, {"image": "vg/2.jpg"},
            {"image": "vg/VG_100K/3.jpg"}, {"question": "no image"}]
    data = tmp_path / "released.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = records.check_images(str(data), str(tmp_path / "images"))
    assert {k: len(v) for k, v in problems.items()} == {"coco/train2017": 1, "vg/2.jpg": 1, "vg/VG_100K": 1,
                                                        "(no image field)": 1}
    assert "5 records, 4 with an image missing or unreadable" in capsys.readouterr().out
    (tmp_path / "complete.json").write_text(json.dumps(rows[0]) + "\n")
    assert records.check_images(str(tmp_path / "complete.json"), str(tmp_path / "images")) == {}
