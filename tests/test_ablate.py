import csv
import json
import math
import re
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from litattn.ablate import ablate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"document {i}. " + "def f(x):\n    return x * 2\n" * (100 + 10 * i))
    return folder


def smoke(out_dir: Path, corpus: Path, cache: Path, **extra) -> Path:
    """config_hub/ablations/smoke.yaml, on a small corpus."""
    import yaml

    spec = yaml.safe_load((ROOT / "config_hub/ablations/smoke.yaml").read_text())
    spec["base"] = str(ROOT / spec["base"])
    spec["overrides"].update(
        data={"class_path": "litattn.data.TextFiles", "init_args": {"train_dirs": [str(corpus)]}},
        cache_dir=str(cache),
    )
    return ablate(**{**spec, "out_dir": out_dir, **extra})


def test_smoke_grid_produces_tables_and_plots_and_a_rerun_finishes_only_missing_runs(tmp_path, corpus):
    out = smoke(tmp_path / "grid", corpus, tmp_path / "cache")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], r["seed"]) for r in rows} == {
        (v, s) for v in ("causal", "causal-masked-sdpa") for s in ("1", "2")
    }
    by_key = {(r["variant"], r["seed"]): float(r["final_val_loss"]) for r in rows}
    for seed in ("1", "2"):  # the masked kernel with an all-visible window is the same function
        assert by_key[("causal-masked-sdpa", seed)] == pytest.approx(by_key[("causal", seed)], abs=1e-4)
    assert by_key[("causal", "1")] != by_key[("causal", "2")]  # seeds differ
    table = (out / "results.md").read_text()
    assert "| causal | 2 |" in table and "± " in table
    for r in rows:  # each row is its run's own summary
        summary = json.loads((out / r["variant"] / f"seed-{r['seed']}" / "summary.json").read_text())
        assert float(r["final_val_loss"]) == pytest.approx(summary["val_loss"], abs=1e-9)
        assert int(r["steps"]) == summary["step"] == 6 and int(r["params_added"]) == 0  # the budget; same model
    main_table = table.split("\n\n")[0]  # the paired differences follow in a table of their own
    cells = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in main_table.splitlines() if line[:2] == "| "}
    assert "| causal-masked-sdpa | +0.0000 [" in table.split("**difference to causal**")[1]
    for variant in ("causal", "causal-masked-sdpa"):  # mean ± sample std over the seeds, from the csv rows
        losses = [by_key[(variant, seed)] for seed in ("1", "2")]
        mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / 2**0.5
        assert cells[variant][1].strip() == f"{mean:.4f} ± {std:.4f}"
        ppl = [math.exp(loss) for loss in losses]  # the ppl column: mean and spread of each run's perplexity
        assert cells[variant][2].strip() == f"{sum(ppl) / 2:.2f} ± {statistics.stdev(ppl):.2f}"
    for png in ("loss_curves.png", "summary.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 300 and image.std() > 0.05

    # the evaluation stage on the finished grid: no run retrains; Self-Extend equals causal within its window and
    # reaches (64 - 32) * 2 + 32 = 96 tokens, where causal (block_size 64, no --context) is an error row
    perplexity_args = {
        "data": {"class_path": "litattn.data.TextFiles", "init_args": {"train_dirs": [str(corpus)]}},
        "cache_dir": str(tmp_path / "cache"),
        "lengths": [16, 96],
        "max_batches": 1,
        "micro_batch_size": 2,
    }
    evaluate = {
        "attention": {"causal": {"name": "causal"}, "se": {"name": "self_extend", "group_size": 2, "window": 32}},
        "perplexity": perplexity_args,
    }
    smoke(tmp_path / "grid", corpus, tmp_path / "cache", evaluate=evaluate)
    with open(out / "evaluation.csv") as f:
        evaluated = list(csv.DictReader(f))
    assert len(evaluated) == 2 * 2 * 2 * 2  # variants x seeds x attention specs x lengths
    by_cell = {(r["variant"], r["seed"], r["attention"], r["length"]): r for r in evaluated}
    for (variant, seed, attention, length), r in by_cell.items():
        if length == "96":
            if attention == "causal":
                assert r["value"] == "" and "--context 96" in r["error"]
            else:
                assert float(r["value"]) > 1 and not r["error"]
        elif attention == "causal":
            extended = by_cell[(variant, seed, "se", length)]
            assert float(r["value"]) == pytest.approx(float(extended["value"]), rel=1e-4)
            saved = json.loads((out / variant / f"seed-{seed}" / "eval" / "causal" / "perplexity.json").read_text())
            assert float(r["value"]) == saved["results"][0]["perplexity"]
    md = (out / "evaluation.md").read_text()
    assert "| causal | causal |" in md and "n/a" in md
    assert matplotlib.image.imread(out / "evaluation.png").std() > 0.05
    evaluation_times = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/eval/*/perplexity.json")}
    smoke(tmp_path / "grid", corpus, tmp_path / "cache", evaluate=evaluate)  # nothing left to do: nothing rerun
    assert {p: p.stat().st_mtime_ns for p in evaluation_times} == evaluation_times

    # kill mid-grid, emulated: one run never finished (its summary and final/ are gone, a step checkpoint stays)
    interrupted = out / "causal-masked-sdpa" / "seed-2"
    (interrupted / "summary.json").unlink()
    import shutil

    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "step-00000006")
    untouched = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    smoke(tmp_path / "grid", corpus, tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # finished runs were skipped
    assert "Resumed from" in (interrupted / "log.txt").read_text()
    assert not (interrupted / "eval").exists()  # evaluations of the checkpoint it replaced are gone
    with open(out / "results.csv") as f:
        rerun = {(r["variant"], r["seed"]): float(r["final_val_loss"]) for r in csv.DictReader(f)}
    assert rerun.keys() == by_key.keys()
    # the resumed run continues exactly where it stopped: the same final loss as the uninterrupted run
    assert rerun == pytest.approx(by_key, abs=1e-5)


def test_dry_run_lists_the_plan_and_runs_nothing(tmp_path, capsys):
    from litattn.cli import main

    main(
        [
            "ablate",
            "--config",
            str(ROOT / "config_hub/ablations/smoke.yaml"),
            "--out_dir",
            str(tmp_path / "dry"),
            "--dry_run",
            "true",
        ]
    )
    out = capsys.readouterr().out
    assert "causal/seed-1" in out and "causal-masked-sdpa/seed-2" in out
    assert not any((tmp_path / "dry").glob("*/seed-*/summary.json"))


def test_a_misspelt_variant_key_fails_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="not a valid pretrain recipe"):
        ablate(
            base=ROOT / "config_hub/pretrain/debug.yaml",
            variants={"bad": {"train": {"max_step": 3}}},
            seeds=[1],
            out_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="Unknown attention mechanism 'nope'"):
        ablate(
            base=ROOT / "config_hub/pretrain/debug.yaml",
            variants={"bad": {"model": {"attention": {"name": "nope"}}}},
            seeds=[1],
            out_dir=tmp_path,
        )


def test_evaluation_tables_from_result_files(tmp_path):
    """Passkey accuracy pools the depths; cells are mean ± sample std over seeds; an error in any seed is n/a."""
    from litattn import ablate_evaluate
    from litattn.ablate import Run

    runs = [Run("v", seed, tmp_path / f"seed-{seed}") for seed in (1, 2)]
    evaluations = ablate_evaluate.plan({"attention": {"se": {"name": "self_extend"}}, "passkey": {}}, runs)
    correct = {1: (2, 1), 2: (0, 1)}  # seed -> correct answers at depth 0 and depth 1, of 2 trials each
    for e in evaluations:
        e.directory.mkdir(parents=True)
        cells = [{"correct": c, "trials": 2, "digit_accuracy": 0.2 * (c + 1)} for c in correct[e.run.seed]]
        rows = [{"length": 256, "cells": cells}, {"length": 512, "cells": cells}]
        if e.run.seed == 2:
            rows[1] = {"length": 512, "error": "too long"}
        e.result_file.write_text(json.dumps({"results": rows}))
    rows = ablate_evaluate.rows(evaluations)
    accuracy = [(r["seed"], r["length"], r["value"]) for r in rows if r["kind"] == "passkey"]
    assert accuracy == [(1, 256, 0.75), (1, 512, 0.75), (2, 256, 0.25), (2, 512, None)]
    digits = [(r["seed"], r["length"], r["value"]) for r in rows if r["kind"] == "passkey_digits"]
    assert digits == [(1, 256, pytest.approx(0.5)), (1, 512, pytest.approx(0.5)), (2, 256, pytest.approx(0.3)),
                      (2, 512, None)]  # fmt: skip
    table = ablate_evaluate.markdown(rows, [1, 2])
    accuracy_table, digits_table = table.split("**passkey digit accuracy")
    assert f"| v | se | 0.50 ± {statistics.stdev([0.75, 0.25]):.2f} (0.75, 0.25) | n/a |" in accuracy_table
    assert f"| v | se | 0.40 ± {statistics.stdev([0.5, 0.3]):.2f} (0.50, 0.30) | n/a |" in digits_table
    assert "difference to" not in table  # one attention label: nothing to pair


def test_evaluation_pairs_each_label_with_the_baseline_by_seed_and_pools_depths(tmp_path):
    from litattn import ablate_evaluate
    from litattn.ablate import Run

    runs = [Run("v", seed, tmp_path / f"seed-{seed}") for seed in (1, 2, 3)]
    spec = {"attention": {"causal": {"name": "causal"}, "se": {"name": "self_extend"}}, "passkey": {}}
    evaluations = ablate_evaluate.plan({**spec, "baseline": "causal"}, runs)
    correct = {  # (seed, label) -> correct answers of 4 at depth 0 and depth 1, length 256 then 512
        (1, "causal"): [(4, 4), (0, 1)], (2, "causal"): [(4, 3), (1, 0)], (3, "causal"): [(3, 4), (0, 0)],
        (1, "se"): [(4, 4), (3, 4)], (2, "se"): [(4, 4), (2, 3)], (3, "se"): [(4, 3), (4, 4)],
    }  # fmt: skip
    for e in evaluations:
        e.directory.mkdir(parents=True)
        rows = [
            {"length": n, "cells": [{"correct": c, "trials": 4, "digit_accuracy": c / 4} for c in pair]}
            for n, pair in zip((256, 512), correct[(e.run.seed, e.label)], strict=True)
        ]
        e.result_file.write_text(json.dumps({"results": rows, "depths": [0.0, 1.0]}))
    table = ablate_evaluate.markdown(ablate_evaluate.rows(evaluations), [1, 2, 3], "causal")
    # per seed at 512: se 7/8, 5/8, 8/8 against causal 1/8, 1/8, 0/8: differences 0.75, 0.5, 1.0
    diffs = [0.75, 0.5, 1.0]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    mean = statistics.mean(diffs)
    accuracy = table.split("**passkey accuracy: difference to causal**")[1].split("**")[0]
    # at 256: se 8/8, 8/8, 7/8 against causal 8/8, 7/8, 7/8: differences 0, 0.125, 0
    diffs_256 = [0.0, 0.125, 0.0]
    half_256 = 4.303 * statistics.stdev(diffs_256) / math.sqrt(3)
    assert (
        f"| v | se | +0.04 [{0.125 / 3 - half_256:+.2f}, {0.125 / 3 + half_256:+.2f}] "
        f"| +{mean:.2f} [+{mean - half:.2f}, +{mean + half:.2f}] * |" in accuracy
    )
    assert "| v | causal |" not in accuracy  # the baseline is not compared with itself
    with pytest.raises(ValueError, match="evaluate.baseline 'casual' is not one of the attention labels"):
        ablate_evaluate.plan({**spec, "baseline": "casual"}, runs)

    grids = ablate_evaluate.depth_accuracy(evaluations)
    assert list(grids) == [("v", "causal"), ("v", "se")]
    assert grids[("v", "se")]["correct"].tolist() == [[12, 11], [9, 11]]  # summed over seeds
    assert grids[("v", "se")]["trials"].tolist() == [[12, 12], [12, 12]]
    ablate_evaluate.plot_depths(grids, tmp_path / "depths.png")
    assert matplotlib.image.imread(tmp_path / "depths.png").std() > 0.05


def test_answers_evaluations_pair_variants_with_the_baseline_variant(tmp_path):
    """`evaluate answers` rows (four kinds at the items' length); each variant against the baseline variant with
    the same attention label, paired by seed; each label against the baseline label in the same variant."""
    from litattn import ablate_evaluate
    from litattn.ablate import Run

    runs = [Run(v, seed, tmp_path / v / f"seed-{seed}") for v in ("mean", "focus") for seed in (1, 2, 3)]
    spec = {"attention": {"own": None, "rethink": {"rethink_every": 2}}, "answers": {"items": 4}}
    evaluations = ablate_evaluate.plan(spec, runs)
    exact = {  # (variant, label) -> exact match per seed
        ("mean", "own"): [0.25, 0.5, 0.25], ("mean", "rethink"): [0.5, 0.5, 0.5],
        ("focus", "own"): [0.5, 0.75, 0.75], ("focus", "rethink"): [0.75, 0.75, 1.0],
    }  # fmt: skip
    for e in evaluations:
        e.directory.mkdir(parents=True)
        value = exact[(e.run.variant, e.label)][e.run.seed - 1]
        row = {"length": 32, "answer_loss": 1.0 - value, "exact_match": value, "first_line_match": value,
               "token_f1": value}  # fmt: skip
        e.result_file.write_text(json.dumps({"results": [row]}))
    assert evaluations[0].config["out_file"] == str(evaluations[0].result_file)
    rows = ablate_evaluate.rows(evaluations)
    assert {r["kind"] for r in rows} == {"answer_loss", "exact_match", "first_line_match", "token_f1"}
    table = ablate_evaluate.markdown(rows, [1, 2, 3], "own", "mean")
    by_variant = table.split("**greedy exact match: difference to variant mean**")[1].split("**")[0]
    diffs = [0.25, 0.25, 0.5]  # focus - mean, own label, per seed
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert f"| focus | own | +{statistics.mean(diffs):.2f} [{statistics.mean(diffs) - half:+.2f}, " in by_variant
    assert "| mean |" not in by_variant  # the baseline variant is not compared with itself
    by_label = table.split("**greedy exact match: difference to own**")[1].split("**")[0]
    assert "| mean | rethink | +0.17 [" in by_label and "| focus | rethink | +0.17 [" in by_label
    loss = table.split("**answer loss (nats per answer token)** by length")[1].split("**")[0]
    assert "| mean | own | 0.6667 ± " in loss  # four decimals for a loss
    ablate_evaluate.write(rows, [1, 2, 3], tmp_path, "own", "mean")
    assert (tmp_path / "evaluation.png").is_file()


@pytest.mark.parametrize(
    "evaluate, message",
    [
        ({"perplexty": {}}, "unknown keys ['perplexty']"),
        ({"attention": {"x": {"name": "nope"}}, "passkey": {}}, "evaluate.attention.x: Unknown attention mechanism"),
        ({"passkey": {"trails": 3}}, "evaluate.passkey is not valid"),
        ({"attention": {"x": {"name": "causal"}}}, "names no evaluation"),
        ({"variants": ["casual"], "passkey": {}}, "evaluate.variants must be a list of this ablation's variants"),
    ],
)
def test_a_bad_evaluate_section_fails_before_any_run(tmp_path, evaluate, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ablate(
            base=ROOT / "config_hub/pretrain/debug.yaml",
            variants={"causal": {}},
            seeds=[1],
            out_dir=tmp_path,
            evaluate=evaluate,
        )
    assert not any(tmp_path.iterdir())


def test_evaluate_variants_chooses_whose_runs_are_evaluated(tmp_path):
    from litattn import ablate_evaluate
    from litattn.ablate import Run

    runs = [Run(v, seed, tmp_path / v / f"seed-{seed}") for v in ("a", "b", "c") for seed in (1, 2)]
    evaluations = ablate_evaluate.plan({"variants": ["c", "a"], "passkey": {}}, runs)
    assert [(e.run.variant, e.run.seed) for e in evaluations] == [("a", 1), ("a", 2), ("c", 1), ("c", 2)]
    assert len(ablate_evaluate.plan({"passkey": {}}, runs)) == 6  # default: every run
    # options without a name are checked against each chosen variant's mechanism
    trained = {"a": {"name": "hybrid"}, "b": {"name": "causal"}, "c": {"name": "hybrid", "iterations": 2}}
    grad = {"attention": {"g": {"refine_steps": 2}}, "passkey": {}}
    assert len(ablate_evaluate.plan({**grad, "variants": ["a", "c"]}, runs, trained)) == 4
    with pytest.raises(ValueError, match=re.escape("evaluate.attention.g (with variant 'b''s 'causal'): Unknown opt")):
        ablate_evaluate.plan(grad, runs, trained)


def test_own_data_and_seq_len_are_each_runs_own(tmp_path):
    """`data: own` and `seq_len: own` in an evaluation: each run evaluated on its own data module and length (a
    truncation row on its own cut), read from its config; other keys cannot be `own`; a run without one is an
    error before any work."""
    from litattn import ablate_evaluate
    from litattn.ablate import Run

    runs = [Run(v, seed, tmp_path / v / f"seed-{seed}") for v in ("left", "idf") for seed in (1, 2)]
    data = {v: {"class_path": "litattn.data.PyDocQA", "init_args": {"truncation": t}} for v, t in
            (("left", "input_left"), ("idf", "idf"))}  # fmt: skip
    configs = {r.name: {"data": data[r.variant], "train": {"max_seq_length": 64 * r.seed}} for r in runs}
    spec = {"answers": {"data": "own", "seq_len": "own", "items": 4}}
    evaluations = ablate_evaluate.plan(spec, runs, None, configs)
    got = [(e.run.name, e.config["data"]["init_args"]["truncation"], e.config["seq_len"]) for e in evaluations]
    assert got == [("left/seed-1", "input_left", 64), ("left/seed-2", "input_left", 128),
                   ("idf/seed-1", "idf", 64), ("idf/seed-2", "idf", 128)]  # fmt: skip
    assert all(e.config["items"] == 4 for e in evaluations)
    with pytest.raises(ValueError, match=re.escape("evaluate.answers.items: only data and seq_len may be `own`")):
        ablate_evaluate.plan({"answers": {"items": "own"}}, runs, None, configs)
    configs["idf/seed-2"]["train"] = {}
    with pytest.raises(ValueError, match=re.escape("evaluate.answers.seq_len is `own` but the run's recipe sets no")):
        ablate_evaluate.plan(spec, runs, None, configs)


def test_prepare_steps_run_once_per_seed_before_the_runs_that_need_them(tmp_path, corpus, capsys):
    """A `prepare` step pretrains a first stage per seed; the variants continue their seed's checkpoint. A rerun
    runs no step again; a misspelt option fails before any work; a step that does not make what it promises
    stops the ablation with its log."""
    data = ["--data", "TextFiles", "--data.train_dirs", f"[{corpus}]", "--cache_dir", str(tmp_path / "cache")]
    stage = str(tmp_path / "stage-1" / "seed-{seed}")
    command = ["pretrain", "--config", str(ROOT / "config_hub/pretrain/debug.yaml"), *data, "--seed", "{seed}"]
    command += ["--train.max_steps", "2", "--log.sample_prompt", "null", "--out_dir", stage]
    prepare = [{"command": command, "creates": f"{stage}/final"}]
    continued = {"initial_checkpoint_dir": f"{stage}/final"}
    out = smoke(tmp_path / "grid", corpus, tmp_path / "cache", prepare=prepare, variants={"causal": continued})
    for seed in (1, 2):
        assert (tmp_path / "stage-1" / f"seed-{seed}" / "final").is_dir()
        assert (out / "prepare" / f"1-seed-{seed}.log").is_file()
        config = (out / "causal" / f"seed-{seed}" / "run.yaml").read_text()
        assert f"stage-1/seed-{seed}/final" in config
    assert "prepare 1 seed 2: litattn pretrain" in capsys.readouterr().out
    smoke(tmp_path / "grid", corpus, tmp_path / "cache", prepare=prepare, variants={"causal": continued})
    rerun = capsys.readouterr().out
    assert "prepare 1 seed 2                         done" in rerun and "litattn pretrain" not in rerun

    with pytest.raises(ValueError, match=re.escape("prepare step 1 is not a valid litattn command")):
        smoke(tmp_path / "bad", corpus, tmp_path / "cache", prepare=[{"command": [*command, "--trian.x", "1"],
              "creates": "x"}])  # fmt: skip
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=re.escape("prepare step 1 must have exactly the keys command and creates")):
        smoke(tmp_path / "bad", corpus, tmp_path / "cache", prepare=[{"command": command}])
    other = [a.replace("stage-1", "stage-x") for a in command]
    broken = [{"command": other, "creates": str(tmp_path / "never-{seed}")}]
    with pytest.raises(RuntimeError, match=r"prepare 1 seed 1 failed \(it did not create .*never-1\); see "):
        smoke(tmp_path / "broken", corpus, tmp_path / "cache", prepare=broken)


def test_epoch_tables_show_validation_and_gap_at_epoch_ends(tmp_path):
    """Two seeds of 4 epochs x 2 steps, hand-written logs: the gap is val at the epoch's last step minus the mean
    training loss over its steps."""
    from litattn.ablate import Run, _epoch_tables

    runs = [Run("v", seed, tmp_path / f"seed-{seed}") for seed in (1, 2)]
    for run in runs:
        logs = run.directory / "logs" / "csv" / "version_0"
        logs.mkdir(parents=True)
        (run.directory / "summary.json").write_text(json.dumps({"step": 8, "epoch": 4}))
        lines = ["step,train_loss,val_loss"]
        for step in range(1, 9):
            lines.append(f"{step},{5 - step * 0.5 + run.seed},")
            if step % 2 == 0:
                lines.append(f"{step},,{4 + run.seed * 0.1}")
        (logs / "metrics.csv").write_text("\n".join(lines) + "\n")
    table = _epoch_tables(runs, ["v"])
    # epoch 2: steps 3, 4 -> train (3.5 + s + 3.0 + s) / 2 = 3.25 + s; val 4 + 0.1 s; gap 0.75 - 0.9 s
    gaps = [0.75 - 0.9 * s for s in (1, 2)]
    vals = [4.1, 4.2]
    val_table, gap_table = table.split("**validation - training loss**")
    assert "| variant | 1 | 2 | 3 | 4 |" in val_table
    cells = [line for line in gap_table.splitlines() if line.startswith("| v |")][0].split("|")
    assert cells[3].strip() == f"{statistics.mean(gaps):.3f} ± {statistics.stdev(gaps):.3f}"
    cells = [line for line in val_table.splitlines() if line.startswith("| v |")][0].split("|")
    assert cells[3].strip() == f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def test_figures_a_run_does_not_know_are_empty_cells_and_n_a_not_zero(tmp_path):
    """Issue 20, item 2: a summary with null figures (val_loss, tokens/s, memory) tabulates as empty cells and
    "n/a", over the runs that know them, and plots without a traceback."""
    from litattn.ablate import Run, report

    runs = [Run("v", seed, tmp_path / f"seed-{seed}") for seed in (1, 2, 3)]
    for run, (val, speed) in zip(runs, [(None, None), (4.0, 300.0), (4.2, None)], strict=True):
        logs = run.directory / "logs" / "csv" / "version_0"
        logs.mkdir(parents=True)
        (logs / "metrics.csv").write_text("step,tokens,train_loss\n1,256,5.0\n")
        summary = {"step": 1, "tokens": 256, "epoch": 0, "val_loss": val, "tokens_per_sec": speed}
        (run.directory / "summary.json").write_text(json.dumps({**summary, "peak_memory_bytes": None, "parameters": 9}))
    report(runs, ["v"], "v", [1, 2, 3], None, tmp_path)
    rows = results(tmp_path)
    assert [(r["final_val_loss"], r["tokens_per_sec"], r["peak_memory_gib"]) for r in rows] == [
        ("", "", ""),
        ("4.0", "300.0", ""),
        ("4.2", "", ""),
    ]
    cells = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| v |")]
    cells = [c.strip() for c in cells[0].split("|")[3:-2]]
    assert cells[0] == f"4.1000 ± {statistics.stdev([4.0, 4.2]):.4f} (2 of 3 runs)"
    assert cells[4:] == ["300 ± 0 (1 of 3 runs)", "n/a"]
    assert "n/a, or (k of n runs)" in (tmp_path / "results.md").read_text()
    assert matplotlib.image.imread(tmp_path / "summary.png").std() > 0.05


# ---------------------------------------------------------------------------------- a killed grid recovers
DRIVER = Path(__file__).with_name("fault_driver.py")
DETERMINISTIC = ["variant", "seed", "steps", "tokens", "final_val_loss", "final_val_ppl", "best_val_loss"]
DETERMINISTIC += ["train_val_gap", "parameters", "params_added"]


def killed_grid_spec(tmp_path: Path, corpus: Path, out: str) -> Path:
    """smoke.yaml as the recipes of disrupt-set, hybrid, truncation: no step checkpoints (`save_interval: null`),
    so a kill before final/ loses the run and one after it leaves only final/. One seed of two variants: with
    the whole-split final validation (`fv`) and with the last periodic one (`last`, as debug.yaml)."""
    import yaml

    spec = yaml.safe_load((ROOT / "config_hub/ablations/smoke.yaml").read_text())
    spec.update(base=str(ROOT / spec["base"]), out_dir=str(tmp_path / out), seeds=[1])
    spec["overrides"].update(
        data={"class_path": "litattn.data.TextFiles", "init_args": {"train_dirs": [str(corpus)]}},
        cache_dir=str(tmp_path.parent / "cache"),
        train={"save_interval": None},
    )
    spec["variants"] = {"fv": {"eval": {"final_validation": True}}, "last": {}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_a_grid_without_step_checkpoints_killed_at_any_phase_finishes_like_an_uninterrupted_one(tmp_path, corpus):
    """Issue 20, items 1, 2 and 4: the grid is killed (the whole process group, as a terminal's Ctrl-C or a
    kill of the job) in a metrics write, in the final validation, between final/ and summary.json, and while
    results.md is written; each rerun continues, and the last one only tabulates: the same results as a grid
    never interrupted, no traceback anywhere."""
    import subprocess
    import sys

    import yaml

    def grid(fault: str | None = None, phase: str | None = None) -> subprocess.CompletedProcess:
        command = [str(DRIVER), phase, fault] if fault else ["-m", "litattn"]
        return subprocess.run(
            [sys.executable, *command, "ablate", "--config", str(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            start_new_session=True,  # its own process group, which the faults signal
        )

    reference = yaml.safe_load(killed_grid_spec(tmp_path, corpus, "reference").read_text())
    ablate(**reference)
    spec = killed_grid_spec(tmp_path, corpus, "grid")
    out = tmp_path / "grid"
    fv, last = out / "fv" / "seed-1", out / "last" / "seed-1"
    outputs = []

    # killed in fv's 5th metrics row (step 4 of 6): fv has no checkpoint and starts again
    outputs.append(proc := grid("SIGKILL_group", "metrics@fv/seed-1"))
    assert proc.returncode == -9 and "[fault] SIGKILL_group during metrics" in (fv / "log.txt").read_text()
    assert not (fv / "final").exists() and not (fv / "summary.json").exists()

    # Ctrl-C in fv's final validation: fv saves final/ without it; ablate waits for it, then stops
    outputs.append(proc := grid("SIGINT_group", "final_validation@fv/seed-1"))
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "litattn: interrupted", proc.stderr
    assert (fv / "final").is_dir() and not (fv / "summary.json").exists()

    # killed between last's final/ and its summary.json; fv resumed from final/, ran its final validation
    outputs.append(proc := grid("SIGKILL_group", "summary@last/seed-1"))
    assert proc.returncode == -9 and (fv / "summary.json").is_file()
    assert (last / "final").is_dir() and not (last / "summary.json").exists()

    # killed while results.md is written; last resumed from final/ and wrote its summary
    outputs.append(proc := grid("SIGKILL", "results"))
    assert proc.returncode == -9 and list(out.glob(".results.md.*.tmp"))
    summary = json.loads((last / "summary.json").read_text())
    assert summary["val_loss"] is not None and summary["val_loss_is"].startswith("last val loss (2 batches, step 6)")
    assert summary["tokens_per_sec"] > 0 and summary["elapsed_s"] > 0 and summary["peak_memory_bytes"] > 0

    # the last rerun runs nothing and cleans up
    outputs.append(proc := grid())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running" not in proc.stdout and not list(out.glob(".*.tmp"))
    for run in (fv, last):
        outputs.append(subprocess.CompletedProcess([], 0, (run / "log.txt").read_text(), ""))
    assert not [p for p in outputs if "Traceback" in p.stdout + p.stderr]
    got, expected = results(out), results(tmp_path / "reference")
    assert [{k: r[k] for k in DETERMINISTIC} for r in got] == [{k: r[k] for k in DETERMINISTIC} for r in expected]
    assert all(float(r["tokens_per_sec"]) > 0 and float(r["peak_memory_gib"]) > 0 for r in got)
    assert summary["val_loss"] == pytest.approx(float(got[1]["final_val_loss"]), abs=0)
    assert "n/a" not in (out / "results.md").read_text()


def test_results_table_pairs_each_variant_with_the_baseline_by_seed():
    from litattn.ablate import _markdown

    def row(variant, seed, loss, gap=None):
        return {"variant": variant, "seed": seed, "final_val_loss": loss, "final_val_ppl": math.exp(loss),
                "best_val_loss": loss, "train_val_gap": gap, "tokens_per_sec": 100.0, "peak_memory_gib": 1.0,
                "params_added": 0}  # fmt: skip

    base = {1: 3.00, 2: 3.10, 3: 2.95}
    ssa = {1: 2.90, 2: 3.02, 3: 2.84}  # differences -0.10, -0.08, -0.11: consistent, so the interval excludes 0
    rows = [row("causal", s, v) for s, v in base.items()] + [row("ssa", s, v) for s, v in ssa.items()]
    rows += [row("noisy", 1, 3.10), row("noisy", 2, 3.00), row("noisy", 3, 2.95)]  # +0.10, -0.10, 0: no
    table = _markdown(rows, ["causal", "ssa", "noisy"], [1, 2, 3], None)
    diffs = [ssa[s] - base[s] for s in base]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    mean = statistics.mean(diffs)
    paired = table.split("**difference to causal**")[1]
    want = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] *"
    assert f"| ssa | {want} | {want} | n/a |" in paired  # the gap is unknown: n/a
    noisy = paired.split("| noisy | ")[1].split(" | ")[0]
    assert noisy.startswith("+0.0000 [") and not noisy.endswith("*")
    assert "| causal |" not in paired
    assert "**difference to ssa**" in _markdown(rows, ["causal", "ssa", "noisy"], [1, 2, 3], None, "ssa")


def test_seed_and_variant_placeholders_become_each_runs_own(tmp_path):
    from litattn.ablate import Run, _run_config

    recipe = {"initial_checkpoint_dir": "out/stage-1/{variant}/seed-{seed}/final", "train": {"max_steps": 5}}
    overrides = {"log": {"notes": ["seed {seed}", 3]}}
    config = _run_config(recipe, overrides, {}, {"max_steps": 7}, Run("ssa", 2, tmp_path / "ssa" / "seed-2"))
    assert config["initial_checkpoint_dir"] == "out/stage-1/ssa/seed-2/final"
    assert config["log"]["notes"] == ["seed 2", 3] and config["train"] == {"max_steps": 7} and config["seed"] == 2
