"""The table a run ends with: per-domain validation, what the sample weights cost and did, where things are."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dograph.reporting import format_seconds, markdown_table

if TYPE_CHECKING:
    from dograph.data.sources import Corpus
    from dograph.mixing import Mixer
    from dograph.train.trainer import TrainResult


def validation_rows(final_eval: dict[str, Any], corpus: Corpus) -> list[list[Any]]:
    rows = [[d, share, final_eval[f"val/{d}/loss"], final_eval[f"val/{d}/ppl"]]
            for d, share in zip(corpus.domains, corpus.natural_mixture, strict=True)]
    rows.append(["average (natural mixture)", 1.0, final_eval["val/avg_loss"], final_eval["val/avg_ppl"]])
    return rows


def print_weight_summary(result: TrainResult, corpus: Corpus) -> None:
    """What the sample weights cost (ESS) and did (effective vs sampled human-domain mixture)."""
    summary = result.weight_summary
    if not summary.steps:
        return
    sampled, effective = summary.mean_mixtures()
    print(f"\nSample weights over {summary.steps} reweighted steps: effective sample size "
          f"(sum v_i)^2 / (B sum v_i^2) mean {summary.mean_ess:.3f}, min {summary.ess_min:.3f} (1 = every sample "
          "counts equally)")
    rows = [[d, share, s, e, e - s] for d, share, s, e in
            zip(corpus.domains, corpus.natural_mixture, sampled, effective, strict=True)]
    print(markdown_table(["domain", "natural share", "sampled (batch share)", "effective (sum of weights)",
                          "effective - sampled"], rows))


def print_run_summary(result: TrainResult, corpus: Corpus, mixer: Mixer, run_dir: Path,
                      export: Path | None) -> None:
    """The table a run ends with: per-domain validation loss and perplexity, and where things are."""
    print("\nValidation (loss = mean token cross-entropy in nats; ppl = exp(loss))")
    print(markdown_table(["domain", "natural share", "val loss", "val ppl"],
                         validation_rows(result.final_eval, corpus)))
    state = result.state
    print(f"\nsteps: {state.step} ({state.skipped_steps} skipped)   tokens seen: {state.tokens_seen:,}   "
          f"training time: {format_seconds(state.elapsed)} (+ validation {format_seconds(state.eval_time_s)}, "
          f"checkpoints {format_seconds(state.ckpt_time_s)})")
    print_weight_summary(result, corpus)
    for title, text in mixer.summary().items():
        print(f"\n{title}\n{text}")
    print(f"\nrun directory: {run_dir}")
    print("  metrics.jsonl, checkpoints/, .hydra/config.yaml (resolved config), run_info.json"
          + (", hf/ (AutoModelForCausalLM.from_pretrained loads it)" if export is not None else ""))
