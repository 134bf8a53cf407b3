"""Downstream evaluation with lm-eval: the score rule, local tasks end to end, learning, no network, config."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from helpers import REPO

from dograph.config import EvalConfig, ModelConfig, RunConfig, TrainerConfig, to_run_config
from dograph.data.tokenizer import train_bpe
from dograph.errors import ConfigError, DataError
from dograph.eval.cli import load_run_config
from dograph.eval.cli import main as evaluate_main
from dograph.eval.downstream import eval_context, evaluate, lm_eval_command, run_lm_eval, select_score, summarize
from dograph.eval.tasks import LOCAL_TASKS, build_local_tasks
from dograph.models import build_model

# ---- the score rule ---------------------------------------------------------------------------------------


def test_acc_norm_where_present_else_acc_else_perplexity() -> None:
    both = {"alias": "hellaswag", "acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.35,
            "acc_norm_stderr,none": 0.02}
    acc_only = {"alias": "lambada_openai", "perplexity,none": 80.0, "perplexity_stderr,none": 3.0, "acc,none": 0.2,
                "acc_stderr,none": 0.005}
    rolling = {"alias": "wikitext", "word_perplexity,none": 120.0, "word_perplexity_stderr,none": "N/A",
               "byte_perplexity,none": 2.1, "bits_per_byte,none": 1.07}
    assert select_score(both) == ("acc_norm", 0.35, 0.02)
    assert select_score(acc_only) == ("acc", 0.2, 0.005)
    assert select_score(rolling) == ("word_perplexity", 120.0, None)
    raw = {"results": {"hellaswag": both, "lambada_openai": acc_only, "wikitext": rolling},
           "n-samples": {"hellaswag": {"original": 100, "effective": 10}}}
    result = summarize(raw, num_fewshot=0, limit=10)
    assert result.average == pytest.approx((0.35 + 0.2) / 2)  # the rolling task has no accuracy
    assert [s.n for s in result.scores] == [10, None, None]
    assert result.record()["downstream/hellaswag/stderr"] == 0.02
    assert result.compact()["tasks"]["wikitext"]["metric"] == "word_perplexity"


# ---- tiny models and local tasks ----------------------------------------------------------------------------


def tiny_model(tok, seed: int = 0) -> torch.nn.Module:
    shape = ModelConfig(n_layer=2, n_head=2, d_model=64, d_ff=128, max_position_embeddings=128)
    return build_model(shape, len(tok), bos_id=tok.eos_token_id, eos_id=tok.eos_token_id, seed=seed)


@pytest.fixture(scope="module")
def local_tokenizer(local_corpus: Path):
    texts = [json.loads(line)["text"] for path in sorted(local_corpus.glob("*.jsonl"))
             for line in path.read_text().splitlines()]
    return train_bpe(texts, 512)


@pytest.fixture
def eval_cfg(make_config) -> RunConfig:
    return make_config("eval=local", "eval.local_items=4", "eval.limit=6", "trainer.seq_len=64")


def test_local_tasks_end_to_end(eval_cfg: RunConfig, local_tokenizer, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = evaluate(tiny_model(local_tokenizer), local_tokenizer, eval_cfg, run_dir, step=4)
    scores = {s.task: s for s in result.scores}
    assert set(scores) == set(LOCAL_TASKS)
    assert scores["dograph_continuation"].metric == "acc_norm"
    assert scores["dograph_continuation_acc"].metric == "acc"
    assert scores["dograph_domain_rolling"].metric == "word_perplexity"
    assert scores["dograph_continuation"].n == 6
    raw = json.loads((run_dir / "eval" / "lm_eval.json").read_text())
    assert "acc_norm,none" in raw["results"]["dograph_continuation"]
    compact = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert compact["limit"] == 6 and compact["average"] == pytest.approx(result.average)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "downstream" and record["step"] == 4
    assert record["downstream/dograph_continuation/metric"] == "acc_norm"
    assert record["downstream/avg"] == pytest.approx(result.average)


def run_evaluate_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dograph.eval.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


@pytest.fixture
def saved_run(eval_cfg: RunConfig, local_tokenizer, tmp_path: Path) -> Path:
    """A run directory as training leaves it: hf/ export and run_info.json (the config without eval)."""
    run_dir = tmp_path / "saved"
    tiny_model(local_tokenizer).save_pretrained(str(run_dir / "hf"))
    local_tokenizer.save_pretrained(str(run_dir / "hf"))
    config = asdict(eval_cfg)
    config.pop("eval")  # a run from before the eval config group
    (run_dir / "run_info.json").write_text(json.dumps({"config": config}, default=str))
    (run_dir / "summary.json").write_text(json.dumps({"status": "complete", "steps": 7}))
    return run_dir


def test_cli_evaluates_a_saved_run(saved_run: Path) -> None:
    proc = run_evaluate_cli(str(saved_run), "eval=local", "eval.local_items=4", "eval.limit=5",
                            "eval.tasks=[dograph_continuation,dograph_domain_rolling]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| dograph_continuation | acc_norm |" in proc.stdout and "average" in proc.stdout
    scores = json.loads((saved_run / "eval" / "scores.json").read_text())
    assert set(scores["tasks"]) == {"dograph_continuation", "dograph_domain_rolling"}
    record = json.loads((saved_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "downstream" and record["step"] == 7


@pytest.mark.parametrize(("args", "expected"), [
    (["trainer.lr=1"], "only eval=NAME"),
    (["eval.limit=0"], "eval.limit must be > 0"),
])
def test_cli_refuses_bad_overrides_in_one_line(saved_run: Path, args: list[str], expected: str) -> None:
    proc = run_evaluate_cli(str(saved_run), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and expected in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def fsdp_run(saved_run: Path) -> Path:
    """The saved run as trained with trainer.parallelism=fsdp (lm-eval refused after training, hf/ exported)."""
    info = json.loads((saved_run / "run_info.json").read_text())
    info["config"]["trainer"]["parallelism"] = "fsdp"
    (saved_run / "run_info.json").write_text(json.dumps(info))
    return saved_run


def test_fsdp_run_is_evaluated_from_its_export(fsdp_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_run_config(fsdp_run, ["eval=local"]).trainer.parallelism == "fsdp"  # described as trained
    code = evaluate_main([str(fsdp_run), "eval=local", "eval.local_items=4", "eval.limit=3",
                          "eval.tasks=[dograph_continuation]", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    scores = json.loads((fsdp_run / "eval" / "scores.json").read_text())
    assert set(scores["tasks"]) == {"dograph_continuation"} and scores["limit"] == 3
    with pytest.raises(ConfigError, match=r"^eval\.tasks cannot run after training"):  # training still refuses it
        RunConfig(trainer=TrainerConfig(parallelism="fsdp"), eval=EvalConfig(tasks=["dograph_continuation"]))


def test_cli_without_export_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run_info.json").write_text(json.dumps({"config": {}}))
    proc = run_evaluate_cli(str(tmp_path), "eval=local")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds no model" in proc.stderr and "Traceback" not in proc.stderr


# ---- a trained model beats a random one ------------------------------------------------------------------


def test_trained_model_beats_random_on_a_task_it_can_learn(local_corpus: Path, tmp_path: Path) -> None:
    """Train on exactly the passages of a continuation task: accuracy far above a random model's (~1/4)."""
    docs = [json.loads(line)["text"] for line in (local_corpus / "docs.jsonl").read_text().splitlines()]
    passages = [doc[:110] for doc in docs if len(doc) >= 110][:24]  # one item each (60 + 30 characters)
    tasks = build_local_tasks(tmp_path / "tasks", {"a": passages[:12], "b": passages[12:]}, n_items=12, seed=1,
                              context_chars=60, ending_chars=30)
    tok = train_bpe(passages, 512)
    model = tiny_model(tok, seed=1)
    random_acc = _continuation_acc(model, tok, tasks)
    ids = [tok(p, add_special_tokens=False)["input_ids"][:128] for p in passages]
    width = max(len(row) for row in ids)
    batch = torch.tensor([row + [tok.eos_token_id] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):  # memorise the passages
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained_acc = _continuation_acc(model, tok, tasks)
    assert trained_acc > random_acc + 0.3, (random_acc, trained_acc, float(loss))


def _continuation_acc(model, tok, tasks: Path) -> float:
    raw = run_lm_eval(model, tok, ["dograph_continuation"], include_paths=[tasks], max_length=128)
    return select_score(raw["results"]["dograph_continuation"])[1]


# ---- no network ------------------------------------------------------------------------------------------------


def test_hub_task_without_network_is_one_line_data_error(local_tokenizer, saved_run: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        run_lm_eval(tiny_model(local_tokenizer), local_tokenizer, ["piqa"], include_paths=[])
    message = str(info.value)
    assert "\n" not in message and "piqa" in message and "HF_DATASETS_CACHE" in message
    with pytest.raises(ConfigError, match="piqa"):  # the index is cached now: an unknown name is cheap
        run_lm_eval(tiny_model(local_tokenizer), local_tokenizer, ["piqaa"], include_paths=[])
    proc = run_evaluate_cli(str(saved_run), "eval.tasks=[piqa]", env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: lm-eval task(s) piqa") and "HF_DATASETS_CACHE" in lines[-1]
    assert "Traceback" not in proc.stderr


# ---- lm-eval's own CLI -----------------------------------------------------------------------------------------


def wide_export(run_dir: Path, tok) -> Path:
    """An export with more positions (256) than the evaluation context of a seq_len=64 run (128)."""
    shape = ModelConfig(n_layer=2, n_head=2, d_model=64, d_ff=128, max_position_embeddings=256)
    model = build_model(shape, len(tok), bos_id=tok.eos_token_id, eos_id=tok.eos_token_id, seed=0)
    model.save_pretrained(str(run_dir / "hf"))
    tok.save_pretrained(str(run_dir / "hf"))
    return run_dir


def test_lm_eval_cli_command_sets_the_projects_context(eval_cfg: RunConfig, local_tokenizer, tmp_path: Path) -> None:
    """lm-eval's CLI parses the printed command into a model whose context is eval_context, not the export's."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.models.huggingface import HFLM

    run_dir = wide_export(tmp_path / "run", local_tokenizer)
    argv = shlex.split(lm_eval_command(eval_cfg, run_dir, ["dograph_continuation"], [tmp_path / "my tasks"]))
    assert argv[0] == "lm_eval"
    args = HarnessCLI()._parser.parse_args(["run", *argv[1:]])
    assert args.tasks == ["dograph_continuation"] and args.include_path == str(tmp_path / "my tasks")
    as_cli = HFLM.create_from_arg_obj(args.model_args, {"batch_size": 1, "device": "cpu"})
    plain = HFLM.create_from_arg_obj({"pretrained": str(run_dir / "hf")}, {"batch_size": 1, "device": "cpu"})
    assert as_cli.max_length == eval_context(eval_cfg) == 128
    assert plain.max_length == 256  # what the CLI uses without max_length: the export's n_positions


@pytest.mark.slow
def test_lm_eval_cli_reproduces_the_rolling_perplexity(eval_cfg: RunConfig, local_tokenizer, tmp_path: Path) -> None:
    """The printed command, run as is, gives the word perplexity of dograph.eval.downstream (docs/evaluation.md)."""
    from transformers import AutoModelForCausalLM

    run_dir = wide_export(tmp_path / "run", local_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf")).eval()
    cfg = eval_cfg.for_evaluation(EvalConfig(tasks=["dograph_domain_rolling"], limit=4, local_items=4))
    result = evaluate(model, local_tokenizer, cfg, run_dir)
    ours, argv = result.scores[0], shlex.split(result.command)
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), *argv[1:], "--device", "cpu",
                           "--output_path", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (result.command, proc.stderr[-2000:])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["dograph_domain_rolling"]
    assert ours.metric == "word_perplexity"
    assert results["word_perplexity,none"] == pytest.approx(ours.score, rel=1e-4)


# ---- config --------------------------------------------------------------------------------------------------


def test_eval_config_group() -> None:
    assert to_run_config(compose_config([])).eval.task_names == []
    paper = to_run_config(compose_config(["eval=paper"])).eval
    assert paper.task_names == ["hellaswag", "piqa", "openbookqa", "copa", "logiqa", "winogrande", "sciq",
                                "arc_easy", "lambada_openai"]
    assert to_run_config(compose_config(["eval.tasks=paper9"])).eval.task_names == paper.task_names
    assert to_run_config(compose_config(["eval=local"])).eval.task_names == list(LOCAL_TASKS)
    assert to_run_config(compose_config(["eval.tasks=[piqa,sciq]"])).eval.task_names == ["piqa", "sciq"]
    for override, key in (("eval.limit=0", "eval.limit"), ("eval.num_fewshot=-1", "eval.num_fewshot")):
        with pytest.raises(ConfigError, match=f"^{key} "):
            to_run_config(compose_config([override]))
