"""The `guardrail` command line. Exit codes: 0 ran, 2 bad usage or policy, 3 bad video.

Every command turns a `GuardrailError` into one line on stderr and its exit code; nothing a
user can cause ends in a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from guardrail.bench.command import bench_app
from guardrail.console import (
    Engine_,
    MaxFrames_,
    MaxGap_,
    MinShot_,
    ProgressBar,
    SampleFps_,
    Sampling_,
    VllmOption_,
    err,
    fail,
    guarded,
    out,
    quiet_transformers,
    vllm_settings,
)
from guardrail.errors import PolicyError, UsageError, VideoError
from guardrail.prompt import LAYOUTS

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Video safety guardrail: judge videos against policy YAML.")
policy_app = typer.Typer(no_args_is_help=True, help="Author and check policy sets.")
video_app = typer.Typer(no_args_is_help=True, help="Inspect what the model will see.")
model_app = typer.Typer(no_args_is_help=True, help="Make and convert models.")
app.add_typer(policy_app, name="policy")
app.add_typer(video_app, name="video")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

# ---------------------------------------------------------------------------------- policy

@policy_app.command("validate")
@guarded
def policy_validate(files: Annotated[list[Path], typer.Argument(help="Policy YAML files.")]):
    """Check policy files; print `ok FILE`, or `file:line: key: message` lines and exit 2."""
    from guardrail.policy import load_policy

    failed = False
    for path in files:
        try:
            pset = load_policy(path)
        except PolicyError as error:
            failed = True
            for line in error.messages:
                err.print(line, markup=False, soft_wrap=True)
            continue
        n = len(pset.categories)
        out.print(f"ok {path} ({pset.name} v{pset.version}, {n} categor{'y' if n == 1 else 'ies'})",
                  markup=False)
    if failed:
        raise typer.Exit(2)


@policy_app.command("render")
@guarded
def policy_render(
    file: Annotated[Path, typer.Argument(help="A policy YAML file.")],
    layout: Annotated[str, typer.Option(help=f"One of {', '.join(LAYOUTS)}.")] = "parallel",
    style: Annotated[str, typer.Option(help="Prompt style: default | safewatch.")] = "default",
):
    """Print the policy chunks and the full prompt text as the model sees it."""
    from guardrail.policy import load_policy
    from guardrail.prompt import STYLES, build_prompt, check_layout, render_prompt

    check_layout(layout)
    if style not in STYLES:
        raise UsageError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    prompt = build_prompt(load_policy(file), style=style)
    # NOTE: the texts go to stdout as they are (never through rich, which rewraps lines at the
    # terminal width): what is printed is what the model reads, byte for byte.
    for i, chunk in enumerate(prompt.chunks, 1):
        _rule(f"chunk {i}/{len(prompt.chunks)}: {prompt.keys[i - 1]}")
        _exact(chunk)
    _rule(f"full prompt ({layout})")
    _exact(render_prompt(prompt, layout))
    _rule("verdict probes (one per category, parallel, at the answer position)")
    for probe in prompt.probes:
        _exact(probe + "\n")


@policy_app.command("schema")
@guarded
def policy_schema():
    """Print the JSON Schema of the policy YAML (for editors: see docs/policies.md)."""
    from guardrail.policy_tools import schema

    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


@policy_app.command("lint")
@guarded
def policy_lint(
    files: Annotated[list[Path], typer.Argument(help="Policy YAML files.")],
    model: Annotated[str | None, typer.Option(
        help="Count with this model's tokenizer and check its context (no weights load).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report.")] = False,
):
    """Per category the chunk's tokens, per layout the prompt's tokens against the model's
    context, and warnings to act on. Exit 0 with warnings, 2 when a prompt cannot fit or a file
    is invalid."""
    from guardrail.errors import PolicyError
    from guardrail.policy import load_policy
    from guardrail.policy_lint import Report, estimate, lint, model_counter

    count, tokenizer, context = (model_counter(model) if model else
                                 (estimate, "an estimate (4 characters per token; --model "
                                  "counts exactly)", None))
    reports = []
    for f in files:
        try:
            reports.append(lint(load_policy(f), str(f), count, tokenizer, context))
        except PolicyError as err:
            reports.append(Report(str(f), tokenizer, errors=list(err.messages)))
    if as_json:
        sys.stdout.write(json.dumps({"files": [r.json() for r in reports]}) + "\n")
    else:
        out.print(f"tokens counted with {tokenizer}", markup=False)
        for r in reports:
            _print_lint(r)
    if any(r.errors for r in reports):
        raise typer.Exit(2)


def _print_lint(r) -> None:
    fit = f" (context {r.context:,})" if r.context else ""
    out.print(f"{r.file}: " + ", ".join(f"{k} {v:,}" for k, v in r.prompt_tokens.items())
              + f" prompt tokens{fit}", markup=False)
    for c in r.categories:
        out.print(f"  {c['id']}: {c['tokens']:,} tokens", markup=False)
    for w in r.warnings:
        out.print(f"  warning: {w}", markup=False)
    for e in r.errors:
        err.print(f"{r.file}: {e}" if not e.startswith(r.file) else e, markup=False)


@policy_app.command("test")
@guarded
def policy_test(
    file: Annotated[Path, typer.Argument(help="The policy YAML to test.")],
    examples: Annotated[Path, typer.Option(
        help="JSONL manifest: {\"video\": path, \"labels\": [category ids]} per line.")],
    model: Annotated[str | None, typer.Option(help="Model directory or hub id.")] = None,
    against: Annotated[Path | None, typer.Option(
        help="Another version of the set: list the examples whose verdict changes.")] = None,
    layout: Annotated[str, typer.Option(help=f"One of {', '.join(LAYOUTS)}.")] = "parallel",
    frames: Annotated[int, typer.Option(help="Frames per window.")] = 8,
    sampling_mode: Sampling_ = "uniform",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    engine_name: Engine_ = "transformers",
    vllm_option: VllmOption_ = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
):
    """Judge labelled example videos with the set: per example expected vs flagged, per
    category precision and recall, and with --against which examples change verdict."""
    from guardrail.bench.datasets import load_dataset
    from guardrail.engine import GuardEngine
    from guardrail.policy import load_policy
    from guardrail.policy_test import report
    from guardrail.video import SamplingConfig

    quiet_transformers()
    policies, data = load_policy(file), load_dataset(examples)
    old = load_policy(against) if against is not None else None
    engine = GuardEngine.from_pretrained(model, policies=policies, device=device, layout=layout,
                                         sampling=SamplingConfig(mode=sampling_mode,
                                                                 num_frames=frames),
                                         engine=engine_name, vllm=vllm_settings(vllm_option))
    runs = len(data.videos()) * (2 if old is not None else 1)
    with ProgressBar(enabled=not as_json and sys.stderr.isatty()) as bar:
        bar.start(runs, "judging examples")
        got = report(engine, policies, data, old, on_video=bar.step)
    if as_json:
        sys.stdout.write(json.dumps(got) + "\n")
        return
    table = Table("video", "expected", "flagged", "")
    for e in got["examples"]:
        ids = e["flagged_ids"]
        mark = "error" if ids is None else ("ok" if set(ids) == set(e["labels"]) else "DIFF")
        table.add_row(e["video"], ", ".join(e["labels"]) or "-",
                      e.get("error", "") if ids is None else (", ".join(ids) or "-"), mark)
    out.print(table)
    cats = Table("category", "precision", "recall", "tp", "fp", "fn")
    for cid, m in got["per_category"].items():
        def pct(x):
            return "-" if x is None else f"{x:.2f}"
        cats.add_row(cid, pct(m["precision"]), pct(m["recall"]), str(m["tp"]), str(m["fp"]),
                     str(m["fn"]))
    out.print(cats)
    for c in got.get("changed", []):
        out.print(f"changed: {c['video']}: {', '.join(c['before']) or '-'} -> "
                  f"{', '.join(c['after']) or '-'}", markup=False)
    if old is not None and not got["changed"]:
        out.print(f"no example changes verdict against {against}", markup=False)
    for warning in got["warnings"]:
        out.print(f"[bold yellow]warning:[/] {escape(warning)}")


@policy_app.command("diff")
@guarded
def policy_diff(
    old: Annotated[Path, typer.Argument(help="The policy file in use.")],
    new: Annotated[Path, typer.Argument(help="The edited policy file.")],
    as_json: Annotated[bool, typer.Option("--json", help="The diff as one JSON object.")] = False,
):
    """Semantic diff by category id: added, removed and changed categories with the changed
    fields. Reordering categories is no change (it changes no verdict)."""
    from guardrail.policy import load_policy
    from guardrail.policy_tools import diff

    a, b = load_policy(old), load_policy(new)
    d = diff(a, b)
    if as_json:
        sys.stdout.write(json.dumps(d) + "\n")
        return
    names = {c.id: c.name for c in [*a.categories, *b.categories]}
    for cid in d["added"]:
        out.print(f"+ {cid} ({names[cid]})", markup=False)
    for cid in d["removed"]:
        out.print(f"- {cid} ({names[cid]})", markup=False)
    for c in d["changed"]:
        out.print(f"~ {c['id']} ({names[c['id']]}): {', '.join(c['fields'])}", markup=False)
    if (a.name, a.version) != (b.name, b.version):
        out.print(f"set: {a.name} v{a.version} -> {b.name} v{b.version}", markup=False)
    if not any(d.values()):
        out.print(f"no category changes ({a.name} v{a.version} -> {b.name} v{b.version})",
                  markup=False)


def _rule(title: str) -> None:
    out.file.flush()
    sys.stdout.write(f"----- {title} -----\n")


def _exact(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- video

@video_app.command("probe")
@guarded
def video_probe(
    video: Annotated[Path, typer.Argument(help="A video file.")],
    frames: Annotated[int, typer.Option(help="Frames sampled per window.")] = 8,
    window: Annotated[float | None, typer.Option(help="Window length in seconds.")] = None,
    sampling_mode: Sampling_ = "uniform",
    sample_fps: SampleFps_ = 1.0,
    max_frames: MaxFrames_ = None,
    min_shot: MinShot_ = 0.5,
    max_gap: MaxGap_ = 5.0,
    decoder: Annotated[str, typer.Option(help="auto | decord | pyav")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
):
    """Show container, codec, playback duration, fps, size, and the frames sampled per window
    with their presentation times (coverage: also the shots found)."""
    from guardrail.video import SamplingConfig, plan_video

    try:
        planned = plan_video(video, SamplingConfig(
            mode=sampling_mode, num_frames=frames, window_s=window, fps=sample_fps,
            max_frames=max_frames, min_shot_s=min_shot, max_gap_s=max_gap), backend=decoder)
    except VideoError as error:
        raise fail(error, str(video)) from None
    info, windows = planned.info, [c.window for c in planned.clips]
    if as_json:
        data = {"video": str(video), **info.__dict__, "sampling": planned.sampling,
                "shots": planned.shots, "warnings": list(planned.warnings),
                "windows": [{"start_s": w.start_s, "end_s": w.end_s, "indices": list(w.indices),
                             "timestamps_s": list(w.timestamps_s)} for w in windows]}
        print(json.dumps(data))
        return
    out.print(f"[bold]{video}[/]: {info.container} / {info.codec}, {info.width}x{info.height}, "
              f"{info.duration_s:.2f} s at {info.fps:.2f} fps, {info.num_frames} frames, "
              f"{info.num_bytes} bytes, decoder {info.backend}, sampling {planned.sampling}"
              + (f", {planned.shots} shots" if planned.shots is not None else ""))
    for warning in planned.warnings:
        out.print(f"warning: {warning}", markup=False)
    table = Table("window", "start_s", "end_s", "frame indices", "timestamps (s)")
    for i, w in enumerate(windows):
        table.add_row(str(i), f"{w.start_s:.2f}", f"{w.end_s:.2f}",
                      " ".join(map(str, w.indices)),
                      " ".join(f"{t:.2f}" for t in w.timestamps_s))
    out.print(table)


# ---------------------------------------------------------------------------------- model

@model_app.command("make-tiny")
@guarded
def model_make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    family: Annotated[str, typer.Option(
        help="qwen2_5_vl | qwen2_vl | qwen3_vl | internvl")] = "qwen2_5_vl",
    seed: Annotated[int, typer.Option(help="Weight seed; same seed, same files.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option(
        help="A Qwen tokenizer directory (tokenizer.json ...) to use instead of the built-in "
             "tiny one; the vocabulary then has its real size.")] = None,
):
    """Write a tiny random model + tokenizer + processor (for tests and dry runs only)."""
    from guardrail.tiny import make_tiny

    quiet_transformers()
    path = make_tiny(out_dir, family, seed=seed, tokenizer=tokenizer)
    out.print(f"wrote a tiny random {family} model to {path} (its verdicts are meaningless)")


@model_app.command("convert")
@guarded
def model_convert(
    src: Annotated[Path, typer.Argument(help="Original InternVL2-chat checkpoint (SafeWatch-8B).")],
    dst: Annotated[Path, typer.Argument(help="Directory to write the native model into.")],
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
):
    """Convert an original InternVL2-chat checkpoint to a native transformers InternVL model."""
    from guardrail.convert import convert

    quiet_transformers()
    path = convert(src, dst, dtype=dtype)
    out.print(f"wrote a native InternVL model to {path}; run it with "
              f"`guardrail check VIDEO --model {path}`", markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------- check

@app.command("check")
@guarded
def check(
    videos: Annotated[list[Path], typer.Argument(help="Video files to judge.")],
    model: Annotated[str | None, typer.Option(
        help="Model directory or hub id (default: $GUARDRAIL_MODEL or Qwen2.5-VL-7B).")] = None,
    policy: Annotated[list[Path] | None, typer.Option(
        help="Policy YAML; repeat to combine sets (default: the shipped safewatch set).")] = None,
    mode: Annotated[str, typer.Option(help="fast | explain | explain_flagged")] = "fast",
    layout: Annotated[str, typer.Option(help=f"One of {', '.join(LAYOUTS)}.")] = "parallel",
    prompt_style: Annotated[str, typer.Option(
        help="default | safewatch (SafeWatch's own prompt, for SafeWatch-8B)")] = "default",
    keep_ratio: Annotated[float, typer.Option(
        help="Share of video tokens kept by policy-aware pruning; 1.0 = off.")] = 1.0,
    pruning_mode: Annotated[str, typer.Option(help="kv | pre_prefill")] = "kv",
    frames: Annotated[int, typer.Option(help="Frames per window.")] = 8,
    window: Annotated[float | None, typer.Option(
        help="Judge long videos in windows of this many seconds.")] = None,
    sampling_mode: Sampling_ = "uniform",
    sample_fps: SampleFps_ = 1.0,
    max_frames: MaxFrames_ = None,
    min_shot: MinShot_ = 0.5,
    max_gap: MaxGap_ = 5.0,
    batch_size: Annotated[int, typer.Option(
        help="Windows judged together in one forward pass, over all the videos given.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Bound on generated tokens.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    decoder: Annotated[str, typer.Option(help="Video decoder: auto | decord | pyav")] = "auto",
    calibration: Annotated[str | None, typer.Option(
        help="Score calibration: auto (beside the policy file or in the model dir) or a "
             "file from `guardrail bench calibrate`; off by default.")] = None,
    engine_name: Engine_ = "transformers",
    vllm_option: VllmOption_ = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON verdict per line.")] = False,
):
    """Judge each video against the policy set; print one verdict per video, in order."""
    from guardrail.engine import GuardEngine
    from guardrail.policy import load_policies
    from guardrail.video import SamplingConfig, VideoLimits, check_media, load_media
    from guardrail.video.prefetch import prefetch

    quiet_transformers()
    sampling = SamplingConfig(mode=sampling_mode, num_frames=frames, window_s=window,
                              fps=sample_fps, max_frames=max_frames, min_shot_s=min_shot,
                              max_gap_s=max_gap)
    # one file goes by path, so `--calibration auto` finds the calibration file beside it
    policies = policy[0] if policy and len(policy) == 1 else (
        load_policies(policy) if policy else None)
    bad = 0
    good = []
    for path in videos:          # every input before the model loads (minutes at 7B)
        try:
            check_media(path, VideoLimits())
            good.append(path)
        except VideoError as error:
            bad += 1
            fail(error, str(path))
    if not good:
        raise typer.Exit(VideoError.exit_code)
    videos = good
    engine = GuardEngine.from_pretrained(
        model, policies=policies, device=device, dtype=dtype, layout=layout, mode=mode,
        prompt_style=prompt_style,
        keep_ratio=keep_ratio, pruning_mode=pruning_mode, batch_size=batch_size,
        sampling=sampling, max_new_tokens=max_new_tokens, decoder=decoder,
        calibration=calibration, engine=engine_name, vllm=vllm_settings(vllm_option))
    def decode(paths: list[Path]) -> tuple[list[tuple[Path, object]], object]:
        """(path, Video or the VideoError) of each, and the readable ones prepared for the
        engine (None where it refuses them; judging them then reports why): runs ahead of the
        model, on a thread."""
        out = []
        for path in paths:
            try:
                out.append((path, load_media(path, sampling, engine.config.limits, decoder)))
            except VideoError as error:
                out.append((path, error))
        return out, engine.prepare_or_none([v for _, v in out if not isinstance(v, VideoError)])

    batches = [videos[s: s + batch_size] for s in range(0, len(videos), batch_size)]
    with ProgressBar(enabled=not as_json and sys.stderr.isatty()) as bar:
        bar.start(len(videos))
        for _, (results, prepared) in prefetch(batches, decode):   # the next batch decodes
            decoded = []                                            # and prepares meanwhile
            for path, got in results:
                if isinstance(got, VideoError):
                    bad += 1
                    with bar.aside():
                        fail(got, str(path))
                    bar.step()
                else:
                    decoded.append((path, got))
            if not decoded:
                continue
            verdicts = engine.check_batch(prepared or [v for _, v in decoded],
                                          progress=bar.tracker(len(decoded)))
            bar.step(len(decoded))
            with bar.aside():
                for (path, _), verdict in zip(decoded, verdicts, strict=True):
                    if as_json:
                        print(verdict.model_dump_json(), flush=True)
                    else:
                        _print_verdict(path, verdict)
    if bad:
        raise typer.Exit(VideoError.exit_code)


@app.command("serve")
@guarded
def serve_cmd(
    model: Annotated[str | None, typer.Option(help="Model directory or hub id.")] = None,
    config: Annotated[Path | None, typer.Option(
        help="Serve config (default deploy/serve.yaml).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
):
    """Start the HTTP service on a local Ray; ready when GET /healthz answers 200."""
    from guardrail.serve.command import serve

    quiet_transformers()
    serve(model, config, host, port)


def _print_verdict(path: Path, verdict) -> None:
    status = "[bold red]FLAGGED[/]" if verdict.flagged else "[bold green]ok[/]"
    calibrated = "calibrated" if verdict.calibrated else "uncalibrated"
    out.print(f"{path}: {status}  ({verdict.policy_set} v{verdict.policy_version}, "
              f"{verdict.layout}/{verdict.mode}, {calibrated}, {verdict.video.frames_used} "
              f"frames, {verdict.timing_ms.total:.0f} ms)")
    for warning in verdict.warnings:
        out.print(f"[bold yellow]warning:[/] {escape(warning)}")
    table = Table("id", "category", "score", "threshold", "flagged")
    for c in verdict.categories:
        table.add_row(c.id, c.name, f"{c.score:.3f}", f"{c.threshold:.2f}",
                      "[red]yes[/]" if c.flagged else "no")
    out.print(table)
    if len(verdict.segments) > 1:
        for s in verdict.segments:
            out.print(f"  {s.start_s:7.1f}-{s.end_s:7.1f} s  flagged: "
                      f"{', '.join(s.flagged_ids) or '-'}", markup=False)
    if verdict.description is not None:
        out.print(f"DESCRIPTION: {verdict.description}", markup=False)
        out.print(f"EXPLANATION: {verdict.explanation}", markup=False)


def main() -> None:  # pragma: no cover - console script entry
    try:
        app()
    except UsageError as error:
        raise SystemExit(fail(error).exit_code) from None


if __name__ == "__main__":  # pragma: no cover
    main()
