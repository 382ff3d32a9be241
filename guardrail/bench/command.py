"""`guardrail bench run | score | calibrate`: a typer sub-app mounted by cli.py.

Exit codes as elsewhere: 0 ran (failed videos are reported, not fatal), 2 bad usage."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from guardrail.console import (
    Engine_,
    MaxFrames_,
    ProgressBar,
    Sampling_,
    VllmOption_,
    err,
    guarded,
    out,
    quiet_transformers,
    vllm_settings,
)

bench_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Evaluate a model and policy set on a labelled video set.")
Dataset_ = Annotated[Path, typer.Option(
    "--dataset", help="SafeWatch-Bench folder, or a .jsonl manifest.")]
Calibration_ = Annotated[Path | None, typer.Option(
    help="Calibration file to apply to the scores before scoring.")]
Json_ = Annotated[bool, typer.Option("--json", help="Print metrics as JSON; no progress bar.")]


@bench_app.command("run")
@guarded
def bench_run(
    dataset: Dataset_,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (resumable).")],
    model: Annotated[str | None, typer.Option(help="Model directory or hub id.")] = None,
    policy: Annotated[list[Path] | None, typer.Option(
        help="Policy YAML; repeat to combine sets (default policies/safewatch.yaml).")] = None,
    mode: Annotated[str, typer.Option(help="fast | explain | explain_flagged")] = "fast",
    layout: Annotated[str, typer.Option(
        help="sequential | parallel | parallel_cached | isolated")] = "parallel",
    keep_ratio: Annotated[float | None, typer.Option(help="Visual token keep ratio.")] = None,
    frames: Annotated[int, typer.Option(help="Frames per window.")] = 8,
    window: Annotated[float | None, typer.Option(help="Window length in seconds.")] = None,
    sampling_mode: Sampling_ = "uniform",
    max_frames: MaxFrames_ = None,
    max_new_tokens: Annotated[int, typer.Option(help="Bound on generated tokens.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    decoder: Annotated[str, typer.Option(help="Video decoder: auto | decord | pyav")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Only the first N videos.")] = None,
    batch: Annotated[int, typer.Option(
        "--batch-size", "--batch",
        help="Videos per engine call (their windows share forward passes).")] = 1,
    prefetch: Annotated[int, typer.Option(
        help="Groups of videos decoded ahead of the model, on other threads (0: decode each "
             "group when the model is ready for it).")] = 2,
    ray: Annotated[bool, typer.Option("--ray", help="Spread videos over Ray workers.")] = False,
    ray_workers: Annotated[int, typer.Option(help="Ray workers, one engine each.")] = 2,
    ray_cpus: Annotated[float, typer.Option(help="CPUs per Ray worker.")] = 1.0,
    ray_gpus: Annotated[float, typer.Option(help="GPUs per Ray worker.")] = 0.0,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: the running Ray, or a new local one).")] = None,
    calibration: Calibration_ = None,
    engine_name: Engine_ = "transformers",
    vllm_option: VllmOption_ = None,
    as_json: Json_ = False,
):
    """Judge every video of the dataset, then write predictions.jsonl, metrics.json, report.md."""
    from guardrail.bench.datasets import load_dataset
    from guardrail.bench.predictions import PREDICTIONS
    from guardrail.bench.runner import EngineSpec, RayOptions, run
    from guardrail.engine import DEFAULT_POLICY
    from guardrail.policy import load_policies
    from guardrail.video import SamplingConfig

    quiet_transformers()
    data = load_dataset(dataset).limit(limit)
    pset = load_policies(policy or [DEFAULT_POLICY])
    options = [("layout", layout), ("mode", mode), ("max_new_tokens", max_new_tokens),
               ("sampling", SamplingConfig(mode=sampling_mode, num_frames=frames,
                                           window_s=window, max_frames=max_frames)),
               ("decoder", decoder)]
    if keep_ratio is not None:
        options.append(("keep_ratio", keep_ratio))
    spec = EngineSpec(model, pset, device, dtype, tuple(options), engine_name,
                      tuple(sorted((vllm_settings(vllm_option) or {}).items())))
    ray_opts = RayOptions(ray_workers, ray_cpus, ray_gpus, ray_address) if ray else None
    try:
        with ProgressBar(enabled=not as_json and sys.stderr.isatty()) as bar:
            result = run(data, spec, out_dir, ray=ray_opts, batch=batch, prefetch=prefetch,
                         on_start=lambda todo, done: bar.start(todo,
                                                               f"judging ({done} done before)"),
                         on_done=lambda _: bar.step(), on_group=bar.tracker)
    except KeyboardInterrupt:
        err.print(f"interrupted; every video judged so far is kept in {out_dir / PREDICTIONS}: "
                  "run the same command again to go on", markup=False)
        raise typer.Exit(130) from None
    waited = (f" (waiting for decoded videos {result.input_wait_s:.1f} s)"
              if result.input_wait_s is not None and result.judged else "")
    err.print(f"judged {result.judged} videos, {result.failed} failed, {result.skipped} already "
              f"done, in {result.elapsed_s:.1f} s{waited}", markup=False)
    _score_and_report([out_dir / PREDICTIONS], data, out_dir, calibration, as_json)


@bench_app.command("score")
@guarded
def bench_score(
    predictions: Annotated[list[Path], typer.Option(
        help="predictions.jsonl; repeat to compare several runs side by side.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    dataset: Annotated[Path | None, typer.Option(
        help="SafeWatch-Bench folder or .jsonl manifest (default: labels in the predictions).")
    ] = None,
    calibration: Calibration_ = None,
    as_json: Json_ = False,
):
    """Write metrics.json and report.md; with several prediction files, one per run (scored on
    the videos they all have) plus comparison.md, and print one side-by-side table."""
    from guardrail.bench.datasets import load_dataset

    data = load_dataset(dataset) if dataset is not None else None
    _score_and_report(predictions, data, out_dir, calibration, as_json)


@bench_app.command("calibrate")
@guarded
def bench_calibrate(
    predictions: Annotated[Path, typer.Option(help="predictions.jsonl of a labelled split.")],
    dataset: Annotated[Path | None, typer.Option(
        help="Labels from this dataset (default: labels in the predictions).")] = None,
    method: Annotated[str, typer.Option(help="temperature | platt")] = "temperature",
    policy: Annotated[Path | None, typer.Option(
        help="Store beside this policy file (x.yaml -> x.calibration.json), where "
             "--calibration auto finds it; not guardrail's own policies folder.")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Store in this model directory (calibration/<policy_set>.json).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Store here instead.")] = None,
):
    """Fit per-category score calibration on a labelled split; print ECE before and after.
    Stored beside the predictions (<policy_set>.calibration.json) unless --policy, --model or
    --out says where."""
    from guardrail import calibration as cal_mod
    from guardrail.bench.datasets import load_dataset
    from guardrail.bench.predictions import join, read_predictions
    from guardrail.errors import UsageError

    preds, _ = read_predictions(predictions)
    already = [p.video_path for p in preds.values() if p.verdict.calibrated]
    if already:
        raise UsageError(f"{predictions}: {len(already)} verdicts (e.g. {already[0]}) have "
                         "calibrated scores; fit on raw scores (judge without --calibration), "
                         "a calibration is applied to raw scores")
    rows, _ = join(preds, load_dataset(dataset) if dataset is not None else None)
    if not len(rows.labels):
        raise UsageError(f"{predictions}: no labelled predictions to fit on")
    first = next(iter(preds.values())).verdict
    cal = cal_mod.fit(rows.scores, rows.matrix(rows.labels), rows.category_ids, method,
                      policy_set=first.policy_set, model=first.model)
    path = out_file or cal_mod.default_path(policy=policy, model=model,
                                            policy_set=first.policy_set, beside=predictions)
    cal_mod.check_writable_place(path)
    cal_mod.save(cal, path)
    out.print(f"{method} calibration of {len(rows.category_ids)} categories on "
              f"{cal.n_videos} videos: ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}; "
              f"wrote {path}", markup=False)
    for cid, counts in cal.info.items():
        out.print(f"  {cid}: {counts['n']} labelled videos, {counts['n_pos']} positive, "
                  f"{counts['n'] - counts['n_pos']} negative", markup=False)
    for warning in cal_mod.fit_warnings(cal):
        err.print(f"warning: {warning}", markup=False)


# ----------------------------------------------------------------------------- helpers

def _score_and_report(files: list[Path], data, out_dir: Path, calibration: Path | None,
                      as_json: bool) -> None:
    from guardrail.bench.compare import common_videos, names, table, to_markdown
    from guardrail.bench.report import write_report
    from guardrail.bench.score import score, write_metrics
    from guardrail.calibration import load

    cal = load(calibration) if calibration is not None else None
    only = common_videos(files) if len(files) > 1 else None
    runs = []
    for f, name in zip(files, names(files), strict=True):
        scored = score(f, data, calibration=cal, name=name, only=only)
        where = out_dir if len(files) == 1 else out_dir / name
        write_metrics(scored.metrics, where)
        write_report(scored, where)
        runs.append(scored)
    header, rows = table(runs)
    if len(files) > 1:
        (out_dir / "comparison.md").write_text(
            f"# Comparison on {len(only or ())} common videos\n\n" + to_markdown(header, rows))
    if as_json:
        for r in runs:
            print(json.dumps({"name": r.name, **r.metrics}))
        return
    grid = Table(*header, title=f"metrics ({out_dir})")
    for row in rows:
        grid.add_row(*row)
    out.print(grid)
    for r in runs:
        for warning in r.metrics["warnings"]:
            label = f" ({r.name})" if len(runs) > 1 else ""
            out.print(f"[bold yellow]warning{escape(label)}:[/] {escape(warning)}")


if __name__ == "__main__":  # pragma: no cover - `python -m guardrail.bench.command run ...`
    bench_app()
