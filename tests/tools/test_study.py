"""The study tool (`eesmm_jax.tools.study`): the quick preset end to end writes every field of every
record, a rerun skips finished runs, the evaluations score planted features at 100% and at
chance, the FLOPs column is the flops module's count times the steps, and the tables pair and
mark cells as documented."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eesmm_jax import finetune, train
from eesmm_jax.data import tfdata
from eesmm_jax.tools import flops
from eesmm_jax.tools import study
from tests import FAST_COMPILE

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

FIELDS = {"method": str, "num_mix": int, "epochs": (int, float), "seed": int, "ablation": str,
          "steps": int, "batch_size": int, "flops_per_step": float, "pretrain_flops": float,
          "pretrain_seconds": float, "probe_acc": float, "knn_acc": float, "finetune_acc": float,
          "workdir": str, "fingerprint": str}
QUICK = study.PRESETS["quick"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The quick preset's command, run once for the module as a person runs it (one CPU device,
  not the tests' eight): (out dir, records, console output)."""
  out = str(tmp_path_factory.mktemp("study"))
  env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
  done = subprocess.run([sys.executable, "-m", "eesmm_jax.tools.study", "--preset", "quick", "--out",
                         out], env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(out, "study.json")) as f:
    return out, json.load(f), done.stdout


def test_study_json_holds_the_runs_and_the_baselines(quick):
  _, study_json, _ = quick
  assert study_json["preset"] == "quick" and study_json["runs_not_started"] == []
  assert (study_json["train_examples"], study_json["test_examples"]) == (1437, 360)
  base = study_json["baselines"]
  # Raw pixels on the digits: a linear probe and a k-NN well above chance.
  assert 0.5 < base["pixels"]["probe_acc"] <= 1.0 and 0.5 < base["pixels"]["knn_acc"] <= 1.0
  scratch = [r for r in study_json["runs"] if r["method"] == "scratch"]
  assert base["scratch"]["finetune_acc"]["seeds"] == len(scratch) == len(QUICK.seeds)
  assert base["scratch"]["finetune_acc"]["mean"] == pytest.approx(
      np.mean([r["finetune_acc"] for r in scratch]))
  assert base["random_init"]["probe_acc"]["mean"] == pytest.approx(
      np.mean([r["probe_acc"] for r in scratch]))
  figure = study_json["figure"]
  with Image.open(os.path.join(quick[0], figure["path"])) as png:
    assert png.size[0] > 5 * 32 and png.size[1] > figure["test_images"] * 32


def test_quick_preset_writes_every_field_of_every_record(quick):
  out, study_json, console = quick
  records = study_json["runs"]
  # The console is the progress line alone: the trainers' lines and library logs are in the
  # runs' console.log files.
  assert console and all(line.startswith("study: ") for line in console.splitlines())
  assert len(records) == len(study.grid(QUICK, ablations=False))
  for r in records:
    for key, kind in FIELDS.items():
      assert isinstance(r[key], kind), (key, r)
    assert r["method"] in ("scratch", "simmim", "eesmm")
    assert r["num_mix"] == {"scratch": 0, "simmim": 1}.get(r["method"], r["num_mix"])
    for key in ("probe_acc", "knn_acc", "finetune_acc"):
      assert 0.0 <= r[key] <= 1.0
    pretrained = r["method"] != "scratch"
    assert (r["steps"] > 0 and r["pretrain_flops"] > 0 and r["pretrain_seconds"] > 0) == pretrained
    assert os.path.isfile(os.path.join(r["workdir"], "record.json"))
  cells = {}
  for r in records:
    cells.setdefault((r["method"], r["num_mix"], r["epochs"]), set()).add(r["seed"])
  assert {m for m, _, _ in cells} == {"scratch", "simmim", "eesmm"}
  assert all(len(seeds) >= len(QUICK.seeds) for seeds in cells.values())
  with open(os.path.join(out, "study.md")) as f:
    text = f.read()
  assert "## At equal epochs" in text and "## Differences" in text
  with Image.open(os.path.join(out, "study.png")) as png:
    assert png.size[0] > 500 and png.size[1] > 500


def test_rerun_skips_finished_runs(quick, monkeypatch):
  """A rerun trains nothing: the records are read back and the figure's encoders restored
  from their checkpoints."""
  out, study_json, _ = quick
  calls = []
  monkeypatch.setattr(train, "pretrain", lambda *a, **k: calls.append("pretrain"))
  monkeypatch.setattr(finetune, "run", lambda *a, **k: calls.append("finetune"))
  monkeypatch.setattr(study, "_KEPT", {})
  again = study.main(["--preset", "quick", "--out", out])
  assert calls == []
  assert again["runs"] == study_json["runs"] and again["baselines"] == study_json["baselines"]
  assert again["figure"] == study_json["figure"]


def test_flops_column_is_the_flops_count_times_the_steps(quick):
  out, study_json, _ = quick
  records = study_json["runs"]
  data_dir = os.path.join(out, "digits")
  per_step = {}
  for r in records:
    if r["method"] == "scratch":
      continue
    config = study.pretrain_config(QUICK, study.Run(r["method"], r["num_mix"], r["epochs"],
                                                    r["seed"]), data_dir)
    if r["num_mix"] not in per_step:
      per_step[r["num_mix"]] = flops.step_flops(config)
    steps = int(r["epochs"] * (tfdata.num_examples(config.data) // QUICK.batch_size))
    assert r["steps"] == steps
    assert r["pretrain_flops"] == pytest.approx(per_step[r["num_mix"]] * steps, rel=1e-9)
  assert len(per_step) == len(QUICK.budgets)


def test_planted_features_score_100_percent_and_constant_ones_chance(quick):
  """Real digits labels, planted features: one-hot of the label is a perfect extractor (100%
  for the probe and the k-NN); a constant one leaves only chance (one class's share, ~10%)."""
  out, _, _ = quick
  images = study.eval_images(QUICK, os.path.join(out, "digits"))
  labels = {split: np.concatenate([b["label"][b["mask"]] for b in batches])
            for split, batches in images.items()}
  assert (len(labels["train"]), len(labels["test"])) == (1437, 360)
  planted = lambda make: [(make(y), y) for y in (labels["train"], labels["test"])]
  perfect = study.frozen_scores(*planted(lambda y: np.eye(10)[y]))
  assert perfect == {"probe_acc": 1.0, "knn_acc": 1.0}
  constant = study.frozen_scores(*planted(lambda y: np.ones((len(y), 8))))
  largest_class = np.bincount(labels["test"]).max() / len(labels["test"])
  for accuracy in constant.values():
    assert 0.05 < accuracy <= largest_class < 0.15


def record(method, n, epochs, seed, cost, acc, ablation=""):
  return dict(method=method, num_mix=n, epochs=epochs, seed=seed, ablation=ablation,
              pretrain_flops=cost, pretrain_seconds=cost / 1e9, probe_acc=acc, knn_acc=acc,
              finetune_acc=acc)


def test_tables_pair_equal_epochs_equal_compute_and_mark_the_seed_spread():
  """SimMIM costs 1 per epoch, EESMM n=2 0.55: n=2 at 2 epochs meets SimMIM at 1 (x1.10) and
  n=2 at 8 meets nothing (x2.2 > 1.5 from SimMIM at 2)."""
  records = [record("scratch", 0, 0, s, 0.0, 0.5 + 0.01 * s) for s in range(3)]
  for e in (1, 2):
    records += [record("simmim", 1, e, s, e * 1.0, 0.70 + 0.01 * s) for s in range(3)]
  for e in (1, 2, 8):
    records += [record("eesmm", 2, e, s, e * 0.55, 0.71 + 0.01 * s) for s in range(3)]
  records += [record("eesmm", 2, 2, s, 1.1, 0.9, "rotate=True") for s in range(3)]
  cells = study.summarize(records)
  pairs = {(what, study.cell_label(a), study.cell_label(b)) for what, a, b in
           study.comparisons(cells)}
  assert ("equal epochs", "EESMM n=2 1 ep", "SimMIM 1 ep") in pairs
  assert ("equal compute (FLOPs x1.10)", "EESMM n=2 2 ep", "SimMIM 1 ep") in pairs
  assert not any(b == "SimMIM 2 ep" and "compute" in what for what, _, b in pairs)
  assert ("ablation", "EESMM n=2 2 ep (rotate=True)", "EESMM n=2 2 ep") in pairs
  assert len([p for p in pairs if p[0] == "vs random init / scratch"]) == 5
  by_label = {study.cell_label(c): c for c in cells}
  # +1 point with std 1 on each side: inside the spread; +20 points with 0 and 1: beyond it.
  assert not study.beyond_spread(by_label["EESMM n=2 1 ep"], by_label["SimMIM 1 ep"], "knn_acc")
  assert study.beyond_spread(by_label["EESMM n=2 2 ep (rotate=True)"], by_label["EESMM n=2 2 ep"],
                             "knn_acc")
  study_json = dict(preset="quick", quick=False, command="python -m eesmm_jax.tools.study ...",
                    runs=records, runs_not_started=[], baselines=dict(
                        pixels=dict(probe_acc=0.6, knn_acc=0.6)))
  text = study.markdown(study_json, QUICK, 1.0)
  assert "| ablation | EESMM n=2 2 ep (rotate=True) | EESMM n=2 2 ep | **+18.0** |" in text


def test_sweep_points_parse_and_bad_ones_are_refused_in_one_line():
  assert study.sweep_point("2e-3:15") == (2e-3, 15.0)
  for bad in ("2e-3", "0:15", "x:1", "1e-3:-2"):
    with pytest.raises(ValueError, match=r"--sweep .*expected LR:EPOCHS"):
      study.sweep_point(bad)


def test_sweep_reports_each_point_on_a_quiet_console(tmp_path):
  """`--sweep` on a Fashion-MNIST preset (planted IDX files): one line per point with its top-1,
  sweep.json agreeing with it, and nothing of TensorFlow's start-up on stderr (clu's writer
  imports TensorFlow, whose oneDNN line TF_CPP_MIN_LOG_LEVEL does not keep out)."""
  from tests.data.test_idx import plant
  root = plant(str(tmp_path / "fm"))
  out = str(tmp_path / "sweep")
  env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
  env.pop("TF_ENABLE_ONEDNN_OPTS", None)
  done = subprocess.run([sys.executable, "-m", "eesmm_jax.tools.study", "--preset", "cpu-fashion",
                         "--quick", "--data_dir", root, "--out", out, "--sweep", "1e-3:0.05"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "oneDNN" not in done.stderr and "port.cc" not in done.stderr, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert all(line.startswith("study: ") for line in lines), done.stdout
  with open(os.path.join(out, "sweep.json")) as f:
    (row,) = json.load(f)
  assert (row["lr"], row["epochs"]) == (1e-3, 0.05) and 0.0 <= row["finetune_acc"] <= 1.0
  assert any(f"lr 0.001, 0.05 epochs: top-1 {100 * row['finetune_acc']:.2f}%" in line
             for line in lines), done.stdout


def test_gpu_preset_runs_quick_through_its_launcher_without_tensorflow(tmp_path):
  """`QUICK=1 launch/study_gpu.sh OUT` on planted IDX files, where TensorFlow, TFDS,
  scikit-learn, clu and matplotlib cannot be imported (a stock accelerator image has none of
  them): the whole grid at its tiny size, every record with every label fraction, the baselines,
  the reconstruction figure, and one line for the study.png it cannot draw."""
  from tests.data.test_idx import plant
  root = plant(str(tmp_path / "fm"))
  blocked = tmp_path / "blocked"
  blocked.mkdir()
  (blocked / "sitecustomize.py").write_text(
      "import sys\nfor name in ('tensorflow', 'tensorflow_datasets', 'sklearn', 'clu', "
      "'matplotlib'):\n  sys.modules[name] = None\n")
  out = str(tmp_path / "study")
  env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "QUICK": "1", "DATA_DIR": root,
         "PYTHONPATH": str(blocked), "PYTHON": sys.executable}
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  done = subprocess.run(["bash", "launch/study_gpu.sh", out], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(out, "log.txt")) as f:
    log = f.read()
  assert log and all(line.startswith("study: ") for line in log.splitlines()), log
  assert "matplotlib is not installed" in log
  with open(os.path.join(out, "study.json")) as f:
    study_json = json.load(f)
  preset = study.PRESETS["gpu-fashion"].quick_version()
  assert study_json["preset"] == "gpu-fashion" and study_json["quick"]
  assert len(study_json["runs"]) == len(study.grid(preset, ablations=False))
  for r in study_json["runs"]:
    for key in study.FRACTION_KEYS.values():
      assert 0.0 <= r[key] <= 1.0, (key, r)
  base = study_json["baselines"]
  assert base["pixels"]["probe_acc"] == 1.0  # the planted classes are separable in the pixels
  assert all(base["scratch"][key]["seeds"] == len(preset.seeds)
             for key in study.FRACTION_KEYS.values())
  assert os.path.isfile(os.path.join(out, study_json["figure"]["path"]))
  assert not os.path.exists(os.path.join(out, "study.png"))


def test_gpu_launcher_without_the_idx_files_names_the_install_command(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  done = subprocess.run(["bash", "launch/study_gpu.sh", str(tmp_path / "out")], cwd=repo,
                        env={**os.environ, "DATA_DIR": str(tmp_path)}, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
  assert "apt-get install dataset-fashion-mnist" in done.stderr and str(tmp_path) in done.stderr
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
